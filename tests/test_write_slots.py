"""Postgres write slots (slots.py, write_slot.lua) against real Redis and
Postgres: one budget of writing connections for drain batches and
write-through inserts, a write-through run buffered when none is free, a
drain batch waiting for one, and a dead holder's slot lapsing."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from mollifier.app import App
from mollifier.config import Settings
from mollifier.drainer import Drainer
from mollifier.keys import WRITE_SLOTS, env_keys
from mollifier.scripts import load_scripts
from mollifier_client.v1 import gate_pb2, run_pb2

from tests.fault_helpers import accept_all, buffer_depth, count_rows, snapshots

_ids = itertools.count(1)
FLAGS = {"mollifierEnabled": True}
SCRIPTS = load_scripts()


def request(env: str = "env_s", **fields: Any) -> gate_pb2.TriggerRequest:
    snap = run_pb2.RunSnapshot(run_id=f"run_s{next(_ids)}", payload=b"{}")
    return gate_pb2.TriggerRequest(
        env_id=env,
        org_id="org_s",
        task_identifier="task-s",
        org_feature_flags=FLAGS,
        snapshot=snap,
        write_through=True,
        **fields,
    )


async def take(redis: Any, holder: str, limit: int, lease_ms: int = 60_000) -> int:
    return int(await SCRIPTS.write_slot(redis, [WRITE_SLOTS], [holder, limit, lease_ms, "0"]))


async def held_after_give_back(redis: Any) -> int:
    """Slots held once a direct write's give-back (sent after its answer) had
    up to a second to land."""
    for _ in range(100):
        if not await redis.zcard(WRITE_SLOTS):
            break
        await asyncio.sleep(0.01)
    return int(await redis.zcard(WRITE_SLOTS))


async def renew(redis: Any, holder: str, lease_ms: int = 60_000) -> int:
    return int(await SCRIPTS.write_slot(redis, [WRITE_SLOTS], [holder, 99, lease_ms, "1"]))


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[App]:
    s = settings.replace(
        trip_threshold=10_000, gate_timeout_ms=2000, drain_concurrency=3, write_slots=3
    )
    a = await App.connect(s, start_background=False)
    yield a
    await a.close()


async def rows(url: str, env: str = "env_s") -> list[str]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT run_id FROM mollifier.runs WHERE env_id = %s", (env,))
        return [r[0] for r in await cur.fetchall()]


async def test_a_slot_is_taken_under_the_limit_renewed_and_lapses(redis_client: Any) -> None:
    assert await take(redis_client, "a", 2) == 1
    assert await take(redis_client, "b", 2) == 1
    assert await take(redis_client, "c", 2) == 0
    # A higher limit (the drain's) still finds room below it.
    assert await take(redis_client, "c", 3) == 1
    assert await redis_client.zcard(WRITE_SLOTS) == 3
    # Asking again under a holder that holds one (an answer that came too
    # late) counts it once, even at the limit.
    assert await take(redis_client, "c", 3) == 1
    assert await redis_client.zcard(WRITE_SLOTS) == 3
    await redis_client.zrem(WRITE_SLOTS, "a")
    assert await take(redis_client, "d", 3) == 1
    # Renewing a held slot pushes out its lapse; a slot not held is not renewed.
    before = await redis_client.zscore(WRITE_SLOTS, "b")
    assert await renew(redis_client, "b", 120_000) == 1
    assert await redis_client.zscore(WRITE_SLOTS, "b") > before
    assert await renew(redis_client, "a") == 0
    assert await redis_client.zscore(WRITE_SLOTS, "a") is None
    # A holder that never gives its slot back loses it with its lease.
    await redis_client.delete(WRITE_SLOTS)
    assert await take(redis_client, "gone", 1, lease_ms=150) == 1
    assert await take(redis_client, "next", 1) == 0
    await asyncio.sleep(0.25)
    assert await take(redis_client, "next", 1) == 1
    assert await redis_client.zrange(WRITE_SLOTS, 0, -1) == [b"next"]
    # The set itself lives as long as its longest lease.
    assert 0 < await redis_client.pttl(WRITE_SLOTS) <= 60_000


async def test_a_direct_write_holds_a_slot_and_gives_it_back(app: App) -> None:
    out = await app.gate.trigger(request(), request().snapshot)
    assert out.run is not None and out.run.source == run_pb2.RUN_SOURCE_POSTGRES
    # Given back after the answer, not before it.
    assert await held_after_give_back(app.redis) == 0


async def test_no_free_slot_buffers_the_run_with_postgres_busy(
    app: App, database_url: str
) -> None:
    # Two slots held elsewhere: a direct write may take all but one of three.
    assert await take(app.redis, "elsewhere-1", 3) == 1
    assert await take(app.redis, "elsewhere-2", 3) == 1
    req = request()
    out = await app.gate.trigger(req, req.snapshot)
    assert out.outcome.decision == gate_pb2.DECISION_MOLLIFY
    assert out.outcome.reason == gate_pb2.DECISION_REASON_POSTGRES_BUSY
    assert out.run is not None and out.run.source == run_pb2.RUN_SOURCE_BUFFER
    assert await rows(database_url) == []
    # The next trigger follows it into the buffer (its backlog keeps the order).
    after = request()
    nxt = await app.gate.trigger(after, after.snapshot)
    assert nxt.outcome.reason == gate_pb2.DECISION_REASON_BACKLOG
    # Runs that must never be buffered are written at once, slots or not.
    bypass = request(debounce=True)
    direct = await app.gate.trigger(bypass, bypass.snapshot)
    assert direct.outcome.reason == gate_pb2.DECISION_REASON_BYPASS_DEBOUNCE
    assert direct.run is not None and direct.run.source == run_pb2.RUN_SOURCE_POSTGRES
    # The drain may take the last slot: the buffered runs land, once each.
    d = Drainer(app.settings.replace(drain_enabled=True), app.redis, app.scripts, app.pool)
    assert await d.tick() == 2
    assert sorted(await rows(database_url)) == sorted(
        [req.snapshot.run_id, after.snapshot.run_id, bypass.snapshot.run_id]
    )
    assert await app.redis.zrange(WRITE_SLOTS, 0, -1) == [b"elsewhere-1", b"elsewhere-2"]


async def _stall_redis(url: str, seconds: float) -> None:
    """Keep Redis busy (one script spinning) for ``seconds``: slow, not down."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    spin = (
        "local t = redis.call('TIME'); local stop = t[1] * 1e6 + t[2] + ARGV[1] "
        "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] >= stop return 1"
    )
    try:
        await client.eval(spin, 0, int(seconds * 1e6))
    finally:
        await client.aclose()


