"""MutateService: changes to a run wherever it is (buffer, being drained, Postgres).

The rule, for one run:

1. Read the buffered entry (its state and version ``v``), then look for the
   row in ``mollifier.runs`` (scoped by env and run id). The buffer is read
   FIRST so its version pins the moment: a row can only be written by a lease
   holder, and a leased entry (state D) leaves that state only deleted (ack)
   or through a reclaim or nack, which raise ``v``; so when the entry was
   queued at version v, no row existed when Postgres was asked, and the
   compare-and-set below still finds v, then no row can exist (or appear) for
   that snapshot. Versions start at the entry's arrival score, so an entry
   made again for the same run id cannot pass for the one that was read.
2. A row exists: change it in one Postgres transaction (``SELECT ... FOR
   UPDATE``, compute, ``UPDATE``), keeping the answer under the request id in
   the same transaction.
3. Else the entry, queued (Q) or dead-lettered (F): decode and check the
   snapshot (a damaged one raises DamagedEntry, never passed on), change it in
   Python, write it back with lua/mutate.lua, a compare-and-set on ``v`` that
   also keeps the answer under the request id. A lost race reads again.
4. Leased (D): its snapshot is in a drainer's hands; wait for its fate (the
   drainer acks only after commit, so once the entry is gone its row exists;
   or it comes back queued) within ``mutation_wait_ms``, then UNAVAILABLE with
   reason RUN_DRAINING: retryable, never a silent loss.

The drainer leases the current snapshot and the materializer writes the row
from it (tags, metadata, delay_until) and from the entry's ``cx``/``cr`` (a
cancelled entry becomes a CANCELED row), so a change made while queued is in
the row the run ends as.

Request ids: an answer is kept for ``REQUEST_TTL_MS`` under
``mf:{env}:req:<id>`` (written by the same script as a buffer change) and in
``mollifier.mutation_requests`` (written in the same transaction as a Postgres
change); both are checked before anything is applied. Concurrent copies of
one call cannot both apply: in the buffer the script checks the request key
first, in Postgres the row lock and the request row's primary key make the
second copy wait and then read the first one's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
import redis.exceptions
from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError, Message
from mollifier_client.v1 import gate_pb2, mutate_pb2, run_pb2
from psycopg_pool import AsyncConnectionPool

from .buffer import Buffer
from .codec import (
    as_text,
    bare_snapshot,
    entry_to_run,
    entry_view,
    ms_from_ts,
    now_ms,
    ts_from_ms,
)
from .config import Settings
from .errors import (
    AlreadyExists,
    DamagedEntry,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from .gate import Gate
from .keys import env_keys
from .materializer import _READ_COLS, _row_to_run
from .metadata_ops import MetadataOp, apply_operations, parse_document, parse_operations
from .scripts import Scripts
from .validation import Limits, Violations, check_snapshot

__all__ = ["REQUEST_TTL_MS", "Mutations"]

log = logging.getLogger("mollifier.mutations")

BUFFER = mutate_pb2.MUTATION_TARGET_BUFFER
POSTGRES = mutate_pb2.MUTATION_TARGET_POSTGRES

# How long a call's answer is kept for retries with the same request id.
REQUEST_TTL_MS = 86_400_000
# How often (at most) kept answers older than REQUEST_TTL_MS are deleted.
PRUNE_EVERY_S = 600.0
# Compare-and-set rounds before giving up with a retryable error; 100 writers
# on one run each need at most ~100 rounds.
MAX_ROUNDS = 2000
POLL_S = 0.02
MAX_CANCEL_REASON = 1024

# lua/mutate.lua results.
APPLIED, DUPLICATE, VERSION_CHANGED, GONE, DRAINING, DAMAGED = 1, 2, 3, 4, 5, 6

_STATUS_TEXT = {
    run_pb2.RUN_STATUS_PENDING: "PENDING",
    run_pb2.RUN_STATUS_DELAYED: "DELAYED",
    run_pb2.RUN_STATUS_CANCELED: "CANCELED",
    run_pb2.RUN_STATUS_SYSTEM_FAILURE: "SYSTEM_FAILURE",
}

R = TypeVar("R", bound=Message)
# change(run, now_ms) -> whether it changed anything; edits run in place, may raise.
Change = Callable[[run_pb2.Run, int], bool]
# respond(run, target, changed) -> the answer.
Respond = Callable[[run_pb2.Run, int, bool], R]

_REDIS_DOWN = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
)

_UPDATE_SQL = (
    "UPDATE mollifier.runs SET status = %s, tags = %s, metadata = %s::jsonb, "
    "metadata_type = %s, delay_until = %s, canceled_at = %s, cancel_reason = %s, "
    "idempotency_key = %s, idempotency_key_expires_at = %s "
    "WHERE run_id = %s AND env_id = %s"
)


def _int(value: Any) -> int:
    try:
        return int(value) if value not in (None, b"", "") else 0
    except ValueError:
        return 0


def _same_replay(run: run_pb2.Run | None, snap: run_pb2.RunSnapshot) -> bool:
    """Whether an existing run is one made from this replay's snapshot."""
    if run is None or not run.HasField("snapshot"):
        return False
    made = run.snapshot
    return (
        made.task_identifier == snap.task_identifier
        and made.payload == snap.payload
        and made.payload_type == snap.payload_type
        and not made.idempotency_key
    )


