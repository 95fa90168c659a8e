"""Server CPU per call: the bare grpc.aio echo against Evaluate, in one run.

    .venv/bin/python bench/gate_cpu.py

Reads this process's CPU time (the servers run here; the load comes from
bench/gate.py's client process) and Redis's from /proc, so each figure is CPU
per call rather than wall time, which the shared machine makes noisy.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import gate as g


async def main() -> None:
    from mollifier.app import App, settle_gc
    from mollifier.config import Settings
    from mollifier.devstack import RedisProcess
    from mollifier.server import start_server

    folder = Path(tempfile.mkdtemp(prefix="mollifier-bench-"))
    redis = RedisProcess(folder)
    redis.start()
    s = Settings.from_env(
        {}, redis_url=redis.url, database_url="", drain_enabled=False,
        trip_threshold=10**9, log_level="ERROR",
    )  # fmt: skip
    app = await App.connect(s, start_background=False)
    side = await start_server(app, "127.0.0.1:0")
    echo, eport = await g._echo_server()
    settle_gc()  # as `mollifier serve` does once serving

    def redis_cpu() -> float:
        assert redis.proc is not None
        with open(f"/proc/{redis.proc.pid}/stat") as f:
            parts = f.read().split()
        return (int(parts[13]) + int(parts[14])) / os.sysconf("SC_CLK_TCK")

    calls = 10_000
    n = calls + min(2000, calls // 5)  # the client's warm-up calls count too
    targets = (("echo", f"127.0.0.1:{eport}", g.ECHO), ("Evaluate", side.address, g.EVALUATE))
    try:
        for name, addr, method in targets * 2:
            t0, r0 = time.process_time(), redis_cpu()
            r = await g._measure(addr, method, 64, calls)
            cpu = (time.process_time() - t0) / n * 1e6
            rcpu = (redis_cpu() - r0) / n * 1e6
            print(f"{name}: {r['per_sec']:,.0f}/s, server CPU {cpu:.0f} us/call, "
                  f"Redis CPU {rcpu:.0f} us/call")  # fmt: skip
    finally:
        await side.stop(0)
        await echo.stop(0)
        await app.close()
        redis.stop()


if __name__ == "__main__":
    g._run(main())
