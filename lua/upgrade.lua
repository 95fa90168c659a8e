--[[
  Move one env's runs from the earlier layout (a hash per run,
  mf:{env}:run:<run_id>, and the queue as a ZSET, mf:{env}:q) into the layout
  of includes/entry and includes/queue, a bounded number of runs per call.

  Two kinds of call:
  - with run ids (ARGV[3..]): runs of the lease, retry or failed set, paged by
    the caller; each keeps its place in its set and only its hash becomes an
    entry;
  - without (ARGV[2] > 0): up to ARGV[2] runs leave the old queue for the
    back set, at their arrival score. They arrived before the upgrade, so they
    are older than every run the new layout queued, and are leased first.

  A run that already has an entry keeps it (it was accepted again, under the
  new layout, before the move: it is queued there already), and its old hash
  is only deleted. Nothing is lost on a crash between calls: a run is in its
  old set with its old hash until the call that moves it, which does both.

  Input:
    KEYS[1] back zset     mf:{env}:qb
    KEYS[2] runs hash     mf:{env}:runs
    KEYS[3] old queue     mf:{env}:q

    ARGV[1] old run hash prefix, mf:{env}:run:
    ARGV[2] most runs to move from the old queue (0 with run ids)
    ARGV[3] ... run ids whose hash to convert in place

  Output: { moved, left } — runs converted in this call, and runs still in the
  old queue (call again until 0).
]]
local rcall = redis.call
local backKey, runsKey, oldQueueKey = KEYS[1], KEYS[2], KEYS[3]
local prefix, most = ARGV[1], tonumber(ARGV[2])

--- @include "includes/entry"

local function text(v)
  if v == nil or v == "" then return false end
  return v
end

-- The old hash of one run made its entry, and deleted. Returns "moved" when
-- an entry was written, "kept" when the run already had one, false when the
-- run has no old hash.
local function convert(runId)
  local oldKey = prefix .. runId
  local flat = rcall("HGETALL", oldKey)
  if #flat == 0 then
    return false
  end
  local result = "kept"
  if rcall("HEXISTS", runsKey, runId) == 0 then
    local f = {}
    for i = 1, #flat, 2 do
      f[flat[i]] = flat[i + 1]
    end
    entry_put(runsKey, runId, {
      text(f.s), text(f.st), tonumber(f.sc) or false, tonumber(f.ca) or false,
      tonumber(f.du) or 0, text(f.ik), tonumber(f.at) or 0, tonumber(f.v) or 0,
      text(f.lt), text(f.le), tonumber(f.cx) or false, text(f.cr),
    })
    result = "moved"
  end
  rcall("DEL", oldKey)
  return result
end

local moved = 0
for i = 3, #ARGV do
  if convert(ARGV[i]) == "moved" then moved = moved + 1 end
end
if most > 0 then
  local queued = rcall("ZRANGE", oldQueueKey, 0, most - 1, "WITHSCORES")
  for i = 1, #queued, 2 do
    local runId = queued[i]
    local result = convert(runId)
    if result == "moved" then
      moved = moved + 1
      rcall("ZADD", backKey, queued[i + 1], runId)
    end
    -- "kept": queued in the LIST already; false: a reference to nothing.
    rcall("ZREM", oldQueueKey, runId)
  end
end
return { moved, rcall("ZCARD", oldQueueKey) }
