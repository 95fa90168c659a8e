"""Trigger owning the whole write path (TriggerRequest.write_through) against
real Redis and Postgres: pass-through runs written by the sidecar, one
idempotency rule for both paths, order kept across the switch, and Postgres
failures sending runs to the buffer instead."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from mollifier.app import App
from mollifier.config import Settings
from mollifier.devstack import PostgresProcess
from mollifier.drainer import Drainer
from mollifier.errors import AlreadyExists, FailedPrecondition, Unavailable
from mollifier.keys import env_keys
from mollifier_client.v1 import gate_pb2, run_pb2

from tests.entries import env_depth

_ids = itertools.count(1)
FLAGS = {"mollifierEnabled": True}


def request(env: str = "env_w", **snap_fields: Any) -> gate_pb2.TriggerRequest:
    snap = run_pb2.RunSnapshot(run_id=f"run_w{next(_ids)}", payload=b"{}", **snap_fields)
    return gate_pb2.TriggerRequest(
        env_id=env,
        org_id="org_w",
        task_identifier="task-w",
        org_feature_flags=FLAGS,
        snapshot=snap,
        write_through=True,
    )


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[App]:
    # A loose gate bound: these tests are about where runs land, not latency.
    s = settings.replace(
        trip_threshold=20, trip_window_ms=500, trip_hold_ms=200, gate_timeout_ms=2000
    )
    a = await App.connect(s, start_background=False)
    yield a
    await a.close()


async def trigger(app: App, req: gate_pb2.TriggerRequest) -> Any:
    return await app.gate.trigger(req, req.snapshot)


async def drain(app: App, env: str = "env_w") -> None:
    """Drain until the env's buffer is empty (backed-off retries included)."""
    d = Drainer(app.settings.replace(drain_enabled=True), app.redis, app.scripts, app.pool)
    for _ in range(2000):
        await d.tick()
        if await env_depth(app.redis, env) == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("buffer did not empty")


async def rows(url: str, env: str = "env_w") -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT run_id, status, idempotency_key, materialized_at FROM mollifier.runs "
            "WHERE env_id = %s ORDER BY materialized_at, run_id",
            (env,),
        )
        return list(await cur.fetchall())


async def test_pass_through_is_written_by_the_sidecar(app: App, database_url: str) -> None:
    req = request()
    out = await trigger(app, req)
    assert out.outcome.decision == gate_pb2.DECISION_PASS_THROUGH
    assert out.run is not None
    assert out.run.source == run_pb2.RUN_SOURCE_POSTGRES
    assert out.run.status == run_pb2.RUN_STATUS_PENDING
    assert [r[0] for r in await rows(database_url)] == [req.snapshot.run_id]
    got = await app.buffer.get_run("env_w", req.snapshot.run_id)
    assert got.source == run_pb2.RUN_SOURCE_POSTGRES
    # A delayed run is written DELAYED.
    later = request()
    later.snapshot.delay_until.FromSeconds(4_000_000_000)
    delayed = await trigger(app, later)
    assert delayed.run is not None and delayed.run.status == run_pb2.RUN_STATUS_DELAYED


async def test_without_the_field_nothing_is_written(app: App, database_url: str) -> None:
    req = request()
    req.write_through = False
    out = await trigger(app, req)
    assert out.outcome.decision == gate_pb2.DECISION_PASS_THROUGH
    assert out.run is None
    assert await rows(database_url) == []


async def test_bypass_and_disabled_org_are_written_too(app: App, database_url: str) -> None:
    bypass = request()
    bypass.debounce = True
    off = request()
    off.org_feature_flags["mollifierEnabled"] = False
    keyed = request(idempotency_key="k-bypass")
    keyed.wait_for_completion = True
    for req in (bypass, off, keyed):
        out = await trigger(app, req)
        assert out.run is not None and out.run.source == run_pb2.RUN_SOURCE_POSTGRES
    again = request(idempotency_key="k-bypass")
    again.wait_for_completion = True
    dup = await trigger(app, again)
    assert dup.duplicate and dup.run_id == keyed.snapshot.run_id
    assert len(await rows(database_url)) == 3


