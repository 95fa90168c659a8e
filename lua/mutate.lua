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
    KEYS[1] run hash      mf:{env}:run:<run_id>
    KEYS[2] request key   mf:{env}:req:<request_id>
    KEYS[3] binding       mf:{env}:idem:<task>:<key>  (any key of the slot when unused)

    ARGV[1] the version the caller read (field v)
    ARGV[2] run id
    ARGV[3] the answer to keep under KEYS[2] ("" keeps none)
    ARGV[4] how long to keep the answer (ms)
    ARGV[5] "1" to write the change, "0" to only keep the answer (a no-op call)
    ARGV[6] the new snapshot (protobuf bytes), "" to keep the current one
    ARGV[7] "1" to free the idempotency key: DEL KEYS[3] when it is bound to
            this run, and clear the entry's `ik`
    ARGV[8], ARGV[9] ... field / value pairs to HSET on the entry (cx, cr, du)

  Output:
    { 1, newVersion }   APPLIED
    { 2, answer }       DUPLICATE_REQUEST: the answer kept for this request id
    { 3, version }      VERSION_CHANGED: read again and retry
    { 4 }               GONE: no entry (materialized, or never buffered)
    { 5 }               DRAINING: leased (state D); wait for its fate
    { 6, state }        DAMAGED: an unknown state
]]
local rcall = redis.call
local runKey, requestKey, bindingKey = KEYS[1], KEYS[2], KEYS[3]
local expected, runId, answer, answerTtl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local write, snapshot, unbind = ARGV[5] == "1", ARGV[6], ARGV[7] == "1"

local kept = rcall("GET", requestKey)
if kept then
  return { 2, kept }
end

local f = rcall("HMGET", runKey, "st", "v")
if not f[1] then
  return { 4 }
end
if f[1] == "D" then
  return { 5 }
end
if f[1] ~= "Q" and f[1] ~= "F" then
  return { 6, f[1] }
end
if (f[2] or "0") ~= expected then
  return { 3, f[2] or "0" }
end

local version = tonumber(f[2]) or 0
if write then
  if snapshot ~= "" then
    rcall("HSET", runKey, "s", snapshot)
  end
  for i = 8, #ARGV, 2 do
    rcall("HSET", runKey, ARGV[i], ARGV[i + 1])
  end
  if unbind then
    if rcall("GET", bindingKey) == runId then
      rcall("DEL", bindingKey)
    end
    rcall("HSET", runKey, "ik", "")
  end
  version = rcall("HINCRBY", runKey, "v", 1)
end
if answer ~= "" then
  rcall("SET", requestKey, answer, "PX", answerTtl)
end
return { 1, version }
