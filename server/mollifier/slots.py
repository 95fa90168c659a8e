"""Postgres write slots: one budget of writing connections for every process
of every sidecar on one Redis.

The drain process and each serving process have pools of their own, and
several sidecars may share one Redis and one Postgres; only a count kept in
Redis (``write_slot.lua``, the sorted set ``keys.WRITE_SLOTS``) holds all of
them together to ``MOLLIFIER_WRITE_SLOTS`` writing connections. A drain batch
waits for a slot (the whole budget is open to it); a write-through insert
does not wait: with none free among all but one of the slots, its run is
buffered and the drain writes it, so a burst of pass-through triggers never
becomes a burst of Postgres connections.

A slot lapses when its lease runs out, so a holder that dies keeps it only
that long; a drain batch renews its slot while it writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

from .config import Settings
from .keys import WRITE_SLOTS
from .scripts import Scripts

__all__ = ["DRAIN_SLOT_LEASE_MS", "WriteSlots"]

# A drain slot's lease, renewed every third of it while its batch writes: a
# killed drain process's slots come free within this.
DRAIN_SLOT_LEASE_MS = 5000
# How often a drain batch asks again for a slot while all are held.
_POLL_S = 0.01
# A limit no count reaches.
_ANY = 1 << 30
# A direct write's slot outlives its insert's own bound by this much.
_DIRECT_MARGIN_MS = 1000


class WriteSlots:
    """Take and give back write slots (see the module docstring)."""

    def __init__(self, settings: Settings, redis: Any, scripts: Scripts) -> None:
        self.redis = redis
        self.scripts = scripts
        self.budget = settings.write_slots or settings.drain_concurrency
        # All but one for direct writes, so the drain always has a slot to
        # wait for; a budget of one is shared.
        self.direct_limit = max(1, self.budget - 1)
        self.direct_lease_ms = settings.direct_write_timeout_ms + _DIRECT_MARGIN_MS
        self._prefix = f"{os.getpid()}-{secrets.token_hex(4)}:"
        self._count = itertools.count()

    def new_holder(self) -> str:
        """A holder id no other taking (in any process) uses."""
        return self._prefix + str(next(self._count))

    def queue_take_direct(self, pipe: Any, holder: str) -> None:
        """Queue a write-through insert's taking (reply 1 taken, 0 none free)."""
        self.scripts.write_slot.queue(
            pipe, [WRITE_SLOTS], [holder, self.direct_limit, self.direct_lease_ms, "0"]
        )

    async def take_direct(self, holder: str) -> bool:
        """The same taking as ``queue_take_direct``, on the client's pool."""
        return await self._call(holder, self.direct_limit, self.direct_lease_ms, False)

    def queue_release(self, pipe: Any, holder: str) -> None:
        pipe.zrem(WRITE_SLOTS, holder)

    async def release(self, holder: str) -> None:
        await self.redis.zrem(WRITE_SLOTS, holder)

    async def _call(self, holder: str, limit: int, lease_ms: int, renew: bool) -> bool:
        r = await self.scripts.write_slot(
            self.redis, [WRITE_SLOTS], [holder, limit, lease_ms, "1" if renew else "0"]
        )
        return int(r) == 1

    @contextlib.asynccontextmanager
    async def drain_slot(self, stopping: Callable[[], bool]) -> AsyncIterator[bool]:
        """Hold a slot for one drain batch: wait until one is free, renew it
        while the batch writes, give it back after. Yields False (holding
        nothing) when ``stopping()`` turns true while waiting."""
        holder = self.new_holder()
        while not await self._call(holder, self.budget, DRAIN_SLOT_LEASE_MS, False):
            if stopping():
                yield False
                return
            await asyncio.sleep(_POLL_S)
        stop = asyncio.Event()
        renewer = asyncio.create_task(self._renew(holder, stop))
        try:
            yield True
        finally:
            stop.set()
            renewer.cancel()
            # Not awaited to its end: a cancel landing inside a client call can
            # be lost there, and the loop also ends on ``stop``.
            await asyncio.wait({renewer}, timeout=1.0)
            # Given back even when the batch was cancelled; if Redis is gone,
            # the slot lapses with its lease.
            with contextlib.suppress(Exception):
                await asyncio.shield(self.release(holder))

    async def _renew(self, holder: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(DRAIN_SLOT_LEASE_MS / 3000)
            # A failed renewal (Redis blip) is tried again next time. A slot
            # that lapsed meanwhile is put back whatever the count: this batch
            # still writes, and the count must say so to the others. Not once
            # the batch is done: the slot was given back, not lost.
            with contextlib.suppress(Exception):
                renewed = await self._call(holder, self.budget, DRAIN_SLOT_LEASE_MS, True)
                if not renewed and not stop.is_set():
                    await self._call(holder, _ANY, DRAIN_SLOT_LEASE_MS, False)
