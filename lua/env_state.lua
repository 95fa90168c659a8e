--[[
  Read an env's gate and buffer state without counting a trigger.

  Input:
    KEYS[1] gate hash    KEYS[2] policy hash   KEYS[3] queue list
    KEYS[4] back zset    KEYS[5] lease zset    KEYS[6] retry zset
    KEYS[7] failed zset
    ARGV[1] default threshold  ARGV[2] default window (ms)  ARGV[3] default hold (ms)

  Output: { windowCount, threshold, trippedUntilMs, queued, draining, failed,
            retrying, overrideThreshold, overrideWindowMs, overrideHoldMs,
            windowMs, holdMs }
    overrides are "" when not set
]]
local rcall = redis.call
local gateKey, policyKey = KEYS[1], KEYS[2]

--- @include "includes/time"
--- @include "includes/gate"

local now = now_ms()
local defThreshold, defWindow, defHold = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local windowCount, threshold, trippedUntil =
  gate_window(gateKey, policyKey, now, defThreshold, defWindow, defHold, false)
local _, window, hold = gate_policy(policyKey, defThreshold, defWindow, defHold)
local o = rcall("HMGET", policyKey, "threshold", "window_ms", "hold_ms")
return { windowCount, threshold, trippedUntil,
  rcall("LLEN", KEYS[3]) + rcall("ZCARD", KEYS[4]), rcall("ZCARD", KEYS[5]), rcall("ZCARD", KEYS[7]),
  rcall("ZCARD", KEYS[6]),
  o[1] or "", o[2] or "", o[3] or "", window, hold }