async def test_mixed_traffic_every_run_readable_with_its_source(
    app: App, database_url: str
) -> None:
    results = []
    # Under the threshold, over it (a burst), then quiet again after the hold.
    for _ in range(10):
        results.append(await trigger(app, request()))
    burst = await asyncio.gather(*(trigger(app, request()) for _ in range(60)))
    results.extend(burst)
    decisions = {r.outcome.decision for r in results}
    assert decisions == {gate_pb2.DECISION_PASS_THROUGH, gate_pb2.DECISION_MOLLIFY}
    for r in results:
        run = await app.buffer.get_run("env_w", r.run_id)
        expected = (
            run_pb2.RUN_SOURCE_BUFFER
            if r.outcome.decision == gate_pb2.DECISION_MOLLIFY
            else run_pb2.RUN_SOURCE_POSTGRES
        )
        assert run.source == expected
    await drain(app)
    await asyncio.sleep(1.2)  # the window slides past the burst
    for _ in range(5):
        results.append(await trigger(app, request()))
    assert results[-1].outcome.decision == gate_pb2.DECISION_PASS_THROUGH
    for r in results:
        run = await app.buffer.get_run("env_w", r.run_id)
        assert run.source == run_pb2.RUN_SOURCE_POSTGRES
    assert len(await rows(database_url)) == len(results)


async def test_order_per_env_is_kept_across_the_switch(app: App, database_url: str) -> None:
    await app.gate.set_policy("env_w", gate_pb2.EnvPolicy(threshold=5))
    order = []
    for _ in range(30):  # trips after 5: the rest buffered in arrival order
        order.append((await trigger(app, request())).run_id)
    await asyncio.sleep(1.2)  # hold over, rate fallen: the backlog still buffers
    late = await trigger(app, request())
    assert late.outcome.decision == gate_pb2.DECISION_MOLLIFY
    assert late.outcome.reason == gate_pb2.DECISION_REASON_BACKLOG
    order.append(late.run_id)
    await drain(app)
    after = await trigger(app, request())
    assert after.outcome.decision == gate_pb2.DECISION_PASS_THROUGH
    order.append(after.run_id)
    written = {r[0]: r[3] for r in await rows(database_url)}
    assert set(written) == set(order)
    # No row was written before a run that arrived earlier: direct writes never
    # overtake buffered runs (runs of one drained batch share a commit time).
    times = [written[run_id] for run_id in order]
    assert times == sorted(times)
    assert times[4] < times[5] and times[-2] < times[-1]


async def test_one_key_across_the_trip_gives_one_run(app: App, database_url: str) -> None:
    await app.gate.set_policy("env_w", gate_pb2.EnvPolicy(threshold=100))

    async def one() -> Any:
        return await trigger(app, request(idempotency_key="same-key"))

    answers = await asyncio.gather(*(one() for _ in range(500)))
    decisions = {a.outcome.decision for a in answers}
    assert gate_pb2.DECISION_PASS_THROUGH in decisions
    assert gate_pb2.DECISION_MOLLIFY in decisions
    winners = {a.run_id for a in answers}
    assert len(winners) == 1
    assert sum(not a.duplicate for a in answers) == 1
    await drain(app)
    written = await rows(database_url)
    assert [r[0] for r in written] == list(winners)


async def test_postgres_down_sends_runs_to_the_buffer(settings: Settings, redis_url: str) -> None:
    folder = Path(tempfile.mkdtemp(prefix="mollifier-pg-"))
    pg = PostgresProcess(folder)
    pg.start()
    try:
        s = settings.replace(database_url=pg.url, direct_write_timeout_ms=500)
        app = await App.connect(s, start_background=False)
        try:
            first = await trigger(app, request())
            assert first.run is not None and first.run.source == run_pb2.RUN_SOURCE_POSTGRES
            pg.stop()
            during = [await trigger(app, request()) for _ in range(5)]
            # The first is buffered because Postgres failed; the rest follow it
            # into the buffer as its backlog, which keeps their order.
            assert during[0].outcome.reason == gate_pb2.DECISION_REASON_POSTGRES_UNAVAILABLE
            assert {o.outcome.reason for o in during[1:]} == {gate_pb2.DECISION_REASON_BACKLOG}
            for out in during:
                assert out.outcome.decision == gate_pb2.DECISION_MOLLIFY
                assert out.run is not None and out.run.source == run_pb2.RUN_SOURCE_BUFFER
            pg.start()
            await drain(app)
            written = {r[0] for r in await rows(pg.url)}
            assert written == {first.run_id, *(o.run_id for o in during)}
        finally:
            await app.close()
    finally:
        pg.kill()
        shutil.rmtree(folder, ignore_errors=True)


