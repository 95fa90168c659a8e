"""Redis and Postgres connections, made from the settings."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool
from redis.asyncio.cluster import RedisCluster

from .config import Settings

__all__ = ["RedisClient", "make_pool", "make_redis"]

# Either client: every call the sidecar makes works on both.
RedisClient = aioredis.Redis | RedisCluster


def make_redis(settings: Settings) -> Any:
    """A Redis client (bytes in and out) for MOLLIFIER_REDIS_URL."""
    if not settings.redis_url:
        raise ValueError("MOLLIFIER_REDIS_URL is not set")
    common: dict[str, Any] = {
        "decode_responses": False,
        "socket_connect_timeout": 2.0,
        "health_check_interval": 30,
    }
    if settings.redis_cluster:
        # Per node; redis-py's default (100) fails a burst's 101st concurrent
        # call with MaxConnectionsError instead of waiting. Same width as below.
        return RedisCluster.from_url(settings.redis_url, max_connections=512, **common)
    # A burst wider than the pool waits for a free connection instead of failing
    # with "Too many connections"; callers bound the wait with their own timeouts.
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=512, timeout=5, **common
    )
    return aioredis.Redis(connection_pool=pool)


def make_pool(settings: Settings, *, max_size: int | None = None) -> AsyncConnectionPool:
    """A Postgres pool (not yet opened) for MOLLIFIER_DATABASE_URL.

    Its size is the drain concurrency plus a few for reads and mutations, so the
    sidecar never holds Postgres to more than that many connections.
    """
    if not settings.database_url:
        raise ValueError("MOLLIFIER_DATABASE_URL is not set")
    size = max_size or settings.drain_concurrency + 4
    return AsyncConnectionPool(
        settings.database_url,
        min_size=1,
        max_size=size,
        open=False,
        timeout=10.0,
        kwargs={"autocommit": True},
        name="mollifier",
    )
