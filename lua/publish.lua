--[[
  Bind a claimed idempotency key to the run its holder created, and drop the
  claim. Only the holder of the claim's token may publish: a stale holder whose
  claim lapsed (and was perhaps taken by another) changes nothing.

  Input:
    KEYS[1] binding   mf:{env}:idem:<task>:<key>
    KEYS[2] claim     mf:{env}:claim:<task>:<key>
    ARGV[1] ownership token
    ARGV[2] run id
    ARGV[3] binding expires at (ms, absolute)

  Output: { code, runId }
    1: bound to runId (also when it already was: a repeated publish)
    0: the claim is not held under this token; nothing changed
   -1: the key is already bound to another run (runId names it); claim dropped
]]
local rcall = redis.call
local bindingKey, claimKey = KEYS[1], KEYS[2]
local token, runId, expiresAt = ARGV[1], ARGV[2], tonumber(ARGV[3])

if rcall("GET", claimKey) ~= token then
  -- The same publish again (its answer was lost, the client retried): the
  -- key is bound as asked, so it answers as the first did.
  if rcall("GET", bindingKey) == runId then
    return { 1, runId }
  end
  return { 0, "" }
end
rcall("DEL", claimKey)
local bound = rcall("GET", bindingKey)
if bound and bound ~= runId then
  return { -1, bound }
end
rcall("SET", bindingKey, runId, "PXAT", expiresAt)
return { 1, runId }
