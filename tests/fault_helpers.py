"""Helpers shared by the fault and soak tests: a `mollifier serve` subprocess, a
burst of Trigger calls that records what the client was told, and the checks
that every acknowledged run is in Postgres exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
from mollifier.devstack import free_port
from mollifier.keys import env_keys
from mollifier_client.v1 import (
    buffer_pb2_grpc,
    drain_pb2_grpc,
    gate_pb2,
    gate_pb2_grpc,
    mutate_pb2_grpc,
    run_pb2,
)

from tests.entries import env_depth, set_members

OK_DECISIONS = (
    gate_pb2.DECISION_PASS_THROUGH,
    gate_pb2.DECISION_SHADOW_LOG,
    gate_pb2.DECISION_MOLLIFY,
)


class Sidecar:
    """A `mollifier serve` subprocess on a free port, with stubs on a channel."""

    def __init__(self, redis_url: str, database_url: str, **env: str) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        environ = {
            **os.environ,
            "MOLLIFIER_REDIS_URL": redis_url,
            "MOLLIFIER_DATABASE_URL": database_url,
            "MOLLIFIER_LISTEN": self.address,
            "MOLLIFIER_DRAIN_ENABLED": "true",
            "MOLLIFIER_DRAIN_BATCH_SIZE": "100",
            "MOLLIFIER_DRAIN_LEASE_MS": "1500",
            "MOLLIFIER_DRAIN_IDLE_MS": "20",
            "MOLLIFIER_DRAIN_BACKOFF_MS": "50",
            "MOLLIFIER_TRIP_THRESHOLD": "5",
            "MOLLIFIER_LOG_LEVEL": "ERROR",
            **env,
        }
        self.orphans: list[int] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mollifier", "serve"],
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        self.channel = grpc.aio.insecure_channel(self.address)
        self.gate = gate_pb2_grpc.GateServiceStub(self.channel)
        self.buffer = buffer_pb2_grpc.BufferServiceStub(self.channel)
        self.mutate = mutate_pb2_grpc.MutateServiceStub(self.channel)
        self.drain = drain_pb2_grpc.DrainServiceStub(self.channel)

    async def ready(self, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while True:
            assert self.proc.poll() is None, f"sidecar exited with {self.proc.returncode}"
            try:
                await asyncio.wait_for(self.channel.channel_ready(), 0.5)
                return
            except TimeoutError:
                assert time.monotonic() < deadline, "the sidecar did not start"

    def children(self) -> list[int]:
        """Pids of this sidecar's child processes (the drain process, workers)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    found.append(int(entry.name))
        return found

    def kill(self) -> None:
        """SIGKILL serve alone; its children must notice and stop by themselves."""
        self.orphans.extend(self.children())
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def no_orphans(self, within: float = 20) -> None:
        """The children of a killed serve exit by themselves (leftovers are
        SIGKILLed, then reported: an orphan drainer must never run on)."""
        deadline = time.monotonic() + within
        while _running(self.orphans):
            if time.monotonic() > deadline:
                left = _running(self.orphans)
                for p in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGKILL)
                raise AssertionError(f"children of a killed serve still running: {left}")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        await self.no_orphans()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        await self.channel.close(None)


def _running(pids: Sequence[int]) -> list[int]:
    return [p for p in pids if Path(f"/proc/{p}").exists()]


@dataclass
class Burst:
    """What a burst of triggers was told: acknowledged run ids, errors, latencies."""

    acked: set[str] = field(default_factory=set)
    errors: dict[str, int] = field(default_factory=dict)
    decisions: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    sent: int = 0

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


def trigger_request(run_id: str, env_id: str, org_id: str) -> gate_pb2.TriggerRequest:
    return gate_pb2.TriggerRequest(
        env_id=env_id,
        org_id=org_id,
        task_identifier="task-f",
        org_feature_flags={"mollifierEnabled": True},
        write_through=True,
        snapshot=run_pb2.RunSnapshot(run_id=run_id, payload=b'{"x":1}'),
    )


