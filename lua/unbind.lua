--[[
  Free an idempotency key whose run has left the buffer
  (MutateService.ResetIdempotencyKey): delete the binding only while it still
  points at the run the caller saw, so a binding made since by a new trigger
  is never deleted.

  Input:
    KEYS[1] binding       mf:{env}:idem:<task>:<key>

    ARGV[1] the run id the caller found bound

  Output: 1 when the binding was deleted, 0 when it was gone or points elsewhere
]]
local rcall = redis.call
local bindingKey = KEYS[1]
local runId = ARGV[1]

if rcall("GET", bindingKey) == runId then
  rcall("DEL", bindingKey)
  return 1
end
return 0
