"""The gate's own pipelined Redis connection (mollifier.resp), on real redis-servers.

What must hold: every reply reaches the call that sent it, also after calls
timed out, scripts were flushed, or Redis was paused, killed or restarted; a
call never waits past its timeout; a Redis that is down fails calls fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from mollifier.devstack import RedisProcess
from mollifier.keys import env_keys
from mollifier.resp import DirectPipeline
from mollifier.scripts import Scripts, load_scripts
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

DEFAULTS = (1_000_000, 1000, 500, "0")


def evaluate(scripts: Scripts, env: str) -> Callable[[Any], None]:
    k = env_keys(env)
    keys = [k.gate, k.policy, k.queue, k.back, k.lease, k.retry]
    return lambda pipe: scripts.evaluate.queue(pipe, keys, DEFAULTS)


def sadd(key: str, member: str) -> Callable[[Any], None]:
    return lambda pipe: pipe.sadd(key, member)


@pytest.fixture
async def direct(redis_url: str) -> AsyncIterator[DirectPipeline]:
    pipe = DirectPipeline(redis_url, load_scripts(), timeout=2.0)
    yield pipe
    await pipe.aclose()


async def test_replies_reach_their_callers_in_order(
    direct: DirectPipeline, redis_client: aioredis.Redis
) -> None:
    scripts = load_scripts()
    await scripts.load_all(redis_client)
    envs = [f"env_resp_{i}" for i in range(8)]
    # 8 envs x 25 decisions, all submitted at once: each env's window counts
    # must come back 1..25 in the order its calls were submitted.
    futs = [(env, direct.submit(evaluate(scripts, env), 1)) for _ in range(25) for env in envs]
    seen: dict[str, list[int]] = {env: [] for env in envs}
    for env, fut in futs:
        (reply,) = await fut
        seen[env].append(int(reply[2]))
    assert all(counts == list(range(1, 26)) for counts in seen.values())
    # Groups of several commands get their own replies, in order.
    both = await direct.submit(lambda p: (p.sadd("s", "a"), p.sadd("s", "a", "b")), 2)
    assert both == [1, 1]


async def test_a_build_that_queues_the_wrong_count_fails_alone(direct: DirectPipeline) -> None:
    wrong = direct.submit(lambda p: (p.sadd("w", "a"), p.sadd("w", "b")), 1)
    right = direct.submit(sadd("r", "a"), 1)
    with pytest.raises(AssertionError):
        await wrong
    assert await right == [1]


async def test_error_replies_are_redis_py_errors(
    direct: DirectPipeline, redis_client: aioredis.Redis
) -> None:
    await redis_client.set("plain", "x")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await direct.submit(sadd("plain", "a"), 1)
    # A script nobody can load stays NOSCRIPT after the one reload.
    with pytest.raises(NoScriptError):
        await direct.submit(lambda p: p.evalsha("0" * 40, 0), 1)
    assert await direct.submit(sadd("after", "a"), 1) == [1]


async def test_flushed_scripts_are_loaded_again(
    direct: DirectPipeline, redis_client: aioredis.Redis
) -> None:
    scripts = load_scripts()
    await redis_client.script_flush()
    futs = [direct.submit(evaluate(scripts, "env_noscript"), 1) for _ in range(20)]
    counts = [int((await f)[0][2]) for f in futs]
    # Each call ran exactly once, in order, although all first met NOSCRIPT.
    assert counts == list(range(1, 21))


async def test_a_call_never_waits_past_its_timeout(
    redis_factory: Callable[..., RedisProcess],
) -> None:
    server = redis_factory()
    # Bounds wide enough for a loaded machine, far below "hangs".
    pipe = DirectPipeline(server.url, load_scripts(), timeout=0.3, stall_after=0.6)
    try:
        assert await pipe.submit(sadd("k", "a"), 1) == [1]
        server.pause()
        t0 = time.monotonic()
        stuck = [pipe.submit(sadd("k", f"p{i}"), 1) for i in range(5)]
        for fut in stuck:
            with pytest.raises(TimeoutError):
                await fut
        assert time.monotonic() - t0 < 1.5
        # Past stall_after the silent connection is dropped for a new one.
        await asyncio.sleep(0.7)
        late = pipe.submit(sadd("k", "late"), 1)
        await asyncio.sleep(0.05)
        server.resume()
        with contextlib.suppress(TimeoutError):
            # On the new connection: answered once Redis runs again, if in time.
            assert await late == [1]
        # Whatever the paused server still answers, each new call gets its own reply.
        for i in range(10):
            assert await pipe.submit(sadd("fresh", f"m{i}"), 1) == [1]
            assert await pipe.submit(sadd("fresh", f"m{i}"), 1) == [0]
    finally:
        server.resume()
        await pipe.aclose()


async def test_timed_out_calls_do_not_shift_replies(
    redis_factory: Callable[..., RedisProcess],
) -> None:
    server = redis_factory()
    pipe = DirectPipeline(server.url, load_scripts(), timeout=0.2, stall_after=30)
    admin = aioredis.Redis.from_url(server.url)
    try:
        assert await pipe.submit(sadd("x", "warm"), 1) == [1]
        await admin.client_pause(600, all=True)
        gone = [pipe.submit(sadd("x", f"g{i}"), 1) for i in range(5)]
        for fut in gone:
            with pytest.raises(TimeoutError):
                await fut
        await asyncio.sleep(0.65)
        # The late replies of the timed-out calls (all 1) are read and
        # dropped; these calls get their own answers.
        for i in range(5):
            assert await pipe.submit(sadd("x", f"g{i}"), 1) == [0]
            assert await pipe.submit(sadd("x", f"n{i}"), 1) == [1]
    finally:
        await admin.aclose()
        await pipe.aclose()


async def test_killed_and_restarted_redis(redis_factory: Callable[..., RedisProcess]) -> None:
    server = redis_factory()
    pipe = DirectPipeline(server.url, load_scripts(), timeout=1.0)
    try:
        assert await pipe.submit(sadd("k", "a"), 1) == [1]
        server.kill()
        t0 = time.monotonic()
        for _ in range(3):
            with pytest.raises((RedisConnectionError, TimeoutError)):
                await pipe.submit(sadd("k", "b"), 1)
        # Down means refused at once, not a wait for the timeout.
        assert time.monotonic() - t0 < 0.9
        server.start()
        deadline = time.monotonic() + 5
        while True:
            try:
                assert await pipe.submit(evaluate(load_scripts(), "env_back"), 1)
                break
            except (RedisConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "never reconnected"
                await asyncio.sleep(0.05)
    finally:
        await pipe.aclose()


async def test_password_and_database_from_the_url(
    redis_factory: Callable[..., RedisProcess],
) -> None:
    server = redis_factory(extra_args=("--requirepass", "s3cret"))
    url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
    pipe = DirectPipeline(url, load_scripts(), timeout=1.0)
    check = aioredis.Redis.from_url(url)
    try:
        assert await pipe.submit(sadd("in_db3", "a"), 1) == [1]
        assert await check.smembers("in_db3") == {b"a"}
        wrong = DirectPipeline(
            f"redis://:nope@127.0.0.1:{server.port}/0", load_scripts(), timeout=1.0
        )
        try:
            with pytest.raises(ResponseError):
                await wrong.submit(sadd("k", "a"), 1)
        finally:
            await wrong.aclose()
    finally:
        await check.aclose()
        await pipe.aclose()


async def test_no_call_runs_behind_a_failed_handshake(
    redis_factory: Callable[..., RedisProcess],
) -> None:
    # A SELECT Redis refuses (16 databases) or an AUTH to a Redis without a
    # password: the calls must fail, not run in database 0 unauthenticated.
    server = redis_factory()
    check = aioredis.Redis.from_url(server.url)
    urls = (
        f"redis://127.0.0.1:{server.port}/20",
        f"redis://:s3cret@127.0.0.1:{server.port}/0",
    )
    try:
        for url in urls:
            pipe = DirectPipeline(url, load_scripts(), timeout=1.0)
            try:
                # Several loop turns' worth of calls, queued while connecting.
                futs = [pipe.submit(sadd("leaked", f"m{i}"), 1) for i in range(3)]
                await asyncio.sleep(0)
                futs.append(pipe.submit(sadd("leaked", "late"), 1))
                for fut in futs:
                    with pytest.raises(ResponseError):
                        await fut
                # And again on the next connect.
                await asyncio.sleep(0.2)
                with pytest.raises(ResponseError):
                    await pipe.submit(sadd("leaked", "again"), 1)
            finally:
                await pipe.aclose()
            assert await check.smembers("leaked") == set()
    finally:
        await check.aclose()


async def test_only_the_commands_that_met_noscript_are_sent_again(
    direct: DirectPipeline, redis_client: aioredis.Redis
) -> None:
    # One call whose first script Redis knows and whose second it does not
    # (as when another client's SCRIPT LOAD lands inside a large call): the
    # first ran and must not run again.
    scripts = load_scripts()
    await redis_client.script_flush()
    await redis_client.script_load(scripts.evaluate.source)
    k = env_keys("env_state_mixed")
    state_keys = [k.gate, k.policy, *k.buffered]

    def build(pipe: Any) -> None:
        scripts.evaluate.queue(
            pipe, [k.gate, k.policy, k.queue, k.back, k.lease, k.retry], DEFAULTS
        )
        scripts.env_state.queue(pipe, state_keys, DEFAULTS[:3])

    first, _ = await direct.submit(build, 2)
    assert int(first[2]) == 1  # the window counted this decision once
    (again,) = await direct.submit(evaluate(scripts, "env_state_mixed"), 1)
    assert int(again[2]) == 2


async def test_redis_py_paths_send_again_only_what_met_noscript(
    redis_client: aioredis.Redis,
) -> None:
    from mollifier.scripts import AutoPipeline

    scripts = load_scripts()
    auto = AutoPipeline(redis_client, scripts)
    runs: tuple[Callable[[Callable[[Any], None]], Awaitable[list[Any]]], ...] = (
        lambda b: scripts.execute(redis_client, b),
        lambda b: auto.submit(b, 2),
    )
    for n, run in enumerate(runs):
        k = env_keys(f"env_mixed_{n}")
        await redis_client.script_flush()
        await redis_client.script_load(scripts.evaluate.source)
        gate_keys = [k.gate, k.policy, k.queue, k.back, k.lease, k.retry]

        def build(pipe: Any, gate_keys: list[str] = gate_keys, k: Any = k) -> None:
            scripts.evaluate.queue(pipe, gate_keys, DEFAULTS)
            scripts.env_state.queue(pipe, [k.gate, k.policy, *k.buffered], DEFAULTS[:3])

        first, _ = await run(build)
        assert int(first[2]) == 1


async def test_close_fails_waiting_calls(redis_factory: Callable[..., RedisProcess]) -> None:
    server = redis_factory()
    pipe = DirectPipeline(server.url, load_scripts(), timeout=5.0)
    assert await pipe.submit(sadd("k", "a"), 1) == [1]
    server.pause()
    try:
        waiting = pipe.submit(sadd("k", "b"), 1)
        await asyncio.sleep(0.05)
        await pipe.aclose()
        with pytest.raises(RedisConnectionError):
            await waiting
        with pytest.raises(RedisConnectionError):
            await pipe.submit(sadd("k", "c"), 1)
    finally:
        server.resume()


async def test_a_full_waiting_list_behind_a_silent_connection_recovers(
    redis_factory: Callable[..., RedisProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls that pile up to the limit behind a frozen Redis must not wedge the
    pipeline: once the connection has been silent past stall_after it is
    replaced, and calls are answered again."""
    import mollifier.resp

    monkeypatch.setattr(mollifier.resp, "MAX_WAITING", 50)
    server = redis_factory()
    pipe = DirectPipeline(server.url, load_scripts(), timeout=0.2, stall_after=0.5)
    try:
        assert await pipe.submit(sadd("k", "a"), 1) == [1]
        server.pause()
        futs = [pipe.submit(sadd("k", f"b{i}"), 1) for i in range(100)]
        refused = sum(
            1 for f in futs if f.done() and isinstance(f.exception(), RedisConnectionError)
        )
        assert refused > 0  # the limit was reached
        for f in futs:
            with contextlib.suppress(Exception):
                await f
        await asyncio.sleep(0.6)
        # Still frozen: a new call waits on a fresh connection and times out,
        # instead of being refused for a list that never empties.
        with pytest.raises(TimeoutError):
            await pipe.submit(sadd("k", "c"), 1)
        server.resume()
        deadline = time.monotonic() + 5
        while True:
            try:
                assert await pipe.submit(sadd("k2", "x"), 1) in ([1], [0])
                break
            except (RedisConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "the pipeline stayed wedged"
                await asyncio.sleep(0.05)
    finally:
        server.resume()
        await pipe.aclose()


async def test_miscounted_calls_are_refused(direct: DirectPipeline) -> None:
    with pytest.raises(ValueError):
        direct.submit(lambda p: None, 0)
    with pytest.raises(ValueError):
        direct.submit(b"*1\r\n$4\r\nPING\r\n", 2)
    assert await direct.submit(b"*1\r\n$4\r\nPING\r\n", 1) == [b"PONG"]


async def test_a_server_that_is_not_redis_fails_calls_fast() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pipe = DirectPipeline(f"redis://127.0.0.1:{port}/0", load_scripts(), timeout=1.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(RedisConnectionError):
            await pipe.submit(sadd("k", "a"), 1)
        assert time.monotonic() - t0 < 0.9
    finally:
        await pipe.aclose()
        server.close()
        await server.wait_closed()


def test_tls_options_come_from_the_url() -> None:
    import ssl

    target = DirectPipeline._parse("rediss://h:6380/0?ssl_cert_reqs=none&ssl_check_hostname=false")
    ctx = target["ssl"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
    strict = DirectPipeline._parse("rediss://h:6380/0")["ssl"]
    assert strict.verify_mode == ssl.CERT_REQUIRED
