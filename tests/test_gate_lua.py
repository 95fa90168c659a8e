"""The gate's and the front door's Lua scripts, called directly on a real Redis."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from mollifier.app import App
from mollifier.codec import bare_snapshot
from mollifier.keys import env_keys
from mollifier_client.v1 import run_pb2
from redis.crc import key_slot

from tests.entries import queue_scores, read_entry
from tests.gate_helpers import new_env, open_app, redis_now_ms, sleep_until_redis_ms

# ARGV defaults: threshold, window (ms), hold (ms), shadow
DEFAULTS = (10, 1000, 500, "0")


@pytest.fixture
async def app(redis_url: str) -> AsyncIterator[App]:
    async with open_app(redis_url) as a:
        yield a


def eval_keys(env: str) -> list[str]:
    k = env_keys(env)
    return [k.gate, k.policy, k.queue, k.back, k.lease, k.retry]


def accept_keys(env: str, run_id: str, task: str = "t", key: str = "") -> list[str]:
    k = env_keys(env)
    idem = k.idem(task, key) if key else k.idem_prefix
    return [*k.buffered, k.env, k.runs, idem]


def accept_args(
    env: str, run_id: str, *, key: str = "", expires: int = 0, capacity: int = 100
) -> list[str | bytes | int]:
    snap = run_pb2.RunSnapshot(run_id=run_id, env_id=env, org_id="o", task_identifier="t")
    return [
        run_id,
        "o",
        bare_snapshot(snap),
        f"t:{key}" if key else "",
        expires,
        capacity,
        "0",
        0,
    ]


async def test_every_env_key_shares_one_slot() -> None:
    env = "env-slot_1"
    k = env_keys(env)
    keys = [
        k.queue,
        k.back,
        k.lease,
        k.retry,
        k.failed,
        k.gate,
        k.policy,
        k.env,
        k.runs,
        k.idem("task/a", "key:with:colons{and}braces"),
        k.claim("task/a", "k"),
        k.request("req_1"),
    ]
    assert len({key_slot(key.encode()) for key in keys}) == 1
    assert key_slot(k.queue.encode()) == key_slot(env.encode())


async def test_evaluate_counts_and_stores_the_two_buckets(
    app: App, redis_client: aioredis.Redis
) -> None:
    env = new_env()
    k = env_keys(env)
    for i in range(1, 4):
        r = await app.scripts.evaluate(redis_client, eval_keys(env), DEFAULTS)
        assert [int(x) for x in r[:4]] == [1, 6, i, 10]
    g = await redis_client.hgetall(k.gate)
    assert int(g[b"wc"]) == 3
    assert int(g[b"ws"]) % 1000 == 0
    assert 0 < await redis_client.pttl(k.gate) <= 2 * 1000 + 1000


async def test_previous_bucket_is_weighted_by_its_overlap(
    app: App, redis_client: aioredis.Redis
) -> None:
    env = new_env()
    k = env_keys(env)
    window = 1000
    now = await redis_now_ms(redis_client)
    bucket = now - now % window
    if now - bucket > 700:  # leave room to measure inside one bucket
        bucket += window
        await sleep_until_redis_ms(redis_client, bucket + 1)
    # A previous bucket holding 400 triggers, this bucket none yet.
    await redis_client.hset(k.gate, mapping={"ws": bucket - window, "wc": 400, "wp": 0, "tu": 0})
    before = await redis_now_ms(redis_client)
    r = await app.scripts.evaluate(redis_client, eval_keys(env), (1000, window, 500, "0"))
    after = await redis_now_ms(redis_client)
    count = int(r[2])
    hi = math.floor(400 * (window - (before - bucket)) / window) + 1
    lo = math.floor(400 * (window - (after - bucket)) / window) + 1
    assert lo <= count <= hi
    g = await redis_client.hgetall(k.gate)
    assert (int(g[b"ws"]), int(g[b"wp"]), int(g[b"wc"])) == (bucket, 400, 1)


async def test_a_bucket_two_windows_old_is_forgotten(
    app: App, redis_client: aioredis.Redis
) -> None:
    env = new_env()
    k = env_keys(env)
    now = await redis_now_ms(redis_client)
    bucket = now - now % 1000
    await redis_client.hset(k.gate, mapping={"ws": bucket - 2000, "wc": 400, "wp": 400, "tu": 0})
    r = await app.scripts.evaluate(redis_client, eval_keys(env), DEFAULTS)
    # Not adjacent to the current bucket (even if a bucket edge passed meanwhile).
    assert [int(x) for x in r[:3]] == [1, 6, 1]
    g = await redis_client.hgetall(k.gate)
    assert (int(g[b"wp"]), int(g[b"wc"])) == (0, 1)


async def test_policy_hash_overrides_defaults(app: App, redis_client: aioredis.Redis) -> None:
    env = new_env()
    k = env_keys(env)
    await redis_client.hset(k.policy, mapping={"threshold": 1, "hold_ms": 10_000})
    r1 = await app.scripts.evaluate(redis_client, eval_keys(env), DEFAULTS)
    r2 = await app.scripts.evaluate(redis_client, eval_keys(env), DEFAULTS)
    assert [int(x) for x in r1[:4]] == [1, 6, 1, 1]
    assert [int(x) for x in r2[:4]] == [3, 7, 2, 1]
    now = await redis_now_ms(redis_client)
    assert now < int(r2[4]) <= now + 10_000


async def test_shadow_mode_never_reports_mollify(app: App, redis_client: aioredis.Redis) -> None:
    env = new_env()
    args = (1, 1000, 500, "1")
    r = [await app.scripts.evaluate(redis_client, eval_keys(env), args) for _ in range(3)]
    assert [(int(x[0]), int(x[1])) for x in r] == [(1, 6), (2, 9), (2, 9)]


async def test_env_state_does_not_count(app: App, redis_client: aioredis.Redis) -> None:
    env = new_env()
    k = env_keys(env)
    await app.scripts.evaluate(redis_client, eval_keys(env), DEFAULTS)
    keys = [k.gate, k.policy, *k.buffered]
    for _ in range(3):
        r = await app.scripts.env_state(redis_client, keys, DEFAULTS[:3])
        assert int(r[0]) == 1
    assert int((await redis_client.hgetall(k.gate))[b"wc"]) == 1


async def test_trigger_lua_buffers_only_on_mollify(app: App, redis_client: aioredis.Redis) -> None:
    env = new_env()
    k = env_keys(env)

    def trig_keys(run_id: str) -> list[str]:
        return [k.gate, k.policy, *accept_keys(env, run_id)]

    args = (1, 60_000, 60_000, "0")
    # write_through off, binding lifetime, no forced pass-through reason.
    tail = ("0", 86_400_000, 0)
    r = await app.scripts.trigger(
        redis_client, trig_keys("run_a"), [*args, *accept_args(env, "run_a"), *tail]
    )
    assert (int(r[0]), int(r[5])) == (1, 0)
    assert not await redis_client.hexists(k.runs, "run_a")
    r = await app.scripts.trigger(
        redis_client, trig_keys("run_b"), [*args, *accept_args(env, "run_b"), *tail]
    )
    assert (int(r[0]), int(r[1]), int(r[5]), r[6]) == (3, 7, 1, b"run_b")
    entry = await read_entry(redis_client, env, "run_b")
    assert entry is not None
    assert entry["st"] == b"Q" and entry["v"] == entry["sc"]
    assert entry["ca"] == int(r[7])
    assert await queue_scores(redis_client, env) == [("run_b", entry["sc"])]


async def test_accept_lua_capacity_counts_every_state_and_writes_nothing_when_full(
    app: App, redis_client: aioredis.Redis
) -> None:
    env = new_env()
    k = env_keys(env)
    for i in range(3):
        r = await app.scripts.accept(
            redis_client, accept_keys(env, f"run_{i}"), accept_args(env, f"run_{i}", capacity=4)
        )
        assert int(r[0]) == 1
    # One leased, one dead-lettered: they still take room.
    await redis_client.zadd(k.failed, {"run_f": 1})
    snapshot_keys = sorted(await redis_client.keys(k.tag + ":*"))
    env_hash = await redis_client.hgetall(k.env)
    runs = await redis_client.hgetall(k.runs)
    r = await app.scripts.accept(
        redis_client, accept_keys(env, "run_x"), accept_args(env, "run_x", capacity=4)
    )
    assert int(r[0]) == 4
    assert sorted(await redis_client.keys(k.tag + ":*")) == snapshot_keys
    assert await redis_client.hgetall(k.env) == env_hash
    assert await redis_client.hgetall(k.runs) == runs


async def test_accept_lua_scores_strictly_increase(app: App, redis_client: aioredis.Redis) -> None:
    env = new_env()
    for i in range(50):
        await app.scripts.accept(
            redis_client, accept_keys(env, f"run_{i}"), accept_args(env, f"run_{i}")
        )
    got = await queue_scores(redis_client, env)
    assert [m for m, _ in got] == [f"run_{i}" for i in range(50)]
    scores = [s for _, s in got]
    assert scores == sorted(set(scores))


async def test_accept_lua_binding_expiry(app: App, redis_client: aioredis.Redis) -> None:
    env = new_env()
    k = env_keys(env)
    now = await redis_now_ms(redis_client)
    r = await app.scripts.accept(
        redis_client,
        accept_keys(env, "run_1", key="k1"),
        accept_args(env, "run_1", key="k1", expires=now + 60_000),
    )
    assert int(r[0]) == 1
    assert 0 < await redis_client.pttl(k.idem("t", "k1")) <= 60_000
    # An expiry already past binds nothing: the run is accepted, the key stays free.
    r = await app.scripts.accept(
        redis_client,
        accept_keys(env, "run_2", key="k2"),
        accept_args(env, "run_2", key="k2", expires=now - 1),
    )
    assert int(r[0]) == 1
    assert await redis_client.get(k.idem("t", "k2")) is None
    entry = await read_entry(redis_client, env, "run_2")
    assert entry is not None and "ik" not in entry


async def test_claim_publish_release_lua(app: App, redis_client: aioredis.Redis) -> None:
    env = new_env()
    k = env_keys(env)
    keys = [k.idem("t", "k"), k.claim("t", "k")]
    assert [x for x in await app.scripts.claim(redis_client, keys, ["tok1", 10_000])][:2] == [
        1,
        b"tok1",
    ]
    busy = await app.scripts.claim(redis_client, keys, ["tok2", 10_000])
    assert int(busy[0]) == 3 and 0 < int(busy[2]) <= 10_000
    assert int(await app.scripts.release(redis_client, [keys[1]], ["tok2"])) == 0
    expires = await redis_now_ms(redis_client) + 5000
    assert [
        int((await app.scripts.publish(redis_client, keys, ["tok2", "run_2", expires]))[0])
    ] == [0]
    r = await app.scripts.publish(redis_client, keys, ["tok1", "run_1", expires])
    assert (int(r[0]), r[1]) == (1, b"run_1")
    assert await redis_client.get(keys[0]) == b"run_1"
    assert 0 < await redis_client.pttl(keys[0]) <= 5000
    assert await redis_client.exists(keys[1]) == 0
    resolved = await app.scripts.claim(redis_client, keys, ["tok3", 10_000])
    assert (int(resolved[0]), resolved[1]) == (2, b"run_1")
