"""The promise under faults: a run the client was answered for exists exactly once
in Postgres, an acknowledged mutation is in its row, and the gate keeps answering.

Real processes, nothing mocked: `mollifier serve` subprocesses SIGKILLed at
random points of a trigger burst, of the drain and of a mutation burst; Redis
SIGKILLed and restarted from its append-only file mid-burst; Redis frozen
(SIGSTOP) and paused (CLIENT PAUSE), and Postgres stopped, during a burst; two
sidecars draining one Redis while one of them is killed.

Every trigger here uses write_through, so every OK answer means "this run will
exist": PASS_THROUGH runs are written by the sidecar, MOLLIFY runs buffered.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import grpc
import psycopg
import pytest
import redis.asyncio as aioredis
from mollifier.app import App
from mollifier.config import Settings
from mollifier.devstack import PostgresProcess, RedisProcess
from mollifier.migrations import migrate
from mollifier_client.v1 import gate_pb2, mutate_pb2, run_pb2
from psycopg_pool import AsyncConnectionPool

from tests.fault_helpers import (
    Burst,
    Sidecar,
    assert_buffer_consistent,
    assert_exactly_once,
    sidecar_proc,
    trigger_burst,
    wait_drained,
)

pytestmark = [pytest.mark.fault, pytest.mark.slow]

ENVS = [f"env_f{i}" for i in range(6)]


async def _migrate(database_url: str) -> None:
    pool = AsyncConnectionPool(database_url, min_size=1, max_size=2, open=False)
    await pool.open()
    try:
        await migrate(pool)
    finally:
        await pool.close()


@pytest.mark.parametrize("seed", [1, 2])
async def test_sidecar_killed_mid_trigger_burst(
    redis_url: str, redis_client: aioredis.Redis, database_url: str, seed: int
) -> None:
    rnd = random.Random(seed)
    burst = Burst()
    first = Sidecar(redis_url, database_url)
    await first.ready()
    current = [first]
    stop = asyncio.Event()
    task = asyncio.create_task(
        trigger_burst(lambda: current[0].gate, burst, stop, prefix=f"k{seed}_", envs=ENVS)
    )
    # Kill at a random point of the burst, while calls are in flight.
    await asyncio.sleep(0.5 + rnd.random() * 1.5)
    before = len(burst.acked)
    first.kill()
    second = Sidecar(redis_url, database_url)
    try:
        await second.ready()
        current[0] = second
        await asyncio.sleep(1.0)
        stop.set()
        await task
        await first.channel.close(None)
        await first.no_orphans()
        assert before > 0 and len(burst.acked) > before, burst
        assert burst.decisions.get(gate_pb2.DECISION_MOLLIFY, 0) > 0, burst.decisions
        await wait_drained(redis_client, ENVS)
        assert_exactly_once(database_url, burst.acked)
        await assert_buffer_consistent(redis_client, ENVS)
    finally:
        await second.close()


async def test_sidecar_killed_at_random_points_of_drain(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    """Three kills at random moments of one drain, then a clean finish."""
    app = await App.connect(settings, start_background=False)
    acked: set[str] = set()
    try:
        for i in range(0, 3000, 250):
            outs = await asyncio.gather(
                *(
                    app.buffer.accept(
                        run_pb2.RunSnapshot(
                            run_id=f"run_d{n}",
                            env_id=ENVS[n % len(ENVS)],
                            org_id=f"org_{n % 3}",
                            task_identifier="task-d",
                            payload=b"{}",
                        )
                    )
                    for n in range(i, i + 250)
                )
            )
            acked.update(o.run.run_id for o in outs if o.run is not None)
    finally:
        await app.close(grace=1)
    assert len(acked) == 3000
    rnd = random.Random(7)
    for _ in range(3):
        s = Sidecar(settings.redis_url, settings.database_url, MOLLIFIER_DRAIN_RATE_PER_SEC="3000")
        await s.ready()
        await asyncio.sleep(0.2 + rnd.random() * 0.6)
        s.kill()
        await s.channel.close(None)
        await s.no_orphans()
    async with sidecar_proc(settings.redis_url, settings.database_url):
        await wait_drained(redis_client, ENVS)
    assert_exactly_once(settings.database_url, acked)


async def test_sidecar_killed_mid_mutation_burst(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    """AddTags (a unique tag per call) and UpdateMetadata increments on runs that
    are buffered, draining and materialized, the sidecar killed mid-burst: every
    acknowledged tag and increment is in the row the run ends as."""
    app = await App.connect(settings, start_background=False)
    run_ids = [f"run_m{n}" for n in range(400)]
    try:
        await asyncio.gather(
            *(
                app.buffer.accept(
                    run_pb2.RunSnapshot(
                        run_id=r,
                        env_id=ENVS[n % 3],
                        org_id="org_m",
                        task_identifier="task-m",
                        payload=b"{}",
                        metadata=b'{"n":0}',
                    )
                )
                for n, r in enumerate(run_ids)
            )
        )
    finally:
        await app.close(grace=1)
    acked_tags: dict[str, set[str]] = {r: set() for r in run_ids}
    acked_incs: dict[str, int] = dict.fromkeys(run_ids, 0)
    errors: dict[str, int] = {}
    counter = iter(range(10**9))
    current: list[Sidecar] = []
    stop = asyncio.Event()

    async def worker(w: int) -> None:
        rnd = random.Random(w)
        while not stop.is_set():
            n = next(counter)
            run_id = rnd.choice(run_ids)
            env = ENVS[run_ids.index(run_id) % 3]
            # A request id per logical call; retried (same id) on transient errors.
            req_id = f"req_{n}"
            tag = f"t{n}"
            incr = n % 2 == 0
            for _ in range(40):
                if stop.is_set() and not current:
                    return
                try:
                    stub = current[0].mutate
                    if incr:
                        await stub.UpdateMetadata(
                            mutate_pb2.UpdateMetadataRequest(
                                env_id=env,
                                run_id=run_id,
                                request_id=req_id,
                                operations=[
                                    mutate_pb2.MetadataOperation(
                                        type=mutate_pb2.METADATA_OPERATION_TYPE_INCREMENT,
                                        path="n",
                                        value_json="1",
                                    )
                                ],
                            ),
                            timeout=10,
                        )
                        acked_incs[run_id] += 1
                    else:
                        await stub.AddTags(
                            mutate_pb2.AddTagsRequest(
                                env_id=env, run_id=run_id, request_id=req_id, tags=[tag]
                            ),
                            timeout=10,
                        )
                        acked_tags[run_id].add(tag)
                    break
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                    errors[code] = errors.get(code, 0) + 1
                    assert exc.code() in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.CANCELLED,
                    ), exc
                    await asyncio.sleep(0.05)
                except IndexError:
                    await asyncio.sleep(0.05)

    s1 = Sidecar(
        settings.redis_url,
        settings.database_url,
        MOLLIFIER_DRAIN_RATE_PER_SEC="400",
        MOLLIFIER_MAX_TAGS="500",
    )
    await s1.ready()
    current.append(s1)
    workers = asyncio.gather(*(worker(w) for w in range(12)))
    await asyncio.sleep(1.2 + random.Random(3).random())
    current.clear()
    s1.kill()
    s2 = Sidecar(settings.redis_url, settings.database_url, MOLLIFIER_MAX_TAGS="500")
    await s2.ready()
    current.append(s2)
    await asyncio.sleep(1.5)
    stop.set()
    await workers
    try:
        await wait_drained(redis_client, ENVS)
    finally:
        await s1.channel.close(None)
        await s1.no_orphans()
        await s2.close()
    assert sum(acked_incs.values()) > 0 and any(acked_tags.values()), errors
    with psycopg.connect(settings.database_url) as conn:
        found = {
            r[0]: (set(r[1]), r[2])
            for r in conn.execute("SELECT run_id, tags, metadata FROM mollifier.runs").fetchall()
        }
    assert set(found) == set(run_ids)
    for run_id in run_ids:
        tags, metadata = found[run_id]
        assert acked_tags[run_id] <= tags, (run_id, acked_tags[run_id] - tags)
        # A call answered with an error may still have applied (it then is
        # retried with its request id and applies once): the row holds at
        # least every acknowledged increment, and at most every one sent.
        assert metadata["n"] >= acked_incs[run_id], (run_id, metadata, acked_incs[run_id])


async def test_redis_killed_and_restarted_from_aof_mid_burst(
    redis_factory: Callable[..., RedisProcess], database_url: str
) -> None:
    """appendfsync always: every write Redis answered is on disk, so every run
    accepted before the kill is still buffered after the restart."""
    server = redis_factory(appendonly=True)
    client = aioredis.Redis.from_url(server.url)
    burst = Burst()
    try:
        async with sidecar_proc(server.url, database_url, MOLLIFIER_DRAIN_RATE_PER_SEC="1500") as s:
            stop = asyncio.Event()
            task = asyncio.create_task(
                trigger_burst(lambda: s.gate, burst, stop, prefix="a", envs=ENVS, deadline_s=3)
            )
            await asyncio.sleep(1.0)
            before = len(burst.acked)
            await asyncio.to_thread(server.kill)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(server.start)
            await asyncio.sleep(1.5)
            stop.set()
            await task
            assert before > 0 and len(burst.acked) > before
            await wait_drained(client, ENVS)
        assert_exactly_once(database_url, burst.acked)
        await assert_buffer_consistent(client, ENVS)
    finally:
        await client.aclose()


@pytest.mark.parametrize("how", ["sigstop", "client-pause"])
async def test_redis_paused_during_burst_gate_fails_open(
    redis_factory: Callable[..., RedisProcess], database_url: str, how: str
) -> None:
    """While Redis does not answer, Trigger fails open (the sidecar writes the
    run to Postgres itself) within its bound; nothing accepted is lost."""
    server = redis_factory()
    client = aioredis.Redis.from_url(server.url)
    burst = Burst()
    try:
        async with sidecar_proc(server.url, database_url) as s:
            stop = asyncio.Event()
            task = asyncio.create_task(
                trigger_burst(lambda: s.gate, burst, stop, prefix="p", envs=ENVS, deadline_s=10)
            )
            await asyncio.sleep(0.8)
            n_before = len(burst.latencies)
            if how == "sigstop":
                server.pause()
            else:
                # Longer than the wait below, so the Evaluate lands inside the pause.
                await client.client_pause(4000, all=True)
            await asyncio.sleep(2.0)
            # Evaluate alone also answers while Redis is away.
            started = time.monotonic()
            ev = await s.gate.Evaluate(
                gate_pb2.EvaluateRequest(
                    env_id=ENVS[0],
                    org_id="org_x",
                    task_identifier="task-f",
                    org_feature_flags={"mollifierEnabled": True},
                ),
                timeout=5,
            )
            ev_latency = time.monotonic() - started
            during = burst.latencies[n_before:]
            if how == "sigstop":
                server.resume()
            await asyncio.sleep(1.0)
            stop.set()
            await task
            assert ev.reason == gate_pb2.DECISION_REASON_FAIL_OPEN
            # Generous: the configured bound is 50 ms; the point is "answers", not speed.
            assert ev_latency < 2.0, ev_latency
            assert len(during) > 20, (len(during), burst.errors)
            during.sort()
            assert during[len(during) // 2] < 2.0, during[len(during) // 2]
            assert not set(burst.errors) - {"DEADLINE_EXCEEDED"}, burst.errors
            await wait_drained(client, ENVS)
        assert_exactly_once(database_url, burst.acked)
    finally:
        server.resume()
        await client.aclose()


async def test_postgres_stopped_during_burst(
    redis_url: str,
    redis_client: aioredis.Redis,
    pg_factory: Callable[[], PostgresProcess],
) -> None:
    """Postgres down: write-through triggers are buffered instead (MOLLIFY with
    POSTGRES_UNAVAILABLE), the drainer backs off, and every run lands after."""
    pg = pg_factory()
    await _migrate(pg.url)
    burst = Burst()
    async with sidecar_proc(
        redis_url,
        pg.url,
        MOLLIFIER_DIRECT_WRITE_TIMEOUT_MS="300",
        MOLLIFIER_DRAIN_MAX_ATTEMPTS="50",
    ) as s:
        stop = asyncio.Event()
        task = asyncio.create_task(
            trigger_burst(lambda: s.gate, burst, stop, prefix="g", envs=ENVS, deadline_s=10)
        )
        await asyncio.sleep(0.8)
        await asyncio.to_thread(pg.stop)
        await asyncio.sleep(2.0)
        await asyncio.to_thread(pg.start)
        await asyncio.sleep(1.0)
        stop.set()
        await task
        assert not burst.errors, burst.errors
        await wait_drained(redis_client, ENVS, within=90)
    assert_exactly_once(pg.url, burst.acked)


async def test_two_sidecars_draining_one_redis_one_killed(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    app = await App.connect(settings, start_background=False)
    try:
        for i in range(0, 4000, 500):
            await asyncio.gather(
                *(
                    app.buffer.accept(
                        run_pb2.RunSnapshot(
                            run_id=f"run_t{n}",
                            env_id=ENVS[n % len(ENVS)],
                            org_id=f"org_{n % 4}",
                            task_identifier="task-t",
                            payload=b"{}",
                        )
                    )
                    for n in range(i, i + 500)
                )
            )
    finally:
        await app.close(grace=1)
    a = Sidecar(settings.redis_url, settings.database_url, MOLLIFIER_DRAIN_RATE_PER_SEC="1500")
    b = Sidecar(settings.redis_url, settings.database_url, MOLLIFIER_DRAIN_RATE_PER_SEC="1500")
    try:
        await asyncio.gather(a.ready(), b.ready())
        await asyncio.sleep(1.0)
        a.kill()
        await wait_drained(redis_client, ENVS, within=90)
    finally:
        await a.channel.close(None)
        await a.no_orphans()
        await b.close()
    assert_exactly_once(settings.database_url, {f"run_t{n}" for n in range(4000)})
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM mollifier.runs").fetchone()
    assert row == (4000,)
