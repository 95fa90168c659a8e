--[[
  Claim an idempotency key before the gate, so concurrent triggers with one key
  serialise and the burst lands exactly once.

  Input:
    KEYS[1] binding   mf:{env}:idem:<task>:<key>
    KEYS[2] claim     mf:{env}:claim:<task>:<key>
    ARGV[1] ownership token (random, chosen by the sidecar)
    ARGV[2] claim ttl (ms)

  Output: { state, value, retryAfterMs }
    state 1 CLAIMED:  value = the token
    state 2 RESOLVED: value = the bound run id
    state 3 BUSY:     value = "", retryAfterMs = time left on the holder's claim
]]
local rcall = redis.call
local bindingKey, claimKey = KEYS[1], KEYS[2]
local token, ttl = ARGV[1], tonumber(ARGV[2])

local bound = rcall("GET", bindingKey)
if bound then
  return { 2, bound, 0 }
end
if rcall("SET", claimKey, token, "NX", "PX", ttl) then
  return { 1, token, 0 }
end
local left = rcall("PTTL", claimKey)
if left < 0 then left = 0 end
return { 3, "", left }
