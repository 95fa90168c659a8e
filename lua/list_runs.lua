--[[
  One page of an env's buffered runs (queued, leased, backing off, failed) in
  arrival order, after a cursor. Queued runs are read in order from the queue
  (its `back` set by score, then the LIST from the first run after the cursor,
  found by binary search: includes/queue); the leased, retrying and failed
  sets are small and are merged in by each entry's arrival score.

  Input:
    KEYS[1] queue list  KEYS[2] back zset  KEYS[3] lease zset
    KEYS[4] retry zset  KEYS[5] failed zset  KEYS[6] runs hash
    ARGV[1] cursor: arrival score of the last run of the previous page (0 at first)
    ARGV[2] how many runs at most

  Output: { {runId, arrivalScore, entryView}, ... } in arrival order, where
  entryView is s st ca at le cx cr du v
]]
local rcall = redis.call
local queueKey, backKey, runsKey = KEYS[1], KEYS[2], KEYS[6]
local cursor, limit = tonumber(ARGV[1]), tonumber(ARGV[2])

--- @include "includes/entry"
--- @include "includes/queue"

local found = {}
local entries = {}
-- A reference with no entry (should not happen) is passed over, and the page
-- is still filled from the runs after it.
local offset = 0
while #found < limit do
  local back = rcall("ZRANGEBYSCORE", backKey, "(" .. ARGV[1], "+inf", "WITHSCORES",
    "LIMIT", offset, limit - #found)
  if #back == 0 then break end
  for i = 1, #back, 2 do
    local e = entry_get(runsKey, back[i])
    if e then
      entries[back[i]] = e
      found[#found + 1] = { back[i], tonumber(back[i + 1]) }
    end
  end
  offset = offset + #back / 2
end
-- Up to `limit` from the LIST too, even with the back set's page full: the
-- back set is older than the LIST in every run of this layout, but the sort
-- below, not that rule, is what orders the page.
local pos = queue_first_after(queueKey, runsKey, cursor)
local fromList = 0
while fromList < limit do
  local ids = rcall("LRANGE", queueKey, pos, pos + limit - fromList - 1)
  if #ids == 0 then break end
  for _, runId in ipairs(ids) do
    local e = entry_get(runsKey, runId)
    if e and e[E_SC] then
      entries[runId] = e
      found[#found + 1] = { runId, e[E_SC] }
      fromList = fromList + 1
    end
  end
  pos = pos + #ids
end
for i = 3, 5 do
  for _, runId in ipairs(rcall("ZRANGE", KEYS[i], 0, -1)) do
    local e = entry_get(runsKey, runId)
    if e and e[E_SC] and e[E_SC] > cursor then
      entries[runId] = e
      found[#found + 1] = { runId, e[E_SC] }
    end
  end
end
table.sort(found, function(x, y) return x[2] < y[2] end)

local out = {}
for i = 1, math.min(limit, #found) do
  local runId = found[i][1]
  local e = entries[runId] or entry_get(runsKey, runId)
  out[i] = { runId, found[i][2], entry_view(e) }
end
return out
