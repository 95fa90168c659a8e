"""Postgres schema migrations (placeholder until the drain work lands)."""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool


async def migrate(pool: AsyncConnectionPool) -> None:
    """Apply pending migrations."""
