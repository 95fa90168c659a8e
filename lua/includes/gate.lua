--[[
  Shared by evaluate.lua and trigger.lua: the sliding-window trip evaluator.

  The window is a sliding-window counter: the current fixed bucket's count plus
  the previous bucket's count weighted by how much of it still lies inside the
  window. A burst at the end of one bucket therefore still counts, almost fully,
  at the start of the next, so no window edge admits twice the threshold.

  Gate hash fields: ws = current bucket start (ms), wc = current bucket count,
  wp = previous bucket count, tu = tripped until (ms).
  Policy hash fields (all optional): threshold, window_ms, hold_ms.
]]
local function gate_policy(policyKey, defThreshold, defWindow, defHold)
  local p = rcall("HMGET", policyKey, "threshold", "window_ms", "hold_ms")
  local threshold = tonumber(p[1]) or defThreshold
  local window = tonumber(p[2]) or defWindow
  local hold = tonumber(p[3]) or defHold
  return threshold, window, hold
end

-- Counts one trigger when `count` is true; returns windowCount, threshold,
-- trippedUntil (ms, 0 when not tripped) and whether the env is tripped now.
-- The gate hash as of `now`: the current bucket (ws, wc), the previous one's
-- count (wp), the trip (tu), rolled forward when a bucket boundary passed.
local function gate_load(gateKey, now, window)
  local g = rcall("HMGET", gateKey, "ws", "wc", "wp", "tu")
  local ws = tonumber(g[1]) or 0
  local wc = tonumber(g[2]) or 0
  local wp = tonumber(g[3]) or 0
  local tu = tonumber(g[4]) or 0
  local bucket = now - (now % window)
  if ws ~= bucket then
    if ws == bucket - window then wp = wc else wp = 0 end
    wc = 0
    ws = bucket
  end
  return ws, wc, wp, tu, bucket
end

local function gate_window(gateKey, policyKey, now, defThreshold, defWindow, defHold, count)
  local threshold, window, hold = gate_policy(policyKey, defThreshold, defWindow, defHold)
  local ws, wc, wp, tu, bucket = gate_load(gateKey, now, window)
  if count then wc = wc + 1 end
  local weight = (window - (now - bucket)) / window
  local windowCount = math.floor(wp * weight) + wc
  if count and windowCount > threshold then
    -- Re-armed on every trigger while the rate stays over.
    tu = now + hold
  end
  if count then
    rcall("HSET", gateKey, "ws", ws, "wc", wc, "wp", wp, "tu", tu)
    -- An idle env's gate state goes away by itself.
    rcall("PEXPIRE", gateKey, math.max(2 * window, tu - now) + 1000)
  end
  -- Over the threshold means tripped even with a zero hold (tu == now).
  local tripped = tu > now or (count and windowCount > threshold)
  if not tripped then tu = 0 end
  return windowCount, threshold, tu, tripped
end

-- Counts n triggers that arrive together: the same as n calls of
-- gate_window(..., true) at the same `now`, with one read and one write of
-- the gate hash. Returns the threshold and, per trigger in order, its
-- windowCount, trippedUntil (0 when not tripped) and whether it is tripped.
local function gate_window_many(gateKey, policyKey, now, defThreshold, defWindow, defHold, n)
  local threshold, window, hold = gate_policy(policyKey, defThreshold, defWindow, defHold)
  local ws, wc, wp, tu, bucket = gate_load(gateKey, now, window)
  local weight = (window - (now - bucket)) / window
  local carried = math.floor(wp * weight)
  local counts, untils, trips = {}, {}, {}
  for i = 1, n do
    wc = wc + 1
    local windowCount = carried + wc
    if windowCount > threshold then tu = now + hold end
    local tripped = tu > now or windowCount > threshold
    counts[i] = windowCount
    untils[i] = tripped and tu or 0
    trips[i] = tripped
  end
  rcall("HSET", gateKey, "ws", ws, "wc", wc, "wp", wp, "tu", tu)
  rcall("PEXPIRE", gateKey, math.max(2 * window, tu - now) + 1000)
  return threshold, counts, untils, trips
end

-- Runs of an env still buffered (queued, leased or backing off): while any
-- remain, new triggers of the env are buffered too, so they keep arrival order.
local function gate_backlog(queueKey, backKey, leaseKey, retryKey)
  return rcall("LLEN", queueKey) + rcall("ZCARD", backKey) + rcall("ZCARD", leaseKey)
    + rcall("ZCARD", retryKey)
end

-- Decision and reason codes are the proto enum numbers.
local DECISION_PASS_THROUGH, DECISION_SHADOW_LOG, DECISION_MOLLIFY = 1, 2, 3
local REASON_UNDER_THRESHOLD, REASON_TRIPPED, REASON_BACKLOG, REASON_SHADOW_TRIPPED = 6, 7, 8, 9
local REASON_BUFFER_FULL = 11

local function gate_decide(tripped, backlog, shadow)
  if shadow then
    if tripped then return DECISION_SHADOW_LOG, REASON_SHADOW_TRIPPED end
    return DECISION_PASS_THROUGH, REASON_UNDER_THRESHOLD
  end
  if tripped then return DECISION_MOLLIFY, REASON_TRIPPED end
  if backlog > 0 then return DECISION_MOLLIFY, REASON_BACKLOG end
  return DECISION_PASS_THROUGH, REASON_UNDER_THRESHOLD
end
