--[[
  Give leased runs back: requeue each after a delay, or dead-letter it.

  Token-checked like ack.lua: a run not held under this token is rejected and
  left untouched. A requeued run waits in the retry zset until its backoff ends
  (lease.lua then moves it back to the head of the queue, at its arrival
  score); it is never leased before that. A run is dead-lettered (state F, in
  the failed zset, kept and readable) when asked to, or when its attempts
  (counted at lease) reached the maximum.

  Input:
    KEYS[1] lease zset    mf:{env}:lease
    KEYS[2] retry zset    mf:{env}:retry
    KEYS[3] failed zset   mf:{env}:failed

    ARGV[1] runs hash     mf:{env}:runs
    ARGV[2] lease token
    ARGV[3] delay (ms); 0 = exponential backoff: base * 2^(attempts-1), capped
    ARGV[4] backoff base (ms)
    ARGV[5] backoff cap (ms)
    ARGV[6] max attempts
    ARGV[7] "1" to dead-letter now
    ARGV[8] the error, kept as last error (`le`)
    ARGV[9] ... run ids

  Output: { requeued, deadLettered, {rejected run ids} }
]]
local rcall = redis.call
local leaseKey, retryKey, failedKey = KEYS[1], KEYS[2], KEYS[3]
local runsKey, token = ARGV[1], ARGV[2]
local delay, base, cap = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local maxAttempts, dead, err = tonumber(ARGV[6]), ARGV[7] == "1", ARGV[8]

--- @include "includes/time"
--- @include "includes/entry"

local now = now_ms()
local requeued, deadLettered, rejected = 0, 0, {}
for i = 9, #ARGV do
  local runId = ARGV[i]
  local e = entry_get(runsKey, runId)
  if e and e[E_ST] == "D" and e[E_LT] == token then
    local at = tonumber(e[E_AT]) or 0
    rcall("ZREM", leaseKey, runId)
    e[E_LT] = false
    if err ~= "" then
      e[E_LE] = err
    end
    if dead or at >= maxAttempts then
      e[E_ST] = "F"
      rcall("ZADD", failedKey, now, runId)
      deadLettered = deadLettered + 1
    else
      local wait = delay
      if wait <= 0 then
        wait = math.min(cap, base * 2 ^ math.max(0, at - 1))
      end
      e[E_ST] = "Q"
      rcall("ZADD", retryKey, now + wait, runId)
      requeued = requeued + 1
    end
    e[E_V] = (tonumber(e[E_V]) or 0) + 1
    entry_put(runsKey, runId, e)
  else
    rejected[#rejected + 1] = runId
  end
end
return { requeued, deadLettered, rejected }
