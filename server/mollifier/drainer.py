"""The drainer: buffered runs into Postgres, exactly once, fairly across tenants.

Each tick reads the org index, takes the next slice of orgs (at most
``drain_orgs_per_tick``, round-robin by a cursor) and, inside each org, the
next env (a cursor per org, advanced by one each visit). Every org in the slice
gets the same number of picks per tick whatever its number of envs, so an org
with six busy envs and an org with one are drained one to one. When there are
fewer orgs than ``drain_concurrency``, the slice is walked again (more rounds)
so Postgres is still kept busy, with every org getting one pick per round.

A pick leases one batch in one Lua call (lua/lease.lua: entries become DRAINING
with a per-batch token and a deadline), writes it in one statement
(materializer.materialize_batch), and acks after commit. Retryable Postgres
errors nack with exponential backoff; attempts are counted at lease and a run
is dead-lettered when they run out. Before committing, the batch checks that
its lease has time left: a drainer that stalled past its lease rolls back and
leaves the runs to whoever leased them next. Materialization is idempotent on
run id, so a commit whose ack was lost (crash, Redis blip) creates nothing
twice when the runs are leased again.

Everything a DrainService handler needs is a plain async method here, so tests
drive the drainer without gRPC.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import duration_pb2
from mollifier_client.v1 import drain_pb2, run_pb2
from psycopg_pool import AsyncConnectionPool

from .buffer import depths
from .codec import (
    as_text,
    decode_snapshot,
    entry_to_run,
    entry_view,
    env_field,
    full_snapshot,
    now_ms,
    ts_from_ms,
)
from .config import Settings
from .errors import DamagedEntry
from .keys import DRAIN_PAUSED, INDEX_ORGS, OLD_RUN_PATTERN, env_keys, old_run_env, org_envs_key
from .materializer import (
    Entry,
    LeaseLost,
    Outcome,
    Result,
    describe_error,
    is_retryable,
    rows_of,
    write_batch,
)
from .scripts import Scripts
from .slots import WriteSlots
from .validation import Violations

__all__ = ["Drainer", "LeasedBatch", "LeasedRun"]

log = logging.getLogger("mollifier.drainer")

BACKOFF_CAP_MS = 60_000
MAX_LEASE_RUNS = 1000
RECLAIM_PER_CALL = 1000
# Runs upgrade.lua moves out of an env's old queue per call.
UPGRADE_PER_CALL = 1000
REPAIR_INTERVAL_S = 30.0
SWEEP_INTERVAL_S = 5.0
SWEEP_ORGS_PER_PASS = 100
ORG_EMPTY_GRACE_S = 1.0
DEFAULT_PAGE = 50
MAX_PAGE = 1000


def _int(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        if v is None or v in (b"", ""):
            return 0
        return int(float(v))


# Values per run in lease.lua's flat reply: runId, s, ca, at, cx, cr, le.
LEASE_STRIDE = 7


@dataclass(slots=True)
class LeasedRun:
    """One leased entry, as lease.lua returns it."""

    run_id: str
    raw: bytes
    accepted_ms: int
    attempts: int
    canceled_ms: int
    cancel_reason: str
    last_error: str


@dataclass(slots=True)
class LeasedBatch:
    """One env's leased batch: its token, deadline and runs."""

    env_id: str
    token: str
    deadline_ms: int
    # Redis's clock at lease and our monotonic clock then: the time left is
    # measured on our clock, so a skewed local wall clock does not matter.
    redis_now_ms: int
    mono_at: float
    # lease.lua's reply as it came, LEASE_STRIDE values per run: the drainer
    # turns it straight into entries, and ``runs`` is only built when read.
    flat: list[Any] = field(default_factory=list)
    reclaimed: int = 0
    dead_lettered: int = 0
    # Dead-lettered by this lease call because their lease expired on their
    # last attempt (see Drainer._settle_written).
    expired_out: list[str] = field(default_factory=list)
    _runs: list[LeasedRun] | None = None

    @property
    def size(self) -> int:
        return len(self.flat) // LEASE_STRIDE

    @property
    def runs(self) -> list[LeasedRun]:
        if self._runs is None:
            f = self.flat
            self._runs = [
                LeasedRun(
                    f[i].decode(),
                    f[i + 1],
                    _int(f[i + 2]),
                    _int(f[i + 3]),
                    _int(f[i + 4]) if f[i + 4] else 0,
                    f[i + 5].decode() if f[i + 5] else "",
                    f[i + 6].decode() if f[i + 6] else "",
                )
                for i in range(0, len(f), LEASE_STRIDE)
            ]
        return self._runs

    def remaining_ms(self) -> float:
        elapsed = (time.monotonic() - self.mono_at) * 1000
        return self.deadline_ms - self.redis_now_ms - elapsed


class _Rotation:
    """Round-robin cursors: the last org visited, and the last env per org.

    Cursors are ids, not positions, so orgs and envs coming and going do not
    shift anyone's turn.
    """

    def __init__(self) -> None:
        self.last_org = ""
        self.last_env: dict[str, str] = {}

    @staticmethod
    def after(items: Sequence[str], last: str) -> int:
        for i, item in enumerate(items):
            if item > last:
                return i
        return 0

    def next_orgs(self, orgs: Sequence[str], n: int) -> list[str]:
        if not orgs:
            return []
        start = self.after(orgs, self.last_org)
        n = min(n, len(orgs))
        picked = [orgs[(start + i) % len(orgs)] for i in range(n)]
        self.last_org = picked[-1]
        return picked

    def next_env(self, org: str, envs: Sequence[str]) -> str:
        i = self.after(envs, self.last_env.get(org, ""))
        self.last_env[org] = envs[i]
        return envs[i]


