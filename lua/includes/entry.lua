--[[
  Shared: a buffered run's entry, packed and unpacked.

  Every buffered run of an env is one field of one hash, mf:{env}:runs, keyed
  by run id, whose value is the entry packed with cmsgpack as an array of
  twelve values (false where a value is not set):
    1 s   the RunSnapshot, protobuf-encoded, without its run_id and env_id
          (the field name and the key hold them; readers put them back)
    2 st  state: Q queued, D draining (leased), F failed (dead-lettered)
    3 sc  arrival score: its place in the queue, kept so a run that comes back
          from a lease or a backoff goes back to the same place (the head)
    4 ca  accepted at (ms)
    5 du  delay_until (ms, 0 none)
    6 ik  "<task>:<key>" when an idempotency key is bound
    7 at  materialization attempts
    8 v   version, raised by every change to the entry (compare-and-set); it
          starts at the arrival score, not at 1, so an entry made again for the
          same run id (a retried Accept after the run was drained) never meets a
          version read from the earlier one. Packed as its distance from the
          arrival score (one byte, not nine); entry_unpack gives it whole
    9 lt  lease token (state D; the deadline is its score in the lease zset)
   10 le  last error
   11 cx  cancelled at (ms)
   12 cr  cancel reason
  One packed value in one hash per env, rather than a hash per run, is what
  keeps a buffered run within 1.5x its snapshot's bytes (docs/benchmarks.md):
  a top-level key costs ~106 bytes before its value.

  Numbers are packed as integers (cmsgpack packs an integral number as one);
  scores, ~1.8e15, are exact in Lua's doubles (below 2^53).
]]

local E_S, E_ST, E_SC, E_CA, E_DU, E_IK, E_AT, E_V, E_LT, E_LE, E_CX, E_CR =
  1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
local E_COUNT = 12
-- Positions by field name, for callers that name fields (mutate.lua).
local E_POS = { s = 1, st = 2, sc = 3, ca = 4, du = 5, ik = 6, at = 7, v = 8,
  lt = 9, le = 10, cx = 11, cr = 12 }

-- A packed value as an entry table; one that cannot be unpacked reads as an
-- entry holding those bytes as its snapshot and nothing else, never as a
-- script error: the drain then finds the snapshot undecodable and
-- dead-letters it with the bytes kept, and readers report it damaged.
local function entry_unpack(raw)
  local ok, e = pcall(cmsgpack.unpack, raw)
  if not ok or type(e) ~= "table" then
    e = { raw }
  end
  for i = 1, E_COUNT do
    if e[i] == nil then e[i] = false end
  end
  -- A queue place that is not a number is no queue place (damaged): the
  -- scripts compare and ZADD it, and a string there would stop them midway.
  -- (cmsgpack unpacks numbers as numbers, so a string is never a valid one.)
  if type(e[E_SC]) ~= "number" then e[E_SC] = false end
  -- The same rule as the Python codec's entry_view: a value that is not a
  -- number counts as 0.
  local stored = type(e[E_V]) == "number" and e[E_V] or 0
  e[E_V] = stored + (e[E_SC] or 0)
  return e
end

-- The entry of one run, or nil when the run has none.
local function entry_get(runsKey, runId)
  local raw = rcall("HGET", runsKey, runId)
  if not raw then
    return nil
  end
  return entry_unpack(raw)
end

-- Packs the entry; the table is left as it was (its version whole).
local function entry_pack(e)
  for i = 1, E_COUNT do
    if e[i] == nil then e[i] = false end
  end
  local version = e[E_V]
  e[E_V] = (tonumber(version) or 0) - (tonumber(e[E_SC]) or 0)
  local packed = cmsgpack.pack(e)
  e[E_V] = version
  return packed
end

local function entry_put(runsKey, runId, e)
  rcall("HSET", runsKey, runId, entry_pack(e))
end

-- Whether a run with no entry still has its hash of the earlier layout,
-- mf:{env}:run:<run_id>, beside mf:{env}:runs: upgrade.lua has not moved it
-- yet, so a reference to it is left for the move rather than dropped.
local function entry_waits_for_upgrade(runsKey, runId)
  local oldKey = string.sub(runsKey, 1, #runsKey - #"runs") .. "run:" .. runId
  return rcall("EXISTS", oldKey) == 1
end

-- What a caller answers with (s st ca at le cx cr du v, as the Python
-- codec's ENTRY_FIELDS); all nil for no entry.
local function entry_view(e)
  if not e then
    return { false, false, false, false, false, false, false, false, false }
  end
  return { e[E_S], e[E_ST], e[E_CA], e[E_AT], e[E_LE], e[E_CX], e[E_CR], e[E_DU], e[E_V] }
end