async def trigger_burst(
    stub_of: Callable[[], Any],
    burst: Burst,
    stop: asyncio.Event,
    *,
    prefix: str,
    envs: Sequence[str],
    workers: int = 16,
    deadline_s: float = 5.0,
    pause_s: float = 0.0,
) -> None:
    """Workers send Trigger (write_through) until ``stop``; a run the client was
    answered for (OK, any decision) is recorded as acknowledged."""
    counter = iter(range(10**9))

    async def worker(w: int) -> None:
        while not stop.is_set():
            n = next(counter)
            run_id = f"run_{prefix}{n}"
            env = envs[n % len(envs)]
            burst.sent += 1
            started = time.monotonic()
            try:
                resp = await stub_of().Trigger(
                    trigger_request(run_id, env, f"org_{env}"), timeout=deadline_s
                )
            except grpc.aio.AioRpcError as exc:
                burst.error(exc.code().name)
                await asyncio.sleep(0.02)
                continue
            burst.latencies.append(time.monotonic() - started)
            burst.decisions[resp.decision] = burst.decisions.get(resp.decision, 0) + 1
            assert resp.run.run_id == run_id, resp
            burst.acked.add(run_id)
            if pause_s:
                await asyncio.sleep(pause_s * random.random())

    await asyncio.gather(*(worker(w) for w in range(workers)))


def rows(database_url: str, run_ids: Sequence[str] | None = None) -> dict[str, int]:
    """run_id -> number of rows (the whole table when no ids are given)."""
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        if run_ids is None:
            found = conn.execute(
                "SELECT run_id, count(*) FROM mollifier.runs GROUP BY run_id"
            ).fetchall()
        else:
            found = conn.execute(
                "SELECT run_id, count(*) FROM mollifier.runs WHERE run_id = ANY(%s) "
                "GROUP BY run_id",
                (list(run_ids),),
            ).fetchall()
    return {r[0]: int(r[1]) for r in found}


async def buffer_depth(redis: Any, envs: Sequence[str]) -> int:
    total = 0
    for env in envs:
        total += await env_depth(redis, env)
    return total


async def wait_drained(redis: Any, envs: Sequence[str], within: float = 60) -> None:
    deadline = time.monotonic() + within
    while (depth := await buffer_depth(redis, envs)) > 0:
        assert time.monotonic() < deadline, f"{depth} runs still buffered"
        await asyncio.sleep(0.1)


def assert_exactly_once(database_url: str, acked: set[str]) -> None:
    """Every acknowledged run has one row; no run id has two (the table as a whole)."""
    found = rows(database_url, sorted(acked))
    missing = acked - set(found)
    assert not missing, f"{len(missing)} acknowledged runs lost, e.g. {sorted(missing)[:5]}"
    everything = rows(database_url)
    doubled = {r: n for r, n in everything.items() if n != 1}
    assert not doubled, f"runs created twice: {doubled}"


async def assert_buffer_consistent(redis: Any, envs: Sequence[str]) -> None:
    """Every entry is in exactly one of queue/back/lease/retry/failed and back."""
    for env in envs:
        where = await set_members(redis, env)
        hashes = {raw.decode() for raw in await redis.hkeys(env_keys(env).runs)}
        doubled = {r: w for r, w in where.items() if len(w) > 1}
        assert not doubled, f"{env}: runs in two sets: {doubled}"
        assert set(where) == hashes, (
            f"{env}: sets without hash {sorted(set(where) - hashes)[:5]}, "
            f"hash without set {sorted(hashes - set(where))[:5]}"
        )


async def stop_after(stop: asyncio.Event, seconds: float) -> None:
    await asyncio.sleep(seconds)
    stop.set()


@contextlib.asynccontextmanager
async def sidecar_proc(redis_url: str, database_url: str, **env: str) -> Any:
    s = Sidecar(redis_url, database_url, **env)
    try:
        await s.ready()
        yield s
    finally:
        await s.close()


def snapshots(n: int, tag: str, envs: Sequence[str]) -> list[run_pb2.RunSnapshot]:
    """``n`` runs spread over ``envs`` and two orgs, ids ``run_<tag><i>``."""
    return [
        run_pb2.RunSnapshot(
            run_id=f"run_{tag}{i}",
            env_id=envs[i % len(envs)],
            org_id=f"org_{tag}{i % 2}",
            task_identifier="task-1",
            payload=b'{"i":%d}' % i,
        )
        for i in range(n)
    ]


async def accept_all(app: Any, items: Sequence[run_pb2.RunSnapshot]) -> None:
    """Buffer the runs through Buffer.accept, 250 at a time."""
    for i in range(0, len(items), 250):
        await asyncio.gather(*(app.buffer.accept(s) for s in items[i : i + 250]))


def count_rows(database_url: str) -> int:
    """Rows in mollifier.runs (run ids key the table: a duplicate cannot hide)."""
    with psycopg.connect(database_url, connect_timeout=2) as conn:
        row = conn.execute("SELECT count(*) FROM mollifier.runs").fetchone()
        assert row is not None
        return int(row[0])
