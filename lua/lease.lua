--[[
  Lease up to N runs from the head of one env's queue (drainer or Lease RPC).

  First it puts back what is due: runs whose lease deadline passed (their
  holder died or gave up) go back to the queue at their arrival score `sc`,
  i.e. the head, unless their attempts are used up, in which case they are
  dead-lettered; runs whose backoff ended leave the retry set for the queue,
  also at `sc`. Then it pops up to N runs from the head.

  A hash missing what it cannot be drained without (its snapshot `s`, or its
  queue place `sc` when it comes back) is dead-lettered with the reason in
  `le`, counted in deadLettered: kept and readable, never left in no set.

  Attempts are counted here, at lease: every lease is one materialization
  attempt, so a run whose batch kills its drainer (and is never nacked) still
  runs out of attempts and is dead-lettered instead of looping forever.

  A lease writes only what a holder and the other scripts read: st, lt and at.
  The deadline lives in the lease zset (its score), not in the hash, and the
  version `v` is not raised: a leased run (state D) cannot be mutated, and it
  leaves state D only through ack (the hash is deleted), nack or reclaim (both
  raise `v`), so a compare-and-set against a version read before the lease
  still fails. This per-run write is the drain's largest cost in Redis.

  Input:
    KEYS[1] queue zset    mf:{env}:q
    KEYS[2] lease zset    mf:{env}:lease
    KEYS[3] retry zset    mf:{env}:retry
    KEYS[4] failed zset   mf:{env}:failed

    ARGV[1] run hash key prefix, mf:{env}:run:
    ARGV[2] most runs to lease (N, 0 only reclaims)
    ARGV[3] lease duration (ms)
    ARGV[4] lease token (one per batch)
    ARGV[5] max attempts: an expired lease at this many attempts is dead-lettered
    ARGV[6] most expired / due runs moved back per call (bounds the script's work)

  Output: { nowMs, deadlineMs, reclaimed, deadLettered, entries, expiredOut }
    entries: one flat list, 7 values per run in queue order:
    runId, s, ca, at, cx, cr, le (`at` already counting this lease; a field
    that is not set is returned as false, i.e. nil). Flat and only what a
    holder needs: the reply is built and parsed once per run, not per table.
    expiredOut: the ids dead-lettered because their lease expired on their
    last attempt. The holder may have committed their rows and died before
    its ack: the drain looks them up in Postgres and settles those it finds
    (ack.lua with ARGV[8]).
]]
local rcall = redis.call
local queueKey, leaseKey, retryKey, failedKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix = ARGV[1]
local want, leaseMs, token = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local maxAttempts, reclaimMax = tonumber(ARGV[5]), tonumber(ARGV[6])

--- @include "includes/time"

local now = now_ms()
local deadline = now + leaseMs
-- Formatted once: as a number it would be converted for every run's ZADD.
local deadlineText = string.format("%d", deadline)
local reclaimed, deadLettered = 0, 0
local expiredOut = {}

-- To the failed set with the reason: a run out of attempts, or a damaged
-- hash (a field it cannot be drained without is missing). `ld` is no longer
-- written; cleared for entries leased before that.
local function dead_letter(runKey, runId, reason)
  rcall("HDEL", runKey, "lt", "ld")
  rcall("HSET", runKey, "st", "F", "le", reason)
  rcall("HINCRBY", runKey, "v", 1)
  rcall("ZADD", failedKey, now, runId)
  deadLettered = deadLettered + 1
end

-- Expired leases: back to the head, or dead-lettered when out of attempts.
local expired = rcall("ZRANGEBYSCORE", leaseKey, "-inf", "(" .. now, "LIMIT", 0, reclaimMax)
for _, runId in ipairs(expired) do
  local runKey = prefix .. runId
  rcall("ZREM", leaseKey, runId)
  local f = rcall("HMGET", runKey, "sc", "at")
  if not f[1] and rcall("EXISTS", runKey) == 1 then
    dead_letter(runKey, runId, "buffered run has no queue place (sc)")
  elseif f[1] and (tonumber(f[2]) or 0) >= maxAttempts then
    dead_letter(runKey, runId, "lease expired after " .. (f[2] or "0") .. " attempts")
    expiredOut[#expiredOut + 1] = runId
  elseif f[1] then
    rcall("HDEL", runKey, "lt", "ld")
    rcall("HSET", runKey, "st", "Q")
    rcall("HINCRBY", runKey, "v", 1)
    rcall("ZADD", queueKey, f[1], runId)
    reclaimed = reclaimed + 1
  end
end

-- Backoff over: back to the queue at the arrival score.
local due = rcall("ZRANGEBYSCORE", retryKey, "-inf", now, "LIMIT", 0, reclaimMax)
for _, runId in ipairs(due) do
  rcall("ZREM", retryKey, runId)
  local sc = rcall("HGET", prefix .. runId, "sc")
  if sc then
    rcall("ZADD", queueKey, sc, runId)
  elseif rcall("EXISTS", prefix .. runId) == 1 then
    dead_letter(prefix .. runId, runId, "buffered run has no queue place (sc)")
  end
end

local entries = {}
if want > 0 then
  local ids = rcall("ZRANGE", queueKey, 0, want - 1)
  if #ids > 0 then
    -- The head is taken as a whole: one range removal and one ZADD for all,
    -- so the per-run work is one HMGET and one HSET.
    rcall("ZREMRANGEBYRANK", queueKey, 0, #ids - 1)
    local leased = {}
    for _, runId in ipairs(ids) do
      local runKey = prefix .. runId
      local f = rcall("HMGET", runKey, "s", "ca", "at", "cx", "cr", "le")
      -- A queue ref whose hash is gone (should not happen): dropped, never
      -- leased. A hash without its snapshot can never be written: it is
      -- dead-lettered, kept and readable, rather than left in no set.
      if not f[1] and rcall("EXISTS", runKey) == 1 then
        dead_letter(runKey, runId, "buffered run has no snapshot")
      elseif f[1] then
        local at = (tonumber(f[3]) or 0) + 1
        rcall("HSET", runKey, "st", "D", "lt", token, "at", at)
        leased[#leased + 1] = deadlineText
        leased[#leased + 1] = runId
        local n = #entries
        entries[n + 1] = runId
        entries[n + 2] = f[1]
        entries[n + 3] = f[2]
        entries[n + 4] = at
        entries[n + 5] = f[4]
        entries[n + 6] = f[5]
        entries[n + 7] = f[6]
      end
    end
    -- ZADD takes at most a few thousand arguments comfortably; batches are <= 1000.
    if #leased > 0 then
      rcall("ZADD", leaseKey, unpack(leased))
    end
  end
end
return { now, deadline, reclaimed, deadLettered, entries, expiredOut }
