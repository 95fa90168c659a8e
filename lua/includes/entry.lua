--[[
  Shared by accept.lua and trigger.lua: taking one run into the buffer.

  A buffered run is one hash, mf:{env}:run:<run_id>, with the fields:
    s   the RunSnapshot, protobuf-encoded, ids filled in
    st  state: Q queued, D draining (leased), F failed (dead-lettered)
    sc  arrival score: its place in the queue, kept so a run that comes back
        from a lease or a backoff goes back to the same place (the head)
    ca  accepted at (ms)          org  org id
    du  delay_until (ms, 0 none)  ik   "<task>:<key>" when an idempotency key is bound
    at  materialization attempts  le   last error
    lt  lease token (state D; the deadline is its score in the lease zset)
    cx  cancelled at (ms)         cr   cancel reason
    v   version, raised by every change to the entry (compare-and-set); it
        starts at the arrival score, not at 1, so an entry made again for the
        same run id (a retried Accept after the run was drained) never meets a
        version read from the earlier one

  Accept results: 1 ACCEPTED, 2 DUPLICATE_RUN_ID, 3 DUPLICATE_IDEMPOTENCY_KEY,
  4 FULL (over the env's capacity, or the caller says the whole buffer is);
  trigger.lua adds 5 BOUND (key bound to the run for a direct write).
]]
-- Needs includes/time.
local RESULT_ACCEPTED, RESULT_DUP_RUN, RESULT_DUP_IDEM, RESULT_FULL = 1, 2, 3, 4

local ENTRY_FIELDS = { "s", "st", "ca", "at", "le", "cx", "cr", "du", "v" }

-- The fields a caller needs to answer with an existing run.
local function entry_view(runKey)
  return rcall("HMGET", runKey, unpack(ENTRY_FIELDS))
end

-- Returns { result, runId, createdAtMs, entryView } where entryView is the
-- existing run's fields for a duplicate found in the buffer, else {}.
local function accept_entry(k, a, now)
  -- A live binding wins: the key answers with its run, buffered or not. A
  -- binding to this very run was made by trigger.lua for a direct write that
  -- Postgres refused retryably; the run now comes to the buffer instead.
  if a.idem ~= "" then
    local bound = rcall("GET", k.idem)
    if bound and bound ~= a.runId then
      local existingKey = k.runPrefix .. bound
      return { RESULT_DUP_IDEM, bound, 0, entry_view(existingKey) }
    end
  end
  if rcall("EXISTS", k.run) == 1 then
    return { RESULT_DUP_RUN, a.runId, 0, entry_view(k.run) }
  end
  if a.totalFull == "1" then
    return { RESULT_FULL, a.runId, 0, {} }
  end
  local depth = rcall("ZCARD", k.queue) + rcall("ZCARD", k.lease)
    + rcall("ZCARD", k.retry) + rcall("ZCARD", k.failed)
  if depth >= a.capacity then
    return { RESULT_FULL, a.runId, 0, {} }
  end
  -- Strictly increasing per env, close to the accept time, so the queue keeps
  -- arrival order and its scores still read as times for the stale sweep.
  local last = tonumber(rcall("HGET", k.env, "ls")) or 0
  local score = math.max(now * 1000, last + 1)
  rcall("HSET", k.env, "ls", score, "org", a.orgId)
  local boundKey = ""
  -- A binding trigger.lua made for a direct write that turned buffered is set
  -- again below like any other: without a TTL while the run is buffered, and
  -- recorded in the entry (ik) so ack and reset find it.
  if a.idem ~= "" then
    if a.idemExpiresAt == 0 then
      rcall("SET", k.idem, a.runId)
      boundKey = a.idem
    elseif a.idemExpiresAt > now then
      rcall("SET", k.idem, a.runId, "PXAT", a.idemExpiresAt)
      boundKey = a.idem
    end
    -- An expiry already past binds nothing: the key is free again.
  end
  rcall("HSET", k.run, "s", a.snapshot, "st", "Q", "sc", score, "ca", now, "org", a.orgId,
    "du", a.delayUntil, "ik", boundKey, "at", 0, "v", score)
  rcall("ZADD", k.queue, score, a.runId)
  return { RESULT_ACCEPTED, a.runId, now, {} }
end
