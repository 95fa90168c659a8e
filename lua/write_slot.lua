--[[
  Take, or renew, one of the Postgres write slots shared by every process of
  every sidecar on this Redis (drain batches and write-through inserts), so
  Postgres never holds more writing connections than MOLLIFIER_WRITE_SLOTS.

  A slot is a member of one sorted set scored by when it lapses: a holder
  that dies without giving its slot back loses it when the lease runs out.
  Giving a slot back is a plain ZREM of the holder.

  A caller takes a slot only while fewer than its own limit are held: the
  drain's limit is the whole budget and a write-through insert's one less,
  so direct writes can never hold every slot and starve the drain.

  Taking again under a holder id that holds a slot renews it: a caller that
  timed out waiting for the answer may ask again without counting twice.

  Input:
    KEYS[1] slots zset   mf:pg:slots   (holder -> lapses at, ms)
    ARGV[1] holder id (unique per taking)
    ARGV[2] limit: take only while fewer than this many slots are held
    ARGV[3] lease (ms)
    ARGV[4] "1" renew: only push out the lapse of a slot the holder holds

  Output: 1 taken (renewed); 0 none free (renewing: the slot had lapsed)
]]
local rcall = redis.call

--- @include "includes/time"

local slotsKey = KEYS[1]
local holder, limit, leaseMs = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local renew = ARGV[4] == "1"

local now = now_ms()
rcall("ZREMRANGEBYSCORE", slotsKey, "-inf", now)
if not rcall("ZSCORE", slotsKey, holder) then
  if renew or rcall("ZCARD", slotsKey) >= limit then
    return 0
  end
end
rcall("ZADD", slotsKey, now + leaseMs, holder)
-- The set outlives its longest lease only: sidecars gone, it goes too.
if rcall("PTTL", slotsKey) < leaseMs then
  rcall("PEXPIRE", slotsKey, leaseMs)
end
return 1
