--[[
  Move one env's runs from the earlier layout (a hash per run,
  mf:{env}:run:<run_id>, and the queue as a ZSET, mf:{env}:q) into the layout
  of includes/entry and includes/queue, a bounded number of runs per call.

  Queued runs go to the queue's back set at their arrival score: they arrived
  before the upgrade, so they are older than every run the new layout queued,
  and are leased first. Runs in the lease, retry and failed sets keep their
  place there; only their hash becomes an entry. A run already holding an
  entry keeps it (its old hash is only deleted). Nothing is lost on a crash
  between calls: a run is in its old set with its old hash until the call that
  moves it, which does both in one step.

  Input:
    KEYS[1] back zset     mf:{env}:qb
    KEYS[2] lease zset    mf:{env}:lease
    KEYS[3] retry zset    mf:{env}:retry
    KEYS[4] failed zset   mf:{env}:failed
    KEYS[5] runs hash     mf:{env}:runs
    KEYS[6] old queue     mf:{env}:q

    ARGV[1] old run hash prefix, mf:{env}:run:
    ARGV[2] most runs to move from the old queue in this call

  Output: { moved, left } — runs converted in this call, and runs still in the
  old queue (call again until 0).
]]
local rcall = redis.call
local backKey, runsKey, oldQueueKey = KEYS[1], KEYS[5], KEYS[6]
local prefix, most = ARGV[1], tonumber(ARGV[2])

--- @include "includes/entry"

local function text(v)
  if v == nil or v == "" then return false end
  return v
end

-- The old hash of one run as an entry, and the hash deleted; false when the
-- run has no old hash.
local function convert(runId)
  local oldKey = prefix .. runId
  local flat = rcall("HGETALL", oldKey)
  if #flat == 0 then
    return false
  end
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
  end
  rcall("DEL", oldKey)
  return true
end

local moved = 0
for i = 2, 4 do
  for _, runId in ipairs(rcall("ZRANGE", KEYS[i], 0, -1)) do
    if convert(runId) then moved = moved + 1 end
  end
end
local queued = rcall("ZRANGE", oldQueueKey, 0, most - 1, "WITHSCORES")
for i = 1, #queued, 2 do
  local runId = queued[i]
  if convert(runId) then moved = moved + 1 end
  rcall("ZADD", backKey, queued[i + 1], runId)
  rcall("ZREM", oldQueueKey, runId)
end
return { moved, rcall("ZCARD", oldQueueKey) }
