"""The Redis and Postgres a benchmark runs against (its own, on free ports),
and the CPU its processes use."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from mollifier.app import App
from mollifier.config import Settings
from mollifier.devstack import PostgresProcess, RedisProcess


@contextlib.asynccontextmanager
async def own_stores(*, fsync: bool = False) -> AsyncIterator[tuple[RedisProcess, PostgresProcess]]:
    """A redis-server and a migrated postgres, stopped and removed at the end.

    Separate folders: postgres runs as its own user when we are root and is
    given its folder; a parent it cannot enter would stop initdb.
    """
    redis_dir = Path(tempfile.mkdtemp(prefix="mollifier-bench-redis-"))
    pg_dir = Path(tempfile.mkdtemp(prefix="mollifier-bench-pg-"))
    redis = RedisProcess(redis_dir)
    pg = PostgresProcess(pg_dir, fsync=fsync)
    try:
        redis.start()
        pg.start()
        # Migrations once, as `mollifier serve` would.
        settings = Settings.from_env(
            {}, redis_url=redis.url, database_url=pg.url, drain_enabled=False
        )
        app = await App.connect(settings, start_background=False)
        await app.close(grace=0)
        yield redis, pg
    finally:
        redis.stop()
        pg.stop()
        shutil.rmtree(redis_dir, ignore_errors=True)
        shutil.rmtree(pg_dir, ignore_errors=True)


def process_cpu() -> Iterator[tuple[int, int, float]]:
    """(pid, parent pid, user + system CPU seconds) of every process on the
    machine, from /proc; a process that ends while being read is skipped."""
    tick = os.sysconf("SC_CLK_TCK")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which is in parentheses and may hold spaces.
        rest = stat[stat.rindex(")") + 2 :].split()
        yield int(name), int(rest[1]), (int(rest[11]) + int(rest[12])) / tick
