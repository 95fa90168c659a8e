"""`mollifier serve` with the drainer in its own process (and extra gRPC workers).

Real processes throughout: the sidecar is started with `python -m mollifier
serve`, its children are found through /proc, and they are killed for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mollifier.app import App
from mollifier.config import Settings
from mollifier.devstack import free_port
from mollifier.keys import DRAIN_COUNTERS_PREFIX, WRITE_SLOTS
from mollifier.supervisor import DRAIN_COMMAND, WORKER_COMMAND
from mollifier_client.v1 import drain_pb2, drain_pb2_grpc, gate_pb2, gate_pb2_grpc, run_pb2

from tests.fault_helpers import accept_all, buffer_depth, count_rows, snapshots

pytestmark = [pytest.mark.slow]

ENVS = [f"env_p{i}" for i in range(4)]


def children(pid: int) -> dict[int, str]:
    """Child pids of ``pid`` and their command lines."""
    found: dict[int, str] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
                    found[int(child)] = cmd.decode()
    return found


def children_running(pid: int, command: str) -> list[int]:
    return [c for c, cmd in children(pid).items() if command in cmd]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


async def wait_until(pred: Callable[[], Awaitable[bool]], limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not await pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def start_serve(settings: Settings, port: int, **env: str) -> subprocess.Popen[bytes]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MOLLIFIER_")}
    environ |= {
        "MOLLIFIER_REDIS_URL": settings.redis_url,
        "MOLLIFIER_DATABASE_URL": settings.database_url,
        "MOLLIFIER_LISTEN": f"127.0.0.1:{port}",
        "MOLLIFIER_DRAIN_ENABLED": "true",
        "MOLLIFIER_DRAIN_PROCESS": "true",
        "MOLLIFIER_DRAIN_BATCH_SIZE": "100",
        "MOLLIFIER_DRAIN_LEASE_MS": "1500",
        "MOLLIFIER_DRAIN_IDLE_MS": "20",
        "MOLLIFIER_LOG_LEVEL": "INFO",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "mollifier", "serve"],
        env=environ,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def wait_serving(port: int, proc: subprocess.Popen[bytes]) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def serving() -> bool:
            assert proc.poll() is None, "serve exited early"
            try:
                resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError:
                return False
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

        await wait_until(serving, 30, "serve to be healthy")


def stop(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    assert proc.stderr is not None
    return proc.stderr.read().decode()


async def status(port: int) -> drain_pb2.GetStatusResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = drain_pb2_grpc.DrainServiceStub(channel)
        resp: drain_pb2.GetStatusResponse = await stub.GetStatus(
            drain_pb2.GetStatusRequest(), timeout=5
        )
        return resp


async def test_drain_process_materializes_reports_and_stops_on_sigterm(settings: Settings) -> None:
    app = await App.connect(settings, start_background=False)  # also migrates
    port, metrics_port = free_port(), free_port()
    proc = start_serve(settings, port, MOLLIFIER_METRICS_LISTEN=f"127.0.0.1:{metrics_port}")
    try:
        await wait_serving(port, proc)
        drains = children_running(proc.pid, DRAIN_COMMAND)
        assert len(drains) == 1, children(proc.pid)
        await accept_all(app, snapshots(1500, "a", ENVS))

        async def drained() -> bool:
            return await buffer_depth(app.redis, ENVS) == 0

        await wait_until(drained, 60, "the drain process to empty the buffer")
        assert count_rows(settings.database_url) == 1500

        # The serving process reports the drain process's work (published to Redis).
        async def counted() -> bool:
            return (await status(port)).materialized_total == 1500

        await wait_until(counted, 10, "GetStatus to count the drain process's rows")
        assert await app.redis.keys(DRAIN_COUNTERS_PREFIX + "*")
        text = await asyncio.to_thread(scrape, f"http://127.0.0.1:{metrics_port}/metrics")
        assert 'mollifier_drain_runs_total{outcome="materialized"} 1500.0' in text
        assert "mollifier_drain_batch_seconds_count" in text
        assert "mollifier_drain_batch_seconds_count 0.0" not in text

        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
        assert code == 0
        assert not alive(drains[0]), "the drain process outlived serve"
    finally:
        logs = stop(proc)
        await app.close(grace=1)
    assert "drain process stopped" in logs


async def test_sigterm_mid_drain_stops_both_within_the_grace(settings: Settings) -> None:
    app = await App.connect(settings, start_background=False)
    port = free_port()
    grace_ms = 2000
    # Slow drain: batches are in flight when SIGTERM lands.
    proc = start_serve(
        settings,
        port,
        MOLLIFIER_DRAIN_RATE_PER_SEC="1000",
        MOLLIFIER_SHUTDOWN_GRACE_MS=str(grace_ms),
    )
    try:
        await accept_all(app, snapshots(4000, "s", ENVS))
        await wait_serving(port, proc)
        drains = children_running(proc.pid, DRAIN_COMMAND)
        assert len(drains) == 1

        async def started() -> bool:
            return count_rows(settings.database_url) >= 300

        await wait_until(started, 30, "the drain to start")
        proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        code = await asyncio.to_thread(proc.wait, grace_ms / 1000 + 10)
        took = time.monotonic() - began
        assert code == 0
        # The grace plus interpreter start-up slack, not the grace twice.
        assert took < grace_ms / 1000 + 2.5, took
        assert not alive(drains[0])
        assert await buffer_depth(app.redis, ENVS) > 0, (
            "the buffer emptied before SIGTERM; slow it down"
        )
    finally:
        stop(proc)
        await app.close(grace=1)


async def test_killed_drain_process_is_restarted_and_the_buffer_drains(
    settings: Settings,
) -> None:
    app = await App.connect(settings, start_background=False)
    port = free_port()
    proc = start_serve(settings, port, MOLLIFIER_DRAIN_RATE_PER_SEC="1000")
    try:
        await accept_all(app, snapshots(5000, "k", ENVS))
        await wait_serving(port, proc)
        first = children_running(proc.pid, DRAIN_COMMAND)
        assert len(first) == 1

        async def started() -> bool:
            return count_rows(settings.database_url) >= 500

        await wait_until(started, 30, "the drain to start")
        os.kill(first[0], signal.SIGKILL)

        async def restarted() -> bool:
            now = children_running(proc.pid, DRAIN_COMMAND)
            return len(now) == 1 and now[0] != first[0] and alive(now[0])

        await wait_until(restarted, 20, "serve to restart the drain process")
        assert await buffer_depth(app.redis, ENVS) > 0, (
            "the drain finished before the kill; slow it down"
        )

        async def drained() -> bool:
            return await buffer_depth(app.redis, ENVS) == 0

        await wait_until(drained, 90, "the restarted drain process to empty the buffer")
        assert count_rows(settings.database_url) == 5000
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        logs = stop(proc)
        await app.close(grace=1)
    assert "child process exited unexpectedly; restarting" in logs


async def test_a_killed_drain_process_s_slots_lapse_and_nothing_is_lost(
    settings: Settings,
) -> None:
    """SIGKILL while every drain batch holds a write slot (Postgres's runs table
    locked, so they wait mid-write): the dead holder's slots block writers only
    until their lease runs out, the restarted drain process never holds more
    than the budget beside them, and every run lands once."""
    app = await App.connect(settings, start_background=False)  # also migrates
    port = free_port()
    locker = await psycopg.AsyncConnection.connect(settings.database_url)
    await locker.execute("LOCK TABLE mollifier.runs IN ACCESS EXCLUSIVE MODE")
    # Buffered before the drain starts, so its first tick finds every env.
    await accept_all(app, snapshots(400, "z", ENVS))
    # Two slots: two batches of the four envs' are sure to be waiting at once.
    proc = start_serve(settings, port, MOLLIFIER_WRITE_SLOTS="2")
    most_held = 0
    try:
        await wait_serving(port, proc)
        first = children_running(proc.pid, DRAIN_COMMAND)

        async def all_held() -> bool:
            return int(await app.redis.zcard(WRITE_SLOTS)) == 2

        await wait_until(all_held, 20, "the drain's batches to hold every slot")
        os.kill(first[0], signal.SIGKILL)
        killed_at = time.monotonic()

        # Meanwhile a write-through run finds no slot it may take: buffered.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            gate = gate_pb2_grpc.GateServiceStub(channel)
            out = await gate.Trigger(
                gate_pb2.TriggerRequest(
                    env_id="env_px",  # no backlog of its own
                    org_id="org_p",
                    task_identifier="task-p",
                    org_feature_flags={"mollifierEnabled": True},
                    snapshot=run_pb2.RunSnapshot(run_id="run_p_busy", payload=b"{}"),
                    write_through=True,
                ),
                timeout=10,
            )
        assert out.reason == gate_pb2.DECISION_REASON_POSTGRES_BUSY
        assert out.run.source == run_pb2.RUN_SOURCE_BUFFER

        async def restarted_and_lapsed() -> bool:
            nonlocal most_held
            most_held = max(most_held, int(await app.redis.zcard(WRITE_SLOTS)))
            now = children_running(proc.pid, DRAIN_COMMAND)
            return bool(now) and now[0] != first[0] and time.monotonic() - killed_at > 6

        # Past DRAIN_SLOT_LEASE_MS: the dead process's slots are gone, the new
        # one's batches hold them (still waiting on the lock).
        await wait_until(restarted_and_lapsed, 30, "the restart and the slots' lapse")
        assert int(await app.redis.zcard(WRITE_SLOTS)) <= 2
        await locker.rollback()

        async def drained() -> bool:
            nonlocal most_held
            most_held = max(most_held, int(await app.redis.zcard(WRITE_SLOTS)))
            return await buffer_depth(app.redis, [*ENVS, "env_px"]) == 0

        await wait_until(drained, 60, "the restarted drain process to empty the buffer")
        assert count_rows(settings.database_url) == 401
        assert most_held <= 2
    finally:
        await locker.close()
        logs = stop(proc)
        await app.close(grace=1)
    assert "child process exited unexpectedly; restarting" in logs


async def test_workers_share_one_port(settings: Settings) -> None:
    port = free_port()
    proc = start_serve(settings, port, MOLLIFIER_WORKERS="3")
    try:
        await wait_serving(port, proc)

        async def all_up() -> bool:
            return len(children_running(proc.pid, WORKER_COMMAND)) == 2

        await wait_until(all_up, 30, "two extra workers")
        workers = children_running(proc.pid, WORKER_COMMAND)
        assert len(children_running(proc.pid, DRAIN_COMMAND)) == 1
        # Fresh connections are spread over the processes by the kernel; every
        # one of them answers.
        request = gate_pb2.EvaluateRequest(env_id="env_w", org_id="org_w", task_identifier="t")
        for _ in range(12):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                resp = await gate_pb2_grpc.GateServiceStub(channel).Evaluate(request, timeout=10)
                assert resp.decision == gate_pb2.DECISION_PASS_THROUGH
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
        assert not any(alive(w) for w in workers)
    finally:
        stop(proc)


def test_workers_need_a_fixed_port() -> None:
    from mollifier.config import ConfigError

    with pytest.raises(ConfigError, match="MOLLIFIER_WORKERS"):
        Settings.from_env({}, listen="127.0.0.1:0", workers=2)
