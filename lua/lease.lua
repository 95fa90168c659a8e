--[[
  Lease up to N runs from the head of one env's queue (drainer or Lease RPC).

  First it puts back what is due: runs whose lease deadline passed (their
  holder died or gave up) go back to the queue (its `back` set, see
  includes/queue) at their arrival score `sc`, i.e. the head, unless their attempts are used up, in which case they are
  dead-lettered; runs whose backoff ended leave the retry set for the queue,
  also at `sc`. Then it pops up to N runs from the head.

  An entry missing what it cannot be drained without (its snapshot `s`, or its
  queue place `sc` when it comes back) is dead-lettered with the reason in
  `le`, counted in deadLettered: kept and readable, never left in no set.

  Attempts are counted here, at lease: every lease is one materialization
  attempt, so a run whose batch kills its drainer (and is never nacked) still
  runs out of attempts and is dead-lettered instead of looping forever.

  A lease changes only what a holder and the other scripts read: st, lt and
  at. The deadline lives in the lease zset (its score), not in the entry, and the
  version `v` is not raised: a leased run (state D) cannot be mutated, and it
  leaves state D only through ack (the hash is deleted), nack or reclaim (both
  raise `v`), so a compare-and-set against a version read before the lease
  still fails. The leased entries are read with one HMGET and written back
  with one HSET.

  Input:
    KEYS[1] queue list    mf:{env}:ql
    KEYS[2] back zset     mf:{env}:qb
    KEYS[3] lease zset    mf:{env}:lease
    KEYS[4] retry zset    mf:{env}:retry
    KEYS[5] failed zset   mf:{env}:failed
    KEYS[6] runs hash     mf:{env}:runs

    ARGV[1] most runs to lease (N, 0 only reclaims)
    ARGV[2] lease duration (ms)
    ARGV[3] lease token (one per batch)
    ARGV[4] max attempts: an expired lease at this many attempts is dead-lettered
    ARGV[5] most expired / due runs moved back per call (bounds the script's work)

  Output: { nowMs, deadlineMs, reclaimed, deadLettered, entries, expiredOut }
    entries: one flat list, 7 values per run in queue order:
    runId, s, ca, at, cx, cr, le (`s` without its run and env ids; `at`
    already counting this lease; a value that is not set is returned as
    false, i.e. nil). Flat and only what a holder needs: the reply is built
    and parsed once per run, not per table.
    expiredOut: the ids dead-lettered because their lease expired on their
    last attempt. The holder may have committed their rows and died before
    its ack: the drain looks them up in Postgres and settles those it finds
    (ack.lua with ARGV[8]).
]]
local rcall = redis.call
local queueKey, backKey, leaseKey, retryKey, failedKey, runsKey =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local want, leaseMs, token = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local maxAttempts, reclaimMax = tonumber(ARGV[4]), tonumber(ARGV[5])

--- @include "includes/time"
--- @include "includes/entry"
--- @include "includes/queue"

local now = now_ms()
local deadline = now + leaseMs
-- Formatted once: as a number it would be converted for every run's ZADD.
local deadlineText = string.format("%d", deadline)
local reclaimed, deadLettered = 0, 0
local expiredOut = {}

-- To the failed set with the reason: a run out of attempts, or a damaged
-- entry (a value it cannot be drained without is missing).
local function dead_letter(runId, e, reason)
  e[E_LT] = false
  e[E_ST] = "F"
  e[E_LE] = reason
  e[E_V] = (tonumber(e[E_V]) or 0) + 1
  entry_put(runsKey, runId, e)
  rcall("ZADD", failedKey, now, runId)
  deadLettered = deadLettered + 1
end

-- A reference with no entry whose hash of the earlier layout is still there
-- is left where it is (entry_waits_for_upgrade). The drainer upgrades before
-- its first lease, so this only guards a lease that came first anyway.
-- Expired leases: back to the head, or dead-lettered when out of attempts.
local expired = rcall("ZRANGEBYSCORE", leaseKey, "-inf", "(" .. now, "LIMIT", 0, reclaimMax)
for _, runId in ipairs(expired) do
  local e = entry_get(runsKey, runId)
  if e or not entry_waits_for_upgrade(runsKey, runId) then
    rcall("ZREM", leaseKey, runId)
  end
  if e and not e[E_SC] then
    dead_letter(runId, e, "buffered run has no queue place (sc)")
  elseif e and (tonumber(e[E_AT]) or 0) >= maxAttempts then
    dead_letter(runId, e, "lease expired after " .. string.format("%d", tonumber(e[E_AT]) or 0)
      .. " attempts")
    expiredOut[#expiredOut + 1] = runId
  elseif e then
    e[E_LT] = false
    e[E_ST] = "Q"
    e[E_V] = (tonumber(e[E_V]) or 0) + 1
    entry_put(runsKey, runId, e)
    rcall("ZADD", backKey, e[E_SC], runId)
    reclaimed = reclaimed + 1
  end
end

-- Backoff over: back to the queue at the arrival score.
local due = rcall("ZRANGEBYSCORE", retryKey, "-inf", now, "LIMIT", 0, reclaimMax)
for _, runId in ipairs(due) do
  local e = entry_get(runsKey, runId)
  if e or not entry_waits_for_upgrade(runsKey, runId) then
    rcall("ZREM", retryKey, runId)
  end
  if e and e[E_SC] then
    rcall("ZADD", backKey, e[E_SC], runId)
  elseif e then
    dead_letter(runId, e, "buffered run has no queue place (sc)")
  end
end

local entries = {}
if want > 0 then
  local ids = queue_take(queueKey, backKey, want)
  if #ids > 0 then
    -- One HMGET for every entry and one HSET and one ZADD for all the leased:
    -- the per-run work is an unpack and a pack.
    local raws = rcall("HMGET", runsKey, unpack(ids))
    local leased, written = {}, {}
    for i, runId in ipairs(ids) do
      -- A queue ref with no entry (should not happen): dropped, never leased.
      -- An entry without its snapshot can never be written: it is
      -- dead-lettered, kept and readable, rather than left in no set.
      if raws[i] then
        local e = entry_unpack(raws[i])
        if not e[E_S] then
          dead_letter(runId, e, "buffered run has no snapshot")
        else
          local at = (tonumber(e[E_AT]) or 0) + 1
          e[E_ST], e[E_LT], e[E_AT] = "D", token, at
          written[#written + 1] = runId
          written[#written + 1] = entry_pack(e)
          leased[#leased + 1] = deadlineText
          leased[#leased + 1] = runId
          local n = #entries
          entries[n + 1] = runId
          entries[n + 2] = e[E_S]
          entries[n + 3] = e[E_CA]
          entries[n + 4] = at
          entries[n + 5] = e[E_CX]
          entries[n + 6] = e[E_CR]
          entries[n + 7] = e[E_LE]
        end
      end
    end
    -- ZADD and HSET take a few thousand arguments comfortably; batches are <= 1000.
    if #leased > 0 then
      rcall("HSET", runsKey, unpack(written))
      rcall("ZADD", leaseKey, unpack(leased))
    end
  end
end
return { now, deadline, reclaimed, deadLettered, entries, expiredOut }
