--[[
  Shared: an env's queue of runs waiting to be leased, in two keys.

    queue  LIST mf:{env}:ql   run ids accepted and never leased, in arrival
                              order: RPUSH at accept, popped from the head
    back   ZSET mf:{env}:qb   run id -> arrival score (`sc`): runs that came
                              back (an expired lease, a backoff that ended, a
                              retried dead letter)

  A run comes back only after a lease took it from the head, so it is older
  than every run still in the LIST (and later arrivals are newer still):
  taking `back` in score order and then the LIST's head keeps arrival order
  exactly. A LIST costs ~18 bytes a run where a ZSET member costs ~125, and
  `back` stays small (only runs that came back).

  The LIST is sorted by arrival score too (accept's scores strictly increase
  per env), which is what queue_first_after's binary search relies on.
]]
-- Needs includes/entry (queue_first_after reads arrival scores).

local function queue_len(queueKey, backKey)
  return rcall("LLEN", queueKey) + rcall("ZCARD", backKey)
end

-- Up to n run ids from the head, removed: `back` first, then the LIST.
local function queue_take(queueKey, backKey, n)
  local ids = rcall("ZRANGE", backKey, 0, n - 1)
  if #ids > 0 then
    rcall("ZREMRANGEBYRANK", backKey, 0, #ids - 1)
  end
  if #ids < n then
    local more = rcall("LPOP", queueKey, n - #ids)
    if more then
      for _, runId in ipairs(more) do
        ids[#ids + 1] = runId
      end
    end
  end
  return ids
end

-- The arrival score of the LIST's run at index i (0-based), or nil when the
-- index is past the end. A reference with no entry (or no score: damaged)
-- reads as the next run's score, which keeps the LIST sorted for the binary
-- search, and nil when no run after it has one.
local function queue_score_at(queueKey, runsKey, i)
  while true do
    local ids = rcall("LRANGE", queueKey, i, i + 15)
    if #ids == 0 then
      return nil
    end
    for _, runId in ipairs(ids) do
      local e = entry_get(runsKey, runId)
      if e and e[E_SC] then
        return e[E_SC]
      end
    end
    i = i + #ids
  end
end

-- The index of the LIST's first run whose arrival score is above `score`
-- (LLEN when none is): a binary search, ~log2(n) LRANGE reads and unpacks.
local function queue_first_after(queueKey, runsKey, score)
  local lo, hi = 0, rcall("LLEN", queueKey)
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if (queue_score_at(queueKey, runsKey, mid) or math.huge) > score then
      hi = mid
    else
      lo = mid + 1
    end
  end
  return lo
end
