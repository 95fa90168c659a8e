"""Fixtures that start real redis-server and postgres processes on free ports.

Nothing here touches the machine's shared Redis or Postgres. Session-wide
servers are shared by the tests that only read and write; a test that stops,
kills or pauses a server asks the factories for one of its own.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis.asyncio as aioredis
from mollifier.config import Settings
from mollifier.devstack import PostgresProcess, RedisProcess


def _tempdir(prefix: str) -> Path:
    # Not pytest's tmp_path: its parents are closed to the postgres user.
    return Path(tempfile.mkdtemp(prefix=prefix))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    folder = _tempdir("mollifier-redis-")
    server = RedisProcess(folder)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def redis_factory() -> Iterator[Callable[..., RedisProcess]]:
    """Start extra redis-servers (e.g. to kill); each is stopped at the end."""
    started: list[tuple[RedisProcess, Path]] = []

    def make(**kwargs: object) -> RedisProcess:
        folder = _tempdir("mollifier-redis-")
        server = RedisProcess(folder, **kwargs)  # type: ignore[arg-type]
        server.start()
        started.append((server, folder))
        return server

    yield make
    for server, folder in started:
        server.kill()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def redis_url(redis_server: RedisProcess) -> AsyncIterator[str]:
    """The session Redis, emptied before each test (it is ours alone)."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    yield redis_server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresProcess]:
    folder = _tempdir("mollifier-pg-")
    server = PostgresProcess(folder)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_factory() -> Iterator[Callable[[], PostgresProcess]]:
    """Start extra postgres servers (e.g. to stop mid-drain); each is killed at the end."""
    started: list[tuple[PostgresProcess, Path]] = []

    def make() -> PostgresProcess:
        folder = _tempdir("mollifier-pg-")
        server = PostgresProcess(folder)
        server.start()
        started.append((server, folder))
        return server

    yield make
    for server, folder in started:
        server.kill()
        shutil.rmtree(folder, ignore_errors=True)


_db_numbers = itertools.count(1)


@pytest.fixture
def database_url(pg_server: PostgresProcess) -> Iterator[str]:
    """A fresh, empty database on the session Postgres, dropped afterwards."""
    name = f"t_{next(_db_numbers)}"
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield pg_server.url.rsplit("/", 1)[0] + "/" + name
    with (
        psycopg.connect(pg_server.url, autocommit=True) as conn,
        contextlib.suppress(psycopg.Error),
    ):
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def settings(redis_url: str, database_url: str) -> Settings:
    """Settings pointing at this test's Redis and database, drainer off."""
    return Settings.from_env(
        {}, redis_url=redis_url, database_url=database_url, drain_enabled=False
    )
