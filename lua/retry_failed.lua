--[[
  Put dead-lettered runs back in their queue, at their arrival score (the
  head), with their attempts reset (RetryFailed). The last error is kept.

  A request id makes a retried call apply once: its answer is stored for a day
  and a repeat returns it without moving anything.

  Input:
    KEYS[1] back zset     mf:{env}:qb (the queue's returned runs, includes/queue)
    KEYS[2] failed zset   mf:{env}:failed
    KEYS[3] request key   mf:{env}:req:<request_id> (any key of the slot when none)

    ARGV[1] runs hash     mf:{env}:runs
    ARGV[2] "1" when a request id was given (KEYS[3] is then used)
    ARGV[3] "1" to retry every failed run of the env (ARGV[4..] ignored)
    ARGV[4] ... run ids

  Output: retried count (the stored count on a repeated request id)
]]
local rcall = redis.call
local backKey, failedKey, requestKey = KEYS[1], KEYS[2], KEYS[3]
local runsKey, hasRequest, all = ARGV[1], ARGV[2] == "1", ARGV[3] == "1"

--- @include "includes/entry"

if hasRequest then
  local stored = rcall("GET", requestKey)
  if stored then
    return tonumber(stored)
  end
end

local ids = {}
if all then
  ids = rcall("ZRANGE", failedKey, 0, -1)
else
  for i = 4, #ARGV do
    ids[#ids + 1] = ARGV[i]
  end
end

local retried = 0
for _, runId in ipairs(ids) do
  if rcall("ZSCORE", failedKey, runId) then
    local e = entry_get(runsKey, runId)
    if e and e[E_SC] then
      rcall("ZREM", failedKey, runId)
      e[E_ST], e[E_AT] = "Q", 0
      e[E_V] = (tonumber(e[E_V]) or 0) + 1
      entry_put(runsKey, runId, e)
      rcall("ZADD", backKey, e[E_SC], runId)
      retried = retried + 1
    elseif not e and not entry_waits_for_upgrade(runsKey, runId) then
      -- A reference to nothing: dropped. An entry without its queue place
      -- (damaged) stays in the failed set, readable, rather than in no set;
      -- so does a run still in the earlier layout (upgrade.lua moves it).
      rcall("ZREM", failedKey, runId)
    end
  end
end
if hasRequest then
  rcall("SET", requestKey, retried, "PX", 86400000)
end
return retried
