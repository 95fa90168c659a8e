"""Gate benchmark: Evaluate decisions per second beside a bare grpc.aio echo server.

    .venv/bin/python bench/gate.py [--calls 20000] [--inflight 8 64]

Starts its own redis-server, an in-process sidecar (gate only: no Postgres) and
a bare grpc.aio echo server in this process, then drives each from a separate
client process so the client's CPU does not share the servers' event loop.
Both are sent the same pre-serialized EvaluateRequest bytes, so the client does
the same work for each and the difference is the sidecar's own cost (decoding,
validation, one Lua call to Redis, encoding). Every Evaluate is under the
threshold with the org flag on, i.e. the full cascade and the trip evaluator run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EVALUATE = "/mollifier.v1.GateService/Evaluate"
ECHO = "/bench.Echo/Echo"
ENVS = 16


def _requests() -> list[bytes]:
    from mollifier_client.v1 import gate_pb2

    return [
        gate_pb2.EvaluateRequest(
            env_id=f"env_bench_{i}",
            org_id="org_bench",
            task_identifier="bench-task",
            org_feature_flags={"mollifierEnabled": True},
        ).SerializeToString()
        for i in range(ENVS)
    ]


# ---------------------------------------------------------------- client side


LUA = "lua"  # the evaluate script called straight from this process (no sidecar)
BATCH = "/mollifier.v1.GateService/EvaluateBatch"
BATCH_SIZE = 100


def _batch_requests() -> list[bytes]:
    from mollifier_client.v1 import gate_pb2

    return [
        gate_pb2.EvaluateBatchRequest(
            inputs=[
                gate_pb2.GateInput(
                    env_id=f"env_bench_{(j + i) % ENVS}",
                    org_id="org_bench",
                    task_identifier="bench-task",
                    org_feature_flags={"mollifierEnabled": True},
                )
                for i in range(BATCH_SIZE)
            ]
        ).SerializeToString()
        for j in range(ENVS)
    ]


async def _lua_caller(redis_url: str) -> Any:
    """What a webapp would do without the sidecar: EVALSHA evaluate.lua itself."""
    from mollifier.config import Settings
    from mollifier.connections import make_redis
    from mollifier.keys import env_keys
    from mollifier.scripts import load_scripts

    settings = Settings.from_env({}, redis_url=redis_url, trip_threshold=1_000_000_000)
    redis = make_redis(settings)
    scripts = load_scripts()
    await scripts.load_all(redis)
    args = (settings.trip_threshold, settings.trip_window_ms, settings.trip_hold_ms, "0")
    calls = []
    for i in range(ENVS):
        k = env_keys(f"env_bench_{i}")
        calls.append([k.gate, k.policy, k.queue, k.back, k.lease, k.retry])

    async def call(i: int) -> Any:
        return await scripts.evaluate(redis, calls[i % ENVS], args)

    return redis, call


async def _drive(
    address: str, method: str, inflight: int, calls: int, warmup: int, channels: int = 1
) -> dict[str, Any]:
    if method == LUA:
        redis, lua_call = await _lua_caller(address)
        try:
            return await _drive_calls(lua_call, method, inflight, calls, warmup)
        finally:
            await redis.aclose()
    import grpc

    # Several channels are several TCP connections (own subchannel pools), which
    # SO_REUSEPORT spreads over a sidecar's worker processes.
    opened = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(channels)
    ]
    try:
        # Bytes in, bytes out: no client-side codec, the same work for both servers.
        rpcs = [ch.unary_unary(method, None, None) for ch in opened]
        requests = _batch_requests() if method == BATCH else _requests()

        async def grpc_call(i: int) -> Any:
            return await rpcs[i % channels](requests[i % len(requests)], timeout=10)

        return await _drive_calls(grpc_call, method, inflight, calls, warmup)
    finally:
        for ch in opened:
            await ch.close(None)


async def _drive_calls(
    call: Any, method: str, inflight: int, calls: int, warmup: int
) -> dict[str, Any]:
    from mollifier_client.v1 import gate_pb2

    latencies: list[float] = []
    fail_open = 0

    async def worker(n: int, record: bool, offset: int) -> None:
        nonlocal fail_open
        for i in range(n):
            t0 = time.perf_counter()
            answer = await call(offset + i)
            if record:
                latencies.append(time.perf_counter() - t0)
                if method == EVALUATE:
                    # A fail-open answer skipped Redis: count it, it is not a real decision.
                    reason = gate_pb2.EvaluateResponse.FromString(answer).reason
                    fail_open += reason == gate_pb2.DECISION_REASON_FAIL_OPEN

    per = max(1, warmup // inflight)
    await asyncio.gather(*(worker(per, False, w) for w in range(inflight)))
    per = calls // inflight
    started = time.perf_counter()
    await asyncio.gather(*(worker(per, True, w) for w in range(inflight)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    n = len(latencies)
    return {
        "calls": n,
        "seconds": elapsed,
        "per_sec": n / elapsed,
        "p50_ms": latencies[n // 2] * 1000,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000,
        "fail_open": fail_open,
        "decisions_per_sec": n * (BATCH_SIZE if method == BATCH else 1) / elapsed,
    }


def client_main(args: argparse.Namespace) -> None:
    result = _run(
        _drive(args.address, args.method, args.inflight, args.calls, args.warmup, args.channels)
    )
    print(json.dumps(result))


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# ---------------------------------------------------------------- server side


async def _echo_server() -> tuple[Any, int]:
    import grpc

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _measure(
    address: str, method: str, inflight: int, calls: int, channels: int = 1
) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--client",
        "--address", address,
        "--method", method,
        "--inflight", str(inflight),
        "--calls", str(calls),
        "--warmup", str(min(2000, calls // 5)),
        "--channels", str(channels),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"client failed for {method} at {inflight} in flight")
    result: dict[str, Any] = json.loads(out)
    return result


async def bench(calls: int, inflights: list[int]) -> list[dict[str, Any]]:
    from mollifier.app import App, settle_gc
    from mollifier.config import Settings
    from mollifier.devstack import RedisProcess
    from mollifier.server import start_server

    folder = Path(tempfile.mkdtemp(prefix="mollifier-bench-"))
    redis = RedisProcess(folder)
    redis.start()
    rows: list[dict[str, Any]] = []
    try:
        settings = Settings.from_env(
            {},
            redis_url=redis.url,
            database_url="",
            drain_enabled=False,
            # Far above what the run sends: every call takes the full cascade and
            # the Lua trip evaluator, and answers PASS_THROUGH / UNDER_THRESHOLD.
            trip_threshold=1_000_000_000,
            log_level="WARNING",
        )
        app = await App.connect(settings, start_background=False)
        sidecar = await start_server(app, "127.0.0.1:0")
        echo, echo_port = await _echo_server()
        # As `mollifier serve` does once serving (the echo shares the process).
        gc_threshold = gc.get_threshold()
        settle_gc()
        try:
            for inflight in inflights:
                e = await _measure(f"127.0.0.1:{echo_port}", ECHO, inflight, calls)
                g = await _measure(sidecar.address, EVALUATE, inflight, calls)
                lua = await _measure(redis.url, LUA, inflight, calls)
                rows.append({"inflight": inflight, "echo": e, "evaluate": g, "lua": lua})
            b = await _measure(sidecar.address, BATCH, 8, max(80, calls // 20))
            rows.append({"inflight": 8, "batch": b})
        finally:
            # bench/run.py goes on in this process: as it was before.
            gc.unfreeze()
            gc.set_threshold(*gc_threshold)
            await sidecar.stop(0)
            await echo.stop(0)
            await app.close()
    finally:
        redis.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return rows


async def bench_workers(calls: int, inflights: list[int], workers: int) -> str:
    """Echo vs `mollifier serve` with 1 and with ``workers`` gRPC processes, 4 channels."""
    import socket
    import subprocess

    from mollifier.devstack import RedisProcess

    channels = 4
    folder = Path(tempfile.mkdtemp(prefix="mollifier-bench-"))
    redis = RedisProcess(folder)
    redis.start()
    echo, echo_port = await _echo_server()
    lines = [
        f"Workers: `bench/gate.py --workers {workers}`, {os.cpu_count()} cores, "
        f"{calls} calls per measurement, {channels} client channels (connections)",
        "",
        "| in flight | server | calls/s | p50 ms | p99 ms | vs echo calls/s | vs echo p99 |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    try:
        for inflight in inflights:
            e = await _measure(f"127.0.0.1:{echo_port}", ECHO, inflight, calls, channels)
            lines.append(
                f"| {inflight} | bare grpc.aio echo | {e['per_sec']:,.0f} | {e['p50_ms']:.2f} | "
                f"{e['p99_ms']:.2f} | 1.00 | 1.00 |"
            )
            for n in (1, workers):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", 0))
                    port = sock.getsockname()[1]
                env = {k: v for k, v in os.environ.items() if not k.startswith("MOLLIFIER_")}
                env |= {
                    "MOLLIFIER_REDIS_URL": redis.url,
                    "MOLLIFIER_LISTEN": f"127.0.0.1:{port}",
                    "MOLLIFIER_TRIP_THRESHOLD": "1000000000",
                    "MOLLIFIER_LOG_LEVEL": "ERROR",
                    "MOLLIFIER_WORKERS": str(n),
                }
                proc = subprocess.Popen(  # noqa: ASYNC220 (before the clock)
                    [sys.executable, "-m", "mollifier", "serve"], env=env
                )
                try:
                    await asyncio.sleep(3 + n)  # every worker bound and serving
                    g = await _measure(f"127.0.0.1:{port}", EVALUATE, inflight, calls, channels)
                finally:
                    proc.terminate()
                    proc.wait(15)
                lines.append(
                    f"| {inflight} | `mollifier serve`, {n} worker(s) | {g['per_sec']:,.0f} | "
                    f"{g['p50_ms']:.2f} | {g['p99_ms']:.2f} | "
                    f"{g['per_sec'] / e['per_sec']:.2f} | {g['p99_ms'] / e['p99_ms']:.2f} |"
                )
    finally:
        await echo.stop(0)
        redis.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return "\n".join(lines)


def report(rows: list[dict[str, Any]], calls: int) -> str:
    lines = [
        f"Gate benchmark, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
        f"{calls} calls per measurement",
        "",
        "| in flight | server | calls/s | p50 ms | p99 ms |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    ratios = []
    names = {
        "echo": "bare grpc.aio echo",
        "evaluate": "GateService/Evaluate",
        "lua": "evaluate.lua straight from Python (no sidecar)",
    }
    for row in rows:
        if "batch" in row:
            b = row["batch"]
            lines.append(
                f"| {row['inflight']} | GateService/EvaluateBatch, {BATCH_SIZE} per call | "
                f"{b['per_sec']:,.0f} ({b['decisions_per_sec']:,.0f} decisions/s) | "
                f"{b['p50_ms']:.2f} | {b['p99_ms']:.2f} |"
            )
            ok = "meets" if b["decisions_per_sec"] >= 30_000 else "MISSES"
            ratios.append(
                f"- EvaluateBatch: {b['decisions_per_sec']:,.0f} decisions/s "
                f"({ok} the target: >= 30,000)"
            )
            continue
        for kind in ("echo", "evaluate", "lua"):
            r = row[kind]
            name = names[kind]
            lines.append(
                f"| {row['inflight']} | {name} | {r['per_sec']:,.0f} | "
                f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
            )
        thr = row["evaluate"]["per_sec"] / row["echo"]["per_sec"]
        p99 = row["evaluate"]["p99_ms"] / row["echo"]["p99_ms"]
        ok = "meets" if thr >= 0.6 and p99 <= 2.0 else "MISSES"
        ratios.append(
            f"- {row['inflight']} in flight: Evaluate runs at {thr:.0%} of the echo's "
            f"throughput, p99 {p99:.2f}x the echo's ({ok} the target: >=60%, <=2x); "
            f"{row['evaluate']['fail_open']} of {row['evaluate']['calls']} answers were FAIL_OPEN"
        )
    return "\n".join([*lines, "", *ratios])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls per measurement")
    parser.add_argument("--inflight", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2000, help=argparse.SUPPRESS)
    parser.add_argument("--channels", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="also measure `mollifier serve` with MOLLIFIER_WORKERS=N (and N-process "
        "clients' channels) beside the echo and one worker, all over 4 channels",
    )
    args = parser.parse_args()
    if args.client:
        args.inflight = args.inflight[0]
        client_main(args)
        return
    # The servers start clients with asyncio subprocesses; gRPC's fork handlers
    # only log noise about that, since the children exec a fresh interpreter.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    # Fail-open warnings would flood the terminal; they are counted instead.
    logging.basicConfig(level=logging.ERROR)
    if args.workers:
        print(_run(bench_workers(args.calls, args.inflight, args.workers)))
        return
    rows = _run(bench(args.calls, args.inflight))
    print(report(rows, args.calls))


if __name__ == "__main__":
    main()
