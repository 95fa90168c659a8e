"""Drain benchmark: buffered runs into Postgres, beside a raw COPY and a row loop.

    .venv/bin/python bench/drain.py [--runs 50000] [--loop-runs 10000]

Starts its own redis-server and postgres (mollifier.devstack, fsync off like
the tests), buffers the runs through Buffer.accept, and times:

- COPY: the same rows COPYed into mollifier.runs (the ceiling; rows built
  before the clock starts, so the comparison is conservative);
- one statement per batch: materialize_batch alone, no Redis (the SQL's cost),
  both ways: COPY into a staging table + one INSERT ... SELECT (what the drainer
  uses), and one INSERT ... SELECT FROM unnest(arrays);
- drainer: the built-in drainer, lease -> write -> ack, until the buffer is empty;
- row loop: one INSERT per run, each its own transaction (the seeds' way).

Every method writes into an emptied table, so they are compared on the same rows.
For the drainer it also reports the CPU each process spent per run (this
process's getrusage, Redis's INFO cpu, the postgres processes' /proc times):
on a shared 2-core machine wall times move with other work, CPU much less.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from mollifier_client.v1 import run_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.stores, run as a script

from mollifier.app import App
from mollifier.buffer import depths
from mollifier.codec import now_ms
from mollifier.config import Settings
from mollifier.devstack import PostgresProcess
from mollifier.keys import env_keys
from mollifier.materializer import (
    _ONE_SQL,
    COLUMN_NAMES,
    Entry,
    materialize_batch,
    row_values,
)

ENVS = 10
ORGS = 5


def make_snapshots(n: int) -> list[run_pb2.RunSnapshot]:
    payload = b'{"user":"u_123","order":{"id":"o_456","items":[1,2,3],"total":99.5},"n":%d}'
    out = []
    for i in range(n):
        env = i % ENVS
        out.append(
            run_pb2.RunSnapshot(
                run_id=f"run_bench{i:07d}",
                env_id=f"env_{env}",
                org_id=f"org_{env % ORGS}",
                task_identifier="send-email",
                payload=payload % i,
                payload_type="application/json",
                tags=["bench", f"batch-{i % 7}"],
                metadata=b'{"source":"bench"}',
                metadata_type="application/json",
                queue="task/send-email",
                trace_id="0af7651916cd43dd8448eb211c80319c",
                span_id="b7ad6b7169203331",
                max_attempts=3,
                extra={"region": "eu"},
            )
        )
    return out


async def truncate(app: App) -> None:
    assert app.pool is not None
    async with app.pool.connection() as conn:
        await conn.execute("TRUNCATE mollifier.runs")
        await conn.execute("VACUUM ANALYZE mollifier.runs")


async def count(app: App) -> int:
    assert app.pool is not None
    async with app.pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM mollifier.runs")
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def time_copy(app: App, entries: list[Entry], *, build: bool = False) -> float:
    """COPY the rows; with ``build`` the clock also covers making them from snapshots."""
    assert app.pool is not None
    start = time.perf_counter()
    now = now_ms()
    rows = [row_values(e, now=now) for e in entries]
    cols = ", ".join(COLUMN_NAMES)
    if not build:
        start = time.perf_counter()
    sql = f"COPY mollifier.runs ({cols}) FROM STDIN"
    async with app.pool.connection() as conn, conn.cursor() as cur, cur.copy(sql) as copy:
        for row in rows:
            await copy.write_row(row)
    return time.perf_counter() - start


async def time_batches(app: App, entries: list[Entry], batch: int, method: str) -> float:
    assert app.pool is not None
    start = time.perf_counter()
    for i in range(0, len(entries), batch):
        await materialize_batch(app.pool, entries[i : i + batch], method=method)
    return time.perf_counter() - start


async def time_row_loop(app: App, entries: list[Entry]) -> float:
    assert app.pool is not None
    start = time.perf_counter()
    async with app.pool.connection() as conn:
        for e in entries:
            await conn.execute(_ONE_SQL, row_values(e))
    return time.perf_counter() - start


async def buffer_depth(app: App) -> int:
    found = await depths(app.scripts, app.redis, [f"env_{env}" for env in range(ENVS)])
    return sum(d.total for d in found)


MEMORY: dict[str, float] = {}
CPU: dict[str, float] = {}
SCHED: dict[str, tuple[float, float]] = {}


def _postmaster_pid(pg: PostgresProcess) -> int | None:
    try:
        return int((pg.pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def postgres_cpu_s(pg: PostgresProcess) -> float:
    """User + system CPU seconds of the postmaster and its children (the
    backends); 0.0 when /proc cannot be read."""
    from bench.stores import process_cpu

    root = _postmaster_pid(pg)
    return sum(cpu for pid, ppid, cpu in process_cpu() if root in (pid, ppid))


async def redis_cpu_s(app: App) -> float:
    info = await app.redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def postgres_pids(pg: PostgresProcess) -> list[int]:
    """The postmaster and its children (the backends)."""
    from bench.stores import process_cpu

    root = _postmaster_pid(pg)
    return [pid for pid, ppid, _ in process_cpu() if root in (pid, ppid)]


def schedstat(pids: list[int]) -> dict[int, tuple[int, int]]:
    """(ns running, ns runnable but waiting for a CPU) of each process, all its
    threads together, from /proc/<pid>/task/*/schedstat; processes gone or
    unreadable are left out (a backend that exits during the drain too)."""
    out: dict[int, tuple[int, int]] = {}
    for pid in pids:
        run = wait = 0
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                r, w, _ = (task / "schedstat").read_text().split()
                run, wait = run + int(r), wait + int(w)
        except (OSError, ValueError):
            continue
        out[pid] = (run, wait)
    return out


def sched_delta(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]
) -> tuple[float, float]:
    """Seconds run and waited for a CPU between the two readings (a process
    started in between counts from zero)."""
    run = wait = 0
    for pid, (r, w) in after.items():
        r0, w0 = before.get(pid, (0, 0))
        run, wait = run + r - r0, wait + w - w0
    return run / 1e9, wait / 1e9


class LoopIdle:
    """Time the event loop spends in its selector: waiting for I/O, and also
    (an upper bound, then) waiting for a CPU after the selector's wake-up."""

    def __init__(self) -> None:
        self.idle_s = 0.0
        self._selector: Any = getattr(asyncio.get_running_loop(), "_selector", None)
        self._select: Any = None

    def __enter__(self) -> LoopIdle:
        if self._selector is not None:
            self._select = select = self._selector.select

            def timed(timeout: float | None = None) -> Any:
                start = time.perf_counter()
                try:
                    return select(timeout)
                finally:
                    self.idle_s += time.perf_counter() - start

            self._selector.select = timed
        return self

    def __exit__(self, *exc: object) -> None:
        if self._selector is not None:
            self._selector.select = self._select


def own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def used_memory(app: App) -> int:
    """Redis's used_memory less its clients' buffers: 500 accepts in flight
    leave kilobytes of query and output buffer per connection, which is the
    benchmark's load, not what the buffered runs cost."""
    info = await app.redis.info("memory")
    return int(info["used_memory"]) - int(info.get("mem_clients_normal", 0))


async def time_drain(
    app: App, snaps: list[run_pb2.RunSnapshot], pg: PostgresProcess
) -> tuple[float, float]:
    used_before = await used_memory(app)
    start = time.perf_counter()
    for i in range(0, len(snaps), 500):
        await asyncio.gather(*(app.buffer.accept(s) for s in snaps[i : i + 500]))
    accept_s = time.perf_counter() - start
    assert await buffer_depth(app) == len(snaps)
    # Memory: what the buffered runs cost Redis, against the snapshots' own bytes.
    used_after = await used_memory(app)
    sample = snaps[len(snaps) // 2]
    # One env's runs hash, all of it, per run in it.
    runs_key = env_keys(sample.env_id).runs
    usage = await app.redis.memory_usage(runs_key, samples=0)
    usage = (usage or 0) / max(1, int(await app.redis.hlen(runs_key)))
    MEMORY.update(
        runs=len(snaps),
        snapshot_bytes=sum(s.ByteSize() for s in snaps) / len(snaps),
        used_memory_per_run=(used_after - used_before) / len(snaps),
        hash_memory_usage=float(usage or 0),
    )
    drainer = app.drainer
    drainer.settings = app.settings.replace(drain_enabled=True)
    target = drainer.materialized_total + len(snaps)
    redis_pid = int((await app.redis.info("server"))["process_id"])
    groups = {"drainer": [os.getpid()], "redis": [redis_pid]}
    sched_before = {name: schedstat(pids) for name, pids in groups.items()}
    sched_before["postgres"] = schedstat(postgres_pids(pg))
    cpu_before = (own_cpu_s(), await redis_cpu_s(app), postgres_cpu_s(pg))
    start = time.perf_counter()
    with LoopIdle() as loop_idle:
        drainer.start()
        # Poll the drainer's own counter (no Redis round trips competing with
        # it), then confirm with Redis that the buffer is empty.
        while drainer.materialized_total < target or await buffer_depth(app) > 0:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
    drain_s = time.perf_counter() - start
    cpu_after = (own_cpu_s(), await redis_cpu_s(app), postgres_cpu_s(pg))
    groups["postgres"] = postgres_pids(pg)
    for name, pids in groups.items():
        SCHED[name] = sched_delta(sched_before[name], schedstat(pids))
    SCHED["loop idle"] = (loop_idle.idle_s, drain_s)
    for name, before, after in zip(
        ("drainer", "redis", "postgres"), cpu_before, cpu_after, strict=True
    ):
        CPU[name] = (after - before) / len(snaps) * 1e6
    await drainer.stop(5)
    return accept_s, drain_s


async def main(runs: int, loop_runs: int, **drain: int) -> str:
    """``drain`` overrides settings for the drainer's run (e.g. drain_batch_size)."""
    from bench.stores import own_stores

    async with own_stores() as (redis, pg):
        settings = Settings.from_env(
            {}, redis_url=redis.url, database_url=pg.url, drain_enabled=False, **drain
        )
        app = await App.connect(settings, start_background=False)
        try:
            snaps = make_snapshots(runs)
            entries = [Entry.from_snapshot(s) for s in snaps]
            # The benchmark's own rows (two objects per run, all alive to the
            # end) would otherwise be walked by every full garbage collection,
            # a cost the drain process, which holds none of them, never pays:
            # 30-50 ms per full collection with 20,000 runs, charged to
            # whichever method is being timed. Frozen, they are left alone.
            gc.collect()
            gc.freeze()
            results: list[tuple[str, int, float]] = []

            await truncate(app)
            results.append(("COPY (ceiling)", runs, await time_copy(app, entries)))
            assert await count(app) == runs

            await truncate(app)
            label = "COPY, rows built from snapshots in the clock"
            results.append((label, runs, await time_copy(app, entries, build=True)))
            assert await count(app) == runs

            size = settings.drain_batch_size
            for method, how in (("copy", "COPY (stage on conflict)"), ("unnest", "unnest INSERT")):
                await truncate(app)
                label = f"batch of {size}, {how}, no Redis"
                results.append((label, runs, await time_batches(app, entries, size, method)))
                assert await count(app) == runs

            await truncate(app)
            accept_s, drain_s = await time_drain(app, snaps, pg)
            label = f"drainer (batch {size}, concurrency {settings.drain_concurrency})"
            results.append((label, runs, drain_s))
            assert await count(app) == runs

            await truncate(app)
            loop_n = min(loop_runs, runs)
            label = "one INSERT per run (row loop)"
            results.append((label, loop_n, await time_row_loop(app, entries[:loop_n])))
            assert await count(app) == loop_n
        finally:
            await app.close(grace=1)

    copy_rate = results[0][1] / results[0][2]
    out = [
        f"| {'method':<50} | {'rows':>7} | {'seconds':>8} | {'rows/s':>9} | {'vs COPY':>7} |",
        f"|{'-' * 52}|{'-' * 9}|{'-' * 10}|{'-' * 11}|{'-' * 9}|",
    ]
    drain_ratio = 0.0
    for name, n, secs in results:
        rate = n / secs
        out.append(
            f"| {name:<50} | {n:>7} | {secs:>8.2f} | {rate:>9,.0f} | {rate / copy_rate:>7.2f} |"
        )
        if name.startswith("drainer"):
            drain_ratio = rate / copy_rate
    m = MEMORY
    per_run = m["used_memory_per_run"] / m["snapshot_bytes"]
    out += [
        "",
        f"- Drainer end to end: {drain_ratio:.2f} of the COPY ceiling (target >= 0.5: "
        f"{'meets' if drain_ratio >= 0.5 else 'MISSES'}).",
        f"- Drainer CPU per run: {CPU['drainer']:.1f} us in the drainer's process, "
        f"{CPU['redis']:.1f} us in Redis, {CPU['postgres']:.1f} us in Postgres "
        f"({sum(CPU.values()):.1f} us in all, on {os.cpu_count()} cores).",
        _sched_line(),
        f"- Buffering {runs:,} runs through Buffer.accept: {accept_s:.2f} s "
        f"({runs / accept_s:,.0f} runs/s).",
        f"- Redis memory per buffered run: {m['used_memory_per_run']:,.0f} bytes "
        f"(INFO used_memory less client buffers, delta over {runs:,} runs; "
        f"MEMORY USAGE of one env's runs hash per run: "
        f"{m['hash_memory_usage']:,.0f}) against {m['snapshot_bytes']:,.0f} snapshot bytes: "
        f"{per_run:.2f}x (target <= 1.5x: {'meets' if per_run <= 1.5 else 'MISSES'}).",
    ]
    return "\n".join(out)


def _sched_line() -> str:
    """Where the drain's wall time went: the loop's wait for I/O, and each
    process's time running and waiting for a CPU (/proc/<pid>/schedstat)."""
    idle, wall = SCHED["loop idle"]
    parts = [
        f"{name} {run * 1e3:,.0f} ms running, {wait * 1e3:,.0f} ms waiting"
        for name, (run, wait) in SCHED.items()
        if name != "loop idle"
    ]
    return (
        f"- Drain wall time {wall * 1e3:,.0f} ms on {os.cpu_count()} cores; the drainer's event "
        f"loop was in its selector (waiting for I/O, at most) {idle / wall:.0%} of it; by "
        f"process, running and runnable but waiting for a CPU: {'; '.join(parts)}."
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50_000)
    parser.add_argument("--loop-runs", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, help="MOLLIFIER_DRAIN_BATCH_SIZE to try")
    parser.add_argument("--concurrency", type=int, help="MOLLIFIER_DRAIN_CONCURRENCY to try")
    args = parser.parse_args()
    drain = {
        name: value
        for name, value in (
            ("drain_batch_size", args.batch_size),
            ("drain_concurrency", args.concurrency),
        )
        if value
    }
    print(asyncio.run(main(args.runs, args.loop_runs, **drain)))
