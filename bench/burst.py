"""Burst benchmark: 20,000 triggers for one env from 64 callers, two ways.

    .venv/bin/python bench/burst.py [--triggers 20000] [--callers 64]

Starts its own redis-server and postgres (mollifier.devstack), then:

- straight to Postgres: each caller INSERTs one row per trigger, autocommit, on
  its own connection (a webapp with a pool as wide as its concurrency);
- through the sidecar: `mollifier serve` in its own process, each caller sends
  GateService/Trigger with write_through, so the sidecar writes pass-through
  runs itself and buffers the rest once the env trips; its drainer writes them.

For both: the callers' p50/p99/max and errors, peak Postgres client
connections in use (pg_stat_activity, sampled every 20 ms), the time until
every run is a row, and a check that exactly that many rows exist. The sidecar
is also measured idle first (sequential triggers to another env), and its peak
RSS (VmHWM) is read at the end. With matplotlib, a chart of caller latency and
buffer depth over time is written.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for `from bench.stores import ...` when run as a script
ENV = "env_burst"
ORG = "org_burst"


def _snapshot(i: int, env: str = ENV) -> Any:
    from mollifier_client.v1 import run_pb2

    return run_pb2.RunSnapshot(
        run_id=f"run_{env}_{i:07d}",
        env_id=env,
        org_id=ORG,
        task_identifier="send-email",
        payload=b'{"user":"u_123","order":{"id":"o_456","items":[1,2,3]},"n":%d}' % i,
        payload_type="application/json",
        tags=["bench"],
        queue="task/send-email",
        max_attempts=3,
    )


# Where the machine's CPU goes during a burst: by process kind, read from /proc.
_TICK = os.sysconf("SC_CLK_TCK")


def _kind(pid: int, me: int) -> str | None:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if pid == me:
        return "callers (bench process)"
    name = Path(cmd[0].decode(errors="replace")).name if cmd and cmd[0] else ""
    text = b" ".join(cmd).decode(errors="replace")
    if "mollifier" in text and " _drain-process" in text:
        return "sidecar: drain process"
    if "mollifier" in text and (" serve" in text or " _worker" in text):
        return "sidecar: serving process"
    if name.startswith("redis-server"):
        return "redis-server"
    if name.startswith("postgres") or text.startswith("postgres:"):
        return "postgres"
    return None


def cpu_by_kind() -> dict[str, float]:
    """CPU seconds so far of every process of a kind that matters here, and the
    machine's busy and total CPU seconds (from /proc/stat)."""
    from bench.stores import process_cpu

    me = os.getpid()
    out: dict[str, float] = {}
    for pid, _, cpu in process_cpu():
        kind = _kind(pid, me)
        if kind is not None:
            out[kind] = out.get(kind, 0.0) + cpu
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    out["machine busy"] = (sum(ticks) - ticks[3] - ticks[4]) / _TICK
    out["machine total"] = sum(ticks) / _TICK
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * q))] * 1000 if xs else 0.0


class Sampler:
    """Postgres connections in use (and buffer depth) every 20 ms."""

    def __init__(self, pg_url: str, redis: Any | None) -> None:
        self.pg_url = pg_url
        self.redis = redis
        self.samples: list[tuple[float, int, int, int]] = []  # t, in use, open, depth
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.t0 = 0.0

    async def _run(self) -> None:
        import psycopg
        from mollifier.keys import env_keys

        k = env_keys(ENV)
        async with await psycopg.AsyncConnection.connect(self.pg_url, autocommit=True) as conn:
            while not self._stopping:
                cur = await conn.execute(
                    "SELECT count(*) FILTER (WHERE state <> 'idle'), count(*) "
                    "FROM pg_stat_activity WHERE backend_type = 'client backend' "
                    "AND pid <> pg_backend_pid()"
                )
                row = await cur.fetchone()
                assert row is not None
                depth = 0
                if self.redis is not None:
                    pipe = self.redis.pipeline(transaction=False)
                    pipe.llen(k.queue)
                    for key in (k.back, k.lease, k.retry):
                        pipe.zcard(key)
                    depth = sum(int(n) for n in await pipe.execute())
                t = time.perf_counter() - self.t0
                self.samples.append((t, int(row[0]), int(row[1]), depth))
                await asyncio.sleep(0.02)

    def start(self, t0: float) -> None:
        self.t0 = t0
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        # A flag, not only a cancel: a cancel landing inside a client call was
        # once lost there, and the sampler went on for ever.
        self._stopping = True
        await asyncio.wait({self._task}, timeout=5)
        self._task.cancel()
        await asyncio.wait({self._task}, timeout=5)

    @property
    def peak_in_use(self) -> int:
        return max((s[1] for s in self.samples), default=0)


