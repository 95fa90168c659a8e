"""The drainer under faults: the sidecar SIGKILLed mid-drain, Postgres stopped
mid-drain. Real processes, nothing mocked."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import psycopg
import pytest
from mollifier.app import App
from mollifier.config import Settings
from mollifier.devstack import PostgresProcess, free_port
from mollifier.keys import env_keys

from tests.fault_helpers import accept_all, buffer_depth, count_rows, snapshots

pytestmark = [pytest.mark.fault, pytest.mark.slow]

ENVS = [f"env_k{i}" for i in range(4)]


def start_sidecar(redis_url: str, database_url: str, **env: str) -> subprocess.Popen[bytes]:
    environ = {
        **os.environ,
        "MOLLIFIER_REDIS_URL": redis_url,
        "MOLLIFIER_DATABASE_URL": database_url,
        "MOLLIFIER_LISTEN": f"127.0.0.1:{free_port()}",
        "MOLLIFIER_DRAIN_ENABLED": "true",
        "MOLLIFIER_DRAIN_BATCH_SIZE": "100",
        "MOLLIFIER_DRAIN_LEASE_MS": "1500",
        "MOLLIFIER_DRAIN_IDLE_MS": "20",
        "MOLLIFIER_LOG_LEVEL": "WARNING",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "mollifier", "serve"],
        env=environ,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def test_sidecar_killed_mid_drain_loses_and_duplicates_nothing(settings: Settings) -> None:
    app = await App.connect(settings, start_background=False)  # also migrates
    try:
        await accept_all(app, snapshots(5000, "k", ENVS))
        assert await buffer_depth(app.redis, ENVS) == 5000
        # Slowed to ~2,500 rows/s so the kill lands mid-drain.
        proc = start_sidecar(
            settings.redis_url, settings.database_url, MOLLIFIER_DRAIN_RATE_PER_SEC="2500"
        )
        try:
            wait_for(lambda: count_rows(settings.database_url) >= 1000, 30, "the drain to start")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        mid = count_rows(settings.database_url)
        assert mid < 5000, "the drain finished before the kill; slow it down"
        assert await buffer_depth(app.redis, ENVS) > 0
        proc = start_sidecar(settings.redis_url, settings.database_url)
        try:

            async def drained() -> bool:
                return await buffer_depth(app.redis, ENVS) == 0

            deadline = time.monotonic() + 60
            while not await drained():
                assert time.monotonic() < deadline, "the restarted sidecar did not finish"
                await asyncio.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
            if proc.poll() is None:
                proc.kill()
        assert count_rows(settings.database_url) == 5000
        with psycopg.connect(settings.database_url) as conn:
            row = conn.execute(
                "SELECT count(DISTINCT run_id), count(*) FILTER (WHERE status <> 'PENDING') "
                "FROM mollifier.runs"
            ).fetchone()
        assert row == (5000, 0)
        assert [await app.redis.hlen(env_keys(e).runs) for e in ENVS] == [0] * len(ENVS)
    finally:
        await app.close(grace=1)


async def test_postgres_stopped_mid_drain_every_run_lands(
    redis_url: str, pg_factory: Callable[[], PostgresProcess]
) -> None:
    pg = pg_factory()
    settings = Settings.from_env(
        {},
        redis_url=redis_url,
        database_url=pg.url,
        drain_enabled=False,
        drain_batch_size=50,
        drain_lease_ms=5000,
        drain_rate_per_sec=1000,
        drain_idle_ms=20,
    )
    app = await App.connect(settings, start_background=False)
    try:
        await accept_all(app, snapshots(2000, "p", ENVS))
        drainer = app.drainer
        drainer.settings = settings.replace(drain_enabled=True)
        drainer.start()
        await asyncio.to_thread(wait_for, lambda: count_rows(pg.url) >= 300, 30, "rows")
        await asyncio.to_thread(pg.stop)
        await asyncio.sleep(2.0)
        await asyncio.to_thread(pg.start)
        deadline = time.monotonic() + 60
        while await buffer_depth(app.redis, ENVS) > 0:
            assert time.monotonic() < deadline, "the drain did not recover"
            await asyncio.sleep(0.1)
        await drainer.stop(5)
        assert drainer.requeued_total > 0  # the outage was seen, and retried
        assert drainer.dead_lettered_total == 0
        assert count_rows(pg.url) == 2000
        with psycopg.connect(pg.url) as conn:
            statuses = conn.execute(
                "SELECT status, count(*) FROM mollifier.runs GROUP BY status"
            ).fetchall()
        assert statuses == [("PENDING", 2000)]
    finally:
        await app.close(grace=1)
