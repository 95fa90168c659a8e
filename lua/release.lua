--[[
  Give up a claim on an idempotency key without binding it. Only the holder of
  the claim's token may release it.

  Input:
    KEYS[1] claim     mf:{env}:claim:<task>:<key>
    ARGV[1] ownership token

  Output: 1 released; 0 not held under this token (lapsed or another's)
]]
local rcall = redis.call
local claimKey = KEYS[1]
if rcall("GET", claimKey) == ARGV[1] then
  rcall("DEL", claimKey)
  return 1
end
return 0