async def test_a_slow_redis_still_counts_the_slots(settings: Settings, database_url: str) -> None:
    """Redis too slow for the gate's timeout: the decision fails open, and the
    direct write still asks for a slot (patiently), so the budget holds."""
    # Redis stalls 0.4 s from just before the trigger: past the decision's
    # 0.1 s and the first ask's, inside the second ask's 0.4 s.
    s = settings.replace(trip_threshold=10_000, gate_timeout_ms=100, write_slots=3)
    app = await App.connect(s, start_background=False)
    try:
        assert await take(app.redis, "elsewhere-1", 3) == 1
        assert await take(app.redis, "elsewhere-2", 3) == 1
        stall = asyncio.create_task(_stall_redis(s.redis_url, 0.4))
        await asyncio.sleep(0.05)
        req = request()
        out = await app.gate.trigger(req, req.snapshot)
        await stall
        assert out.outcome.reason == gate_pb2.DECISION_REASON_POSTGRES_BUSY
        assert out.run is not None and out.run.source == run_pb2.RUN_SOURCE_BUFFER
        assert await rows(database_url) == []
        # With a slot free, the same slowness still writes the run (holding one).
        await app.redis.zrem(WRITE_SLOTS, "elsewhere-1", "elsewhere-2")
        stall = asyncio.create_task(_stall_redis(s.redis_url, 0.4))
        await asyncio.sleep(0.05)
        other = request("env_s2")
        written = await app.gate.trigger(other, other.snapshot)
        await stall
        assert written.outcome.reason == gate_pb2.DECISION_REASON_FAIL_OPEN
        assert written.run is not None and written.run.source == run_pb2.RUN_SOURCE_POSTGRES
        assert await held_after_give_back(app.redis) == 0
    finally:
        await app.close()


async def test_a_drain_batch_waits_for_a_slot(app: App, database_url: str) -> None:
    envs = ["env_s"]
    await accept_all(app, snapshots(50, "w", envs))
    for i in range(3):
        assert await take(app.redis, f"held-{i}", 3) == 1
    d = Drainer(app.settings.replace(drain_enabled=True), app.redis, app.scripts, app.pool)
    tick = asyncio.create_task(d.tick())
    await asyncio.sleep(0.3)
    assert not tick.done()
    # Nothing leased while waiting: the runs are not held out of the queue.
    assert await app.redis.zcard(env_keys("env_s").lease) == 0
    assert count_rows(database_url) == 0
    await app.redis.zrem(WRITE_SLOTS, "held-0")
    assert await asyncio.wait_for(tick, 10) == 50
    assert count_rows(database_url) == 50
    assert await app.redis.zrange(WRITE_SLOTS, 0, -1) == [b"held-1", b"held-2"]


