--[[
  Decide for one trigger: count it in the env's sliding window and answer
  PASS_THROUGH, SHADOW_LOG or MOLLIFY. The cascade's earlier steps (kill switch,
  org flag, bypasses) are decided by the caller without Redis.

  Input:
    KEYS[1] gate hash      mf:{env}:gate
    KEYS[2] policy hash    mf:{env}:policy
    KEYS[3] queue list     mf:{env}:ql
    KEYS[4] back zset      mf:{env}:qb
    KEYS[5] lease zset     mf:{env}:lease
    KEYS[6] retry zset     mf:{env}:retry

    ARGV[1] default threshold (triggers per window)
    ARGV[2] default window (ms)
    ARGV[3] default hold (ms)
    ARGV[4] shadow mode: "1" or "0"
    ARGV[5] (optional) n, how many triggers of this env to decide at once
            (EvaluateBatch); absent or 1: one

  Output: { decision, reason, windowCount, threshold, trippedUntilMs }
    decision: 1 PASS_THROUGH, 2 SHADOW_LOG, 3 MOLLIFY
    reason:   6 UNDER_THRESHOLD, 7 TRIPPED, 8 BACKLOG, 9 SHADOW_TRIPPED
    trippedUntilMs: 0 when not tripped
  With n > 1: those five values for each trigger in turn, one flat list of
  5 * n, decided as n calls in a row at the same time would be.
]]
local rcall = redis.call
local gateKey, policyKey = KEYS[1], KEYS[2]
local queueKey, backKey, leaseKey, retryKey = KEYS[3], KEYS[4], KEYS[5], KEYS[6]

--- @include "includes/time"
--- @include "includes/gate"

local now = now_ms()
-- One trigger is the case n = 1: gate_window_many counts it as gate_window does.
local n = math.max(tonumber(ARGV[5]) or 1, 1)
local threshold, counts, untils, trips =
  gate_window_many(gateKey, policyKey, now, tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), n)
local backlog = gate_backlog(queueKey, backKey, leaseKey, retryKey)
local shadow = ARGV[4] == "1"
local out = {}
for i = 1, n do
  local decision, reason = gate_decide(trips[i], backlog, shadow)
  local j = 5 * (i - 1)
  out[j + 1] = decision
  out[j + 2] = reason
  out[j + 3] = counts[i]
  out[j + 4] = threshold
  out[j + 5] = untils[i]
end
return out
