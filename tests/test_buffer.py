"""BufferService's front door against a real Redis: Accept, GetRun,
FindRunByIdempotencyKey, ListRuns, capacity and damaged entries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2
from mollifier.app import App
from mollifier.buffer import depths
from mollifier.codec import full_snapshot
from mollifier.errors import DamagedEntry, InvalidArgument, NotFound, ResourceExhausted
from mollifier.keys import env_keys
from mollifier_client.v1 import buffer_pb2, gate_pb2, run_pb2

from tests.entries import read_entry, set_entry
from tests.gate_helpers import (
    env_key_dump,
    evaluate_request,
    new_env,
    open_app,
    queue_ids,
    redis_now_ms,
    snapshot,
    trigger_request,
)

ACCEPTED = buffer_pb2.ACCEPT_RESULT_ACCEPTED
DUP_RUN = buffer_pb2.ACCEPT_RESULT_DUPLICATE_RUN_ID
DUP_IDEM = buffer_pb2.ACCEPT_RESULT_DUPLICATE_IDEMPOTENCY_KEY


@pytest.fixture
async def app(redis_url: str) -> AsyncIterator[App]:
    async with open_app(redis_url, buffer_capacity_per_env=5) as a:
        yield a


def ts(ms: int) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromMilliseconds(ms)
    return t


async def test_accept_then_get_run(app: App, redis_client: aioredis.Redis) -> None:
    env = new_env()
    snap = snapshot(
        env,
        "run_a",
        payload=b"\x00\x01payload",
        payload_type="application/octet-stream",
        tags=["b", "a", "b"],
        metadata=b'{"x": 1}',
        queue="q1",
        batch_id="batch_1",
        batch_index=3,
        extra={"k": "v"},
    )
    out = await app.buffer.accept(snap)
    assert out.result == ACCEPTED and out.existing_run_id == ""
    assert out.run is not None
    assert (out.run.run_id, out.run.env_id, out.run.status, out.run.source) == (
        "run_a",
        env,
        run_pb2.RUN_STATUS_QUEUED,
        run_pb2.RUN_SOURCE_BUFFER,
    )
    assert list(out.run.snapshot.tags) == ["b", "a"]
    assert out.run.snapshot.metadata_type == "application/json"

    got = await app.buffer.get_run(env, "run_a")
    assert got.snapshot == out.run.snapshot
    assert got.snapshot.payload == b"\x00\x01payload"
    assert got.snapshot.extra["k"] == "v" and got.snapshot.batch_index == 3
    assert got.status == run_pb2.RUN_STATUS_QUEUED
    assert got.created_at == out.run.created_at
    now = await redis_now_ms(redis_client)
    assert now - 5000 < got.created_at.ToMilliseconds() <= now
    assert await queue_ids(redis_client, env) == ["run_a"]
    # The org/env index knows the env.
    assert await redis_client.sismember("mf:idx:orgs", "org_1")


async def test_delayed_run_reads_delayed(app: App, redis_client: aioredis.Redis) -> None:
    env = new_env()
    later = await redis_now_ms(redis_client) + 60_000
    out = await app.buffer.accept(snapshot(env, "run_d", delay_until=ts(later)))
    assert out.run is not None and out.run.status == run_pb2.RUN_STATUS_DELAYED
    assert (await app.buffer.get_run(env, "run_d")).status == run_pb2.RUN_STATUS_DELAYED


async def test_accept_makes_a_run_id(app: App) -> None:
    env = new_env()
    out = await app.buffer.accept(snapshot(env))
    assert out.run is not None and out.run.run_id.startswith("run_")
    assert (await app.buffer.get_run(env, out.run.run_id)).run_id == out.run.run_id


async def test_duplicate_run_id(app: App, redis_client: aioredis.Redis) -> None:
    env = new_env()
    await app.buffer.accept(snapshot(env, "run_1", payload=b"one"))
    before = await env_key_dump(redis_client, env)
    out = await app.buffer.accept(snapshot(env, "run_1", payload=b"two"))
    assert (out.result, out.existing_run_id) == (DUP_RUN, "run_1")
    assert out.run is not None and out.run.snapshot.payload == b"one"
    assert await env_key_dump(redis_client, env) == before


async def test_duplicate_idempotency_key(app: App, redis_client: aioredis.Redis) -> None:
    env = new_env()
    first = await app.buffer.accept(snapshot(env, "run_1", idempotency_key="k"))
    assert first.result == ACCEPTED
    before = await env_key_dump(redis_client, env)
    out = await app.buffer.accept(snapshot(env, "run_2", idempotency_key="k"))
    assert (out.result, out.existing_run_id) == (DUP_IDEM, "run_1")
    assert out.run is not None and out.run.run_id == "run_1"
    assert await env_key_dump(redis_client, env) == before
    # Same key, other task: a different binding.
    other = await app.buffer.accept(snapshot(env, "run_3", task="task-b", idempotency_key="k"))
    assert other.result == ACCEPTED
    found = await app.buffer.find_by_idempotency_key(env, "task-a", "k")
    assert found.run_id == "run_1"
    found = await app.buffer.find_by_idempotency_key(env, "task-b", "k")
    assert found.run_id == "run_3"


async def test_binding_expires_and_frees_the_key(app: App, redis_client: aioredis.Redis) -> None:
    env = new_env()
    soon = await redis_now_ms(redis_client) + 300
    first = await app.buffer.accept(
        snapshot(env, "run_1", idempotency_key="k", idempotency_key_expires_at=ts(soon))
    )
    assert first.result == ACCEPTED
    # Within the expiry: the key answers with the same run.
    assert (await app.buffer.find_by_idempotency_key(env, "task-a", "k")).run_id == "run_1"
    dup = await app.buffer.accept(snapshot(env, "run_2", idempotency_key="k"))
    assert (dup.result, dup.existing_run_id) == (DUP_IDEM, "run_1")

    await asyncio.sleep(0.45)
    with pytest.raises(NotFound):
        await app.buffer.find_by_idempotency_key(env, "task-a", "k")
    again = await app.buffer.accept(snapshot(env, "run_3", idempotency_key="k"))
    assert again.result == ACCEPTED
    assert (await app.buffer.find_by_idempotency_key(env, "task-a", "k")).run_id == "run_3"
    # The old run is still buffered and readable by id.
    assert (await app.buffer.get_run(env, "run_1")).run_id == "run_1"


async def test_binding_with_an_epoch_expiry_binds_nothing(
    app: App, redis_client: aioredis.Redis
) -> None:
    env = new_env()
    out = await app.buffer.accept(
        snapshot(env, "run_1", idempotency_key="k", idempotency_key_expires_at=ts(0))
    )
    assert out.result == ACCEPTED
    assert await redis_client.get(env_keys(env).idem("task-a", "k")) is None
    with pytest.raises(NotFound):
        await app.buffer.find_by_idempotency_key(env, "task-a", "k")


async def test_find_by_key_of_another_env_is_not_found(app: App) -> None:
    env, other = new_env(), new_env()
    await app.buffer.accept(snapshot(env, "run_1", idempotency_key="k"))
    with pytest.raises(NotFound):
        await app.buffer.find_by_idempotency_key(other, "task-a", "k")


async def test_capacity_per_env(app: App, redis_client: aioredis.Redis) -> None:
    env, other = new_env(), new_env()
    for i in range(5):
        assert (await app.buffer.accept(snapshot(env, f"run_{i}"))).result == ACCEPTED
    before = await env_key_dump(redis_client, env)
    with pytest.raises(ResourceExhausted) as err:
        await app.buffer.accept(snapshot(env, "run_5", idempotency_key="k"))
    assert err.value.retry_after_ms
    assert await env_key_dump(redis_client, env) == before
    # Only this env is full.
    assert (await app.buffer.accept(snapshot(other, "run_5"))).result == ACCEPTED
    # A duplicate is still answered as one, not as full.
    assert (await app.buffer.accept(snapshot(env, "run_0"))).result == DUP_RUN


async def test_total_capacity(redis_url: str, redis_client: aioredis.Redis) -> None:
    a, b, c = new_env(), new_env(), new_env()
    async with open_app(
        redis_url,
        buffer_capacity_per_env=4,
        buffer_capacity_total=5,
        trip_threshold=1,
        trip_hold_ms=60_000,
    ) as app:
        for i in range(3):
            await app.buffer.accept(snapshot(a, f"run_a{i}", org_id="org_a"))
        for i in range(2):
            await app.buffer.accept(snapshot(b, f"run_b{i}", org_id="org_b"))
        assert await app.buffer.refresh_total() == 5
        assert app.buffer.total_full

        before = await redis_client.dbsize()
        dump = await env_key_dump(redis_client, c)
        with pytest.raises(ResourceExhausted):
            await app.buffer.accept(snapshot(c, "run_c0", org_id="org_c"))
        assert await env_key_dump(redis_client, c) == dump

        # A tripped Trigger meets the full buffer: PASS_THROUGH, reason BUFFER_FULL.
        await app.gate.evaluate(evaluate_request(c, org_id="org_c"))
        req = trigger_request(c, org_id="org_c", snapshot=snapshot(c, "run_c1", org_id="org_c"))
        t = await app.gate.trigger(req, req.snapshot)
        assert (t.outcome.decision, t.outcome.reason) == (
            gate_pb2.DECISION_PASS_THROUGH,
            gate_pb2.DECISION_REASON_BUFFER_FULL,
        )
        assert t.run is None
        assert await queue_ids(redis_client, c) == []
        assert not await redis_client.hexists(env_keys(c).runs, "run_c1")
        assert await redis_client.dbsize() >= before

        # Room again once runs leave the buffer.
        await redis_client.lpop(env_keys(a).queue, 2)
        assert await app.buffer.refresh_total() == 3
        assert not app.buffer.total_full
        assert (await app.buffer.accept(snapshot(c, "run_c0", org_id="org_c"))).result == ACCEPTED


async def test_get_run_scoped_by_env(app: App) -> None:
    env, other = new_env(), new_env()
    await app.buffer.accept(snapshot(env, "run_1"))
    with pytest.raises(NotFound):
        await app.buffer.get_run(other, "run_1")
    with pytest.raises(NotFound):
        await app.buffer.get_run(env, "run_nope")


async def test_get_run_states(app: App, redis_client: aioredis.Redis) -> None:
    env = new_env()
    await app.buffer.accept(snapshot(env, "run_1"))
    await set_entry(redis_client, env, "run_1", st="D", at=2, le="boom")
    got = await app.buffer.get_run(env, "run_1")
    assert (got.status, got.attempts, got.last_error) == (run_pb2.RUN_STATUS_DRAINING, 2, "boom")
    await set_entry(redis_client, env, "run_1", st="F")
    assert (await app.buffer.get_run(env, "run_1")).status == run_pb2.RUN_STATUS_FAILED
    now = await redis_now_ms(redis_client)
    await set_entry(redis_client, env, "run_1", st="Q", cx=now, cr="user")
    got = await app.buffer.get_run(env, "run_1")
    assert (got.status, got.cancel_reason) == (run_pb2.RUN_STATUS_CANCELED, "user")
    assert got.canceled_at.ToMilliseconds() == now


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("s", b"\xff\xfe garbage that is not a snapshot"),
        ("s", b""),
        ("st", b"?"),
        ("ca", b"not-a-number"),
        ("at", b"x"),
    ],
)
async def test_damaged_entry_is_reported_never_passed_on(
    app: App, field: str, value: bytes, redis_client: aioredis.Redis
) -> None:
    env = new_env()
    await app.buffer.accept(snapshot(env, "run_ok", idempotency_key="k"))
    await set_entry(redis_client, env, "run_ok", **{field: value})
    with pytest.raises(DamagedEntry):
        await app.buffer.get_run(env, "run_ok")
    with pytest.raises(DamagedEntry):
        await app.buffer.list_runs(env)
    with pytest.raises(DamagedEntry):
        await app.buffer.find_by_idempotency_key(env, "task-a", "k")


async def test_snapshot_of_another_run_is_damaged(app: App, redis_client: aioredis.Redis) -> None:
    """The buffer keeps snapshots without their ids; one that holds ids (written
    by something else, or by an older sidecar) must hold this run's."""
    env = new_env()
    await app.buffer.accept(snapshot(env, "run_1"))
    await app.buffer.accept(snapshot(env, "run_2"))
    other = await read_entry(redis_client, env, "run_2")
    assert other is not None
    await set_entry(redis_client, env, "run_1", s=full_snapshot(env, "run_2", other["s"]))
    with pytest.raises(DamagedEntry):
        await app.buffer.get_run(env, "run_1")


