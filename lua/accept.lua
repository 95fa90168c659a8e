--[[
  Take one run into the buffer (BufferService.Accept).

  Input:
    KEYS[1] queue list    mf:{env}:ql
    KEYS[2] back zset     mf:{env}:qb
    KEYS[3] lease zset    mf:{env}:lease
    KEYS[4] retry zset    mf:{env}:retry
    KEYS[5] failed zset   mf:{env}:failed
    KEYS[6] env hash      mf:{env}:env
    KEYS[7] runs hash     mf:{env}:runs
    KEYS[8] binding       mf:{env}:idem:<task>:<key>  (any key of the slot when no key)

    ARGV[1] run id
    ARGV[2] org id
    ARGV[3] snapshot (protobuf bytes, without run_id and env_id)
    ARGV[4] "<task>:<key>" or "" when the run has no idempotency key
    ARGV[5] binding expires at (ms); 0 = no expiry while buffered
    ARGV[6] capacity of the env (runs)
    ARGV[7] "1" when the whole buffer is over its capacity
    ARGV[8] delay_until (ms), 0 for none

  Output: { result, runId, createdAtMs, existingEntry }
    result: 1 ACCEPTED, 2 DUPLICATE_RUN_ID, 3 DUPLICATE_IDEMPOTENCY_KEY, 4 FULL
    existingEntry: s st ca at le cx cr du v of a duplicate found in the
    buffer (all nil when the bound run has left the buffer), else {}
]]
local rcall = redis.call

--- @include "includes/time"
--- @include "includes/entry"
--- @include "includes/queue"
--- @include "includes/accept"

local k = {
  queue = KEYS[1], back = KEYS[2], lease = KEYS[3], retry = KEYS[4], failed = KEYS[5],
  env = KEYS[6], runs = KEYS[7], idem = KEYS[8],
}
local a = {
  runId = ARGV[1], orgId = ARGV[2], snapshot = ARGV[3], idem = ARGV[4],
  idemExpiresAt = tonumber(ARGV[5]), capacity = tonumber(ARGV[6]),
  totalFull = ARGV[7], delayUntil = tonumber(ARGV[8]),
}
return accept_entry(k, a, now_ms())
