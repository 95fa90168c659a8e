"""Postgres schema migrations: versioned SQL files applied in order, exactly once.

Files live in ``mollifier/migrations/NNNN_name.sql``. ``migrate`` takes a
session advisory lock so two processes starting at once apply each file once
(the second waits, then finds nothing pending); each file runs in its own
transaction together with its row in ``mollifier.schema_migrations``, so a
failure leaves no half-applied version behind.
"""

from __future__ import annotations

import logging
import re
from importlib import resources

from psycopg_pool import AsyncConnectionPool

__all__ = ["migrate", "migration_files"]

log = logging.getLogger("mollifier.migrations")

# An arbitrary constant: the advisory lock every mollifier process agrees on.
LOCK_ID = 0x6D6F6C6C  # "moll"

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration file, in version order."""
    folder = resources.files("mollifier").joinpath("migrations")
    found: list[tuple[int, str, str]] = []
    for entry in folder.iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text()))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a version: {versions}")
    return found


async def migrate(pool: AsyncConnectionPool) -> list[str]:
    """Apply pending migrations; returns the names applied (empty when up to date)."""
    applied_now: list[str] = []
    async with pool.connection() as conn:
        # Pool connections are autocommit, so the session lock is held across
        # the per-file transactions below and released explicitly.
        await conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_ID,))
        try:
            async with conn.transaction():
                await conn.execute("CREATE SCHEMA IF NOT EXISTS mollifier")
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS mollifier.schema_migrations ("
                    " version integer PRIMARY KEY,"
                    " name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
            cur = await conn.execute("SELECT version FROM mollifier.schema_migrations")
            done = {int(row[0]) for row in await cur.fetchall()}
            for version, name, sql in migration_files():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql.encode())
                    await conn.execute(
                        "INSERT INTO mollifier.schema_migrations (version, name) VALUES (%s, %s)",
                        (version, name),
                    )
                applied_now.append(name)
                log.info("migration applied", extra={"migration": name})
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_ID,))
    return applied_now
