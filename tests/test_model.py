"""Model-based test of the buffer: a hypothesis state machine drives the real
Lua scripts (through app.buffer, app.drainer and app.mutations, on a real
redis-server) and checks every step against a plain Python model.

Operations: accept (fresh or reused run ids, idempotency keys, delays), lease,
ack, nack (requeue and dead-letter), lease expiry, backoff end, cancel, tags,
metadata, reschedule, reset of an idempotency key, retry of failed runs, and
lookups by key.

Time is advanced honestly by rewriting scores in Redis, never by sleeping:
"the lease ran out" sets every score of the env's lease zset to 1 (a deadline
in 1970), and "the backoff ended" does the same to the retry zset. lease.lua
then sees them as past due at Redis's real clock, exactly as it would after
waiting. Nothing else is touched behind the scripts' back.

The app runs without Postgres (pool None): acked runs simply leave the
buffer, which is what the buffer's contract covers.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from mollifier.app import App
from mollifier.codec import now_ms, ts_from_ms
from mollifier.config import Settings
from mollifier.connections import make_redis
from mollifier.errors import FailedPrecondition, NotFound, Unavailable
from mollifier.keys import env_keys
from mollifier.scripts import load_scripts
from mollifier_client.v1 import buffer_pb2, mutate_pb2, run_pb2

from tests.entries import set_members

T = TypeVar("T")

ENV = "env_model"
ORG = "org_model"
TASK = "task-m"
MAX_ATTEMPTS = 2
KEYS = ["k1", "k2", "k3"]
TAGS = ["a", "b", "c", "d"]


@dataclass
class ModelRun:
    run_id: str
    seq: int  # arrival order
    where: str  # Q queued, D leased, R backing off, F failed
    attempts: int = 0
    token: str = ""
    expired: bool = False  # leased, deadline passed, not yet reclaimed
    idem: str = ""
    tags: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=lambda: {"n": 0})
    canceled: bool = False
    delayed: bool = False


class Loop:
    """One private event loop for the machine (hypothesis rules are sync)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def model_loop() -> Iterator[Loop]:
    loop = Loop()
    yield loop
    loop.loop.close()