async def test_write_through_needs_a_database(redis_url: str) -> None:
    s = Settings.from_env({}, redis_url=redis_url, database_url="", drain_enabled=False)
    app = await App.connect(s, start_background=False)
    try:
        with pytest.raises(FailedPrecondition):
            await trigger(app, request())
    finally:
        await app.close()


async def test_a_failed_direct_write_frees_its_key(settings: Settings, redis_url: str) -> None:
    """Bound for a direct write that then neither reached Postgres nor the
    buffer: the key must not stay held by a run that never came to be."""
    folder = Path(tempfile.mkdtemp(prefix="mollifier-pg-"))
    pg = PostgresProcess(folder)
    pg.start()
    try:
        s = settings.replace(database_url=pg.url, direct_write_timeout_ms=500)
        app = await App.connect(s, start_background=False)
        try:
            pg.stop()
            app.buffer.total_full = True  # nowhere to take the run instead
            req = request(idempotency_key="k-free")
            with pytest.raises(Unavailable):
                await trigger(app, req)
            k = env_keys("env_w")
            assert await app.redis.get(k.idem("task-w", "k-free")) is None
            pg.start()
            assert app.pool is not None
            await app.pool.check()  # drop the connections the restart broke
            app.buffer.total_full = False
            again = await trigger(app, req)  # the caller's retry, same run id
            assert not again.duplicate
            assert again.run is not None and again.run.source == run_pb2.RUN_SOURCE_POSTGRES
            assert [r[0] for r in await rows(pg.url)] == [req.snapshot.run_id]
        finally:
            await app.close()
    finally:
        pg.kill()
        shutil.rmtree(folder, ignore_errors=True)


async def test_a_run_id_of_another_env_is_refused(app: App, database_url: str) -> None:
    first = request(env="env_one")
    await trigger(app, first)
    clash = request(env="env_two")
    clash.snapshot.run_id = first.snapshot.run_id
    with pytest.raises(AlreadyExists):
        await trigger(app, clash)
    assert len(await rows(database_url, "env_one")) == 1
    assert await rows(database_url, "env_two") == []


async def test_a_caller_gone_mid_write_keeps_the_key_bound(app: App, database_url: str) -> None:
    """A direct write whose caller is gone (cancelled) may still commit, and
    the caller fails open and writes the run itself with the same id: the
    key stays bound to that run, so another trigger with it is a duplicate."""
    req = request(idempotency_key="k-gone")
    locker = await psycopg.AsyncConnection.connect(database_url)
    async with locker, locker.transaction():
        # Every insert into the table waits until this transaction ends.
        await locker.execute("LOCK TABLE mollifier.runs IN ACCESS EXCLUSIVE MODE")
        call = asyncio.create_task(trigger(app, req))
        await asyncio.sleep(0.3)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    k = env_keys("env_w")
    assert await app.redis.get(k.idem("task-w", "k-gone")) == req.snapshot.run_id.encode()
    other = request(idempotency_key="k-gone")
    answer = await trigger(app, other)
    assert answer.duplicate and answer.run_id == req.snapshot.run_id
    # The caller's own retry (same run id) is no duplicate: it writes the run.
    again = await trigger(app, req)
    assert not again.duplicate
    assert [r[0] for r in await rows(database_url)] == [req.snapshot.run_id]


async def test_a_retry_under_another_key_does_not_bind_that_key(
    app: App, database_url: str
) -> None:
    """The same run id sent again with another idempotency key: the answer is
    the written run (a duplicate), and the other key stays free."""
    first = request(idempotency_key="k-own")
    assert not (await trigger(app, first)).duplicate
    retry = request(idempotency_key="k-other")
    retry.snapshot.run_id = first.snapshot.run_id
    answer = await trigger(app, retry)
    assert answer.duplicate and answer.run_id == first.snapshot.run_id
    k = env_keys("env_w")
    assert await app.redis.get(k.idem("task-w", "k-other")) is None
    fresh = request(idempotency_key="k-other")
    assert not (await trigger(app, fresh)).duplicate
    assert sorted(r[0] for r in await rows(database_url)) == sorted(
        [first.snapshot.run_id, fresh.snapshot.run_id]
    )