async def _count(pg_url: str, env: str = ENV) -> int:
    import psycopg

    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT count(*) FROM mollifier.runs WHERE env_id = %s", (env,))
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def _truncate(pg_url: str) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute("TRUNCATE mollifier.runs")


async def _callers(
    total: int, callers: int, one: Any, t0: float
) -> tuple[list[tuple[float, float]], int]:
    """Run ``one(i)`` for i in range(total) from ``callers`` tasks; (start, latency) pairs."""
    points: list[tuple[float, float]] = []
    errors = 0
    next_i = 0

    async def caller(c: int) -> None:
        nonlocal next_i, errors
        while next_i < total:
            i = next_i
            next_i += 1
            start = time.perf_counter()
            try:
                await one(c, i)
            except Exception:
                errors += 1
            points.append((start - t0, time.perf_counter() - start))

    await asyncio.gather(*(caller(c) for c in range(callers)))
    return points, errors


async def straight(
    pg_url: str, total: int, callers: int, name: str = "straight to Postgres"
) -> dict[str, Any]:
    import psycopg
    from mollifier.materializer import _ONE_SQL, Entry, row_values

    await _truncate(pg_url)
    conns = [await psycopg.AsyncConnection.connect(pg_url, autocommit=True) for _ in range(callers)]
    snaps = [_snapshot(i) for i in range(total)]

    async def one(c: int, i: int) -> None:
        await conns[c].execute(_ONE_SQL, row_values(Entry.from_snapshot(snaps[i])))

    sampler = Sampler(pg_url, None)
    t0 = time.perf_counter()
    cpu0 = cpu_by_kind()
    sampler.start(t0)
    points, errors = await _callers(total, callers, one, t0)
    all_in = time.perf_counter() - t0
    cpu = cpu_delta(cpu0, cpu_by_kind())
    await sampler.stop()
    for conn in conns:
        await conn.close()
    return _summary(
        name, points, errors, sampler, all_in, await _count(pg_url), cpu=cpu, callers_s=all_in
    )


