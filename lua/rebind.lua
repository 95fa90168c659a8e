--[[
  Point an idempotency binding at another run, only if it still points at the
  expected one (a direct write found the key already held in Postgres by an
  older run, or gave up). An empty new run id drops the binding.

  Input:
    KEYS[1] binding   mf:{env}:idem:<task>:<key>
    ARGV[1] the run id the binding must point at now
    ARGV[2] the run id to point it at, or "" to delete it

  Output: 1 changed; 0 it pointed elsewhere (or was gone); nothing changed
]]
local rcall = redis.call
local bindingKey = KEYS[1]
local expected, replacement = ARGV[1], ARGV[2]

if rcall("GET", bindingKey) ~= expected then
  return 0
end
if replacement == "" then
  rcall("DEL", bindingKey)
else
  rcall("SET", bindingKey, replacement, "KEEPTTL")
end
return 1
