"""Soak: mixed traffic across 50 orgs and 500 envs for N minutes, then a count.

    .venv/bin/python bench/soak.py                 # 10 minutes
    .venv/bin/python bench/soak.py --minutes 3     # shorter
    .venv/bin/python bench/soak.py --minutes 3 --write-doc   # also docs/reliability.md

Starts its own redis-server and postgres (mollifier.devstack) and one
`mollifier serve` subprocess with the built-in drainer on, then runs, all at
once, over gRPC:

- triggers (write_through, so every OK answer is a run that must exist): most
  envs trickle under the trip threshold (straight to Postgres), five of them
  at a time (rotating every 10 s) burst over it (buffered, then drained);
- mutations: AddTags with a unique tag per call on runs already answered for,
  and UpdateMetadata increments, each retried with its request id on a
  retryable error;
- reads: GetRun, ListRuns, GetEnvState and DrainService.GetStatus.

Every 10 s it samples the sidecar's RSS (/proc/<pid>/status), Redis's client
count (CLIENT LIST), Postgres's connections (pg_stat_activity) and the buffer's
depth. At the end it stops the traffic, waits for the buffer to drain and
checks that every run answered for is in mollifier.runs exactly once and every
acknowledged tag is in its row. Exit status 1 when anything was lost or grew.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import redis.asyncio as aioredis
from mollifier_client.v1 import (
    buffer_pb2,
    buffer_pb2_grpc,
    drain_pb2,
    drain_pb2_grpc,
    gate_pb2,
    gate_pb2_grpc,
    mutate_pb2,
    mutate_pb2_grpc,
    run_pb2,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from mollifier.devstack import PostgresProcess, RedisProcess, free_port

ORGS = 50
ENVS = 500
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def env_of(i: int) -> tuple[str, str]:
    return f"env_s{i:03d}", f"org_s{i % ORGS:02d}"


@dataclass
class Stats:
    acked: dict[str, str] = field(default_factory=dict)  # run id -> env
    tags: dict[str, set[str]] = field(default_factory=dict)
    triggers: int = 0
    buffered: int = 0
    mutations: int = 0
    reads: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    trigger_latency: list[float] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def error(self, where: str, code: grpc.StatusCode) -> None:
        key = f"{where}:{code.name}"
        self.errors[key] = self.errors.get(key, 0) + 1


class Traffic:
    def __init__(self, address: str, stats: Stats, seconds: float) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.gate = gate_pb2_grpc.GateServiceStub(self.channel)
        self.buffer = buffer_pb2_grpc.BufferServiceStub(self.channel)
        self.mutate = mutate_pb2_grpc.MutateServiceStub(self.channel)
        self.drain = drain_pb2_grpc.DrainServiceStub(self.channel)
        self.stats = stats
        self.end = time.monotonic() + seconds
        self.ids = iter(range(10**12))
        self.recent: list[str] = []

    def running(self) -> bool:
        return time.monotonic() < self.end

    def hot(self) -> set[int]:
        """Five envs (of five orgs) burst at a time; which five rotates every 10 s."""
        phase = int(time.monotonic() // 10) % 100
        return {i for i in range(ENVS) if i % 100 == phase}

    async def triggers(self, w: int) -> None:
        rnd = random.Random(w)
        while self.running():
            hot = self.hot()
            i = rnd.choice(sorted(hot)) if rnd.random() < 0.7 else rnd.randrange(ENVS)
            env, org = env_of(i)
            run_id = f"run_s{next(self.ids)}"
            started = time.monotonic()
            try:
                resp = await self.gate.Trigger(
                    gate_pb2.TriggerRequest(
                        env_id=env,
                        org_id=org,
                        task_identifier="task-soak",
                        org_feature_flags={"mollifierEnabled": True},
                        write_through=True,
                        snapshot=run_pb2.RunSnapshot(
                            run_id=run_id,
                            payload=b'{"order":{"id":"o_1","items":[1,2,3]},"n":%d}' % w,
                            metadata=b'{"n":0}',
                        ),
                    ),
                    timeout=10,
                )
            except grpc.aio.AioRpcError as exc:
                self.stats.error("trigger", exc.code())
                await asyncio.sleep(0.05)
                continue
            self.stats.trigger_latency.append(time.monotonic() - started)
            self.stats.triggers += 1
            if resp.run.source == run_pb2.RUN_SOURCE_BUFFER:
                self.stats.buffered += 1
            self.stats.acked[run_id] = env
            self.recent.append(run_id)
            if len(self.recent) > 5000:
                del self.recent[:1000]

    async def mutations(self, w: int) -> None:
        rnd = random.Random(1000 + w)
        while self.running():
            if not self.recent:
                await asyncio.sleep(0.05)
                continue
            run_id = rnd.choice(self.recent)
            env = self.stats.acked[run_id]
            n = next(self.ids)
            req_id = f"req_s{n}"
            tag = f"t{n}"
            for _ in range(50):
                try:
                    if n % 2:
                        await self.mutate.AddTags(
                            mutate_pb2.AddTagsRequest(
                                env_id=env, run_id=run_id, request_id=req_id, tags=[tag]
                            ),
                            timeout=10,
                        )
                        self.stats.tags.setdefault(run_id, set()).add(tag)
                    else:
                        await self.mutate.UpdateMetadata(
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
                    self.stats.mutations += 1
                    break
                except grpc.aio.AioRpcError as exc:
                    self.stats.error("mutate", exc.code())
                    if (
                        exc.code() not in RETRYABLE
                        and exc.code() != grpc.StatusCode.INVALID_ARGUMENT
                    ):
                        break
                    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        break  # e.g. the run reached its tag limit
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.01)

    async def reads(self, w: int) -> None:
        rnd = random.Random(2000 + w)
        while self.running():
            try:
                k = rnd.random()
                if k < 0.6 and self.recent:
                    run_id = rnd.choice(self.recent)
                    await self.buffer.GetRun(
                        buffer_pb2.GetRunRequest(env_id=self.stats.acked[run_id], run_id=run_id),
                        timeout=10,
                    )
                elif k < 0.8:
                    await self.buffer.ListRuns(
                        buffer_pb2.ListRunsRequest(
                            env_id=env_of(rnd.randrange(ENVS))[0], page_size=50
                        ),
                        timeout=10,
                    )
                elif k < 0.95:
                    await self.gate.GetEnvState(
                        gate_pb2.GetEnvStateRequest(env_id=env_of(rnd.randrange(ENVS))[0]),
                        timeout=10,
                    )
                else:
                    await self.drain.GetStatus(drain_pb2.GetStatusRequest(), timeout=10)
                self.stats.reads += 1
            except grpc.aio.AioRpcError as exc:
                self.stats.error("read", exc.code())
            await asyncio.sleep(0.005)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def sample(
    stats: Stats, pid: int, redis: aioredis.Redis, pg_url: str, started: float
) -> dict[str, Any]:
    clients = await redis.client_list()
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE application_name <> 'soak-probe'), "
            "(SELECT count(*) FROM mollifier.runs) FROM pg_stat_activity "
            "WHERE datname = current_database()"
        ).fetchone()
        assert row is not None
    depth = 0
    async for key in redis.scan_iter(match="mf:{*}:q?", count=1000):
        name = key.decode()
        if name.endswith(":ql"):
            depth += int(await redis.llen(key))
        elif name.endswith(":qb"):
            depth += int(await redis.zcard(key))
    s = {
        "t": round(time.monotonic() - started),
        "rss_mb": round(rss_mb(pid), 1),
        "redis_clients": len(clients),
        "pg_connections": int(row[0]),
        "rows": int(row[1]),
        "buffered": depth,
        "triggers": stats.triggers,
        "mutations": stats.mutations,
        "reads": stats.reads,
    }
    stats.samples.append(s)
    print(json.dumps(s), flush=True)
    return s


async def soak(args: argparse.Namespace) -> int:
    folder = Path(tempfile.mkdtemp(prefix="mollifier-soak-"))
    # Its own folder: postgres may run as another user (see devstack).
    pg_folder = Path(tempfile.mkdtemp(prefix="mollifier-soak-pg-"))
    redis_server = RedisProcess(folder / "redis")
    pg = PostgresProcess(pg_folder)
    redis_server.start()
    try:
        pg.start()
    except BaseException:
        redis_server.stop()
        raise
    pg_url = pg.url + "?application_name=soak-probe" if "?" not in pg.url else pg.url
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "MOLLIFIER_REDIS_URL": redis_server.url,
        "MOLLIFIER_DATABASE_URL": pg.url,
        "MOLLIFIER_LISTEN": address,
        "MOLLIFIER_TRIP_THRESHOLD": str(args.threshold),
        "MOLLIFIER_LOG_LEVEL": "WARNING",
        "MOLLIFIER_MAX_TAGS": "1000",
    }
    log = open(folder / "sidecar.log", "wb")  # noqa: SIM115, ASYNC230 - closed in finally
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before any traffic
        [sys.executable, "-m", "mollifier", "serve"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    redis = aioredis.Redis.from_url(redis_server.url)
    stats = Stats()
    seconds = args.minutes * 60
    status = 0
    try:
        channel = grpc.aio.insecure_channel(address)
        await asyncio.wait_for(channel.channel_ready(), 30)
        await channel.close(None)
        traffic = Traffic(address, stats, seconds)
        started = time.monotonic()
        print(f"soak: {args.minutes} min, {ORGS} orgs, {ENVS} envs, sidecar pid {proc.pid}")
        workers = [
            *(traffic.triggers(w) for w in range(args.trigger_workers)),
            *(traffic.mutations(w) for w in range(args.mutation_workers)),
            *(traffic.reads(w) for w in range(args.read_workers)),
        ]

        async def sampler() -> None:
            while traffic.running():
                await sample(stats, proc.pid, redis, pg_url, started)
                await asyncio.sleep(10)

        await asyncio.gather(sampler(), *workers)
        print("traffic stopped; draining")
        deadline = time.monotonic() + 300
        while True:
            depth = 0
            async for key in redis.scan_iter(match="mf:{*}:*", count=1000):
                name = key.decode()
                if name.endswith(":ql"):
                    depth += int(await redis.llen(key))
                elif name.endswith((":qb", ":lease", ":retry", ":failed")):
                    depth += int(await redis.zcard(key))
            if depth == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        final = await sample(stats, proc.pid, redis, pg_url, started)
        await traffic.channel.close(None)

        # -- the count ---------------------------------------------------------
        with psycopg.connect(pg.url) as conn:
            found = {
                r[0]: (int(r[1]), set(r[2] or []))
                for r in conn.execute(
                    "SELECT run_id, count(*) OVER (PARTITION BY run_id), tags FROM mollifier.runs"
                ).fetchall()
            }
        missing = [r for r in stats.acked if r not in found]
        doubled = [r for r, (n, _) in found.items() if n > 1]
        lost_tags = sum(len(t - found.get(r, (0, set()))[1]) for r, t in stats.tags.items())
        warm = [s for s in stats.samples if s["t"] >= min(60, seconds / 3)]
        first, last = (warm[0], warm[-2]) if len(warm) >= 3 else (stats.samples[0], final)
        lat = sorted(stats.trigger_latency) or [0.0]
        result = {
            "minutes": args.minutes,
            "triggers": stats.triggers,
            "buffered": stats.buffered,
            "mutations": stats.mutations,
            "reads": stats.reads,
            "trigger_rate_per_s": round(stats.triggers / seconds),
            "trigger_p50_ms": round(lat[len(lat) // 2] * 1000, 1),
            "trigger_p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 1),
            "errors": stats.errors,
            "missing": len(missing),
            "doubled": len(doubled),
            "lost_tags": lost_tags,
            "rss_mb_after_warmup": first["rss_mb"],
            "rss_mb_end_of_traffic": last["rss_mb"],
            "rss_mb_median": statistics.median(s["rss_mb"] for s in stats.samples),
            "redis_clients_max": max(s["redis_clients"] for s in stats.samples),
            "redis_clients_end": final["redis_clients"],
            "pg_connections_max": max(s["pg_connections"] for s in stats.samples),
            "pg_connections_end": final["pg_connections"],
            "rows": final["rows"],
            "buffered_at_end": final["buffered"],
        }
        print(json.dumps(result, indent=2))
        grew = last["rss_mb"] > first["rss_mb"] * 1.5 + 20
        if missing or doubled or lost_tags or final["buffered"] or grew:
            print("SOAK FAILED", file=sys.stderr)
            status = 1
        if args.write_doc:
            write_doc(result, stats.samples, args)
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        if proc.poll() is None:
            proc.kill()
        log.close()
        await redis.aclose()
        redis_server.stop()
        pg.stop()
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(pg_folder, ignore_errors=True)
    return status


def write_doc(
    result: dict[str, Any], samples: list[dict[str, Any]], args: argparse.Namespace
) -> None:
    path = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
    text = path.read_text() if path.exists() else ""
    marker = "<!-- soak results -->"
    rows = "\n".join(
        f"| {s['t']} | {s['rss_mb']} | {s['redis_clients']} | {s['pg_connections']} | "
        f"{s['buffered']} | {s['rows']} | {s['triggers']} | {s['mutations']} | {s['reads']} |"
        for s in samples
    )
    rss = f"{result['rss_mb_after_warmup']} MB → {result['rss_mb_end_of_traffic']} MB"
    redis_clients = f"{result['redis_clients_max']} / {result['redis_clients_end']}"
    pg_conns = f"{result['pg_connections_max']} / {result['pg_connections_end']}"
    errors = json.dumps(result["errors"]) if result["errors"] else "none"
    block = f"""{marker}
