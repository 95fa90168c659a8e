"""The gate's own cost by the way it reaches Redis, without gRPC.

    .venv/bin/python bench/gate_pipeline.py

Calls Gate.evaluate straight from 8 and 64 concurrent tasks, the three ways
in turn, twice, in one run: redis-py one call at a time, redis-py with the
calls coalesced into pipelines (MOLLIFIER_GATE_DIRECT_REDIS=false), and the
gate's own connection (the default). Prints decisions per second and this
process's CPU time per decision.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import uvloop
from mollifier.app import App
from mollifier.config import Settings
from mollifier.devstack import RedisProcess
from mollifier.gate import Gate
from mollifier_client.v1 import gate_pb2


async def run(gate: Gate, n: int, concurrency: int) -> tuple[float, float]:
    reqs = [
        gate_pb2.EvaluateRequest(
            env_id=f"env_{i % 16}", org_id="org", task_identifier="task",
            org_feature_flags={"mollifierEnabled": True},
        )
        for i in range(concurrency)
    ]  # fmt: skip
    each = n // concurrency

    async def worker(r: gate_pb2.EvaluateRequest) -> None:
        for _ in range(each):
            await gate.evaluate(r)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(r) for r in reqs))
    return n / (time.perf_counter() - wall0), (time.process_time() - cpu0) / n * 1e6


async def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="mollifier-bench-"))
    redis = RedisProcess(folder)
    redis.start()
    s = Settings.from_env(
        {}, redis_url=redis.url, database_url="", drain_enabled=False,
        trip_threshold=10**9, log_level="ERROR", gate_timeout_ms=1000,
    )  # fmt: skip
    app = await App.connect(s, start_background=False)
    pooled = Gate(s.replace(gate_direct_redis=False), app.redis, app.scripts, app.buffer)
    plain = Gate(s.replace(gate_direct_redis=False), app.redis, app.scripts, app.buffer)
    plain._pipe.usable = False  # one redis-py call per decision
    ways = (
        ("redis-py, one call each", plain),
        ("redis-py, coalesced pipelines", pooled),
        ("own connection", app.gate),
    )
    try:
        for concurrency in (8, 64):
            for name, gate in ways * 2:
                rate, cpu = await run(gate, 20_000, concurrency)
                print(f"{concurrency} concurrent, {name}: "
                      f"{rate:,.0f} decisions/s, {cpu:.0f} us CPU each")  # fmt: skip
    finally:
        await app.close()
        redis.stop()


if __name__ == "__main__":
    uvloop.run(main())
