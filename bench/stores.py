"""The Redis and Postgres a benchmark runs against: its own, on free ports."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
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