async def test_a_stopping_drainer_stops_waiting_for_a_slot(app: App) -> None:
    await accept_all(app, snapshots(5, "x", ["env_s"]))
    assert await take(app.redis, "held", 3) == 1
    s = app.settings.replace(drain_enabled=True, write_slots=1)
    d = Drainer(s, app.redis, app.scripts, app.pool)
    d.start()
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await d.stop(grace=5)
    assert time.monotonic() - started < 2
    assert await buffer_depth(app.redis, ["env_s"]) == 5


async def test_postgres_never_holds_more_writers_than_the_slots(
    settings: Settings, database_url: str
) -> None:
    """Write-through callers and the drain at once, from more callers and drain
    workers than slots: Postgres's busy connections, sampled all along, never
    number more than the slots."""
    s = settings.replace(
        drain_enabled=True,
        drain_process=False,
        drain_concurrency=4,
        drain_batch_size=50,
        drain_idle_ms=5,
        write_slots=2,
        trip_threshold=150,
        trip_window_ms=200,
        trip_hold_ms=100,
        gate_timeout_ms=2000,
    )
    app = await App.connect(s, start_background=True)
    envs = [f"env_b{i}" for i in range(6)]
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
            while not done.is_set():
                cur = await c.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state <> 'idle' AND pid <> pg_backend_pid()"
                )
                row = await cur.fetchone()
                assert row is not None
                peak = max(peak, int(row[0]))
                await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample())
    reqs = [request(envs[i % len(envs)]) for i in range(1500)]
    answers: list[Any] = []
    try:

        async def caller(part: list[gate_pb2.TriggerRequest]) -> None:
            for r in part:
                answers.append(await app.gate.trigger(r, r.snapshot))

        await asyncio.gather(*(caller(reqs[i::32]) for i in range(32)))
        for _ in range(1000):
            if await buffer_depth(app.redis, envs) == 0:
                break
            await asyncio.sleep(0.02)
    finally:
        done.set()
        await sampler
        await app.close()
    reasons = {a.outcome.reason for a in answers}
    # Both paths ran: direct writes and buffered runs (busy slots among them).
    assert gate_pb2.DECISION_REASON_UNDER_THRESHOLD in reasons
    assert gate_pb2.DECISION_REASON_POSTGRES_BUSY in reasons
    assert count_rows(database_url) == 1500
    assert 1 <= peak <= 2, f"{peak} Postgres connections busy at once"


async def test_shadow_mode_never_buffers_for_want_of_a_slot(
    settings: Settings, database_url: str
) -> None:
    s = settings.replace(shadow_mode=True, gate_timeout_ms=2000, write_slots=3)
    app = await App.connect(s, start_background=False)
    try:
        assert await take(app.redis, "elsewhere-1", 3) == 1
        assert await take(app.redis, "elsewhere-2", 3) == 1
        req = request()
        out = await app.gate.trigger(req, req.snapshot)
        assert out.outcome.decision == gate_pb2.DECISION_PASS_THROUGH
        assert out.run is not None and out.run.source == run_pb2.RUN_SOURCE_POSTGRES
        assert await rows(database_url) == [req.snapshot.run_id]
    finally:
        await app.close()


async def test_a_busy_retry_under_another_key_leaves_that_key_free(
    app: App, database_url: str
) -> None:
    """A written run retried under another key while every slot is busy is
    buffered under that key; its drain finds the row holding the first key,
    so the other key is unbound again, and a trigger with it makes its run."""
    first = request()
    first.snapshot.idempotency_key = "k-own"
    assert not (await app.gate.trigger(first, first.snapshot)).duplicate
    assert await take(app.redis, "elsewhere-1", 3) == 1
    assert await take(app.redis, "elsewhere-2", 3) == 1
    retry = request()
    retry.snapshot.run_id = first.snapshot.run_id
    retry.snapshot.idempotency_key = "k-other"
    out = await app.gate.trigger(retry, retry.snapshot)
    assert out.outcome.reason == gate_pb2.DECISION_REASON_POSTGRES_BUSY
    d = Drainer(app.settings.replace(drain_enabled=True), app.redis, app.scripts, app.pool)
    assert await d.tick() == 1
    binding = env_keys("env_s").idem("task-s", "k-other")
    assert await app.redis.get(binding) is None
    await app.redis.delete(WRITE_SLOTS)
    fresh = request()
    fresh.snapshot.idempotency_key = "k-other"
    made = await app.gate.trigger(fresh, fresh.snapshot)
    assert not made.duplicate and made.run_id == fresh.snapshot.run_id
    assert sorted(await rows(database_url)) == sorted(
        [first.snapshot.run_id, fresh.snapshot.run_id]
    )
    # The first key still answers with the run that holds it.
    again = request()
    again.snapshot.idempotency_key = "k-own"
    dup = await app.gate.trigger(again, again.snapshot)
    assert dup.duplicate and dup.run_id == first.snapshot.run_id
