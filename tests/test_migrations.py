"""Migrations: applied once, safe twice and from two processes at once."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import psycopg
from mollifier.migrations import migrate, migration_files
from psycopg_pool import AsyncConnectionPool


async def _pool(url: str) -> AsyncConnectionPool:
    pool = AsyncConnectionPool(url, min_size=1, max_size=4, open=False, kwargs={"autocommit": True})
    await pool.open(wait=True)
    return pool


async def test_migrate_twice_applies_once(database_url: str) -> None:
    pool = await _pool(database_url)
    try:
        first = await migrate(pool)
        second = await migrate(pool)
    finally:
        await pool.close()
    assert first == [name for _, name, _ in migration_files()]
    assert second == []
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT version FROM mollifier.schema_migrations").fetchall()
        assert len(rows) == len(migration_files())
        conn.execute("SELECT run_id, status, snapshot FROM mollifier.runs LIMIT 1")


async def test_migrate_concurrently_in_one_process(database_url: str) -> None:
    pools = [await _pool(database_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(p) for p in pools))
    finally:
        for p in pools:
            await p.close()
    applied = [name for r in results for name in r]
    assert sorted(applied) == sorted(name for _, name, _ in migration_files())


def test_migrate_from_two_processes_at_once(database_url: str) -> None:
    code = (
        "import asyncio, sys\n"
        "from psycopg_pool import AsyncConnectionPool\n"
        "from mollifier.migrations import migrate\n"
        "async def go():\n"
        "    p = AsyncConnectionPool(sys.argv[1], min_size=1, max_size=2, open=False,"
        " kwargs={'autocommit': True})\n"
        "    await p.open(wait=True)\n"
        "    print(len(await migrate(p)))\n"
        "    await p.close()\n"
        "asyncio.run(go())\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, database_url], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(int(o.strip()) for o in outs) == [0, len(migration_files())]
