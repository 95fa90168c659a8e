--[[
  How many runs one env has where, and how old its queue's head is: what the
  metrics, the status call, the stale sweep and the index upkeep read.

  Input:
    KEYS[1] queue list  KEYS[2] back zset  KEYS[3] lease zset
    KEYS[4] retry zset  KEYS[5] failed zset  KEYS[6] runs hash
    ARGV[1] stale cutoff: an arrival score (ms * 1000); the queued runs that
            arrived at or before it are counted. 0 counts none.

  Output: { queued, draining, retrying, failed, headScore, stale }
    queued: the LIST and the back set; headScore: the arrival score of the
    queue's oldest run, 0 when the queue is empty.
]]
local rcall = redis.call
local queueKey, backKey, runsKey = KEYS[1], KEYS[2], KEYS[6]
local cutoff = tonumber(ARGV[1]) or 0

--- @include "includes/entry"
--- @include "includes/queue"

local head = 0
local first = rcall("ZRANGE", backKey, 0, 0, "WITHSCORES")
if #first > 0 then
  head = tonumber(first[2])
else
  head = queue_score_at(queueKey, runsKey, 0) or 0
end
local stale = 0
if cutoff > 0 and head > 0 and head <= cutoff then
  stale = rcall("ZCOUNT", backKey, "-inf", ARGV[1]) + queue_first_after(queueKey, runsKey, cutoff)
end
return { queue_len(queueKey, backKey), rcall("ZCARD", KEYS[3]), rcall("ZCARD", KEYS[4]),
  rcall("ZCARD", KEYS[5]), head, stale }
