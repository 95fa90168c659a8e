"""The wiring: one App holds the settings, the store clients and the parts."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from typing import Any

from psycopg_pool import AsyncConnectionPool

from .buffer import Buffer
from .config import Settings
from .connections import make_pool, make_redis
from .drainer import Drainer
from .gate import Gate
from .mutations import Mutations
from .scripts import Scripts, load_scripts

__all__ = ["App", "settle_gc"]

log = logging.getLogger("mollifier.app")


# Objects allocated between gen-0 collections. Python's default (700) runs a
# collection every few requests, and every tenth of those walks gen 1; the
# hot paths allocate many short-lived objects and almost no cycles.
GC_GEN0_THRESHOLD = 50_000


def settle_gc() -> None:
    """Call once a process has started serving: the objects made while starting
    (modules, protobuf descriptors, the App) are moved out of the collector's
    reach, and collections run less often.

    Profiled under Trigger load, the collector's full passes over the ~60,000
    start-up objects were the largest single cost after gRPC itself; this cut
    the serving process's CPU per Trigger by about a fifth.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


class App:
    """Everything a servicer needs; made by ``App.connect`` and closed by ``close``.

    Servicers are thin: each RPC calls one method of ``gate``, ``buffer``,
    ``drainer`` or ``mutations`` with plain values, so tests can call the same
    methods without gRPC.
    """

    def __init__(
        self,
        settings: Settings,
        redis: Any,
        pool: AsyncConnectionPool | None,
        scripts: Scripts,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.pool = pool
        self.scripts = scripts
        self.buffer = Buffer(settings, redis, scripts, pool)
        self.gate = Gate(settings, redis, scripts, self.buffer)
        # Always made (DrainService's Lease/Ack/status use it); its loop only
        # runs when the built-in sink is on and Postgres is configured.
        self.drainer = Drainer(settings, redis, scripts, pool)
        self.mutations = Mutations(settings, redis, scripts, pool, self.buffer, self.gate)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    @classmethod
    async def connect(cls, settings: Settings, *, start_background: bool = True) -> App:
        """Connect to Redis (and Postgres when configured), migrate, start the drainer."""
        redis = make_redis(settings)
        scripts = load_scripts()
        pool: AsyncConnectionPool | None = None
        if settings.database_url:
            pool = make_pool(settings)
            await pool.open(wait=False)
        app = cls(settings, redis, pool, scripts)
        try:
            await app._prepare()
            if start_background:
                await app.start_background()
        except BaseException:
            await app.close()
            raise
        return app

    async def _prepare(self) -> None:
        with contextlib.suppress(Exception):
            # Not fatal: a Redis that is down now gets the scripts on first use.
            await self.scripts.load_all(self.redis)
        await self.gate.warm_up()
        if self.pool is not None and self.settings.migrate_on_start:
            from psycopg_pool import PoolTimeout

            from .migrations import migrate
            from .server import StartupError

            try:
                await migrate(self.pool)
            except (PoolTimeout, OSError) as exc:
                raise StartupError(
                    "cannot reach Postgres at MOLLIFIER_DATABASE_URL to migrate it "
                    f"({type(exc).__name__}); is it up, and the database there?"
                ) from exc

    async def start_background(self) -> None:
        """Start the background loops (total-depth refresh, drainer)."""
        self._tasks.append(
            asyncio.create_task(self.buffer.refresh_total_loop(stop=self._stopping))
        )
        # With remote_key set the loop runs in the drain process instead.
        if self.drainer.enabled and self.drainer.remote_key is None:
            self.drainer.start()

    async def close(self, grace: float | None = None) -> None:
        """Stop the drainer (in-flight batches get ``grace`` seconds), then the rest."""
        if grace is None:
            grace = self.settings.shutdown_grace_ms / 1000
        with contextlib.suppress(Exception):
            await self.drainer.stop(grace)
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: a cancel swallowed inside a Redis command must not hold
            # the process (the loops also end on _stopping).
            done, _ = await asyncio.wait(self._tasks, timeout=max(grace, 1.0))
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved, so asyncio does not log it
        self._tasks.clear()
        with contextlib.suppress(Exception):
            await self.gate.aclose()
        with contextlib.suppress(Exception):
            await self.redis.aclose()
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await self.pool.close()