Command: `.venv/bin/python bench/soak.py --minutes {args.minutes} --write-doc`
({args.trigger_workers} trigger, {args.mutation_workers} mutation and {args.read_workers} read
workers; trip threshold {args.threshold}/s; one sidecar, one Redis, one Postgres on one machine).

| figure | value |
|---|---|
| triggers answered (write-through) | {result["triggers"]} ({result["trigger_rate_per_s"]}/s) |
| of which buffered | {result["buffered"]} |
| trigger latency p50 / p99 | {result["trigger_p50_ms"]} ms / {result["trigger_p99_ms"]} ms |
| mutations acknowledged | {result["mutations"]} |
| reads | {result["reads"]} |
| runs missing / doubled in Postgres | {result["missing"]} / {result["doubled"]} |
| acknowledged tags missing from rows | {result["lost_tags"]} |
| buffered after the final drain | {result["buffered_at_end"]} |
| sidecar RSS after warm-up → end of traffic | {rss} |
| Redis clients (max / end) | {redis_clients} |
| Postgres connections (max / end) | {pg_conns} |
| errors answered (by call and code) | {errors} |

Samples (every 10 s; the last after traffic stopped and the buffer drained):

| t (s) | RSS MB | Redis clients | PG conns | buffered | rows | triggers | mutations | reads |
|---|---|---|---|---|---|---|---|---|
{rows}
<!-- end soak results -->"""
    if marker in text:
        head, _, rest = text.partition(marker)
        _, _, tail = rest.partition("<!-- end soak results -->")
        text = head + block + tail
    else:
        text = text + "\n" + block + "\n"
    path.write_text(text)
    print(f"wrote {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--threshold", type=int, default=20, help="trip threshold per env per second")
    p.add_argument("--trigger-workers", type=int, default=48)
    p.add_argument("--mutation-workers", type=int, default=8)
    p.add_argument("--read-workers", type=int, default=8)
    p.add_argument(
        "--write-doc", action="store_true", help="write the figures to docs/reliability.md"
    )
    return asyncio.run(soak(p.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
