--[[
  Decide for one trigger and, when the decision is MOLLIFY, take its run into
  the buffer in the same call (GateService.Trigger): one round trip.

  A live idempotency binding answers with the bound run whatever the decision,
  so a key is honoured on both paths.

  Input:
    KEYS[1] gate hash     mf:{env}:gate
    KEYS[2] policy hash   mf:{env}:policy
    KEYS[3] queue zset    mf:{env}:q
    KEYS[4] lease zset    mf:{env}:lease
    KEYS[5] retry zset    mf:{env}:retry
    KEYS[6] failed zset   mf:{env}:failed
    KEYS[7] env hash      mf:{env}:env
    KEYS[8] run hash      mf:{env}:run:<run_id>
    KEYS[9] binding       mf:{env}:idem:<task>:<key>  (any key of the slot when no key)

    ARGV[1]  default threshold       ARGV[2]  default window (ms)
    ARGV[3]  default hold (ms)       ARGV[4]  shadow mode "1" / "0"
    ARGV[5]  run id                  ARGV[6]  org id
    ARGV[7]  snapshot (protobuf)     ARGV[8]  "<task>:<key>" or ""
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

local k = {
  gate = KEYS[1], policy = KEYS[2], queue = KEYS[3], lease = KEYS[4], retry = KEYS[5],
  failed = KEYS[6], env = KEYS[7], run = KEYS[8], idem = KEYS[9],
  runPrefix = string.sub(KEYS[8], 1, #KEYS[8] - #ARGV[5]),
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
  local backlog = gate_backlog(k.queue, k.lease, k.retry)
  decision, reason = gate_decide(tripped, backlog, ARGV[4] == "1")
end

if decision ~= DECISION_MOLLIFY then
  -- Not buffering, but a bound key or a buffered run id still answers as a duplicate.
  if a.idem ~= "" then
    local bound = rcall("GET", k.idem)
    -- Bound to this very run: a retry of a direct write; not a duplicate.
    if bound and bound ~= a.runId then
      return { decision, reason, windowCount, threshold, trippedUntil,
        RESULT_DUP_IDEM, bound, 0, entry_view(k.runPrefix .. bound) }
    end
  end
  if rcall("EXISTS", k.run) == 1 then
    return { decision, reason, windowCount, threshold, trippedUntil,
      RESULT_DUP_RUN, a.runId, 0, entry_view(k.run) }
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