def _refuse_failed_row(run: run_pb2.Run) -> None:
    """A SYSTEM_FAILURE row is the record of a run Postgres refused: it is read
    from the snapshot it was refused with, so a change to its columns would be
    answered and never seen."""
    if run.status == run_pb2.RUN_STATUS_SYSTEM_FAILURE:
        raise FailedPrecondition(
            f"run {run.run_id} was never created (SYSTEM_FAILURE): it cannot be changed",
            reason="RUN_SYSTEM_FAILURE",
            metadata={"run_id": run.run_id},
        )


def _new_metadata(
    run_id: str,
    current: bytes,
    replace: dict[str, Any] | None,
    ops: Sequence[MetadataOp],
    max_bytes: int,
) -> bytes:
    """The run's metadata after the operations (on ``replace`` when given);
    raises when they cannot apply or the result is too large."""
    if replace is not None:
        doc: dict[str, Any] = replace
    else:
        v = Violations()
        found = parse_document(v, "metadata", current)
        if found is None:
            raise FailedPrecondition(
                f"run {run_id} has metadata that is not a JSON object",
                reason="METADATA_NOT_OBJECT",
            )
        doc = found
    result = apply_operations(doc, ops)
    text = json.dumps(result, separators=(",", ":"), ensure_ascii=False)
    v = Violations()
    v.json_document("metadata", text, max_bytes)
    v.raise_if_any()
    return text.encode()


def _dt(ms: int) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC) if ms else None


def _ts_ms(run: run_pb2.Run | run_pb2.RunSnapshot, name: str) -> int:
    return ms_from_ts(getattr(run, name)) if run.HasField(name) else 0


def _pack(kind: str, message: Message) -> bytes:
    return kind.encode() + b":" + message.SerializeToString()


def _call_kind(kind: str, *target: str) -> str:
    """What an answer is kept under besides its request id: the kind of call
    and what it changed, so a request id reused for another run (or another
    key) is refused rather than answered with the first call's answer."""
    digest = hashlib.sha256("\0".join(target).encode()).hexdigest()[:16]
    return f"{kind}/{digest}"


def _unpack(kind: str, raw: bytes, cls: type[R]) -> R:
    """The kept answer; a request id reused for another call is refused."""
    stored_kind, _, body = bytes(raw).partition(b":")
    if stored_kind.decode(errors="replace") != kind:
        raise InvalidArgument(
            [("request_id", "was already used for another call (another kind, run or key)")]
        )
    try:
        return cls.FromString(body)
    except DecodeError:
        raise DamagedEntry("the kept answer of this request id cannot be decoded") from None


def _replay_run_id(env_id: str, request_id: str) -> str:
    """The same new run id for every retry of one replay request."""
    digest = int.from_bytes(hashlib.sha256(f"{env_id}\0{request_id}".encode()).digest(), "big")
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    chars = []
    for _ in range(25):
        digest, i = divmod(digest, 36)
        chars.append(alphabet[i])
    return "run_" + "".join(chars)


