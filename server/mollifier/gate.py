"""The gate: one decision per trigger, and the idempotency-key claims.

The cascade, in order: kill switch off -> PASS_THROUGH (DISABLED); org flag
``mollifierEnabled`` not set -> PASS_THROUGH (ORG_NOT_ENABLED); debounce,
one-time-use token or wait-for-completion -> PASS_THROUGH (BYPASS_*); then the
trip evaluator in Redis (lua/evaluate.lua): SHADOW_LOG in shadow mode when it
would trip, MOLLIFY when tripped or while the env still has a backlog, else
PASS_THROUGH. The first steps need no Redis at all; the last is one script
call bounded by MOLLIFIER_GATE_TIMEOUT_MS, and any Redis failure answers
PASS_THROUGH with reason FAIL_OPEN: the gate never blocks a trigger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from mollifier_client.v1 import buffer_pb2, gate_pb2, run_pb2

from . import metrics
from .buffer import RESULT_ACCEPTED, RESULT_BOUND, RESULT_DUP_IDEM, RESULT_DUP_RUN, Buffer
from .codec import ms_from_ts, now_ms, ts_from_ms
from .config import Settings
from .errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MollifierError,
    ResourceExhausted,
    Unavailable,
)
from .keys import env_keys
from .resp import Batch, DirectPipeline
from .scripts import AutoPipeline, Scripts
from .slots import WriteSlots
from .validation import Violations

M = TypeVar("M", gate_pb2.EvaluateResponse, gate_pb2.TriggerResponse, gate_pb2.GateOutcome)

__all__ = ["Claim", "Gate", "GateRequest", "Outcome", "TriggerOutcome"]

log = logging.getLogger("mollifier.gate")

PASS_THROUGH = gate_pb2.DECISION_PASS_THROUGH
SHADOW_LOG = gate_pb2.DECISION_SHADOW_LOG
MOLLIFY = gate_pb2.DECISION_MOLLIFY

ORG_FLAG = "mollifierEnabled"
MAX_BATCH = 1000
DEFAULT_CLAIM_TTL_MS = 30_000
MAX_CLAIM_TTL_MS = 600_000
PING = b"*1\r\n$4\r\nPING\r\n"
# Bound on the per-env caches of the hot path (cleared whole when reached).
MAX_CACHED_ENVS = 10_000
# Pass-throughs whose direct write takes a Postgres write slot (or is buffered
# without one); see Gate._write_direct.
SLOTTED_REASONS = (gate_pb2.DECISION_REASON_UNDER_THRESHOLD, gate_pb2.DECISION_REASON_FAIL_OPEN)
# Gate timeouts a write slot is asked for again when the first ask timed out.
SLOT_PATIENCE = 4


class GateRequest(Protocol):
    """What the gate reads from EvaluateRequest, TriggerRequest or GateInput."""

    env_id: str
    org_id: str
    task_identifier: str
    debounce: bool
    one_time_use_token: str
    wait_for_completion: bool

    @property
    def org_feature_flags(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """A decision and the numbers behind it."""

    decision: int
    reason: int
    window_count: int = 0
    threshold: int = 0
    tripped_until_ms: int = 0

    def fill(self, msg: M) -> M:
        """Copy into any response carrying the gate fields; returns it."""
        msg.decision = self.decision  # type: ignore[assignment]
        msg.reason = self.reason  # type: ignore[assignment]
        msg.window_count = self.window_count
        msg.threshold = self.threshold
        if self.tripped_until_ms:
            msg.tripped_until.FromMilliseconds(self.tripped_until_ms)
        return msg


@dataclass(frozen=True, slots=True)
class TriggerOutcome:
    """Trigger's answer: the decision, the run id, and the run when buffered."""

    outcome: Outcome
    run_id: str
    run: run_pb2.Run | None
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Claim:
    """A claim's answer: CLAIMED with a token, RESOLVED with a run, or BUSY."""

    state: int
    claim_token: str = ""
    run_id: str = ""
    retry_after_ms: int = 0