def _summary(
    name: str,
    points: list[tuple[float, float]],
    errors: int,
    sampler: Sampler,
    all_in: float,
    rows: int,
    **extra: Any,
) -> dict[str, Any]:
    lat = sorted(p[1] for p in points)
    return {
        "name": name,
        "p50_ms": _pct(lat, 0.5),
        "p99_ms": _pct(lat, 0.99),
        "max_ms": lat[-1] * 1000 if lat else 0.0,
        "errors": errors,
        "peak_pg_in_use": sampler.peak_in_use,
        "peak_pg_open": max((s[2] for s in sampler.samples), default=0),
        "all_in_s": all_in,
        "rows": rows,
        "points": points,
        "samples": sampler.samples,
        **extra,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def through_sidecar(
    redis_url: str, pg_url: str, total: int, callers: int, drain_process: bool = True
) -> dict[str, Any]:
    import grpc
    from mollifier.config import Settings
    from mollifier.connections import make_redis
    from mollifier_client.v1 import gate_pb2, gate_pb2_grpc

    await _truncate(pg_url)
    # Each sidecar run starts from an empty buffer and an untripped gate.
    fresh = make_redis(Settings.from_env({}, redis_url=redis_url))
    await fresh.flushall()
    await fresh.aclose()
    port = _free_port()
    env = {
        **os.environ,
        "MOLLIFIER_REDIS_URL": redis_url,
        "MOLLIFIER_DATABASE_URL": pg_url,
        "MOLLIFIER_LISTEN": f"127.0.0.1:{port}",
        "MOLLIFIER_LOG_LEVEL": "WARNING",
        "MOLLIFIER_DRAIN_PROCESS": "true" if drain_process else "false",
    }
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once, before the clock)
        [sys.executable, "-m", "mollifier", "serve"], env=env, stderr=subprocess.DEVNULL
    )
    redis = make_redis(Settings.from_env({}, redis_url=redis_url))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            stub = gate_pb2_grpc.GateServiceStub(channel)
            flags = {"mollifierEnabled": True}

            def request(i: int, env_id: str) -> Any:
                return gate_pb2.TriggerRequest(
                    env_id=env_id,
                    org_id=ORG,
                    task_identifier="send-email",
                    org_feature_flags=flags,
                    snapshot=_snapshot(i, env_id),
                    write_through=True,
                )

            # Idle: one caller, a few triggers/s worth of spacing, another env.
            idle: list[float] = []
            for i in range(300):
                start = time.perf_counter()
                await stub.Trigger(request(i, "env_idle"), timeout=10)
                idle.append(time.perf_counter() - start)
                await asyncio.sleep(0.01)
            idle.sort()

            reqs = [request(i, ENV) for i in range(total)]
            decisions: dict[int, int] = {}

            async def one(c: int, i: int) -> None:
                r = await stub.Trigger(reqs[i], timeout=30)
                decisions[r.decision] = decisions.get(r.decision, 0) + 1

            sampler = Sampler(pg_url, redis)
            t0 = time.perf_counter()
            cpu0 = cpu_by_kind()
            sampler.start(t0)
            points, errors = await _callers(total, callers, one, t0)
            callers_s = time.perf_counter() - t0
            cpu = cpu_delta(cpu0, cpu_by_kind())
            while await _count(pg_url) < total - errors and time.perf_counter() - t0 < 300:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            all_in = time.perf_counter() - t0
            await asyncio.sleep(0.2)
            await sampler.stop()
            rss = _peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
        await redis.aclose()
    return _summary(
        "through the sidecar" + (" (drain process)" if drain_process else " (drainer in-process)"),
        points,
        errors,
        sampler,
        all_in,
        await _count(pg_url),
        idle_p50_ms=_pct(idle, 0.5),
        idle_p99_ms=_pct(idle, 0.99),
        callers_s=callers_s,
        peak_rss_mb=rss,
        cpu=cpu,
        buffered=decisions.get(gate_pb2.DECISION_MOLLIFY, 0),
        drain_concurrency=Settings.from_env({}).drain_concurrency,
    )


def chart(results: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 4 * len(results)), sharex=True)
    for ax, r in zip(axes, results, strict=True):
        xs = [p[0] for p in r["points"]]
        ys = [p[1] * 1000 for p in r["points"]]
        ax.scatter(xs, ys, s=1, alpha=0.3, label="caller latency (ms)")
        ax.set_yscale("log")
        ax.set_ylabel("latency ms (log)")
        ax.set_title(
            f"{r['name']}: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
            f"all rows in at {r['all_in_s']:.1f} s"
        )
        ax2 = ax.twinx()
        ts = [s[0] for s in r["samples"]]
        ax2.plot(ts, [s[3] for s in r["samples"]], color="tab:red", label="buffer depth")
        ax2.plot(ts, [s[1] for s in r["samples"]], color="tab:green", label="PG conns in use")
        ax2.set_ylabel("buffer depth / connections")
        ax2.set_yscale("symlog")
        ax.legend(loc="upper left")
        ax2.legend(loc="upper right")
    axes[-1].set_xlabel("seconds since the burst started")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


async def bench(total: int, callers: int) -> list[dict[str, Any]]:
    """Both paths on a Postgres with fsync off (as the tests run it), then both
    again on one with fsync and synchronous_commit on, as production runs."""
    from bench.stores import own_stores

    results: list[dict[str, Any]] = []
    for fsync in (False, True):
        tag = ", fsync on" if fsync else ""
        async with own_stores(fsync=fsync) as (redis, pg):
            a = await straight(pg.url, total, callers, name=f"straight to Postgres{tag}")
            runs = [a]
            if not fsync:
                runs.append(
                    await through_sidecar(redis.url, pg.url, total, callers, drain_process=False)
                )
            b = await through_sidecar(redis.url, pg.url, total, callers, drain_process=True)
            b["name"] += tag
            runs.append(b)
            for r in runs:
                r["fsync"] = fsync
            results += runs
    return results