class BufferMachine(RuleBasedStateMachine):
    loop: Loop
    redis_url: str

    def __init__(self) -> None:
        super().__init__()
        self.runs: dict[str, ModelRun] = {}
        self.gone: set[str] = set()
        self.bindings: dict[str, str] = {}
        self.tokens: list[str] = []
        self.seq = 0
        self.ids = 0
        self.requests = 0

    @initialize()
    def connect(self) -> None:
        s = Settings.from_env(
            {},
            redis_url=self.redis_url,
            drain_enabled=False,
            drain_max_attempts=MAX_ATTEMPTS,
            mutation_wait_ms=0,
            buffer_capacity_per_env=10_000,
        )

        async def make() -> App:
            redis = make_redis(s)
            await redis.flushall()
            return App(s, redis, None, load_scripts())

        self.app = self.loop.run(make())

    def teardown(self) -> None:
        app = getattr(self, "app", None)
        if app is not None:
            self.loop.run(app.redis.aclose())

    # -- helpers ---------------------------------------------------------------

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run(coro)

    def req(self) -> str:
        self.requests += 1
        return f"req_{self.requests}_{secrets.token_hex(3)}"

    def live(self, *wheres: str) -> list[str]:
        return sorted(r for r, m in self.runs.items() if m.where in wheres)

    def mutable(self, run_id: str) -> bool:
        return self.runs[run_id].where in ("Q", "R", "F")

    # -- accept ----------------------------------------------------------------

    @rule(
        items=st.lists(
            st.tuples(
                st.booleans(),
                st.integers(0, 10**6),
                st.sampled_from(["", "", *KEYS]),
                st.booleans(),
            ),
            min_size=1,
            max_size=4,
        )
    )
    def accept(self, items: list[tuple[bool, int, str, bool]]) -> None:
        for reuse, pick, key, delayed in items:
            self._accept_one(reuse, pick, key, delayed)

    def _accept_one(self, reuse: bool, pick: int, key: str, delayed: bool) -> None:
        known = sorted(self.runs) + sorted(self.gone)
        if reuse and known:
            run_id = known[pick % len(known)]
        else:
            self.ids += 1
            run_id = f"run_m{self.ids}"
        snap = run_pb2.RunSnapshot(
            run_id=run_id,
            env_id=ENV,
            org_id=ORG,
            task_identifier=TASK,
            payload=b"{}",
            metadata=b'{"n":0}',
            idempotency_key=key,
        )
        if delayed:
            snap.delay_until.CopyFrom(ts_from_ms(now_ms() + 3_600_000))
        out = self.call(self.app.buffer.accept(snap))
        bound = self.bindings.get(key) if key else None
        if bound is not None and bound != run_id:
            assert out.result == buffer_pb2.ACCEPT_RESULT_DUPLICATE_IDEMPOTENCY_KEY
            assert out.existing_run_id == bound
        elif run_id in self.runs:
            assert out.result == buffer_pb2.ACCEPT_RESULT_DUPLICATE_RUN_ID
            assert out.existing_run_id == run_id
        else:
            assert out.result == buffer_pb2.ACCEPT_RESULT_ACCEPTED, out.result
            self.seq += 1
            self.gone.discard(run_id)
            self.runs[run_id] = ModelRun(run_id, self.seq, "Q", idem=key, delayed=delayed)
            if key:
                self.bindings[key] = run_id

    # -- lease / ack / nack ----------------------------------------------------

    def _reclaim(self) -> None:
        """What lease.lua does first: expired leases back (or dead), due retries back."""
        for m in self.runs.values():
            if m.where == "D" and m.expired:
                m.where = "F" if m.attempts >= MAX_ATTEMPTS else "Q"
                m.token, m.expired = "", False
            elif m.where == "R" and m.expired:
                m.where, m.expired = "Q", False

    @rule(n=st.integers(0, 5))
    def lease(self, n: int) -> None:
        token = secrets.token_hex(8)
        batch = self.call(self.app.drainer.lease_env(ENV, n, 60_000, token))
        self._reclaim()
        queued = sorted(self.live("Q"), key=lambda r: self.runs[r].seq)[:n]
        assert [r.run_id for r in batch.runs] == queued
        for lr in batch.runs:
            m = self.runs[lr.run_id]
            m.where, m.token, m.attempts = "D", token, m.attempts + 1
            assert lr.attempts == m.attempts
            snap = run_pb2.RunSnapshot.FromString(lr.raw)
            assert list(snap.tags) == m.tags
            assert json.loads(snap.metadata) == m.meta
            assert bool(lr.canceled_ms) == m.canceled
        if batch.runs:
            self.tokens.append(token)

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        token = data.draw(st.sampled_from(self.tokens))
        candidates = (
            sorted(r for r, m in self.runs.items() if m.token == token)
            + sorted(self.live("Q", "F"))[:2]
        )
        if not candidates:
            return
        ids = data.draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=4, unique=True))
        acked, rejected = self.call(self.app.drainer.ack_env(ENV, token, [(r, "") for r in ids]))
        want = [r for r in ids if self.runs[r].where == "D" and self.runs[r].token == token]
        assert acked == len(want)
        assert sorted(rejected) == sorted(set(ids) - set(want))
        for r in want:
            del self.runs[r]
            self.gone.add(r)

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data(), dead=st.booleans())
    def nack(self, data: st.DataObject, dead: bool) -> None:
        token = data.draw(st.sampled_from(self.tokens))
        candidates = sorted(r for r, m in self.runs.items() if m.token == token)
        if not candidates:
            return
        ids = data.draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=4, unique=True))
        requeued, dl, rejected = self.call(
            self.app.drainer.nack_env(ENV, token, ids, delay_ms=60_000, dead_letter=dead)
        )
        want = [r for r in ids if self.runs[r].where == "D"]
        assert sorted(rejected) == sorted(set(ids) - set(want))
        exp_dead = [r for r in want if dead or self.runs[r].attempts >= MAX_ATTEMPTS]
        assert (requeued, dl) == (len(want) - len(exp_dead), len(exp_dead))
        for r in want:
            m = self.runs[r]
            m.where = "F" if r in exp_dead else "R"
            m.token, m.expired = "", False

    @rule()
    def leases_run_out(self) -> None:
        """Every lease deadline is moved to 1970 (see the module docstring)."""
        k = env_keys(ENV)
        members = self.call(self.app.redis.zrange(k.lease, 0, -1))
        if members:
            self.call(self.app.redis.zadd(k.lease, dict.fromkeys(members, 1), xx=True))
        for m in self.runs.values():
            if m.where == "D":
                m.expired = True

    @rule()
    def backoffs_end(self) -> None:
        k = env_keys(ENV)
        members = self.call(self.app.redis.zrange(k.retry, 0, -1))
        if members:
            self.call(self.app.redis.zadd(k.retry, dict.fromkeys(members, 0), xx=True))
        for m in self.runs.values():
            if m.where == "R":
                m.expired = True

    @rule()
    def retry_failed(self) -> None:
        n = self.call(self.app.drainer.retry_failed(ENV))
        failed = self.live("F")
        assert n == len(failed)
        for r in failed:
            self.runs[r].where, self.runs[r].attempts = "Q", 0

    # -- mutations -------------------------------------------------------------

    def _target(self, pick: int) -> str:
        known = sorted(self.runs) + sorted(self.gone) + ["run_never"]
        return known[pick % len(known)]

    def _expect_mutation(self, run_id: str, coro: Coroutine[Any, Any, T]) -> T | None:
        """Runs the call; returns its answer when the model says it applies."""
        m = self.runs.get(run_id)
        if m is None:
            with pytest.raises(NotFound):
                self.call(coro)
            return None
        if m.where == "D":
            with pytest.raises(Unavailable):
                self.call(coro)
            return None
        return self.call(coro)

    @rule(pick=st.integers(0, 10**6))
    def cancel(self, pick: int) -> None:
        run_id = self._target(pick)
        resp = self._expect_mutation(
            run_id, self.app.mutations.cancel(ENV, run_id, self.req(), "model")
        )
        if resp is not None:
            m = self.runs[run_id]
            assert resp.already_final == m.canceled
            m.canceled = True

    @rule(pick=st.integers(0, 10**6), tags=st.lists(st.sampled_from(TAGS), min_size=1))
    def add_tags(self, pick: int, tags: list[str]) -> None:
        run_id = self._target(pick)
        resp = self._expect_mutation(
            run_id, self.app.mutations.add_tags(ENV, run_id, self.req(), tags)
        )
        if resp is not None:
            m = self.runs[run_id]
            m.tags = list(dict.fromkeys([*m.tags, *tags]))
            assert list(resp.tags) == m.tags

    @rule(pick=st.integers(0, 10**6), by=st.integers(-5, 5), key=st.sampled_from(["x", "y"]))
    def metadata(self, pick: int, by: int, key: str) -> None:
        run_id = self._target(pick)
        ops = [
            mutate_pb2.MetadataOperation(
                type=mutate_pb2.METADATA_OPERATION_TYPE_INCREMENT, path="n", value_json=str(by)
            ),
            mutate_pb2.MetadataOperation(
                type=mutate_pb2.METADATA_OPERATION_TYPE_SET, path=key, value_json=str(by)
            ),
        ]
        resp = self._expect_mutation(
            run_id, self.app.mutations.update_metadata(ENV, run_id, self.req(), operations=ops)
        )
        if resp is not None:
            m = self.runs[run_id]
            m.meta["n"] += by
            m.meta[key] = by
            assert json.loads(resp.run.metadata_json) == m.meta

    @rule(pick=st.integers(0, 10**6))
    def reschedule(self, pick: int) -> None:
        run_id = self._target(pick)
        m = self.runs.get(run_id)
        coro = self.app.mutations.reschedule(
            ENV, run_id, self.req(), ts_from_ms(now_ms() + 7_200_000)
        )
        if m is not None and m.where != "D" and (m.canceled or not m.delayed):
            with pytest.raises(FailedPrecondition):
                self.call(coro)
            return
        self._expect_mutation(run_id, coro)

    @rule(key=st.sampled_from(KEYS))
    def reset_key(self, key: str) -> None:
        coro = self.app.mutations.reset_idempotency_key(ENV, self.req(), TASK, key)
        bound = self.bindings.get(key)
        if bound is None:
            with pytest.raises(NotFound):
                self.call(coro)
            return
        m = self.runs.get(bound)
        if m is not None and m.where == "D":
            with pytest.raises(Unavailable):
                self.call(coro)
            return
        resp = self.call(coro)
        assert resp.reset_in_buffer and resp.run_id == bound
        del self.bindings[key]
        if m is not None:
            m.idem = ""

    @rule(key=st.sampled_from(KEYS))
    def find_by_key(self, key: str) -> None:
        bound = self.bindings.get(key)
        coro = self.app.buffer.find_by_idempotency_key(ENV, TASK, key)
        if bound is None or bound not in self.runs:
            # Unbound, or bound to a run that left the buffer (no Postgres here).
            with pytest.raises(NotFound):
                self.call(coro)
            return
        assert self.call(coro).run_id == bound

    # -- invariants ------------------------------------------------------------

    @invariant()
    def buffer_matches_model(self) -> None:
        if not hasattr(self, "app"):
            return
        k = env_keys(ENV)
        r = self.app.redis

        async def read() -> tuple[dict[str, list[str]], list[Any], dict[str, Any]]:
            # The queue's LIST and back set are both "Q" to the model.
            names = {"q": "Q", "b": "Q", "l": "D", "r": "R", "f": "F"}
            where = {
                run_id: [names[w] for w in sets]
                for run_id, sets in (await set_members(r, ENV)).items()
            }
            hashes = await r.hkeys(k.runs)
            binds = {key: await r.get(k.idem(TASK, key)) for key in KEYS}
            return where, hashes, binds

        where, hashes, binds = self.call(read())
        # Every entry in exactly one set, and it is the model's.
        assert len(hashes) == len(self.runs)
        for run_id, m in self.runs.items():
            model_where = m.where
            assert where.get(run_id) == [model_where], (run_id, where.get(run_id), m)
        assert set(where) == set(self.runs)
        for key in KEYS:
            got = binds[key].decode() if binds[key] is not None else None
            assert got == self.bindings.get(key), (key, got, self.bindings.get(key))
        # Depth as GetEnvState reports it (queued incl. backing off, draining, failed).
        state = self.call(self.app.gate.env_state(ENV))
        assert state.buffer_depth == len(self.live("Q", "R"))
        assert state.draining == len(self.live("D"))
        assert state.failed == len(self.live("F"))


def test_buffer_state_machine(redis_factory: Callable[..., Any], model_loop: Loop) -> None:
    # A Redis of its own: the machine owns every key in it, and nothing else
    # (a stray drainer of another test, say) can move its runs.
    BufferMachine.loop = model_loop
    BufferMachine.redis_url = redis_factory().url
    run_state_machine_as_test(
        BufferMachine,
        settings=settings(
            max_examples=50,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
