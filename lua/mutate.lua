--[[
  Compare-and-set of one buffered run (MutateService): write a changed
  snapshot only if nobody changed the entry since the caller read it, and keep
  the call's answer under its request id in the same step.

  The caller reads the entry (HMGET ... v), changes the snapshot in its own
  code and calls this with the version it read. The change lands only when the
  entry still exists, is not leased (state Q queued or F dead-lettered: a
  leased run's snapshot is already in a drainer's hands) and its version is
  unchanged; the version is then raised, so every concurrent writer of the same
  version but one gets VERSION_CHANGED and reads again. A run that went through
  a lease in between is never written over blindly either: while leased it is
  refused, and it comes back only through a reclaim (lease.lua) or a nack, both
  of which raise the version, or not at all (ack.lua deletes it).

  The answer is kept under the request key before anything else is looked at:
  a retried call with the same request id gets the stored answer and changes
  nothing, even when two copies of the call run at once.

  Input:
    KEYS[1] runs hash     mf:{env}:runs
    KEYS[2] request key   mf:{env}:req:<request_id>
    KEYS[3] binding       mf:{env}:idem:<task>:<key>  (any key of the slot when unused)

    ARGV[1] the version the caller read (field v)
    ARGV[2] run id
    ARGV[3] the answer to keep under KEYS[2] ("" keeps none)
    ARGV[4] how long to keep the answer (ms)
    ARGV[5] "1" to write the change, "0" to only keep the answer (a no-op call)
    ARGV[6] the new snapshot (protobuf bytes, without run_id and env_id), ""
            to keep the current one
    ARGV[7] "1" to free the idempotency key: DEL KEYS[3] when it is bound to
            this run, and clear the entry's `ik`
    ARGV[8], ARGV[9] ... field / value pairs to set on the entry (cx, cr, du;
            cx and du are numbers)

  Output:
    { 1, newVersion }   APPLIED
    { 2, answer }       DUPLICATE_REQUEST: the answer kept for this request id
    { 3, version }      VERSION_CHANGED: read again and retry
    { 4 }               GONE: no entry (materialized, or never buffered)
    { 5 }               DRAINING: leased (state D); wait for its fate
    { 6, state }        DAMAGED: an unknown state
]]
local rcall = redis.call
local runsKey, requestKey, bindingKey = KEYS[1], KEYS[2], KEYS[3]
local expected, runId, answer, answerTtl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local write, snapshot, unbind = ARGV[5] == "1", ARGV[6], ARGV[7] == "1"

local kept = rcall("GET", requestKey)
if kept then
  return { 2, kept }
end

--- @include "includes/entry"

local e = entry_get(runsKey, runId)
local f = e and { e[E_ST], e[E_V] } or {}
if not f[1] then
  return { 4 }
end
if f[1] == "D" then
  return { 5 }
end
if f[1] ~= "Q" and f[1] ~= "F" then
  return { 6, f[1] }
end
-- Compared as text, as the caller read it: a version is an integer.
local current = string.format("%d", tonumber(f[2]) or 0)
if current ~= expected then
  return { 3, current }
end

local version = tonumber(f[2]) or 0
local NUMERIC = { cx = true, du = true }
if write then
  if snapshot ~= "" then
    e[E_S] = snapshot
  end
  for i = 8, #ARGV, 2 do
    local name = ARGV[i]
    local value = ARGV[i + 1]
    if NUMERIC[name] then
      value = tonumber(value) or 0
    elseif value == "" then
      value = false
    end
    e[E_POS[name]] = value
  end
  if unbind then
    if rcall("GET", bindingKey) == runId then
      rcall("DEL", bindingKey)
    end
    e[E_IK] = false
  end
  version = version + 1
  e[E_V] = version
  entry_put(runsKey, runId, e)
end
if answer ~= "" then
  rcall("SET", requestKey, answer, "PX", answerTtl)
end
return { 1, version }
