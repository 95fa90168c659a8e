"""The sidecar, unchanged, on a local three-master Redis Cluster
(MOLLIFIER_REDIS_CLUSTER=true): Trigger, Accept, GetRun, mutations and the
drain across many envs (so across every master); the org/env index read from
any node; the index repair pass scanning every master; and a master killed
and its replica promoted mid-drain."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest
from mollifier.app import App
from mollifier.config import Settings
from mollifier.keys import INDEX_ORGS, env_keys, org_envs_key
from mollifier.server import start_server
from mollifier_client.v1 import (
    buffer_pb2,
    buffer_pb2_grpc,
    gate_pb2,
    gate_pb2_grpc,
    mutate_pb2,
    mutate_pb2_grpc,
    run_pb2,
)
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError

from tests.entries import env_depth
from tests.fault_helpers import assert_exactly_once
from tests.plugins.cluster import LocalCluster

pytestmark = [pytest.mark.slow]

ENVS = [f"env_c{i}" for i in range(24)]


def org_of(env: str) -> str:
    return f"org_c{int(env[5:]) % 5}"


def cluster_settings(url: str, database_url: str, **over: object) -> Settings:
    return Settings.from_env(
        {},
        redis_url=url,
        redis_cluster=True,
        database_url=database_url,
        drain_enabled=False,
        trip_threshold=1,
        drain_batch_size=50,
        drain_idle_ms=20,
        drain_lease_ms=3000,
        **over,
    )


@pytest.fixture
async def cluster(
    redis_cluster_factory: Callable[..., LocalCluster],
) -> AsyncIterator[LocalCluster]:
    yield redis_cluster_factory(replicas=0)


async def _drained(app: App, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while True:
        depth = 0
        try:
            for env in ENVS:
                depth += await env_depth(app.redis, env)
        except ConnectionError as exc:  # redis's, mid-failover: look again
            depth = -1
            print("poll failed:", exc)
        if depth == 0:
            return
        assert time.monotonic() < deadline, f"{depth} runs still buffered"
        await asyncio.sleep(0.1)


async def test_sidecar_runs_unchanged_on_a_cluster(
    cluster: LocalCluster, database_url: str
) -> None:
    settings = cluster_settings(cluster.url, database_url)
    app = await App.connect(settings, start_background=False)
    server = await start_server(app, "127.0.0.1:0")
    import grpc

    channel = grpc.aio.insecure_channel(server.address)
    gate = gate_pb2_grpc.GateServiceStub(channel)
    buffer = buffer_pb2_grpc.BufferServiceStub(channel)
    mutate = mutate_pb2_grpc.MutateServiceStub(channel)
    try:
        # Envs land on every master.
        owners = {cluster.master_of(env_keys(e).queue).port for e in ENVS}
        assert len(owners) == 3
        acked: set[str] = set()
        for n in range(240):
            env = ENVS[n % len(ENVS)]
            req = gate_pb2.TriggerRequest(
                env_id=env,
                org_id=org_of(env),
                task_identifier="task-c",
                org_feature_flags={"mollifierEnabled": True},
                write_through=True,
                snapshot=run_pb2.RunSnapshot(
                    run_id=f"run_c{n}", payload=b"{}", idempotency_key=f"key{n}"
                ),
            )
            resp = await gate.Trigger(req)
            assert resp.run.run_id == f"run_c{n}"
            acked.add(resp.run.run_id)
        for n in range(240, 360):
            env = ENVS[n % len(ENVS)]
            out = await buffer.Accept(
                buffer_pb2.AcceptRequest(
                    snapshot=run_pb2.RunSnapshot(
                        run_id=f"run_c{n}",
                        env_id=env,
                        org_id=org_of(env),
                        task_identifier="task-c",
                        payload=b"{}",
                    )
                )
            )
            assert out.result == buffer_pb2.ACCEPT_RESULT_ACCEPTED
            acked.add(f"run_c{n}")
        # A duplicate idempotency key answers with the bound run, on any master.
        dup = await gate.Trigger(
            gate_pb2.TriggerRequest(
                env_id=ENVS[3],
                org_id=org_of(ENVS[3]),
                task_identifier="task-c",
                org_feature_flags={"mollifierEnabled": True},
                snapshot=run_pb2.RunSnapshot(
                    run_id="run_cdup", payload=b"{}", idempotency_key="key3"
                ),
            )
        )
        assert dup.duplicate and dup.run.run_id == "run_c3"
        # The index is readable from every node (each answers for its slot or
        # redirects; a fresh single-node client per master sees MOVED or data).
        orgs = {m.decode() for m in await app.redis.smembers(INDEX_ORGS)}
        assert orgs == {f"org_c{i}" for i in range(5)}
        for port, _ in cluster.masters():
            one = RedisCluster(host="127.0.0.1", port=port, decode_responses=True)
            try:
                assert set(await one.smembers(INDEX_ORGS)) == orgs
                envs = await one.smembers(org_envs_key("org_c0"))
                assert set(envs) == {e for e in ENVS if org_of(e) == "org_c0"}
            finally:
                await one.aclose()
        # Mutations on buffered runs, then drain, then on materialized ones.
        for n in (250, 251, 252):
            env = ENVS[n % len(ENVS)]
            r = await mutate.AddTags(
                mutate_pb2.AddTagsRequest(
                    env_id=env, run_id=f"run_c{n}", request_id=f"rq{n}", tags=["x"]
                )
            )
            assert r.applied_to == mutate_pb2.MUTATION_TARGET_BUFFER
        got = await buffer.GetRun(
            buffer_pb2.GetRunRequest(env_id=ENVS[250 % 24], run_id="run_c250")
        )
        assert got.run.source == run_pb2.RUN_SOURCE_BUFFER and list(got.run.snapshot.tags) == ["x"]
        app.drainer.settings = settings.replace(drain_enabled=True)
        app.drainer.start()
        await _drained(app)
        await app.drainer.stop(5)
        assert_exactly_once(database_url, acked)
        got = await buffer.GetRun(
            buffer_pb2.GetRunRequest(env_id=ENVS[250 % 24], run_id="run_c250")
        )
        assert got.run.source == run_pb2.RUN_SOURCE_POSTGRES and list(got.run.snapshot.tags) == [
            "x"
        ]
        c = await mutate.CancelRun(
            mutate_pb2.CancelRunRequest(env_id=ENVS[251 % 24], run_id="run_c251", request_id="cx")
        )
        assert c.applied_to == mutate_pb2.MUTATION_TARGET_POSTGRES
        await channel.close(None)
    finally:
        await server.stop(0)
        await app.close(grace=1)


async def test_index_repair_scans_every_master(cluster: LocalCluster, database_url: str) -> None:
    """The index is dropped entirely (a partial failure at its worst); one
    repair pass finds every env with runs, whichever master holds it."""
    settings = cluster_settings(cluster.url, database_url)
    app = await App.connect(settings, start_background=False)
    try:
        for n, env in enumerate(ENVS):
            await app.buffer.accept(
                run_pb2.RunSnapshot(
                    run_id=f"run_r{n}",
                    env_id=env,
                    org_id=org_of(env),
                    task_identifier="task-r",
                    payload=b"{}",
                )
            )
        await app.redis.delete(INDEX_ORGS)
        for i in range(5):
            await app.redis.delete(org_envs_key(f"org_c{i}"))
        added = await app.drainer.repair_index()
        assert added == len(ENVS)
        for env in ENVS:
            assert await app.redis.sismember(org_envs_key(org_of(env)), env)
        assert len(await app.redis.smembers(INDEX_ORGS)) == 5
    finally:
        await app.close(grace=1)


async def test_master_killed_and_replica_promoted_mid_drain(
    redis_cluster_factory: Callable[..., LocalCluster], database_url: str
) -> None:
    cluster = redis_cluster_factory(replicas=1)
    settings = cluster_settings(
        cluster.url, database_url, drain_rate_per_sec=1500, drain_max_attempts=50
    )
    app = await App.connect(settings, start_background=False)
    try:
        acked: set[str] = set()
        for i in range(0, 3000, 300):
            outs = await asyncio.gather(
                *(
                    app.buffer.accept(
                        run_pb2.RunSnapshot(
                            run_id=f"run_p{n}",
                            env_id=ENVS[n % len(ENVS)],
                            org_id=org_of(ENVS[n % len(ENVS)]),
                            task_identifier="task-p",
                            payload=b"{}",
                        )
                    )
                    for n in range(i, i + 300)
                )
            )
            acked.update(o.run.run_id for o in outs if o.run is not None)
        assert len(acked) == 3000
        # Replicas must have everything before the kill (WAIT on each master).
        for port, node in cluster.masters():
            del node
            one = RedisCluster(host="127.0.0.1", port=port)
            try:
                await one.execute_command("WAIT", 1, 5000, target_nodes=one.get_primaries())
            finally:
                await one.aclose()
        app.drainer.settings = settings.replace(drain_enabled=True)
        app.drainer.start()
        deadline = time.monotonic() + 30
        while True:
            with psycopg.connect(database_url) as conn:
                row = conn.execute("SELECT count(*) FROM mollifier.runs").fetchone()
            if row and row[0] >= 500:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        victim = cluster.master_of(env_keys(ENVS[0]).queue)
        victim.kill()
        await asyncio.to_thread(cluster.wait_failover, victim.port, 30)
        await _drained(app, within=90)
        await app.drainer.stop(5)
        assert_exactly_once(database_url, acked)
    finally:
        await app.close(grace=1)
