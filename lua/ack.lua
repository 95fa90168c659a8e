--[[
  Complete leased runs: their rows are committed, so they leave the buffer.

  Only the holder of the lease can ack: a run whose state is not D or whose
  lease token differs (its lease expired and it went to someone else) is
  rejected and left untouched, so a late ack from an expired holder changes
  nothing.

  The run's idempotency binding (field `ik`) outlives it: when the binding still
  points at this run it gets a TTL (only when it has none yet), so triggers
  with the key keep finding the run in Postgres for that long. When the run was
  resolved to another run (its key was already bound in Postgres), the binding
  is pointed at that run.

  Input:
    KEYS[1] lease zset    mf:{env}:lease

    ARGV[1] runs hash     mf:{env}:runs (an argument, as the binding and
            alias prefixes are; same hash slot)
    ARGV[2] binding key prefix, mf:{env}:idem:
    ARGV[3] lease token
    ARGV[4] binding TTL after the run left the buffer (ms)
    ARGV[5] the run ids, separated by spaces (run ids hold no spaces)
    ARGV[6] "runId resolvedRunId ..." pairs, space-separated, for the runs that
            resolved to another run; "" when none did
    (Two strings rather than two arguments per run: a 1,000-run ack costs the
    client one argument to encode, not 2,000.)
    ARGV[7] alias key prefix, mf:{env}:alias: — a run resolved to another run
            leaves an alias to it (for ARGV[4] ms), so reading the run the
            caller was given still answers, with the run it became
    ARGV[8] optional: the failed zset, mf:{env}:failed. Then the runs are
            dead-lettered ones (state F, in that set) whose rows the drain
            found in Postgres, and ARGV[3] is ignored: a holder that committed
            them died before its ack on their last attempt. (A key, not
            KEYS[2], so that the common call names one key; same hash slot.)

  Output: { acked, {rejected run ids} }
]]
local rcall = redis.call
local leaseKey = KEYS[1]
local runsKey, idemPrefix, token, idemTtl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local failedKey = ARGV[8]

--- @include "includes/entry"

local resolvedOf = {}
local pending = nil
for word in string.gmatch(ARGV[6] or "", "%S+") do
  if pending then
    resolvedOf[pending] = word
    pending = nil
  else
    pending = word
  end
end

-- The entries are deleted together at the end; `isDone` keeps a run named
-- twice from being acked twice (its second mention is rejected, as when each
-- entry went at once).
local acked, rejected, done, isDone = 0, {}, {}, {}
for runId in string.gmatch(ARGV[5] or "", "%S+") do
  local resolved = resolvedOf[runId] or ""
  local e = entry_get(runsKey, runId)
  local f = e and { e[E_ST], e[E_LT], e[E_IK] } or {}
  local held
  if failedKey then
    held = f[1] == "F" and rcall("ZSCORE", failedKey, runId) ~= false
  else
    held = f[1] == "D" and f[2] == token
  end
  if held and not isDone[runId] then
    isDone[runId] = true
    if resolved ~= "" and resolved ~= runId and ARGV[7] then
      rcall("SET", ARGV[7] .. runId, resolved, "PX", idemTtl)
    end
    if f[3] and f[3] ~= "" then
      local idemKey = idemPrefix .. f[3]
      if rcall("GET", idemKey) == runId then
        if resolved ~= "" and resolved ~= runId then
          rcall("SET", idemKey, resolved, "KEEPTTL")
        end
        if rcall("PTTL", idemKey) == -1 then
          rcall("PEXPIRE", idemKey, idemTtl)
        end
      end
    end
    done[#done + 1] = runId
    acked = acked + 1
  else
    rejected[#rejected + 1] = runId
  end
end
-- One HDEL and one ZREM per 500 runs rather than one per run; in chunks
-- because unpack takes a few thousand values at most and an external Ack
-- may name more runs than one lease holds.
for i = 1, #done, 500 do
  local j = math.min(i + 499, #done)
  rcall("HDEL", runsKey, unpack(done, i, j))
  rcall("ZREM", failedKey or leaseKey, unpack(done, i, j))
end
return { acked, rejected }