class Mutations:
    """MutateService's methods, callable without gRPC; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        redis: Any,
        scripts: Scripts,
        pool: AsyncConnectionPool | None,
        buffer: Buffer,
        gate: Gate,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.scripts = scripts
        self.pool = pool
        self.buffer = buffer
        self.gate = gate
        self.limits = Limits.from_settings(settings)
        self._pruned_at = -PRUNE_EVERY_S  # the first change after a start prunes
        self._background: set[asyncio.Task[Any]] = set()

    # -- kept answers ----------------------------------------------------------

    async def prune_requests(self, older_than_ms: int = REQUEST_TTL_MS) -> int:
        """Forget Postgres-kept answers older than the retry window; returns how many."""
        if self.pool is None:
            return 0
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM mollifier.mutation_requests "
                "WHERE created_at < now() - make_interval(secs => %s)",
                (older_than_ms / 1000,),
            )
            return cur.rowcount

    def _maybe_prune(self) -> None:
        """Prune at most once per PRUNE_EVERY_S, off the caller's path: Redis
        expires its copies by itself, the table would otherwise only grow."""
        now = time.monotonic()
        if now - self._pruned_at < PRUNE_EVERY_S:
            return
        self._pruned_at = now

        async def prune() -> None:
            try:
                await self.prune_requests()
            except Exception as exc:  # best effort; the next window tries again
                log.warning("pruning kept answers failed: %s", type(exc).__name__)

        task = asyncio.create_task(prune())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _kept(self, env_id: str, request_id: str, kind: str, cls: type[R]) -> R | None:
        """The answer kept for this request id, from either store.

        A store that cannot be reached is skipped here: a call applied there
        cannot be applied again while it is away (its run lives there too).
        """
        try:
            raw = await self.redis.get(env_keys(env_id).request(request_id))
        except _REDIS_DOWN:
            raw = None
        if raw is not None:
            return _unpack(kind, raw, cls)
        if self.pool is None:
            return None
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT response FROM mollifier.mutation_requests "
                    "WHERE env_id = %s AND request_id = %s AND response IS NOT NULL",
                    (env_id, request_id),
                )
                row = await cur.fetchone()
        except psycopg.OperationalError:
            return None
        return _unpack(kind, row[0], cls) if row is not None else None

    async def _claim_pg(
        self, conn: Any, env_id: str, request_id: str, kind: str, cls: type[R]
    ) -> R | None:
        """Take the request id in this transaction, or the answer of whoever has.

        A concurrent copy blocks on the primary key until the first commits
        (then finds its answer) or rolls back (then takes the id itself).
        """
        cur = await conn.execute(
            "INSERT INTO mollifier.mutation_requests (env_id, request_id, kind) "
            "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
            (env_id, request_id, kind),
        )
        if await cur.fetchone() is not None:
            return None
        cur = await conn.execute(
            "SELECT response FROM mollifier.mutation_requests "
            "WHERE env_id = %s AND request_id = %s",
            (env_id, request_id),
        )
        row = await cur.fetchone()
        if row is None or row[0] is None:
            raise Unavailable("the same request is being applied", reason="REQUEST_IN_PROGRESS")
        return _unpack(kind, row[0], cls)

    async def _store_pg(self, conn: Any, env_id: str, request_id: str, answer: bytes) -> None:
        self._maybe_prune()
        await conn.execute(
            "UPDATE mollifier.mutation_requests SET response = %s "
            "WHERE env_id = %s AND request_id = %s",
            (answer, env_id, request_id),
        )

    async def _copy_to_redis(self, env_id: str, request_id: str, answer: bytes) -> None:
        """Best effort: the Postgres copy is the one that counts."""
        with contextlib.suppress(*_REDIS_DOWN):
            await self.redis.set(
                env_keys(env_id).request(request_id), answer, px=REQUEST_TTL_MS, nx=True
            )

    async def _keep(self, env_id: str, request_id: str, kind: str, resp: Message) -> None:
        """Keep an answer assembled from parts that were each kept already."""
        answer = _pack(kind, resp)
        await self._copy_to_redis(env_id, request_id, answer)
        if self.pool is None:
            return
        self._maybe_prune()  # this too adds rows, also when no change lands in Postgres
        try:
            async with self.pool.connection() as conn:
                await conn.execute(
                    "INSERT INTO mollifier.mutation_requests (env_id, request_id, kind, response) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (env_id, request_id, kind, answer),
                )
        except psycopg.OperationalError as exc:
            log.warning("could not keep an answer in postgres: %s", type(exc).__name__)

    # -- the core: one change to one run ---------------------------------------

    async def _apply_pg(
        self,
        env_id: str,
        run_id: str,
        request_id: str,
        kind: str,
        change: Change,
        respond: Respond[R],
        cls: type[R],
    ) -> R | None:
        """Apply to the row in one transaction; None when there is no row."""
        assert self.pool is not None
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                f"SELECT {_READ_COLS} FROM mollifier.runs "
                "WHERE run_id = %s AND env_id = %s FOR UPDATE",
                (run_id, env_id),
            )
            row = await cur.fetchone()
            if row is None:
                return None
            kept = await self._claim_pg(conn, env_id, request_id, kind, cls)
            if kept is not None:
                return kept
            # Applied to the buffered snapshot just before it was drained: the
            # answer is in Redis, and the change is in this row already.
            try:
                raw = await self.redis.get(env_keys(env_id).request(request_id))
            except _REDIS_DOWN:
                raw = None
            if raw is not None:
                await self._store_pg(conn, env_id, request_id, bytes(raw))
                return _unpack(kind, raw, cls)
            run = _row_to_run(row)
            changed = change(run, now_ms())
            resp = respond(run, POSTGRES, changed)
            if changed:
                s = run.snapshot
                has_key = bool(s.idempotency_key)
                await conn.execute(
                    _UPDATE_SQL,
                    (
                        _STATUS_TEXT.get(run.status, "PENDING"),
                        list(s.tags),
                        s.metadata.decode() if s.metadata else None,
                        s.metadata_type,
                        _dt(_ts_ms(s, "delay_until")),
                        _dt(_ts_ms(run, "canceled_at")),
                        run.cancel_reason or None,
                        s.idempotency_key if has_key else None,
                        _dt(_ts_ms(s, "idempotency_key_expires_at")) if has_key else None,
                        run_id,
                        env_id,
                    ),
                )
            answer = _pack(kind, resp)
            await self._store_pg(conn, env_id, request_id, answer)
        await self._copy_to_redis(env_id, request_id, answer)
        return resp

    async def _mutate(
        self,
        env_id: str,
        run_id: str,
        request_id: str,
        kind: str,
        change: Change,
        respond: Respond[R],
        cls: type[R],
    ) -> R:
        """Apply ``change`` to the run wherever it is; see the module docstring."""
        kind = _call_kind(kind, run_id)
        kept = await self._kept(env_id, request_id, kind, cls)
        if kept is not None:
            return kept
        k = env_keys(env_id)
        request_key = k.request(request_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.mutation_wait_ms / 1000
        for attempt in range(MAX_ROUNDS):
            view = entry_view(await self.redis.hget(k.runs, run_id))
            state = as_text(view[1])
            buffered = view[0] is not None or view[1] is not None
            if self.pool is not None:
                # Postgres away: UNAVAILABLE (retryable). Even a queued run never
                # leased may have a row (a direct write that committed after its
                # timeout, then buffered), so the buffer alone cannot decide.
                done = await self._apply_pg(env_id, run_id, request_id, kind, change, respond, cls)
                if done is not None:
                    return done
            if not buffered:
                # Gone from Redis and no row: a drainer acks only after commit,
                # so the run was never here (or is another env's).
                raise NotFound(f"run {run_id} not found in env {env_id}", reason="RUN_NOT_FOUND")
            if state == "D":
                if loop.time() >= deadline:
                    raise Unavailable(
                        f"run {run_id} is being materialized; retry",
                        reason="RUN_DRAINING",
                        metadata={"run_id": run_id},
                        retry_after_ms=max(100, self.settings.mutation_wait_ms // 2),
                    )
                await asyncio.sleep(POLL_S * (0.5 + random.random()))
                continue
            run = entry_to_run(env_id, run_id, view)
            changed = change(run, now_ms())
            resp = respond(run, BUFFER, changed)
            s = run.snapshot
            args: list[Any] = [
                as_text(view[8]) or "0",
                run_id,
                _pack(kind, resp),
                REQUEST_TTL_MS,
                "1" if changed else "0",
                bare_snapshot(s) if changed else "",
                "0",
                "cx",
                _ts_ms(run, "canceled_at"),
                "cr",
                run.cancel_reason,
                "du",
                _ts_ms(s, "delay_until"),
            ]
            r = await self.scripts.mutate(self.redis, [k.runs, request_key, k.idem_prefix], args)
            code = int(r[0])
            if code == APPLIED:
                return resp
            if code == DUPLICATE:
                return _unpack(kind, r[1], cls)
            if code == DAMAGED:
                raise DamagedEntry(
                    f"buffered run {run_id} has an unknown state", metadata={"run_id": run_id}
                )
            if code == VERSION_CHANGED:
                # Someone else wrote first: back off a little, jittered, so a
                # crowd of writers on one run spreads out instead of colliding.
                await asyncio.sleep(random.random() * min(0.02, 0.001 * (attempt + 1)))
            # DRAINING and GONE: the next round waits or finds the row.
        raise Unavailable(
            f"run {run_id} is changed by too many callers at once; retry",
            reason="RUN_CONTENDED",
            retry_after_ms=100,
        )

    # -- checks ----------------------------------------------------------------

    @staticmethod
    def _check_ids(v: Violations, env_id: str, run_id: str, request_id: str) -> None:
        v.env_id("env_id", env_id)
        v.run_id("run_id", run_id)
        v.request_id("request_id", request_id)

    # -- CancelRun -------------------------------------------------------------

    async def cancel(
        self, env_id: str, run_id: str, request_id: str, reason: str = ""
    ) -> mutate_pb2.CancelRunResponse:
        """Cancel a run. A run already CANCELED, or a SYSTEM_FAILURE row, answers
        ``already_final`` and is left as it is (as Postgres-side cancels do)."""
        v = Violations()
        self._check_ids(v, env_id, run_id, request_id)
        v.text("reason", reason, max_len=MAX_CANCEL_REASON)
        v.raise_if_any()

        def change(run: run_pb2.Run, now: int) -> bool:
            if run.HasField("canceled_at") or run.status in (
                run_pb2.RUN_STATUS_CANCELED,
                run_pb2.RUN_STATUS_SYSTEM_FAILURE,
            ):
                return False
            run.canceled_at.CopyFrom(ts_from_ms(now))
            run.cancel_reason = reason
            run.status = run_pb2.RUN_STATUS_CANCELED
            return True

        def respond(run: run_pb2.Run, target: int, changed: bool) -> mutate_pb2.CancelRunResponse:
            return mutate_pb2.CancelRunResponse(
                run=run,
                applied_to=target,  # type: ignore[arg-type]
                already_final=not changed,
            )

        return await self._mutate(
            env_id, run_id, request_id, "cancel", change, respond, mutate_pb2.CancelRunResponse
        )

    # -- RescheduleRun ---------------------------------------------------------

    async def reschedule(
        self,
        env_id: str,
        run_id: str,
        request_id: str,
        delay_until: timestamp_pb2.Timestamp | None,
    ) -> mutate_pb2.RescheduleRunResponse:
        """Move a DELAYED run's delay_until (FAILED_PRECONDITION for any other run)."""
        v = Violations()
        self._check_ids(v, env_id, run_id, request_id)
        new_ms = 0
        if delay_until is None or (delay_until.seconds == 0 and delay_until.nanos == 0):
            v.add("delay_until", "is required")
        else:
            before = len(v.items)
            v.timestamp("delay_until", delay_until)
            if len(v.items) == before:
                new_ms = ms_from_ts(delay_until)
                if new_ms <= now_ms():
                    v.add("delay_until", "must lie in the future")
        v.raise_if_any()
        assert delay_until is not None

        def change(run: run_pb2.Run, now: int) -> bool:
            current = _ts_ms(run.snapshot, "delay_until")
            delayed = (
                not run.HasField("canceled_at")
                and run.status
                not in (run_pb2.RUN_STATUS_CANCELED, run_pb2.RUN_STATUS_SYSTEM_FAILURE)
                and current > now
            )
            if run.source == run_pb2.RUN_SOURCE_POSTGRES:
                delayed = delayed and run.status == run_pb2.RUN_STATUS_DELAYED
            if not delayed:
                raise FailedPrecondition(f"run {run_id} is not delayed", reason="RUN_NOT_DELAYED")
            run.snapshot.delay_until.CopyFrom(ts_from_ms(new_ms))
            if run.status != run_pb2.RUN_STATUS_FAILED:
                run.status = run_pb2.RUN_STATUS_DELAYED
            return True

        def respond(
            run: run_pb2.Run, target: int, changed: bool
        ) -> mutate_pb2.RescheduleRunResponse:
            return mutate_pb2.RescheduleRunResponse(run=run, applied_to=target)  # type: ignore[arg-type]

        return await self._mutate(
            env_id,
            run_id,
            request_id,
            "reschedule",
            change,
            respond,
            mutate_pb2.RescheduleRunResponse,
        )

    # -- AddTags ---------------------------------------------------------------

    async def add_tags(
        self, env_id: str, run_id: str, request_id: str, tags: Sequence[str]
    ) -> mutate_pb2.AddTagsResponse:
        """Add tags, de-duplicated in order; at most ``max_tags`` in total."""
        v = Violations()
        self._check_ids(v, env_id, run_id, request_id)
        if not tags:
            v.add("tags", "is required")
        v.tags("tags", list(tags), self.limits.max_tags)
        v.raise_if_any()
        wanted = list(dict.fromkeys(tags))
        limit = self.limits.max_tags

        def change(run: run_pb2.Run, now: int) -> bool:
            _refuse_failed_row(run)
            current = list(run.snapshot.tags)
            merged = list(dict.fromkeys([*current, *wanted]))
            if len(merged) > limit:
                raise InvalidArgument(
                    [("tags", f"would give the run {len(merged)} tags; at most {limit}")]
                )
            if merged == current:
                return False
            del run.snapshot.tags[:]
            run.snapshot.tags.extend(merged)
            return True

        def respond(run: run_pb2.Run, target: int, changed: bool) -> mutate_pb2.AddTagsResponse:
            return mutate_pb2.AddTagsResponse(tags=list(run.snapshot.tags), applied_to=target)  # type: ignore[arg-type]

        return await self._mutate(
            env_id, run_id, request_id, "tags", change, respond, mutate_pb2.AddTagsResponse
        )

    # -- UpdateMetadata --------------------------------------------------------

    async def update_metadata(
        self,
        env_id: str,
        run_id: str,
        request_id: str,
        *,
        metadata_json: str = "",
        operations: Sequence[mutate_pb2.MetadataOperation] = (),
        parent_operations: Sequence[mutate_pb2.MetadataOperation] = (),
        root_operations: Sequence[mutate_pb2.MetadataOperation] = (),
    ) -> mutate_pb2.UpdateMetadataResponse:
        """Apply metadata operations to the run, its parent and its root.

        Parent operations go to ``parent_run_id`` and root operations to
        ``root_run_id``, each falling back to the run ITSELF when unset (never
        root to the parent). Operations meeting on one run are applied to it
        together, atomically: the run's own first, then the parent's, then the
        root's. Each run is changed once per request id (its part of the answer
        is kept under ``<request_id>#<n>``), so a retry after a partial failure
        finishes the rest without applying anything twice.
        """
        v = Violations()
        self._check_ids(v, env_id, run_id, request_id)
        replace: dict[str, Any] | None = None
        if metadata_json:
            replace = parse_document(v, "metadata_json", metadata_json)
        own = parse_operations(v, "operations", operations)
        parent = parse_operations(v, "parent_operations", parent_operations)
        root = parse_operations(v, "root_operations", root_operations)
        v.raise_if_any()
        whole = _call_kind("metadata", run_id)
        kept = await self._kept(env_id, request_id, whole, mutate_pb2.UpdateMetadataResponse)
        if kept is not None:
            return kept
        run = await self.buffer.find_run(env_id, run_id)
        if run is None:
            raise NotFound(f"run {run_id} not found in env {env_id}", reason="RUN_NOT_FOUND")
        parent_id = run.snapshot.parent_run_id or run_id
        root_id = run.snapshot.root_run_id or run_id
        plan: dict[str, list[MetadataOp]] = {run_id: list(own)}
        if parent_operations:
            plan.setdefault(parent_id, []).extend(parent)
        if root_operations:
            plan.setdefault(root_id, []).extend(root)
        runs = {run_id: run}
        for target_id, what in ((parent_id, "parent"), (root_id, "root")):
            if target_id in plan and target_id not in runs:
                found = await self.buffer.find_run(env_id, target_id)
                if found is None:
                    raise NotFound(
                        f"the {what} run {target_id} not found in env {env_id}",
                        reason=f"{what.upper()}_RUN_NOT_FOUND",
                    )
                runs[target_id] = found
        # Every part is tried on the documents as they are before any is
        # applied: an operation that cannot apply to the parent (say) fails
        # the call with nothing changed, not after the run's own part landed.
        for target_id, ops in plan.items():
            _refuse_failed_row(runs[target_id])
            _new_metadata(
                target_id,
                runs[target_id].snapshot.metadata,
                replace if target_id == run_id else None,
                ops,
                self.limits.max_metadata_bytes,
            )
        results: dict[str, mutate_pb2.MetadataResult] = {}
        for n, (target_id, ops) in enumerate(plan.items()):
            results[target_id] = await self._metadata_part(
                env_id,
                target_id,
                f"{request_id}#{n}",
                replace if target_id == run_id else None,
                ops,
            )
        resp = mutate_pb2.UpdateMetadataResponse(run=results[run_id])
        if parent_operations:
            resp.parent.CopyFrom(results[parent_id])
        if root_operations:
            resp.root.CopyFrom(results[root_id])
        await self._keep(env_id, request_id, whole, resp)
        return resp

    async def _metadata_part(
        self,
        env_id: str,
        run_id: str,
        request_id: str,
        replace: dict[str, Any] | None,
        ops: Sequence[MetadataOp],
    ) -> mutate_pb2.MetadataResult:
        max_bytes = self.limits.max_metadata_bytes

        def change(run: run_pb2.Run, now: int) -> bool:
            _refuse_failed_row(run)
            s = run.snapshot
            text = _new_metadata(run_id, s.metadata, replace, ops, max_bytes)
            if s.metadata and text == s.metadata:
                return False
            s.metadata = text
            s.metadata_type = s.metadata_type or "application/json"
            return True

        def respond(run: run_pb2.Run, target: int, changed: bool) -> mutate_pb2.MetadataResult:
            return mutate_pb2.MetadataResult(
                run_id=run_id,
                applied_to=target,  # type: ignore[arg-type]
                metadata_json=run.snapshot.metadata.decode() or "{}",
            )

        return await self._mutate(
            env_id, run_id, request_id, "metadata-part", change, respond, mutate_pb2.MetadataResult
        )

    # -- ResetIdempotencyKey ---------------------------------------------------

    async def reset_idempotency_key(
        self, env_id: str, request_id: str, task_identifier: str, idempotency_key: str
    ) -> mutate_pb2.ResetIdempotencyKeyResponse:
        """Free a key in both stores: the Redis binding (and the key in the bound
        run's buffered snapshot), and the key on the Postgres row.

        NOT_FOUND only when both stores answered and neither held the key; when
        either could not be reached the answer is UNAVAILABLE (retryable) and the
        Postgres side is rolled back, never a NOT_FOUND hiding an outage.
        """
        v = Violations()
        v.env_id("env_id", env_id)
        v.request_id("request_id", request_id)
        v.task("task_identifier", task_identifier)
        v.idempotency_key("idempotency_key", idempotency_key)
        v.raise_if_any()
        cls = mutate_pb2.ResetIdempotencyKeyResponse
        kind = _call_kind("reset", task_identifier, idempotency_key)
        kept = await self._kept(env_id, request_id, kind, cls)
        if kept is not None:
            return kept
        if self.pool is None:
            buffer_reset, bound = await self._reset_in_buffer(
                env_id, request_id, task_identifier, idempotency_key
            )
            if not buffer_reset:
                raise NotFound("the key is not bound", reason="IDEMPOTENCY_KEY_NOT_FOUND")
            resp = cls(reset_in_buffer=True, run_id=bound)
            await self._keep(env_id, request_id, kind, resp)
            return resp
        async with self.pool.connection() as conn, conn.transaction():
            # Taken first, so a concurrent copy of this call waits for our answer.
            kept = await self._claim_pg(conn, env_id, request_id, kind, cls)
            if kept is not None:
                return kept
            redis_down: BaseException | None = None
            buffer_reset, bound = False, ""
            try:
                buffer_reset, bound = await self._reset_in_buffer(
                    env_id, request_id, task_identifier, idempotency_key
                )
            except _REDIS_DOWN as exc:
                redis_down = exc
            cur = await conn.execute(
                "UPDATE mollifier.runs SET idempotency_key = NULL, "
                "idempotency_key_expires_at = NULL "
                "WHERE env_id = %s AND task_identifier = %s AND idempotency_key = %s "
                "RETURNING run_id",
                (env_id, task_identifier, idempotency_key),
            )
            rows = await cur.fetchall()
            if redis_down is not None:
                # Raising rolls the Postgres side back: the key is reset in both
                # stores or in neither, and the caller retries.
                raise Unavailable(
                    f"redis unavailable: {type(redis_down).__name__}; nothing was reset",
                    reason="REDIS_UNAVAILABLE",
                    retry_after_ms=1000,
                )
            if not buffer_reset and not rows:
                raise NotFound(
                    "the key is bound to no run in either store",
                    reason="IDEMPOTENCY_KEY_NOT_FOUND",
                )
            resp = cls(
                reset_in_buffer=buffer_reset,
                reset_in_postgres=bool(rows),
                run_id=bound or (rows[0][0] if rows else ""),
            )
            answer = _pack(kind, resp)
            await self._store_pg(conn, env_id, request_id, answer)
        await self._copy_to_redis(env_id, request_id, answer)
        return resp

    async def _reset_in_buffer(
        self, env_id: str, request_id: str, task: str, key: str
    ) -> tuple[bool, str]:
        """(a binding was cleared, the run it pointed at). Redis errors propagate."""
        k = env_keys(env_id)
        binding = k.idem(task, key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.mutation_wait_ms / 1000
        for _ in range(MAX_ROUNDS):
            bound_raw = await self.redis.get(binding)
            if bound_raw is None:
                return False, ""
            bound = as_text(bound_raw)
            view = entry_view(await self.redis.hget(k.runs, bound))
            if view[0] is None and view[1] is None:
                # The run has left the buffer; its binding outlived it.
                if int(await self.scripts.unbind(self.redis, [binding], [bound])):
                    return True, bound
                continue
            if as_text(view[1]) == "D":
                if loop.time() >= deadline:
                    raise Unavailable(
                        f"run {bound} is being materialized; retry",
                        reason="RUN_DRAINING",
                        retry_after_ms=max(100, self.settings.mutation_wait_ms // 2),
                    )
                await asyncio.sleep(POLL_S * (0.5 + random.random()))
                continue
            run = entry_to_run(env_id, bound, view)
            snap = run.snapshot
            snap.idempotency_key = ""
            snap.ClearField("idempotency_key_expires_at")
            args: list[Any] = [
                as_text(view[8]) or "0",
                bound,
                "",
                REQUEST_TTL_MS,
                "1",
                bare_snapshot(snap),
                "1",
            ]
            r = await self.scripts.mutate(
                self.redis, [k.runs, k.request(request_id), binding], args
            )
            code = int(r[0])
            if code == APPLIED:
                return True, bound
            if code == DAMAGED:
                raise DamagedEntry(f"buffered run {bound} has an unknown state")
            if code == VERSION_CHANGED:
                await asyncio.sleep(random.random() * 0.005)
        raise Unavailable("the key's run is changed by too many callers", reason="RUN_CONTENDED")

    # -- ReplayRun -------------------------------------------------------------

    async def replay(
        self, env_id: str, run_id: str, request_id: str, new_run_id: str = ""
    ) -> mutate_pb2.ReplayRunResponse:
        """A new run from the old run's snapshot (either store), without its
        idempotency key, through the normal trigger path.

        Without ``new_run_id`` the new id is derived from the request id, so
        every retry of one request names the same run and creates it once.
        """
        v = Violations()
        self._check_ids(v, env_id, run_id, request_id)
        v.run_id("new_run_id", new_run_id, required=False)
        if new_run_id and new_run_id == run_id:
            v.add("new_run_id", "must differ from run_id")
        v.raise_if_any()
        cls = mutate_pb2.ReplayRunResponse
        kind = _call_kind("replay", run_id, new_run_id)
        kept = await self._kept(env_id, request_id, kind, cls)
        if kept is not None:
            return kept
        old = await self.buffer.find_run(env_id, run_id)
        if old is None:
            raise NotFound(f"run {run_id} not found in env {env_id}", reason="RUN_NOT_FOUND")
        snap = run_pb2.RunSnapshot()
        snap.CopyFrom(old.snapshot)
        # A Postgres row's snapshot blob may be unreadable (then only ids are
        # left): check the whole snapshot before anything is built from it.
        check = Violations()
        check_snapshot(check, snap, self.limits)
        if check.items or snap.run_id != run_id or snap.env_id != env_id:
            raise DamagedEntry(
                f"run {run_id} has a snapshot that cannot be replayed",
                metadata={"run_id": run_id, "fields": ", ".join(f for f, _ in check.items)},
            )
        snap.run_id = new_run_id or _replay_run_id(env_id, request_id)
        snap.idempotency_key = ""
        snap.ClearField("idempotency_key_expires_at")
        req = gate_pb2.TriggerRequest(
            env_id=env_id,
            org_id=snap.org_id,
            task_identifier=snap.task_identifier,
            org_feature_flags={"mollifierEnabled": True},
            snapshot=snap,
            write_through=self.pool is not None,
        )
        result = await self.gate.trigger(req, snap)
        run = result.run
        if new_run_id and result.duplicate and not _same_replay(run, snap):
            # The id names another run: answering with it would say a replay
            # was made when none was. (An id derived from the request id, or
            # a run made from this same snapshot, is this replay tried again.)
            raise AlreadyExists(
                f"new_run_id {new_run_id} is already another run",
                reason="RUN_ID_TAKEN",
                metadata={"run_id": new_run_id},
            )
        if run is None:
            # Not buffered and not written by the gate (no write-through):
            # buffer it, so the drainer creates it; never answer with no run.
            run = (await self.buffer.accept(snap)).run
        if run is None:  # pragma: no cover - accept always answers with a run
            raise Unavailable("the replayed run was not created", reason="REPLAY_NOT_CREATED")
        target = BUFFER if run.source == run_pb2.RUN_SOURCE_BUFFER else POSTGRES
        resp = cls(run=run, applied_to=target)
        await self._keep(env_id, request_id, kind, resp)
        return resp
