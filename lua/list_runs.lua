--[[
  One page of an env's buffered runs (queued, leased, backing off, failed) in
  arrival order, after a cursor. Queued runs are read by score from the queue;
  the leased, retrying and failed sets are small and are merged in by each
  entry's arrival score.

  Input:
    KEYS[1] queue zset  KEYS[2] lease zset  KEYS[3] retry zset  KEYS[4] failed zset
    ARGV[1] cursor: arrival score of the last run of the previous page (0 at first)
    ARGV[2] how many runs at most
    ARGV[3] run hash key prefix, mf:{env}:run:

  Output: { {runId, arrivalScore, entryView}, ... } in arrival order, where
  entryView is HMGET of s st ca at le cx cr du v
]]
local rcall = redis.call
local queueKey = KEYS[1]
local cursor, limit, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]

local found = {}
local q = rcall("ZRANGEBYSCORE", queueKey, "(" .. ARGV[1], "+inf", "WITHSCORES", "LIMIT", 0, limit)
for i = 1, #q, 2 do
  found[#found + 1] = { q[i], tonumber(q[i + 1]) }
end
for i = 2, 4 do
  for _, runId in ipairs(rcall("ZRANGE", KEYS[i], 0, -1)) do
    local sc = tonumber(rcall("HGET", prefix .. runId, "sc"))
    if sc and sc > cursor then
      found[#found + 1] = { runId, sc }
    end
  end
end
table.sort(found, function(x, y) return x[2] < y[2] end)

local out = {}
for i = 1, math.min(limit, #found) do
  local runId = found[i][1]
  out[i] = { runId, found[i][2],
    rcall("HMGET", prefix .. runId, "s", "st", "ca", "at", "le", "cx", "cr", "du", "v") }
end
return out
