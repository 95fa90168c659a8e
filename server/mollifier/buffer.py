"""The buffer's front door: accept runs, and read them while they are buffered.

Reads fall back to Postgres: ``get_run`` looks in the buffer first and then at
``mollifier.runs``; in that order a run is never missed, because a drainer
removes an entry from Redis only after its row is committed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from mollifier_client.v1 import buffer_pb2, run_pb2
from psycopg_pool import AsyncConnectionPool

from .codec import (
    bare_snapshot,
    entry_to_run,
    entry_view,
    key_expires_ms,
    ms_from_ts,
    new_run_id,
    ts_from_ms,
)
from .config import Settings
from .errors import NotFound, ResourceExhausted
from .keys import INDEX_ORGS, STATS_TOTAL_DEPTH, env_keys, org_envs_key
from .scripts import Scripts
from .validation import Limits, Violations, check_snapshot

__all__ = [
    "RESULT_ACCEPTED",
    "RESULT_BOUND",
    "RESULT_DUP_IDEM",
    "RESULT_DUP_RUN",
    "RESULT_FULL",
    "AcceptOutcome",
    "Buffer",
    "Depth",
    "depths",
]

log = logging.getLogger("mollifier.buffer")

# Result codes of lua/includes/accept.lua (and BOUND of lua/trigger.lua).
RESULT_ACCEPTED, RESULT_DUP_RUN, RESULT_DUP_IDEM, RESULT_FULL, RESULT_BOUND = 1, 2, 3, 4, 5

DEFAULT_PAGE = 50
MAX_PAGE = 1000


class Depth:
    """One env's runs where they are, and its queue's head (lua/depth.lua)."""

    __slots__ = ("draining", "failed", "head_score", "queued", "retrying", "stale")

    def __init__(self, reply: Sequence[Any]) -> None:
        q, d, r, f, head, stale = (int(x) for x in reply)
        self.queued, self.draining, self.retrying, self.failed = q, d, r, f
        # Arrival score of the oldest queued run (ms * 1000); 0 when none is queued.
        self.head_score = head
        self.stale = stale

    @property
    def total(self) -> int:
        """Every run the env holds in the buffer, dead letters included."""
        return self.queued + self.draining + self.retrying + self.failed


async def depths(
    scripts: Scripts, client: Any, env_ids: Sequence[str], stale_cutoff: int = 0
) -> list[Depth]:
    """lua/depth.lua for each env, in one pipeline. ``stale_cutoff`` (an arrival
    score) counts the queued runs that arrived at or before it."""
    if not env_ids:
        return []

    def build(pipe: Any) -> None:
        for env_id in env_ids:
            k = env_keys(env_id)
            scripts.depth.queue(pipe, [*k.buffered, k.runs], [stale_cutoff])

    return [Depth(r) for r in await scripts.execute(client, build)]


class AcceptOutcome:
    """Accept's answer: the proto result code, the run, the existing run's id."""

    __slots__ = ("existing_run_id", "result", "run")

    def __init__(self, result: int, run: run_pb2.Run | None, existing_run_id: str = "") -> None:
        self.result = result
        self.run = run
        self.existing_run_id = existing_run_id


class Buffer:
    """Accept and read buffered runs."""

    def __init__(
        self,
        settings: Settings,
        redis: Any,
        scripts: Scripts,
        pool: AsyncConnectionPool | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.scripts = scripts
        self.pool = pool
        self.limits = Limits.from_settings(settings)
        # Refreshed in the background; checked by accept without a round trip.
        self.total_full = False

    # -- accepting -------------------------------------------------------------

    def prepare_snapshot(
        self,
        snapshot: run_pb2.RunSnapshot,
        *,
        env_id: str = "",
        org_id: str = "",
        task_identifier: str = "",
        prefix: str = "snapshot",
    ) -> run_pb2.RunSnapshot:
        """A checked copy with ids filled in (and a run id made when none was given)."""
        snap = run_pb2.RunSnapshot()
        snap.CopyFrom(snapshot)
        v = Violations()
        for name, given in (
            ("env_id", env_id),
            ("org_id", org_id),
            ("task_identifier", task_identifier),
        ):
            current = getattr(snap, name)
            if given and current and current != given:
                v.add(f"{prefix}.{name}", f"is {current!r} but the request says {given!r}")
            elif given and not current:
                setattr(snap, name, given)
        v.raise_if_any()
        if not snap.run_id:
            snap.run_id = new_run_id()
        if snap.metadata and not snap.metadata_type:
            snap.metadata_type = "application/json"
        # De-duplicate tags, keeping their first order.
        if len(set(snap.tags)) != len(snap.tags):
            unique = list(dict.fromkeys(snap.tags))
            del snap.tags[:]
            snap.tags.extend(unique)
        check_snapshot(v, snap, self.limits, prefix)
        v.raise_if_any()
        return snap

    def accept_call(self, snap: run_pb2.RunSnapshot) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV shared by accept.lua and the tail of trigger.lua."""
        k = env_keys(snap.env_id)
        if snap.idempotency_key:
            idem = f"{snap.task_identifier}:{snap.idempotency_key}"
            idem_key = k.idem(snap.task_identifier, snap.idempotency_key)
        else:
            idem, idem_key = "", k.idem_prefix
        # 0 tells the script "no expiry"; one at the epoch binds nothing, like
        # any past expiry.
        expires = key_expires_ms(snap)
        delay = ms_from_ts(snap.delay_until) if snap.HasField("delay_until") else 0
        keys = [*k.buffered, k.env, k.runs, idem_key]
        args: list[Any] = [
            snap.run_id,
            snap.org_id,
            bare_snapshot(snap),
            idem,
            expires,
            self.settings.buffer_capacity_per_env,
            "1" if self.total_full else "0",
            delay,
        ]
        return keys, args

    def queue_index(self, pipe: Any, org_id: str, env_id: str) -> None:
        """Register the env in the org/env index (beside the script, not in it:
        the index lives in other hash slots)."""
        # The env before its org: an org whose env set is seen non-empty is kept.
        pipe.sadd(org_envs_key(org_id), env_id)
        pipe.sadd(INDEX_ORGS, org_id)

    def accepted_run(self, snap: run_pb2.RunSnapshot, created_at_ms: int) -> run_pb2.Run:
        run = run_pb2.Run(
            run_id=snap.run_id,
            env_id=snap.env_id,
            status=run_pb2.RUN_STATUS_QUEUED,
            source=run_pb2.RUN_SOURCE_BUFFER,
            snapshot=snap,
            created_at=ts_from_ms(created_at_ms),
        )
        if snap.HasField("delay_until") and ms_from_ts(snap.delay_until) > created_at_ms:
            run.status = run_pb2.RUN_STATUS_DELAYED
        return run

    async def existing_run(
        self, env_id: str, run_id: str, view: Sequence[Any] | None
    ) -> run_pb2.Run:
        """The run a duplicate points at: from the returned entry, else read it."""
        if view and view[0] is not None:
            return entry_to_run(env_id, run_id, view)
        found = await self.find_run(env_id, run_id)
        if found is not None:
            return found
        # Bound, but neither buffered nor in Postgres (e.g. published by a
        # webapp that wrote the run elsewhere): answer with the id alone.
        return run_pb2.Run(run_id=run_id, env_id=env_id, source=run_pb2.RUN_SOURCE_POSTGRES)

    async def accept(self, snapshot: run_pb2.RunSnapshot) -> AcceptOutcome:
        """Buffer one run: ACCEPTED, or which duplicate; RESOURCE_EXHAUSTED when full."""
        v = Violations()
        for name in ("env_id", "org_id", "task_identifier"):
            if not getattr(snapshot, name):
                v.add(f"snapshot.{name}", "is required")
        v.raise_if_any()
        snap = self.prepare_snapshot(snapshot)
        keys, args = self.accept_call(snap)

        def build(pipe: Any) -> None:
            self.scripts.accept.queue(pipe, keys, args)
            self.queue_index(pipe, snap.org_id, snap.env_id)

        r = (await self.scripts.execute(self.redis, build))[0]
        result = int(r[0])
        if result == RESULT_ACCEPTED:
            return AcceptOutcome(
                buffer_pb2.ACCEPT_RESULT_ACCEPTED, self.accepted_run(snap, int(r[2]))
            )
        if result == RESULT_FULL:
            raise ResourceExhausted(
                "the buffer is full" if self.total_full else f"env {snap.env_id} is at capacity",
                metadata={"env_id": snap.env_id},
                retry_after_ms=1000,
            )
        existing_id = r[1].decode()
        existing = await self.existing_run(snap.env_id, existing_id, r[3])
        code = (
            buffer_pb2.ACCEPT_RESULT_DUPLICATE_RUN_ID
            if result == RESULT_DUP_RUN
            else buffer_pb2.ACCEPT_RESULT_DUPLICATE_IDEMPOTENCY_KEY
        )
        return AcceptOutcome(code, existing, existing_id)

    # -- reading ---------------------------------------------------------------

    async def get_buffered(self, env_id: str, run_id: str) -> run_pb2.Run | None:
        """The buffered run, or None when it is not (or no longer) in Redis."""
        view = entry_view(await self.redis.hget(env_keys(env_id).runs, run_id))
        if view[0] is None and view[1] is None:
            return None
        return entry_to_run(env_id, run_id, view)

    async def find_run(self, env_id: str, run_id: str) -> run_pb2.Run | None:
        """Buffer first, then Postgres (see the module docstring for why)."""
        buffered = await self.get_buffered(env_id, run_id)
        if buffered is not None:
            return buffered
        if self.pool is None:
            return None
        from .materializer import read_run

        found = await read_run(self.pool, env_id, run_id)
        if found is None:
            # Drained as a duplicate of an earlier run with its idempotency
            # key: answer with the run it became (ack.lua left the alias).
            alias = await self.redis.get(env_keys(env_id).alias_prefix + run_id)
            if alias is not None:
                found = await read_run(self.pool, env_id, alias.decode())
        return found

    async def get_run(self, env_id: str, run_id: str) -> run_pb2.Run:
        v = Violations()
        v.env_id("env_id", env_id)
        v.run_id("run_id", run_id)
        v.raise_if_any()
        run = await self.find_run(env_id, run_id)
        if run is None:
            raise NotFound(f"run {run_id} not found in env {env_id}", reason="RUN_NOT_FOUND")
        return run

    async def find_by_idempotency_key(self, env_id: str, task: str, key: str) -> run_pb2.Run:
        """The run a live key is bound to (an expired binding is gone by itself)."""
        v = Violations()
        v.env_id("env_id", env_id)
        v.task("task_identifier", task)
        v.idempotency_key("idempotency_key", key)
        v.raise_if_any()
        bound = await self.redis.get(env_keys(env_id).idem(task, key))
        run: run_pb2.Run | None = None
        if bound is not None:
            run = await self.find_run(env_id, bound.decode())
        elif self.pool is not None:
            from .materializer import read_run_by_idempotency_key

            run = await read_run_by_idempotency_key(self.pool, env_id, task, key)
        if run is None:
            raise NotFound(
                "no live run is bound to this idempotency key", reason="IDEMPOTENCY_KEY_NOT_FOUND"
            )
        return run

    async def list_runs(
        self, env_id: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[run_pb2.Run], str]:
        """One page of an env's buffered runs in arrival order, and the next token."""
        v = Violations()
        v.env_id("env_id", env_id)
        if page_size < 0:
            v.add("page_size", "must not be negative")
        cursor = 0
        if page_token:
            try:
                cursor = int(base64.urlsafe_b64decode(page_token.encode()).decode())
            except (ValueError, UnicodeDecodeError):
                v.add("page_token", "is not a token this service gave out")
        v.raise_if_any()
        size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
        k = env_keys(env_id)
        r = await self.scripts.list_runs(self.redis, [*k.buffered, k.runs], [cursor, size + 1])
        runs: list[run_pb2.Run] = []
        last = 0
        for item in r[:size]:
            run_id, score, view = item[0].decode(), int(item[1]), item[2]
            runs.append(entry_to_run(env_id, run_id, view))
            last = score
        token = ""
        if len(r) > size:
            token = base64.urlsafe_b64encode(str(last).encode()).decode()
        return runs, token

    # -- whole-buffer depth ----------------------------------------------------

    async def refresh_total(self) -> int:
        """Recompute the whole buffer's depth from the index; sets ``total_full``."""
        total = 0
        orgs = await self.redis.smembers(INDEX_ORGS)
        for org in orgs:
            envs = await self.redis.smembers(org_envs_key(org.decode()))
            if not envs:
                continue
            found = await depths(self.scripts, self.redis, [e.decode() for e in envs])
            total += sum(d.total for d in found)
        self.total_full = total >= self.settings.buffer_capacity_total
        with contextlib.suppress(Exception):
            await self.redis.set(STATS_TOTAL_DEPTH, total, px=60_000)
        return total

    async def refresh_total_loop(
        self, interval: float = 1.0, stop: asyncio.Event | None = None
    ) -> None:
        """Refresh every ``interval`` seconds until ``stop`` is set.

        Ended by the event, not only by a cancel: a cancel that lands inside a
        redis-py command can be swallowed there, and a loop that only a cancel
        ends would then run on and hold up the shutdown that waits for it.
        """
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                await self.refresh_total()
            except Exception as exc:  # keep the last answer; Redis may be back soon
                log.debug("total depth refresh failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