class _RateLimit:
    """At most ``rate`` rows per second across all batches (0 = no limit)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.next_free = time.monotonic()

    async def take(self, rows: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        start = max(now, self.next_free)
        self.next_free = start + rows / self.rate
        if start > now:
            await asyncio.sleep(start - now)

    def refund(self, rows: int) -> None:
        """Give back rows taken but not used (a batch came back smaller)."""
        if self.rate > 0 and rows > 0:
            self.next_free = max(time.monotonic(), self.next_free - rows / self.rate)


class Drainer:
    """The built-in drainer, plus the lease/ack/nack/status logic DrainService uses."""

    def __init__(
        self,
        settings: Settings,
        redis: Any,
        scripts: Scripts,
        pool: AsyncConnectionPool | None,
        *,
        consumer_id: str = "",
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.scripts = scripts
        self.pool = pool
        self.consumer_id = consumer_id or "drainer-" + secrets.token_hex(4)
        self.sem = asyncio.Semaphore(settings.drain_concurrency)
        self.slots = WriteSlots(settings, redis, scripts)
        self.rate = _RateLimit(settings.drain_rate_per_sec)
        self.rotation = _Rotation()
        self.external_rotation = _Rotation()
        # Counts for status and metrics (this process only).
        self.materialized_total = 0
        self.failed_total = 0
        self.dead_lettered_total = 0
        self.requeued_total = 0
        self.stale_entries = 0
        self.in_flight = 0
        self.ticks = 0
        # Pauses taken by the linger (see _loop); and whether the last pick
        # reached every env with runs.
        self.lingers = 0
        self._picked_every_env = True
        self._stale_counts: dict[str, int] = {}
        self._layout_checked = False
        self._layout_task: asyncio.Task[int] | None = None
        self._sweep_orgs: list[str] = []
        self._sweep_visited: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._batches: set[asyncio.Task[int]] = set()
        self._leased_since_check = 0
        self._empty_orgs: dict[str, float] = {}
        self._paused_cache: tuple[float, bool] = (0.0, False)
        # Set when the drain loop runs in another process (the drain process):
        # the Redis hash it publishes its counters to (see supervisor.py).
        self.remote_key: str | None = None

    # -- configuration ---------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether this sidecar runs the built-in drainer at all."""
        s = self.settings
        return s.drain_enabled and s.drain_sink == "postgres" and self.pool is not None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def commit_margin_ms(self) -> float:
        # A commit must finish well inside the lease; a third of it, at most 2 s.
        return min(self.settings.drain_lease_ms / 3, 2000.0)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the loop (idempotent)."""
        if self.running:
            return
        if self.pool is None:
            raise RuntimeError("the drainer needs a Postgres pool")
        self._stopping = False
        self._wake.clear()
        self._task = asyncio.create_task(self._loop(), name="mollifier-drainer")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop leasing, give in-flight batches ``grace`` seconds, then cancel them.

        A cancelled batch is not lost: its lease runs out and another drainer
        (or this one, restarted) takes it; if it had committed, the rows exist
        and the retry creates nothing twice.
        """
        self._stopping = True
        self._wake.set()
        task = self._task
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=max(grace, 0.0))
        except (TimeoutError, asyncio.CancelledError, Exception):
            task.cancel()
            for batch in list(self._batches):
                batch.cancel()
            with contextlib.suppress(BaseException):
                await task
            log.warning("drainer stopped before its in-flight batches finished")
        self._task = None

    async def _sleep(self, seconds: float) -> None:
        """Sleep, or less when woken (stop, resume, retry_failed)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        if not self._stopping:
            # One wake-up per set(): left set, every later sleep would return
            # at once and the loop would spin on Redis.
            self._wake.clear()

    async def _repair_in_background(self) -> None:
        try:
            await self.repair_index()
        except Exception:
            log.exception("index repair failed")

    async def _layout_ready(self) -> None:
        """Before this drainer's first lease or retry of dead letters: runs of
        the earlier layout moved. A lease before it would find an old run's
        expired lease or ended backoff with no entry and drop the reference.
        Once per drainer, in a task of its own: a caller that gives up (an RPC
        deadline) does not stop it, and the next caller waits for the same one;
        a failure raises and the next caller starts it again."""
        if self._layout_checked:
            return
        task = self._layout_task
        if task is None or (task.done() and (task.cancelled() or task.exception())):
            task = self._layout_task = asyncio.create_task(self.upgrade_layout())
        await asyncio.shield(task)
        self._layout_checked = True

    async def upgrade_layout(self) -> int:
        """Move runs buffered by a sidecar of the earlier layout (a hash per run)
        into the current one (lua/upgrade.lua); returns how many were moved.
        Found by one SCAN; each call of the script does a bounded amount of work
        (UPGRADE_PER_CALL runs), so Redis is never held long."""
        envs: set[str] = set()
        async for raw in self.redis.scan_iter(match=OLD_RUN_PATTERN, count=1000):
            env_id = old_run_env(as_text(raw))
            if env_id is not None:
                envs.add(env_id)
        moved = 0
        for env_id in sorted(envs):
            moved += await self._upgrade_env(env_id)
        if moved:
            log.info("runs moved from the earlier buffer layout", extra={"runs": moved})
        return moved

    async def _upgrade_env(self, env_id: str) -> int:
        """One env's part of upgrade_layout; returns how many runs were moved."""
        k = env_keys(env_id)
        keys = [k.back, k.runs, k.old_queue]
        old_prefix = k.old_run_prefix
        moved = 0

        async def upgrade(most: int, ids: Sequence[str] = ()) -> int:
            nonlocal moved
            r = await self.scripts.upgrade(self.redis, keys, [old_prefix, most, *ids])
            moved += int(r[0])
            return int(r[1])  # runs still in the old queue

        # Runs in the lease, retry and failed sets keep their place: only their
        # hash becomes an entry. ZSCAN, not ranks: other drainers may change
        # those sets meanwhile, and ZSCAN still returns every member that stays
        # in a set for the whole scan.
        for key in (k.lease, k.retry, k.failed):
            ids: list[str] = []
            async for member, _ in self.redis.zscan_iter(key, count=UPGRADE_PER_CALL):
                ids.append(as_text(member))
                if len(ids) >= UPGRADE_PER_CALL:
                    await upgrade(0, ids)
                    ids = []
            if ids:
                await upgrade(0, ids)
        while await upgrade(UPGRADE_PER_CALL):
            pass
        return moved

    async def _loop(self) -> None:
        backoff = 0.1
        last_repair = 0.0
        last_sweep = 0.0
        repair: asyncio.Task[None] | None = None
        try:
            while not self._stopping:
                try:
                    mono = time.monotonic()
                    if mono - last_repair >= REPAIR_INTERVAL_S and (
                        repair is None or repair.done()
                    ):
                        last_repair = mono
                        # Beside the ticks, not before them: its SCAN of every
                        # key would hold up the first lease after a start (tens
                        # of ms with a deep buffer), and it only adds envs the
                        # index lost, which the next ticks then pick.
                        repair = asyncio.create_task(self._repair_in_background())
                    if mono - last_sweep >= SWEEP_INTERVAL_S:
                        last_sweep = mono
                        await self.sweep_stale()
                    leased = await self._launch_tick()
                    backoff = 0.1
                    if not leased:
                        await self._sleep(self.settings.drain_idle_ms / 1000)
                    elif (
                        leased < self.settings.drain_batch_size // 4
                        and self.settings.drain_linger_ms
                        and self._picked_every_env
                    ):
                        # A trickle (the tail of a burst being buffered as it
                        # drains): let it gather into batches. Leasing a few runs
                        # at a time costs a lease, a transaction and an ack each,
                        # and took more CPU per run than the gate's own work,
                        # on the same cores as the gate. Only when the tick
                        # reached every env with runs: with more envs waiting
                        # (many small ones), the next tick has work for Postgres.
                        self.lingers += 1
                        await self._sleep(self.settings.drain_linger_ms / 1000)
                except Exception:
                    # One bad tick (Redis blip, ...) never ends the loop; back off.
                    log.exception("drain tick failed")
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            if repair is not None:
                repair.cancel()
                with contextlib.suppress(BaseException):
                    await repair
            # Stopping: no new leases; the batches in flight finish (stop() bounds it).
            if self._batches:
                await asyncio.gather(*self._batches, return_exceptions=True)

    async def _launch_tick(self) -> int:
        """One tick without waiting for its batches to finish: the next tick picks
        as soon as a slot frees, so Postgres never idles between ticks. Batches
        of a tick take slots in pick order, ahead of the next tick's. Returns
        how many runs were leased since the last call."""
        if await self._paused_cached():
            return 0
        self.ticks += 1
        picks = await self.pick(self.rotation, self.settings.drain_concurrency)
        for org, env in picks:
            task = asyncio.create_task(self._drain_env(org, env))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
        while len(self._batches) >= self.settings.drain_concurrency:
            await asyncio.wait(self._batches, return_when=asyncio.FIRST_COMPLETED)
        if self._leased_since_check == 0 and self._batches:
            # Nothing leased lately: let the rest finish before deciding to idle.
            await asyncio.wait(self._batches)
        leased, self._leased_since_check = self._leased_since_check, 0
        return leased

    # -- pause -----------------------------------------------------------------

    async def is_paused(self) -> bool:
        return bool(await self.redis.exists(DRAIN_PAUSED))

    async def _paused_cached(self) -> bool:
        mono = time.monotonic()
        at, value = self._paused_cache
        if mono - at > 0.25:
            value = await self.is_paused()
            self._paused_cache = (mono, value)
        return value

    async def pause(self, reason: str = "") -> int:
        """Pause every sidecar's drainer on this Redis (shared key)."""
        await self.redis.set(DRAIN_PAUSED, reason or "paused")
        self._paused_cache = (0.0, True)
        # The flag is shared: every drainer on this Redis is paused now, even
        # when this sidecar runs none itself.
        return drain_pb2.DRAIN_STATE_PAUSED

    async def resume(self) -> int:
        await self.redis.delete(DRAIN_PAUSED)
        self._paused_cache = (0.0, False)
        self._wake.set()
        return drain_pb2.DRAIN_STATE_RUNNING

    async def state(self) -> int:
        if not self.enabled:
            return drain_pb2.DRAIN_STATE_DISABLED
        if await self.is_paused():
            return drain_pb2.DRAIN_STATE_PAUSED
        return drain_pb2.DRAIN_STATE_RUNNING

    # -- picking envs fairly ---------------------------------------------------

    async def pick(self, rotation: _Rotation, min_picks: int = 1) -> list[tuple[str, str]]:
        """(org, env) pairs for one tick: the next orgs, the next env of each.

        Rounds repeat over the same slice of orgs until there are ``min_picks``
        picks, so every org in the slice gets the same number.
        """
        orgs = sorted(as_text(o) for o in await self.redis.smembers(INDEX_ORGS))
        slice_ = rotation.next_orgs(orgs, self.settings.drain_orgs_per_tick)
        if not slice_:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for org in slice_:
            pipe.smembers(org_envs_key(org))
        members = await pipe.execute()
        envs_by_org = {
            org: sorted(as_text(e) for e in envs) for org, envs in zip(slice_, members, strict=True)
        }
        live = [org for org in slice_ if envs_by_org[org]]
        # Whether this tick reaches every indexed env (see the linger in _loop).
        every = len(slice_) == len(orgs)
        for org in live:
            self._empty_orgs.pop(org, None)
        for org in slice_:
            if not envs_by_org[org]:
                await self._unindex_org(org)
        if not live:
            return []
        rounds = max(1, math.ceil(min_picks / len(live)))
        picks: list[tuple[str, str]] = []
        for _ in range(rounds):
            for org in live:
                picks.append((org, rotation.next_env(org, envs_by_org[org])))
        self._picked_every_env = every and len(set(picks)) == sum(
            len(envs_by_org[org]) for org in live
        )
        return picks

    # -- index upkeep ----------------------------------------------------------

    async def _env_depth(self, env_id: str) -> int:
        return (await depths(self.scripts, self.redis, [env_id]))[0].total

    async def _unindex_env(self, org: str, env_id: str) -> None:
        """Drop an empty env from its org's set without ever losing a live one.

        SREM first, then re-check: an accept adds to the index after its script
        (same pipeline), so either we see its entry and re-add, or its SADD
        comes after our SREM.
        """
        key = org_envs_key(org)
        await self.redis.srem(key, env_id)
        if await self._env_depth(env_id) > 0:
            await self.redis.sadd(key, env_id)
            return
        if await self.redis.scard(key) == 0:
            await self._unindex_org(org)

    async def _unindex_org(self, org: str) -> None:
        """Drop an org whose env set has stayed empty for a while.

        Accept adds the org before the env (same pipeline), so an org seen with
        no envs may be a brand-new one whose env SADD is a moment away; it is
        only removed once it has been seen empty for ORG_EMPTY_GRACE_S, and
        re-added if an env appeared meanwhile.
        """
        mono = time.monotonic()
        first = self._empty_orgs.setdefault(org, mono)
        if mono - first < ORG_EMPTY_GRACE_S:
            return
        del self._empty_orgs[org]
        key = org_envs_key(org)
        if await self.redis.scard(key) > 0:
            return
        await self.redis.srem(INDEX_ORGS, org)
        if await self.redis.scard(key) > 0:
            await self.redis.sadd(INDEX_ORGS, org)

    async def repair_index(self) -> int:
        """Re-add every env with buffered runs to the index (SCAN of env hashes).

        The index may lag (it cannot be updated in the env's script on a
        cluster); this pass bounds the lag. Returns the envs re-added.
        """
        added = 0
        batch: list[str] = []

        async def flush(names: list[str]) -> int:
            pipe = self.redis.pipeline(transaction=False)
            for env_id in names:
                pipe.hget(env_keys(env_id).env, "org")
            orgs = await pipe.execute()
            found = await depths(self.scripts, self.redis, names)
            n = 0
            for env_id, org_raw, depth in zip(names, orgs, found, strict=True):
                org = as_text(org_raw)
                if org and depth.total > 0:
                    p = self.redis.pipeline(transaction=False)
                    p.sadd(org_envs_key(org), env_id)
                    p.sadd(INDEX_ORGS, org)
                    r = await p.execute()
                    n += int(r[0])
            return n

        async for raw in self.redis.scan_iter(match="mf:{*}:env", count=1000):
            name = as_text(raw)
            if not (name.startswith("mf:{") and name.endswith("}:env")):
                continue
            batch.append(name[4:-5])
            if len(batch) >= 200:
                added += await flush(batch)
                batch = []
        if batch:
            added += await flush(batch)
        if added:
            log.info("index repaired", extra={"envs_added": added})
        return added

    # -- stale sweep -----------------------------------------------------------

    async def sweep_stale(self) -> int:
        """One shard of the stale sweep: up to SWEEP_ORGS_PER_PASS orgs.

        The org list is frozen at the start of a cycle; per-env counts persist
        between passes and, at the end of a cycle, envs not visited (drained and
        gone from the index) are dropped so their counts cannot stick.
        Returns the current total, also kept in ``stale_entries``.
        """
        if not self._sweep_orgs:
            self._sweep_orgs = sorted(as_text(o) for o in await self.redis.smembers(INDEX_ORGS))
            self._sweep_visited = set()
        shard, self._sweep_orgs = (
            self._sweep_orgs[:SWEEP_ORGS_PER_PASS],
            self._sweep_orgs[SWEEP_ORGS_PER_PASS:],
        )
        if shard:
            pipe = self.redis.pipeline(transaction=False)
            for org in shard:
                pipe.smembers(org_envs_key(org))
            envs = sorted({as_text(e) for group in await pipe.execute() for e in group})
            cutoff = (now_ms() - self.settings.stale_after_ms) * 1000
            # Arrival scores are accept-time ms * 1000; depth.lua counts the
            # queued runs at or before the cutoff by a binary search.
            found = await depths(self.scripts, self.redis, envs, cutoff)
            for env_id, depth in zip(envs, found, strict=True):
                self._sweep_visited.add(env_id)
                if depth.stale:
                    self._stale_counts[env_id] = depth.stale
                else:
                    self._stale_counts.pop(env_id, None)
        if not self._sweep_orgs:
            for env_id in list(self._stale_counts):
                if env_id not in self._sweep_visited:
                    del self._stale_counts[env_id]
        self.stale_entries = sum(self._stale_counts.values())
        return self.stale_entries

    # -- lease / ack / nack primitives (one env) -------------------------------

    async def lease_env(self, env_id: str, max_runs: int, lease_ms: int, token: str) -> LeasedBatch:
        await self._layout_ready()
        k = env_keys(env_id)
        r = await self.scripts.lease(
            self.redis,
            [*k.buffered, k.runs],
            [
                max_runs,
                lease_ms,
                token,
                self.settings.drain_max_attempts,
                RECLAIM_PER_CALL,
            ],
        )
        mono = time.monotonic()
        batch = LeasedBatch(env_id, token, int(r[1]), int(r[0]), mono, r[4])
        batch.reclaimed, batch.dead_lettered = int(r[2]), int(r[3])
        batch.expired_out = [as_text(x) for x in r[5]]
        self.dead_lettered_total += batch.dead_lettered
        self.failed_total += batch.dead_lettered
        return batch

    async def ack_env(
        self,
        env_id: str,
        token: str,
        runs: Sequence[tuple[str, str]],
        *,
        from_failed: bool = False,
    ) -> tuple[int, list[str]]:
        """Ack (run id, resolved-to run id or "") pairs; returns (acked, rejected).

        With ``from_failed`` the runs are dead-lettered ones, not leased ones.
        """
        if not runs:
            return 0, []
        k = env_keys(env_id)
        ids = " ".join([run_id for run_id, _ in runs])
        resolved = " ".join([f"{run_id} {to}" for run_id, to in runs if to])
        args: list[Any] = [k.runs, k.idem_prefix, token, self.settings.idempotency_ttl_ms]
        args += (ids, resolved, k.alias_prefix)
        if from_failed:
            args.append(k.failed)
        r = await self.scripts.ack(self.redis, [k.lease], args)
        return int(r[0]), [as_text(x) for x in r[1]]

    async def _settle_written(self, env_id: str, run_ids: Sequence[str]) -> None:
        """Runs dead-lettered because their lease ran out on their last attempt
        may have been committed by a holder that died before its ack: those
        that are rows leave the buffer as an ack would have taken them, instead
        of being listed as failed while they exist. Best effort: the rest stay
        dead-lettered, and RetryFailed settles any of them too (as EXISTS)."""
        if self.pool is None:
            return
        try:
            written = await rows_of(self.pool, env_id, run_ids)
            if written:
                acked, _ = await self.ack_env(
                    env_id, "", [(r, "") for r in run_ids if r in written], from_failed=True
                )
                log.info(
                    "dead-lettered runs already in Postgres settled",
                    extra={"env_id": env_id, "runs": acked},
                )
        except Exception:
            log.exception("settling dead-lettered runs failed", extra={"env_id": env_id})

    async def nack_env(
        self,
        env_id: str,
        token: str,
        run_ids: Sequence[str],
        *,
        delay_ms: int = 0,
        dead_letter: bool = False,
        error: str = "",
    ) -> tuple[int, int, list[str]]:
        """Requeue with backoff (or dead-letter); returns (requeued, dead, rejected)."""
        if not run_ids:
            return 0, 0, []
        k = env_keys(env_id)
        s = self.settings
        r = await self.scripts.nack(
            self.redis,
            [k.lease, k.retry, k.failed],
            [
                k.runs,
                token,
                delay_ms,
                s.drain_backoff_ms,
                BACKOFF_CAP_MS,
                s.drain_max_attempts,
                "1" if dead_letter else "0",
                error[:2000],
                *run_ids,
            ],
        )
        requeued, dead = int(r[0]), int(r[1])
        self.requeued_total += requeued
        self.dead_lettered_total += dead
        self.failed_total += dead
        return requeued, dead, [as_text(x) for x in r[2]]

    # -- the built-in drainer --------------------------------------------------

    async def tick(self) -> int:
        """One round over the next orgs; returns how many runs were leased."""
        if self._stopping or await self._paused_cached():
            return 0
        self.ticks += 1
        picks = await self.pick(self.rotation, self.settings.drain_concurrency)
        if not picks:
            return 0
        tasks = [asyncio.create_task(self._drain_env(org, env)) for org, env in picks]
        self._batches.update(tasks)
        try:
            counts = await asyncio.gather(*tasks)
        finally:
            self._batches.difference_update(tasks)
        return sum(counts)

    async def _drain_env(self, org: str, env_id: str) -> int:
        """Lease one batch of one env, write it, ack it. Never raises.

        The batch holds a Postgres write slot (``slots.py``), shared with
        every other writer of every sidecar on this Redis, from before its
        lease to after its ack. The rate budget is taken before either:
        waiting for it with a lease in hand would eat the lease (and count an
        attempt), and with a slot in hand would keep a writer out.
        """
        async with self.sem:
            if self._stopping:
                return 0
            try:
                size = self.settings.drain_batch_size
                await self.rate.take(size)
                async with self.slots.drain_slot(lambda: self._stopping) as held:
                    if not held:
                        self.rate.refund(size)
                        return 0
                    return await self._drain_held(org, env_id, size)
            except Exception:
                # One env's failure never stops the others or the loop; its
                # leased runs come back when the lease runs out.
                log.exception("draining an env failed", extra={"env_id": env_id})
                return 0

    async def _drain_held(self, org: str, env_id: str, size: int) -> int:
        token = secrets.token_hex(16)
        batch = await self.lease_env(env_id, size, self.settings.drain_lease_ms, token)
        if batch.expired_out:
            await self._settle_written(env_id, batch.expired_out)
        leased = batch.size
        self.rate.refund(size - leased)
        if not leased:
            await self._unindex_env(org, env_id)
            return 0
        self.in_flight += leased
        self._leased_since_check += leased
        try:
            await self.materialize(batch)
        finally:
            self.in_flight -= leased
        return leased

    async def materialize(self, batch: LeasedBatch) -> None:
        """Write a leased batch to Postgres and settle every run in Redis."""
        assert self.pool is not None
        env_id = batch.env_id
        entries: list[Entry] = []
        ids: list[str] = []
        damaged: list[tuple[str, str]] = []
        f = batch.flat
        env_bytes = env_field(env_id)
        # Straight from the flat reply (runId, s, ca, at, cx, cr, le per run):
        # one Entry per run and nothing else, this being the drain's hot loop.
        for run_id_b, raw, ca, cx, cr in zip(
            f[0::LEASE_STRIDE], f[1::LEASE_STRIDE], f[2::LEASE_STRIDE],
            f[4::LEASE_STRIDE], f[5::LEASE_STRIDE], strict=True,
        ):  # fmt: skip
            run_id = run_id_b.decode()
            try:
                snap = decode_snapshot(env_id, run_id, raw)
                # The buffer keeps the snapshot without its ids; the row's
                # snapshot column gets them back.
                full = full_snapshot(env_id, run_id, raw, env_bytes)
                reason = cr.decode() if cr else ""
                entry = Entry(snap, _int(ca), _int(cx) if cx else 0, reason, full)
            except DamagedEntry as exc:
                damaged.append((run_id, exc.message))
                continue
            except (ValueError, UnicodeDecodeError) as exc:
                # A buffer field that is not what it should be: this run alone
                # is dead-lettered, not the batch around it.
                damaged.append((run_id, f"buffered run {run_id} has a damaged field: {exc}"))
                continue
            entries.append(entry)
            ids.append(run_id)
        for run_id, message in damaged:
            # Nothing can be written from it; keep it, readable, in the failed set.
            await self.nack_env(
                batch.env_id, batch.token, [run_id], dead_letter=True, error=message
            )
        if not entries:
            return
        margin = self.commit_margin_ms()

        def lease_holds() -> bool:
            return batch.remaining_ms() > margin

        if not lease_holds():
            return  # too late to start: let the lease expire
        try:
            results = await write_batch(self.pool, entries, check=lease_holds)
        except LeaseLost:
            log.warning(
                "lease too short to commit; left to expire",
                extra={"env_id": batch.env_id, "runs": len(entries)},
            )
            return
        except Exception as exc:
            if not is_retryable(exc):
                raise
            await self.nack_env(batch.env_id, batch.token, ids, error=describe_error(exc))
            log.warning(
                "postgres unavailable; batch requeued with backoff",
                extra={"env_id": batch.env_id, "runs": len(entries), "error": type(exc).__name__},
            )
            return
        if results is None:
            # Every run became a new row: ack them all as they are.
            self.materialized_total += len(ids)
            await self._ack_committed(batch, [(run_id, "") for run_id in ids])
            return
        done: list[tuple[str, str]] = []
        retry: dict[str, list[str]] = {}
        dead: dict[str, list[str]] = {}
        for r in results:
            if r.outcome is Outcome.RETRY:
                retry.setdefault(r.error, []).append(r.run_id)
                continue
            if r.outcome is Outcome.CONFLICT:
                dead.setdefault(r.error, []).append(r.run_id)
                continue
            resolved = r.resolved_run_id if r.outcome is Outcome.RESOLVED else ""
            done.append((r.run_id, resolved))
            if r.outcome is Outcome.CREATED:
                self.materialized_total += 1
            elif r.outcome is Outcome.SYSTEM_FAILURE:
                self.failed_total += 1
        await self._ack_committed(batch, done)
        await self._unbind_not_held(env_id, entries, results)
        for error, run_ids in retry.items():
            await self.nack_env(batch.env_id, batch.token, run_ids, error=error)
        for error, run_ids in dead.items():
            # Kept, readable and retryable in the failed set; never dropped.
            await self.nack_env(batch.env_id, batch.token, run_ids, dead_letter=True, error=error)
            self.failed_total += len(run_ids)

    async def _unbind_not_held(
        self, env_id: str, entries: Sequence[Entry], results: Sequence[Result]
    ) -> None:
        """Drop the binding of a key a run was buffered under but whose row,
        written before, holds another (or none): a retry of a written run under
        another key. Left bound, that key would answer with a run that never
        held it, and its own trigger would never create a run."""
        not_held = {r.run_id for r in results if r.key_not_held}
        if not not_held:
            return
        k = env_keys(env_id)
        for e in entries:
            if e.run_id in not_held:
                s = e.snapshot
                await self.scripts.unbind(
                    self.redis, [k.idem(s.task_identifier, s.idempotency_key)], [e.run_id]
                )

    async def _ack_committed(self, batch: LeasedBatch, done: Sequence[tuple[str, str]]) -> None:
        _, rejected = await self.ack_env(batch.env_id, batch.token, done)
        if rejected:
            # Committed, but the lease had gone: the next holder finds the rows
            # and acks them as EXISTS; nothing is created twice.
            log.warning(
                "ack rejected after commit", extra={"env_id": batch.env_id, "runs": len(rejected)}
            )

    # -- external consumers ----------------------------------------------------

    async def lease_external(
        self, consumer_id: str, max_runs: int = 0, lease_ms: int = 0
    ) -> tuple[str, int, list[run_pb2.Run]]:
        """A batch for an external consumer, picked with the same fairness.

        Returns (token, deadline ms, runs); runs may come from several envs,
        all under the one token.
        """
        v = Violations()
        if max_runs < 0:
            v.add("max_runs", "must not be negative")
        if lease_ms < 0:
            v.add("lease_duration", "must not be negative")
        elif lease_ms and lease_ms < 100:
            v.add("lease_duration", "must be at least 100 ms")
        v.raise_if_any()
        want = min(max_runs or self.settings.drain_batch_size, MAX_LEASE_RUNS)
        lease_ms = lease_ms or self.settings.drain_lease_ms
        token = secrets.token_hex(16)
        picks = await self.pick(self.external_rotation)
        runs: list[run_pb2.Run] = []
        deadline = 0
        if not picks:
            return token, deadline, runs
        share = max(1, math.ceil(want / len(picks)))
        for org, env_id in picks:
            left = want - len(runs)
            if left <= 0:
                break
            batch = await self.lease_env(env_id, min(share, left), lease_ms, token)
            deadline = max(deadline, batch.deadline_ms)
            if not batch.runs:
                await self._unindex_env(org, env_id)
            for lr in batch.runs:
                view: list[bytes | str | int | None] = [
                    lr.raw, b"D", lr.accepted_ms, lr.attempts, lr.last_error,
                    lr.canceled_ms, lr.cancel_reason, 0, 0,
                ]  # fmt: skip
                try:
                    run = entry_to_run(env_id, lr.run_id, view)
                except DamagedEntry as exc:
                    await self.nack_env(
                        env_id, token, [lr.run_id], dead_letter=True, error=exc.message
                    )
                    continue
                runs.append(run)
        log.debug("leased to consumer", extra={"consumer": consumer_id, "runs": len(runs)})
        return token, deadline, runs

    @staticmethod
    def _group(refs: Sequence[tuple[str, str]], field_name: str) -> dict[str, list[str]]:
        v = Violations()
        if not refs:
            v.add(field_name, "is required")
        for i, (env_id, run_id) in enumerate(refs):
            v.env_id(f"{field_name}[{i}].env_id", env_id)
            v.run_id(f"{field_name}[{i}].run_id", run_id)
        v.raise_if_any()
        by_env: dict[str, list[str]] = {}
        for env_id, run_id in refs:
            by_env.setdefault(env_id, []).append(run_id)
        return by_env

    async def ack_external(
        self, token: str, refs: Sequence[tuple[str, str]]
    ) -> tuple[int, list[tuple[str, str]]]:
        """Ack (env, run) refs under a token; returns (acked, rejected refs)."""
        v = Violations()
        v.text("lease_token", token, required=True, max_len=64)
        v.raise_if_any()
        by_env = self._group(refs, "runs")
        acked = 0
        rejected: list[tuple[str, str]] = []
        for env_id, ids in by_env.items():
            n, rej = await self.ack_env(env_id, token, [(i, "") for i in ids])
            acked += n
            self.materialized_total += n
            rejected.extend((env_id, r) for r in rej)
        return acked, rejected

    async def nack_external(
        self,
        token: str,
        refs: Sequence[tuple[str, str]],
        *,
        retry_after_ms: int = 0,
        dead_letter: bool = False,
        error: str = "",
    ) -> tuple[int, int, list[tuple[str, str]]]:
        v = Violations()
        v.text("lease_token", token, required=True, max_len=64)
        if retry_after_ms < 0:
            v.add("retry_after", "must not be negative")
        if len(error) > 2000:
            v.add("error", "must be at most 2000 characters")
        v.raise_if_any()
        by_env = self._group(refs, "runs")
        requeued = dead = 0
        rejected: list[tuple[str, str]] = []
        for env_id, ids in by_env.items():
            rq, dl, rej = await self.nack_env(
                env_id, token, ids, delay_ms=retry_after_ms, dead_letter=dead_letter, error=error
            )
            requeued += rq
            dead += dl
            rejected.extend((env_id, r) for r in rej)
        return requeued, dead, rejected

    # -- failed runs -----------------------------------------------------------

    async def list_failed(
        self, env_id: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[run_pb2.Run], str]:
        """One page of an env's dead-lettered runs, oldest failure first."""
        v = Violations()
        v.env_id("env_id", env_id)
        if page_size < 0:
            v.add("page_size", "must not be negative")
        after_score, after_id = -1, ""
        if page_token:
            try:
                score_s, after_id = (
                    base64.urlsafe_b64decode(page_token.encode()).decode().split("|", 1)
                )
                after_score = int(score_s)
            except (ValueError, UnicodeDecodeError):
                v.add("page_token", "is not a token this service gave out")
        v.raise_if_any()
        size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
        k = env_keys(env_id)
        found: list[tuple[str, int]] = []
        fetch = size + 1
        while True:
            low = "-inf" if after_score < 0 else after_score
            raw = await self.redis.zrangebyscore(
                k.failed, low, "+inf", start=0, num=fetch, withscores=True
            )
            found = []
            for member, score in raw:
                run_id, sc = as_text(member), int(score)
                # Ties on the score are ordered by member: skip up to the cursor.
                if sc == after_score and run_id <= after_id:
                    continue
                found.append((run_id, sc))
            if len(found) > size or len(raw) < fetch:
                break
            fetch *= 2
        page = found[:size]
        raws = await self.redis.hmget(k.runs, [run_id for run_id, _ in page]) if page else []
        views = [entry_view(raw) for raw in raws]
        runs: list[run_pb2.Run] = []
        for (run_id, _), view in zip(page, views, strict=True):
            if view[1] is None:
                continue  # no entry left: a reference to nothing
            try:
                runs.append(entry_to_run(env_id, run_id, view))
            except DamagedEntry as exc:
                # Dead-lettered because it is damaged (no snapshot, say): listed
                # with what is known, so it can be found and dealt with.
                runs.append(
                    run_pb2.Run(
                        run_id=run_id,
                        env_id=env_id,
                        source=run_pb2.RUN_SOURCE_BUFFER,
                        status=run_pb2.RUN_STATUS_FAILED,
                        last_error=as_text(view[4]) or exc.message,
                    )
                )
        token = ""
        if len(found) > size and page:
            last_id, last_score = page[-1]
            token = base64.urlsafe_b64encode(f"{last_score}|{last_id}".encode()).decode()
        return runs, token

    async def retry_failed(
        self, env_id: str, run_ids: Sequence[str] = (), request_id: str = ""
    ) -> int:
        """Requeue dead-lettered runs (all of the env's when none are named)."""
        v = Violations()
        v.env_id("env_id", env_id)
        for i, run_id in enumerate(run_ids):
            v.run_id(f"run_ids[{i}]", run_id)
        if len(run_ids) > MAX_PAGE:
            v.add("run_ids", f"must hold at most {MAX_PAGE} ids")
        if request_id:
            v.request_id("request_id", request_id)
        v.raise_if_any()
        await self._layout_ready()
        k = env_keys(env_id)
        request_key = k.request("retry_failed:" + request_id) if request_id else k.env
        n = await self.scripts.retry_failed(
            self.redis,
            [k.back, k.failed, request_key],
            [k.runs, "1" if request_id else "0", "0" if run_ids else "1", *run_ids],
        )
        self._wake.set()
        return int(n)

    # -- status ----------------------------------------------------------------

    async def remote_counters(self) -> dict[str, float]:
        """What the drain process published (empty when the loop runs here)."""
        if not self.remote_key:
            return {}
        raw = await self.redis.hgetall(self.remote_key)
        return {as_text(k): float(as_text(v)) for k, v in raw.items()}

    async def status(self, org_id: str = "") -> drain_pb2.GetStatusResponse:
        """State, depth per org and env, oldest age, in flight and counts."""
        if org_id:
            v = Violations()
            v.org_id("org_id", org_id)
            v.raise_if_any()
            orgs = [org_id]
        else:
            orgs = sorted(as_text(o) for o in await self.redis.smembers(INDEX_ORGS))
        remote = await self.remote_counters()
        resp = drain_pb2.GetStatusResponse(
            state=await self.state(),  # type: ignore[arg-type]
            materialized_total=self.materialized_total + int(remote.get("materialized", 0)),
            failed_total=self.failed_total + int(remote.get("failed", 0)),
            stale_entries=self.stale_entries + int(remote.get("stale_entries", 0)),
        )
        now = now_ms()
        oldest_all = now
        for org in orgs:
            envs = sorted(as_text(e) for e in await self.redis.smembers(org_envs_key(org)))
            if not envs:
                continue
            found = await depths(self.scripts, self.redis, envs)
            pipe = self.redis.pipeline(transaction=False)
            for env_id in envs:
                k = env_keys(env_id)
                pipe.zrange(k.lease, 0, 99)
                pipe.hget(k.gate, "tu")
            res = await pipe.execute()
            o = drain_pb2.OrgStatus(org_id=org)
            for i, (env_id, depth) in enumerate(zip(envs, found, strict=True)):
                leased, tu = res[i * 2 : i * 2 + 2]
                oldest = now
                if depth.head_score:
                    oldest = min(oldest, depth.head_score // 1000)
                if leased:
                    ids = [as_text(m) for m in leased]
                    raws = await self.redis.hmget(env_keys(env_id).runs, ids)
                    for raw in raws:
                        ca = entry_view(raw)[2]
                        if ca:
                            oldest = min(oldest, _int(ca))
                e = drain_pb2.EnvStatus(
                    env_id=env_id,
                    queued=depth.queued + depth.retrying,
                    draining=depth.draining,
                    failed=depth.failed,
                    oldest_age=_duration(now - oldest),
                )
                if tu and _int(tu) > now:
                    e.tripped_until.CopyFrom(ts_from_ms(_int(tu)))
                o.envs.append(e)
                o.queued += e.queued
                o.draining += e.draining
                resp.in_flight += e.draining
                oldest_all = min(oldest_all, oldest)
            resp.orgs.append(o)
        resp.oldest_age.CopyFrom(_duration(now - oldest_all))
        return resp


def _duration(ms: int) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMilliseconds(max(0, ms))
    return d