def check_gate_request(v: Violations, req: GateRequest, *, task_required: bool) -> None:
    v.env_id("env_id", req.env_id)
    v.org_id("org_id", req.org_id)
    if task_required or req.task_identifier:
        v.task("task_identifier", req.task_identifier)
    v.text("one_time_use_token", req.one_time_use_token, max_len=1024)
    flags = req.org_feature_flags
    if len(flags) > 256:
        v.add("org_feature_flags", "must hold at most 256 flags")


class Gate:
    """Decisions, claims and per-env policy; see the module docstring."""

    def __init__(self, settings: Settings, redis: Any, scripts: Scripts, buffer: Buffer) -> None:
        self.settings = settings
        self.redis = redis
        self.scripts = scripts
        self.buffer = buffer
        self.timeout = settings.gate_timeout_ms / 1000
        self._pipe = AutoPipeline(redis, scripts)
        self._slots = WriteSlots(settings, redis, scripts)
        # Slots being given back after a direct write (not awaited by its caller).
        self._releasing: set[asyncio.Task[Any]] = set()
        self._direct: DirectPipeline | None = None
        if self._pipe.usable and settings.gate_direct_redis and settings.redis_url:
            # The gate's calls are small and many: one connection of their own,
            # written once per loop turn, costs far less per call than the pool;
            # it also bounds each call by the gate timeout itself.
            self._direct = DirectPipeline(settings.redis_url, scripts, timeout=self.timeout)
        # Per env: its whole evaluate.lua call, packed once (keys and the
        # default policy never change while serving).
        self._evaluate_cmds: dict[str, bytes] = {}
        # (env_id, org_id, task_identifier) triples already found valid, so
        # the hot path does not run three regexes per call.
        self._valid_ids: set[tuple[str, str, str]] = set()
        self._defaults = (
            settings.trip_threshold,
            settings.trip_window_ms,
            settings.trip_hold_ms,
            "1" if settings.shadow_mode else "0",
        )

    async def warm_up(self) -> None:
        """Open the gate's own Redis connection now, so the first decision does
        not wait for it and a misconfigured URL shows at start, not as FAIL_OPEN."""
        if self._direct is None:
            return
        loop = asyncio.get_running_loop()
        # A call gives up after the gate timeout (tens of ms), a connect only
        # after connect_timeout (a remote or TLS Redis can take longer than
        # the first): ask again until the connect has had its time.
        until = loop.time() + self._direct.connect_timeout
        try:
            while True:
                try:
                    await self._direct.submit(PING, 1)
                    return
                except TimeoutError:
                    if loop.time() >= until:
                        raise
        except Exception as exc:
            log.warning(
                "the gate's Redis connection failed; decisions fail open until it works",
                extra={"error": repr(exc)},
            )

    async def aclose(self) -> None:
        """Give back the write slots still held, then close the gate's own
        Redis connection (if it has one)."""
        if self._releasing:
            # Bounded: a slot not given back lapses with its lease anyway.
            await asyncio.wait(set(self._releasing), timeout=1.0)
        if self._direct is not None:
            await self._direct.aclose()

    # -- the cascade -----------------------------------------------------------

    def pre_decision(self, req: GateRequest) -> Outcome | None:
        """The steps decided without Redis; None when the evaluator must decide."""
        if not self.settings.enabled:
            return Outcome(PASS_THROUGH, gate_pb2.DECISION_REASON_DISABLED)
        if not req.org_feature_flags.get(ORG_FLAG, False):
            return Outcome(PASS_THROUGH, gate_pb2.DECISION_REASON_ORG_NOT_ENABLED)
        if req.debounce:
            return Outcome(PASS_THROUGH, gate_pb2.DECISION_REASON_BYPASS_DEBOUNCE)
        if req.one_time_use_token:
            return Outcome(PASS_THROUGH, gate_pb2.DECISION_REASON_BYPASS_ONE_TIME_USE_TOKEN)
        if req.wait_for_completion:
            return Outcome(PASS_THROUGH, gate_pb2.DECISION_REASON_BYPASS_WAIT_FOR_COMPLETION)
        return None

    def _evaluate_call(self, env_id: str) -> tuple[list[str], tuple[Any, ...]]:
        k = env_keys(env_id)
        return [k.gate, k.policy, k.queue, k.back, k.lease, k.retry], self._defaults

    def check(self, req: GateRequest, *, task_required: bool) -> None:
        """Validate a gate request (INVALID_ARGUMENT naming every bad field)."""
        ids = (req.env_id, req.org_id, req.task_identifier)
        if (
            ids in self._valid_ids
            and not req.one_time_use_token
            and len(req.org_feature_flags) <= 256
            and (req.task_identifier or not task_required)
        ):
            return
        v = Violations()
        check_gate_request(v, req, task_required=task_required)
        v.raise_if_any()
        if len(self._valid_ids) >= MAX_CACHED_ENVS:
            self._valid_ids.clear()
        self._valid_ids.add(ids)

    def _evaluate_cmd(self, env_id: str) -> bytes:
        cmd = self._evaluate_cmds.get(env_id)
        if cmd is None:
            keys, args = self._evaluate_call(env_id)
            batch = Batch()
            self.scripts.evaluate.queue(batch, keys, args)
            cmd = batch.chunks[0]
            if len(self._evaluate_cmds) >= MAX_CACHED_ENVS:
                self._evaluate_cmds.clear()
            self._evaluate_cmds[env_id] = cmd
        return cmd

    async def _run(
        self, build: Callable[[Any], None], size: int, packed: bytes | None = None
    ) -> list[Any]:
        """``build``'s ``size`` commands in one round trip, bounded by the gate
        timeout: on the gate's own connection (``packed`` instead of ``build``
        when the caller has the one command packed already), else coalesced
        into redis-py pipelines, else (Redis Cluster) one by one."""
        if self._direct is not None:
            # The connection's own deadline bounds the call (no timer per call).
            return await self._direct.submit(build if packed is None else packed, size)
        # asyncio.timeout, not wait_for: no extra task per call.
        async with asyncio.timeout(self.timeout):
            if self._pipe.usable:
                return await self._pipe.submit(build, size)
            return await self.scripts.execute(self.redis, build)

    async def evaluate(self, req: GateRequest) -> Outcome:
        """One decision; never raises for a store failure (FAIL_OPEN instead)."""
        started = time.perf_counter()
        self.check(req, task_required=False)
        pre = self.pre_decision(req)
        if pre is not None:
            return metrics.decided(pre, started)
        env_id = req.env_id
        try:
            r = (
                await self._run(
                    lambda p: self.scripts.evaluate.queue(p, *self._evaluate_call(env_id)),
                    1,
                    self._evaluate_cmd(env_id) if self._direct is not None else None,
                )
            )[0]
        except Exception as exc:  # any Redis trouble: pass through, never block
            return metrics.decided(self._fail_open(exc, env_id), started)
        return metrics.decided(
            Outcome(int(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4])), started
        )

    async def evaluate_batch(self, reqs: Sequence[GateRequest]) -> list[Outcome]:
        """Many decisions in one Redis round trip, in order.

        The inputs of one env are decided by one script call (evaluate.lua
        with a count), as that many Evaluates in a row would be; envs are
        independent, so their calls go out together in one pipeline.
        """
        if len(reqs) > MAX_BATCH:
            raise InvalidArgument([("inputs", f"must hold at most {MAX_BATCH} inputs")])
        bad: Violations | None = None
        for i, req in enumerate(reqs):
            try:
                self.check(req, task_required=False)
            except InvalidArgument as exc:
                bad = bad or Violations()
                for field, desc in exc.violations:
                    bad.add(f"inputs[{i}].{field}", desc)
        if bad is not None:
            bad.raise_if_any()
        started = time.perf_counter()
        outcomes: list[Outcome | None] = [self.pre_decision(r) for r in reqs]
        by_env: dict[str, list[int]] = {}
        for i, o in enumerate(outcomes):
            if o is None:
                by_env.setdefault(reqs[i].env_id, []).append(i)
        if by_env:
            groups = list(by_env.items())

            def build(pipe: Any) -> None:
                for env_id, idx in groups:
                    keys, args = self._evaluate_call(env_id)
                    self.scripts.evaluate.queue(pipe, keys, (*args, len(idx)))

            try:
                results = await self._run(build, len(groups))
            except Exception as exc:
                failed = self._fail_open(exc)
                for _, idx in groups:
                    for i in idx:
                        outcomes[i] = failed
            else:
                for (_, idx), r in zip(groups, results, strict=True):
                    for n, i in enumerate(idx):
                        j = 5 * n
                        outcomes[i] = Outcome(
                            int(r[j]), int(r[j + 1]), int(r[j + 2]), int(r[j + 3]), int(r[j + 4])
                        )
        done = [o for o in outcomes if o is not None]
        return metrics.decided_many(done, started, "evaluate_batch")

    def _fail_open(self, exc: BaseException, env_id: str = "") -> Outcome:
        log.warning(
            "gate failing open",
            extra={"env_id": env_id, "error": type(exc).__name__, "reason": "FAIL_OPEN"},
        )
        return Outcome(PASS_THROUGH, gate_pb2.DECISION_REASON_FAIL_OPEN)

    async def trigger(self, req: GateRequest, snapshot: run_pb2.RunSnapshot) -> TriggerOutcome:
        """Decide and, when MOLLIFY, buffer the snapshot in the same round trip.

        With ``write_through`` on the request, a PASS_THROUGH or SHADOW_LOG run
        is written to Postgres by the sidecar too (see ``_write_direct``).
        """
        started = time.perf_counter()
        self.check(req, task_required=True)
        snap = self.buffer.prepare_snapshot(
            snapshot,
            env_id=req.env_id,
            org_id=req.org_id,
            task_identifier=req.task_identifier,
        )
        write_through = bool(getattr(req, "write_through", False))
        if write_through and self.buffer.pool is None:
            raise FailedPrecondition(
                "write_through needs a database (MOLLIFIER_DATABASE_URL)", reason="NO_DATABASE"
            )
        pre = self.pre_decision(req)
        # A keyed write-through still asks Redis: the key must be honoured (and
        # bound) whichever path the run takes.
        if pre is not None and not (write_through and snap.idempotency_key):
            metrics.decided(pre, started, "trigger")
            if write_through:
                return await self._write_direct(pre, snap, bound=False)
            return TriggerOutcome(pre, snap.run_id, None, False)
        keys, args = self.buffer.accept_call(snap)
        k = env_keys(snap.env_id)
        script_keys = [k.gate, k.policy, *keys]
        script_args = [
            *self._defaults,
            *args,
            "1" if write_through else "0",
            self.settings.idempotency_ttl_ms,
            pre.reason if pre is not None else 0,
        ]

        def build(pipe: Any) -> None:
            self.scripts.trigger.queue(pipe, script_keys, script_args)
            self.buffer.queue_index(pipe, snap.org_id, snap.env_id)

        try:
            results = await self._run(build, 3)
        except Exception as exc:
            # The script may have run before the failure: the caller writes the
            # run with this same run id, and materialization is idempotent on it.
            failed = metrics.decided(self._fail_open(exc, snap.env_id), started, "trigger")
            if write_through:
                return await self._write_direct(failed, snap, bound=False)
            return TriggerOutcome(failed, snap.run_id, None, False)
        r = results[0]
        outcome = Outcome(int(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]))
        metrics.decided(outcome, started, "trigger")
        result = int(r[5])
        if result in (0, RESULT_BOUND) or outcome.reason == gate_pb2.DECISION_REASON_BUFFER_FULL:
            if write_through:
                return await self._write_direct(outcome, snap, bound=result == RESULT_BOUND)
            return TriggerOutcome(outcome, snap.run_id, None, False)
        run_id = r[6].decode()
        if result == RESULT_ACCEPTED:
            run = self.buffer.accepted_run(snap, int(r[7]))
            return TriggerOutcome(outcome, run_id, run, False)
        if result in (RESULT_DUP_IDEM, RESULT_DUP_RUN):
            existing = await self.buffer.existing_run(snap.env_id, run_id, r[8])
            return TriggerOutcome(outcome, run_id, existing, True)
        raise AssertionError(f"unknown trigger result {result}")

    async def _write_direct(
        self, outcome: Outcome, snap: run_pb2.RunSnapshot, *, bound: bool
    ) -> TriggerOutcome:
        """Insert a pass-through run into Postgres through the drainer's own
        materializer; a retryable failure (or no answer within
        MOLLIFIER_DIRECT_WRITE_TIMEOUT_MS) buffers the run instead.

        A run passed for being under its threshold, or failed open, first
        takes a write slot (``slots.py``), and is buffered when none is free
        (written at once if the buffer cannot take it). Not the others: the
        kill switch, an org not enabled, the bypasses and shadow mode (whose
        untripped answers are UNDER_THRESHOLD too) must never buffer a run,
        and a full buffer cannot take it.

        When trigger.lua bound the key to this run and the call fails with the
        run neither written nor buffered, the binding is dropped again, so the
        key is not held by a run that never came to be. Not when the caller is
        gone (cancelled, its deadline passed): the insert may still commit, and
        a caller that gives up fails open and creates the run itself with this
        run id, as does its retry; dropping the binding then would let another
        trigger with the key make a second run.
        """
        if not bound:
            return await self._write_direct_once(outcome, snap, bound=False)
        settled = False
        try:
            answer = await self._write_direct_once(outcome, snap, bound=True)
            settled = True
            return answer
        except MollifierError as exc:
            # A SYSTEM_FAILURE row was kept with the key: it holds the key.
            settled = exc.reason == "POSTGRES_REJECTED"
            raise
        except asyncio.CancelledError:
            settled = True  # outcome unknown: the binding stays (see above)
            raise
        finally:
            if not settled:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._rebind(snap, ""))

    async def _rebind(self, snap: run_pb2.RunSnapshot, holder: str) -> None:
        """Point the snapshot's key, where it is bound to this run, at ``holder``
        (rebind.lua); "" drops the binding."""
        k = env_keys(snap.env_id)
        await self.scripts.rebind(
            self.redis, [k.idem(snap.task_identifier, snap.idempotency_key)], [snap.run_id, holder]
        )

    async def _take_slot(self) -> str | None:
        """A write slot for one direct write: its holder id; "" when none is
        free; None when Redis cannot answer (the write goes ahead without:
        the gate fails open, and so does the budget).

        A slow Redis is not a failing one: past the gate timeout the slot is
        asked for again, on the pool, for up to SLOT_PATIENCE gate timeouts
        more (not longer: a paused Redis must not hold up a failed-open
        trigger), under the same holder id (counted once if the first ask
        landed late).
        """
        holder = self._slots.new_holder()
        try:
            return await self._ask_slot(holder)
        except BaseException:
            # No answer (or the caller is gone): an ask may still land, or have
            # landed; give the slot back in case one did.
            self._release_slot(holder)
            raise

    async def _ask_slot(self, holder: str) -> str | None:
        try:
            r = await self._run(lambda p: self._slots.queue_take_direct(p, holder), 1)
            return holder if int(r[0]) == 1 else ""
        except TimeoutError:
            pass
        except Exception:
            return None  # (nothing sent that could land)
        try:
            async with asyncio.timeout(SLOT_PATIENCE * self.timeout):
                taken = await self._slots.take_direct(holder)
        except Exception:
            self._release_slot(holder)
            return None
        return holder if taken else ""

    def _release_slot(self, holder: str) -> None:
        """Give a slot back without holding up the caller's answer."""
        task = asyncio.create_task(self._give_back(holder))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _give_back(self, holder: str) -> None:
        try:
            await self._run(lambda p: self._slots.queue_release(p, holder), 1)
        except Exception:
            # The gate's bound is tight, and a call that timed out before it
            # went out is never sent: once more on the pool, unhurried, so a
            # Redis hiccup does not leave slots held until their leases lapse.
            # Failing that too, the slot lapses with its lease.
            with contextlib.suppress(Exception):
                await self._slots.release(holder)

    async def _write_direct_once(
        self, outcome: Outcome, snap: run_pb2.RunSnapshot, *, bound: bool
    ) -> TriggerOutcome:
        slot = outcome.reason in SLOTTED_REASONS and not self.settings.shadow_mode
        holder = await self._take_slot() if slot else None
        if holder == "":
            deferred = await self._defer(outcome, snap)
            if deferred is not None:
                return deferred
        try:
            return await self._insert_direct(outcome, snap, bound=bound)
        finally:
            if holder:
                self._release_slot(holder)

    async def _insert_direct(
        self, outcome: Outcome, snap: run_pb2.RunSnapshot, *, bound: bool
    ) -> TriggerOutcome:
        from . import materializer as m

        pool = self.buffer.pool
        assert pool is not None
        entry = m.Entry.from_snapshot(snap)
        try:
            async with asyncio.timeout(self.settings.direct_write_timeout_ms / 1000):
                async with pool.connection() as conn:
                    res = await m.materialize_one(conn, entry)
        except Exception as exc:
            if isinstance(exc, TimeoutError) or m.is_retryable(exc):
                return await self._buffer_instead(outcome, snap, exc)
            raise
        if res.outcome is m.Outcome.CREATED:
            return TriggerOutcome(outcome, snap.run_id, direct_run(snap), False)
        if res.outcome is m.Outcome.RETRY:
            return await self._buffer_instead(outcome, snap, None)
        if res.outcome is m.Outcome.CONFLICT:
            raise AlreadyExists(
                f"run id {snap.run_id} is already used by another env",
                reason="RUN_ID_TAKEN",
                metadata={"run_id": snap.run_id},
            )
        if res.outcome is m.Outcome.SYSTEM_FAILURE:
            raise FailedPrecondition(
                f"postgres refused run {snap.run_id}: {res.error} (kept as a SYSTEM_FAILURE row)",
                reason="POSTGRES_REJECTED",
                metadata={"run_id": snap.run_id},
            )
        holder = res.resolved_run_id or snap.run_id
        if holder != snap.run_id and bound:
            # The key was held in Postgres by an older run whose Redis binding
            # had lapsed: point the binding at the run that really holds it.
            await self._rebind(snap, holder)
        existing = await m.read_run(pool, snap.env_id, holder)
        if (
            bound
            and holder == snap.run_id
            and existing is not None
            and existing.snapshot.idempotency_key != snap.idempotency_key
        ):
            # A retry of a written run under another key: the row keeps its
            # own key, so this one must not stay bound to it.
            await self._rebind(snap, "")
        if existing is None:
            existing = run_pb2.Run(
                run_id=holder, env_id=snap.env_id, source=run_pb2.RUN_SOURCE_POSTGRES
            )
        return TriggerOutcome(outcome, holder, existing, True)

    async def _buffer_instead(
        self, outcome: Outcome, snap: run_pb2.RunSnapshot, exc: BaseException | None
    ) -> TriggerOutcome:
        """Postgres failed retryably on a direct write: take the run into the buffer."""
        metrics.direct_write_fallback()
        log.warning(
            "direct write failed; buffering the run",
            extra={
                "env_id": snap.env_id,
                "run_id": snap.run_id,
                "error": type(exc).__name__ if exc else "retry",
                "reason": "POSTGRES_UNAVAILABLE",
            },
        )
        try:
            return await self._accept_instead(
                outcome, snap, gate_pb2.DECISION_REASON_POSTGRES_UNAVAILABLE
            )
        except ResourceExhausted:
            raise Unavailable(
                "postgres is unavailable and the buffer is full",
                reason="POSTGRES_UNAVAILABLE",
                retry_after_ms=1000,
            ) from exc
        except MollifierError:
            raise
        except Exception as redis_exc:
            raise Unavailable(
                "postgres and redis are both unavailable", reason="STORES_UNAVAILABLE"
            ) from redis_exc

    async def _defer(self, outcome: Outcome, snap: run_pb2.RunSnapshot) -> TriggerOutcome | None:
        """No write slot was free: take the run into the buffer; None when the
        buffer cannot take it either (full, or Redis failing after all), and
        the run is written at once, outside the budget, rather than refused."""
        try:
            deferred = await self._accept_instead(
                outcome, snap, gate_pb2.DECISION_REASON_POSTGRES_BUSY
            )
        except ResourceExhausted:
            return None
        except MollifierError:
            raise
        except Exception:
            return None
        # Expected under load, one per run: counted, not logged.
        metrics.direct_write_deferred()
        return deferred

    async def _accept_instead(
        self, outcome: Outcome, snap: run_pb2.RunSnapshot, reason: int
    ) -> TriggerOutcome:
        accepted = await self.buffer.accept(snap)
        buffered = Outcome(
            MOLLIFY, reason, outcome.window_count, outcome.threshold, outcome.tripped_until_ms
        )
        duplicate = accepted.result != buffer_pb2.ACCEPT_RESULT_ACCEPTED
        run_id = accepted.existing_run_id or snap.run_id
        return TriggerOutcome(buffered, run_id, accepted.run, duplicate)

    # -- idempotency claims ----------------------------------------------------

    def _check_key(self, v: Violations, env_id: str, task: str, key: str) -> None:
        v.env_id("env_id", env_id)
        v.task("task_identifier", task)
        v.idempotency_key("idempotency_key", key)

    async def claim(self, env_id: str, task: str, key: str, ttl_ms: int = 0) -> Claim:
        v = Violations()
        self._check_key(v, env_id, task, key)
        if ttl_ms < 0 or ttl_ms > MAX_CLAIM_TTL_MS:
            v.add("claim_ttl", f"must be 0 to {MAX_CLAIM_TTL_MS} ms")
        v.raise_if_any()
        k = env_keys(env_id)
        token = secrets.token_urlsafe(18)
        r = await self.scripts.claim(
            self.redis,
            [k.idem(task, key), k.claim(task, key)],
            [token, ttl_ms or DEFAULT_CLAIM_TTL_MS],
        )
        state = int(r[0])
        value = r[1].decode()
        if state == gate_pb2.CLAIM_STATE_CLAIMED:
            return Claim(state, claim_token=value)
        if state == gate_pb2.CLAIM_STATE_RESOLVED:
            return Claim(state, run_id=value)
        return Claim(state, retry_after_ms=int(r[2]))

    async def publish(
        self, env_id: str, task: str, key: str, token: str, run_id: str, expires_at_ms: int = 0
    ) -> str:
        v = Violations()
        self._check_key(v, env_id, task, key)
        v.text("claim_token", token, max_len=128, required=True)
        v.run_id("run_id", run_id)
        if expires_at_ms and expires_at_ms <= now_ms():
            v.add("expires_at", "must lie in the future")
        v.raise_if_any()
        k = env_keys(env_id)
        expires = expires_at_ms or now_ms() + self.settings.idempotency_ttl_ms
        r = await self.scripts.publish(
            self.redis, [k.idem(task, key), k.claim(task, key)], [token, run_id, expires]
        )
        code = int(r[0])
        if code == 1:
            return run_id
        if code == -1:
            raise FailedPrecondition(
                f"idempotency key already bound to {r[1].decode()}",
                reason="IDEMPOTENCY_KEY_BOUND",
                metadata={"run_id": r[1].decode()},
            )
        raise FailedPrecondition(
            "the claim is not held under this token (it lapsed or belongs to another)",
            reason="CLAIM_NOT_HELD",
        )

    async def release(self, env_id: str, task: str, key: str, token: str) -> bool:
        v = Violations()
        self._check_key(v, env_id, task, key)
        v.text("claim_token", token, max_len=128, required=True)
        v.raise_if_any()
        k = env_keys(env_id)
        r = await self.scripts.release(self.redis, [k.claim(task, key)], [token])
        return int(r) == 1

    # -- state and policy ------------------------------------------------------

    async def env_state(self, env_id: str) -> gate_pb2.GetEnvStateResponse:
        v = Violations()
        v.env_id("env_id", env_id)
        v.raise_if_any()
        k = env_keys(env_id)
        r = await self.scripts.env_state(
            self.redis,
            [k.gate, k.policy, *k.buffered],
            self._defaults[:3],
        )
        resp = gate_pb2.GetEnvStateResponse(
            env_id=env_id,
            window_count=int(r[0]),
            threshold=int(r[1]),
            buffer_depth=int(r[3]) + int(r[6]),
            draining=int(r[4]),
            failed=int(r[5]),
        )
        if int(r[2]):
            resp.tripped_until.FromMilliseconds(int(r[2]))
        resp.effective_policy.threshold = int(r[1])
        resp.effective_policy.window.FromMilliseconds(int(r[10]))
        resp.effective_policy.hold.FromMilliseconds(int(r[11]))
        if r[7]:
            resp.overrides.threshold = int(r[7])
        if r[8]:
            resp.overrides.window.FromMilliseconds(int(r[8]))
        if r[9]:
            resp.overrides.hold.FromMilliseconds(int(r[9]))
        return resp

    async def set_policy(self, env_id: str, policy: gate_pb2.EnvPolicy) -> gate_pb2.EnvPolicy:
        v = Violations()
        v.env_id("env_id", env_id)
        if policy.threshold < 0:
            v.add("policy.threshold", "must not be negative")
        v.duration("policy.window", policy.window, max_ms=3_600_000)
        v.duration("policy.hold", policy.hold, max_ms=86_400_000)
        window_ms = policy.window.ToMilliseconds()
        if 0 < window_ms < 10:
            v.add("policy.window", "must be at least 10 ms")
        v.raise_if_any()
        k = env_keys(env_id)
        fields = {
            "threshold": policy.threshold,
            "window_ms": window_ms,
            "hold_ms": policy.hold.ToMilliseconds(),
        }
        pipe = self.redis.pipeline(transaction=False)
        for name, value in fields.items():
            if value:
                pipe.hset(k.policy, name, value)
            else:
                pipe.hdel(k.policy, name)
        await pipe.execute()
        state = await self.env_state(env_id)
        return state.effective_policy


def direct_run(snap: run_pb2.RunSnapshot) -> run_pb2.Run:
    """The Run a direct write just created (PENDING, or DELAYED when delayed)."""
    now = now_ms()
    delayed = snap.HasField("delay_until") and ms_from_ts(snap.delay_until) > now
    return run_pb2.Run(
        run_id=snap.run_id,
        env_id=snap.env_id,
        status=run_pb2.RUN_STATUS_DELAYED if delayed else run_pb2.RUN_STATUS_PENDING,
        source=run_pb2.RUN_SOURCE_POSTGRES,
        snapshot=snap,
        created_at=ts_from_ms(now),
        materialized_at=ts_from_ms(now),
    )
