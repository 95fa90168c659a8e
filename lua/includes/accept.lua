--[[
  Shared by accept.lua and trigger.lua: taking one run into the buffer.

  Accept results: 1 ACCEPTED, 2 DUPLICATE_RUN_ID, 3 DUPLICATE_IDEMPOTENCY_KEY,
  4 FULL (over the env's capacity, or the caller says the whole buffer is);
  trigger.lua adds 5 BOUND (key bound to the run for a direct write).
]]
-- Needs includes/time, includes/entry and includes/queue.
local RESULT_ACCEPTED, RESULT_DUP_RUN, RESULT_DUP_IDEM, RESULT_FULL = 1, 2, 3, 4

-- Returns { result, runId, createdAtMs, entryView } where entryView is the
-- existing run's fields for a duplicate found in the buffer, else {}.
local function accept_entry(k, a, now)
  -- A live binding wins: the key answers with its run, buffered or not. A
  -- binding to this very run was made by trigger.lua for a direct write that
  -- Postgres refused retryably; the run now comes to the buffer instead.
  if a.idem ~= "" then
    local bound = rcall("GET", k.idem)
    if bound and bound ~= a.runId then
      return { RESULT_DUP_IDEM, bound, 0, entry_view(entry_get(k.runs, bound)) }
    end
  end
  local existing = entry_get(k.runs, a.runId)
  if existing then
    return { RESULT_DUP_RUN, a.runId, 0, entry_view(existing) }
  end
  if a.totalFull == "1" then
    return { RESULT_FULL, a.runId, 0, {} }
  end
  local depth = queue_len(k.queue, k.back) + rcall("ZCARD", k.lease)
    + rcall("ZCARD", k.retry) + rcall("ZCARD", k.failed)
  if depth >= a.capacity then
    return { RESULT_FULL, a.runId, 0, {} }
  end
  -- Strictly increasing per env, close to the accept time, so the queue keeps
  -- arrival order and its scores still read as times for the stale sweep.
  local last = tonumber(rcall("HGET", k.env, "ls")) or 0
  local score = math.max(now * 1000, last + 1)
  rcall("HSET", k.env, "ls", string.format("%d", score), "org", a.orgId)
  local boundKey = false
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
  entry_put(k.runs, a.runId,
    { a.snapshot, "Q", score, now, a.delayUntil, boundKey, 0, score, false, false, false, false })
  rcall("RPUSH", k.queue, a.runId)
  return { RESULT_ACCEPTED, a.runId, now, {} }
end