async def test_list_runs_pages_cover_every_run_once_in_order(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    env = new_env()
    k = env_keys(env)
    async with open_app(redis_url) as app:
        ids = [f"run_{i:03d}" for i in range(23)]
        for run_id in ids:
            await app.buffer.accept(snapshot(env, run_id))
        # Some runs are leased, one dead-lettered: still listed in arrival order.
        for run_id in ("run_002", "run_010"):
            assert await redis_client.lrem(k.queue, 0, run_id) == 1
            await redis_client.zadd(k.lease, {run_id: 1})
            await set_entry(redis_client, env, run_id, st="D")
        assert await redis_client.lrem(k.queue, 0, "run_015") == 1
        await redis_client.zadd(k.failed, {"run_015": 1})
        await set_entry(redis_client, env, "run_015", st="F")

        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            runs, token = await app.buffer.list_runs(env, page_size=5, page_token=token)
            pages += 1
            assert len(runs) <= 5
            seen.extend(r.run_id for r in runs)
            if not token:
                break
        assert seen == ids
        assert pages == 5
        statuses = {r.run_id: r.status for r in (await app.buffer.list_runs(env, 100))[0]}
        assert statuses["run_002"] == run_pb2.RUN_STATUS_DRAINING
        assert statuses["run_015"] == run_pb2.RUN_STATUS_FAILED
        assert statuses["run_000"] == run_pb2.RUN_STATUS_QUEUED

        # Exactly one page when it fits; an empty env lists nothing.
        runs, token = await app.buffer.list_runs(env, page_size=23)
        assert (len(runs), token) == (23, "")
        assert await app.buffer.list_runs(new_env()) == ([], "")
        with pytest.raises(InvalidArgument) as err:
            await app.buffer.list_runs(env, page_token="!!not a token!!")
        assert [f for f, _ in err.value.violations] == ["page_token"]


async def test_a_queue_reference_with_no_entry_skips_nothing_else(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """A LIST reference whose entry is gone (damage) is passed over: the listing
    still pages through every other run in order, the queue's head is the first
    run that has an entry, and the next lease drops the reference."""
    async with open_app(redis_url) as app:
        env = new_env()
        k = env_keys(env)
        ids = [f"run_{i:02d}" for i in range(9)]
        for run_id in ids:
            await app.buffer.accept(snapshot(env, run_id))
        for gone in ("run_00", "run_04", "run_05"):
            await redis_client.hdel(k.runs, gone)
        alive = [i for i in ids if i not in ("run_00", "run_04", "run_05")]
        seen: list[str] = []
        token = ""
        while True:
            runs, token = await app.buffer.list_runs(env, page_size=2, page_token=token)
            seen += [r.run_id for r in runs]
            if not token:
                break
        assert seen == alive
        (depth,) = await depths(app.scripts, redis_client, [env])
        first = await read_entry(redis_client, env, "run_01")
        assert first is not None and depth.head_score == first["sc"]
        assert depth.queued == len(ids)
        batch = await app.drainer.lease_env(env, 100, 30_000, "tok")
        assert [r.run_id for r in batch.runs] == alive
