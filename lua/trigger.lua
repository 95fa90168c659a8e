--[[
  Decide for one trigger and, when the decision is MOLLIFY, take its run into
  the buffer in the same call (GateService.Trigger): one round trip.

  A live idempotency binding answers with the bound run whatever the decision,
  so a key is honoured on both paths.

  Input:
    KEYS[1] gate hash     mf:{env}:gate
    KEYS[2] policy hash   mf:{env}:policy
    KEYS[3] queue list    mf:{env}:ql
    KEYS[4] back zset     mf:{env}:qb
    KEYS[5] lease zset    mf:{env}:lease
    KEYS[6] retry zset    mf:{env}:retry
    KEYS[7] failed zset   mf:{env}:failed
    KEYS[8] env hash      mf:{env}:env
    KEYS[9] runs hash     mf:{env}:runs
    KEYS[10] binding      mf:{env}:idem:<task>:<key>  (any key of the slot when no key)

    ARGV[1]  default threshold       ARGV[2]  default window (ms)
    ARGV[3]  default hold (ms)       ARGV[4]  shadow mode "1" / "0"
    ARGV[5]  run id                  ARGV[6]  org id
    ARGV[7]  snapshot (protobuf, no ids)     ARGV[8]  "<task>:<key>" or ""
    ARGV[9]  binding expires at (ms), 0 = none while buffered
    ARGV[10] capacity of the env     ARGV[11] "1" when the whole buffer is full
    ARGV[12] delay_until (ms), 0 for none
    ARGV[13] write through: "1" when the sidecar will write a PASS_THROUGH or
             SHADOW_LOG run to Postgres itself
    ARGV[14] binding lifetime (ms) for such a direct write without an expiry
    ARGV[15] forced pass-through reason (2-5: org not enabled, bypasses; 1 kill
             switch), or 0 to evaluate the trip; a forced call counts nothing

  Output: { decision, reason, windowCount, threshold, trippedUntilMs,
            result, runId, createdAtMs, existingEntry }
    decision/reason: as evaluate.lua; reason 11 BUFFER_FULL when a MOLLIFY
    decision met a full buffer and became PASS_THROUGH
    result: 0 not buffered (caller writes the run), else as accept.lua, or
    5 BOUND: not buffered, write through, and the idempotency key is now bound
    to this run, so concurrent triggers with the key answer with it while the
    sidecar writes it to Postgres (the unique index there settles the rest)
]]
local rcall = redis.call

--- @include "includes/time"
--- @include "includes/gate"
--- @include "includes/entry"
--- @include "includes/queue"
--- @include "includes/accept"

local k = {
  gate = KEYS[1], policy = KEYS[2], queue = KEYS[3], back = KEYS[4], lease = KEYS[5],
  retry = KEYS[6], failed = KEYS[7], env = KEYS[8], runs = KEYS[9], idem = KEYS[10],
}
local a = {
  runId = ARGV[5], orgId = ARGV[6], snapshot = ARGV[7], idem = ARGV[8],
  idemExpiresAt = tonumber(ARGV[9]), capacity = tonumber(ARGV[10]),
  totalFull = ARGV[11], delayUntil = tonumber(ARGV[12]),
}

local RESULT_BOUND = 5
local writeThrough = ARGV[13] == "1"
local forced = tonumber(ARGV[15])

local now = now_ms()
local windowCount, threshold, trippedUntil, decision, reason = 0, 0, 0, DECISION_PASS_THROUGH, forced
if forced == 0 then
  local tripped
  windowCount, threshold, trippedUntil, tripped =
    gate_window(k.gate, k.policy, now, tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), true)
  local backlog = gate_backlog(k.queue, k.back, k.lease, k.retry)
  decision, reason = gate_decide(tripped, backlog, ARGV[4] == "1")
end

if decision ~= DECISION_MOLLIFY then
  -- Not buffering, but a bound key or a buffered run id still answers as a duplicate.
  if a.idem ~= "" then
    local bound = rcall("GET", k.idem)
    -- Bound to this very run: a retry of a direct write; not a duplicate.
    if bound and bound ~= a.runId then
      return { decision, reason, windowCount, threshold, trippedUntil,
        RESULT_DUP_IDEM, bound, 0, entry_view(entry_get(k.runs, bound)) }
    end
  end
  local existing = entry_get(k.runs, a.runId)
  if existing then
    return { decision, reason, windowCount, threshold, trippedUntil,
      RESULT_DUP_RUN, a.runId, 0, entry_view(existing) }
  end
  if writeThrough and a.idem ~= "" then
    if a.idemExpiresAt == 0 then
      rcall("SET", k.idem, a.runId, "PX", tonumber(ARGV[14]))
    elseif a.idemExpiresAt > now then
      rcall("SET", k.idem, a.runId, "PXAT", a.idemExpiresAt)
    end
    return { decision, reason, windowCount, threshold, trippedUntil, RESULT_BOUND, a.runId, now, {} }
  end
  return { decision, reason, windowCount, threshold, trippedUntil, 0, a.runId, 0, {} }
end

local r = accept_entry(k, a, now)
if r[1] == RESULT_FULL then
  decision, reason = DECISION_PASS_THROUGH, REASON_BUFFER_FULL
end
return { decision, reason, windowCount, threshold, trippedUntil, r[1], r[2], r[3], r[4] }