CPU_KINDS = (
    "callers (bench process)",
    "sidecar: serving process",
    "sidecar: drain process",
    "redis-server",
    "postgres",
)


def report(results: list[dict[str, Any]], total: int, callers: int) -> str:
    lines = [
        f"{total:,} triggers for one env from {callers} concurrent callers.",
        "",
        "| path | p50 ms | p99 ms | max ms | errors | peak PG conns in use (open) "
        "| all rows in, s | rows |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.1f} | "
            f"{r['errors']} | {r['peak_pg_in_use']} ({r['peak_pg_open']}) | "
            f"{r['all_in_s']:.2f} | {r['rows']:,} |"
        )
    lines.append("")
    for fsync in (False, True):
        group = [r for r in results if r["fsync"] == fsync]
        if not group:
            continue
        a, b = group[0], group[-1]
        better = a["p99_ms"] / b["p99_ms"] if b["p99_ms"] else 0.0
        idle = b["p99_ms"] / b["idle_p99_ms"] if b["idle_p99_ms"] else 0.0
        disk = "fsync on" if fsync else "fsync off"
        lines += [
            f"- Postgres with {disk}: sidecar idle (one caller) p50 {b['idle_p50_ms']:.2f} ms, "
            f"p99 {b['idle_p99_ms']:.2f} ms. Under the burst its callers' p99 is {idle:.1f}x "
            f"the idle p99 (target <= 3x) and {better:.1f}x better than straight to Postgres "
            f"(target >= 5x). {b['buffered']:,} of {total:,} triggers were buffered; callers "
            f"done after {b['callers_s']:.2f} s ({total / b['callers_s']:,.0f} triggers/s, "
            f"straight: {total / a['callers_s']:,.0f}/s); every row in Postgres after "
            f"{b['all_in_s']:.2f} s. Postgres connections in use at peak: "
            f"{b['peak_pg_in_use']} through the sidecar (drain concurrency "
            f"{b['drain_concurrency']}), {a['peak_pg_in_use']} straight. Rows: "
            f"{a['rows']:,} straight, {b['rows']:,} through the sidecar "
            f"({'exactly' if a['rows'] == b['rows'] == total else 'NOT'} {total:,} each). "
            f"Serving process peak RSS: {b['peak_rss_mb']:.0f} MiB.",
        ]
        for r in group[1:-1]:
            lines.append(
                f"- Same run, {r['name']}: p99 {r['p99_ms']:.2f} ms = "
                f"{r['p99_ms'] / r['idle_p99_ms'] if r['idle_p99_ms'] else 0:.1f}x its idle "
                f"p99 ({r['idle_p99_ms']:.2f} ms), "
                f"{a['p99_ms'] / r['p99_ms'] if r['p99_ms'] else 0:.1f}x better than "
                f"straight; all rows in after {r['all_in_s']:.2f} s."
            )
    lines += [
        "",
        "CPU while the callers ran, per trigger (µs), by process (from /proc; the machine "
        f"has {os.cpu_count()} cores):",
        "",
        "| path | " + " | ".join(CPU_KINDS) + " | machine busy | busy share |",
        "| --- |" + " ---: |" * (len(CPU_KINDS) + 2),
    ]
    for r in results:
        cpu = r.get("cpu") or {}
        cells = [f"{cpu.get(k, 0.0) / total * 1e6:,.0f}" for k in CPU_KINDS]
        busy = cpu.get("machine busy", 0.0)
        share = busy / cpu["machine total"] if cpu.get("machine total") else 0.0
        lines.append(
            f"| {r['name']} | " + " | ".join(cells) + f" | {busy / total * 1e6:,.0f} | "
            f"{share:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triggers", type=int, default=20_000)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--chart", default=str(ROOT / "docs" / "burst.png"))
    args = parser.parse_args()
    results = asyncio.run(bench(args.triggers, args.callers))
    print(report(results, args.triggers, args.callers))
    if chart(results, Path(args.chart)):
        print(f"\nchart: {args.chart}")


if __name__ == "__main__":
    main()
