"""Child processes of ``mollifier serve``: the drain process and extra gRPC workers.

The drainer is CPU-bound Python (decoding lease replies, building COPY text);
run in the serving process it shares one event loop, and under a burst one
core, with the gate. With ``MOLLIFIER_DRAIN_PROCESS`` (or more than one
worker) ``serve`` starts ``mollifier _drain-process`` instead: the same
settings, its own App, only the drain loop. With ``MOLLIFIER_WORKERS=N`` it
also starts N-1 ``mollifier _worker`` processes serving gRPC on the same port
(SO_REUSEPORT). Each child is a ``Child``: restarted with backoff when it dies
unexpectedly, sent SIGTERM on shutdown and killed when the grace runs out.

The drain process publishes its counters (``CounterPublisher``) to one Redis
hash per sidecar instance, ``keys.DRAIN_COUNTERS_PREFIX + instance``, every
``PUBLISH_INTERVAL_S``, with a TTL; the serving processes add them to their own
in GetStatus and the Prometheus metrics. Counters go up by HINCRBY of what grew
since the last publish, so a restarted drain process carries on from the hash
instead of resetting it; the gauges (in flight, stale entries) are overwritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from .config import Settings, settings_env
from .keys import DRAIN_COUNTERS_PREFIX

__all__ = [
    "DRAIN_COMMAND",
    "WORKER_COMMAND",
    "Child",
    "CounterPublisher",
    "drain_main",
    "new_instance_id",
    "worker_main",
]

log = logging.getLogger("mollifier.supervisor")

DRAIN_COMMAND = "_drain-process"
# Not MOLLIFIER_*: those are settings, and children get only the settings' own.
PARENT_PID_ENV = "_MOLLIFIER_PARENT_PID"
WORKER_COMMAND = "_worker"
PUBLISH_INTERVAL_S = 0.5
COUNTERS_TTL_S = 120
# A child that ran this long before dying starts again at the first backoff.
_STABLE_S = 30.0
_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 30.0
# What a stopping drain process keeps for itself out of the grace: the final
# publish and closing its connections, before the parent's SIGKILL.
_CLOSE_MARGIN_S = 0.3


def new_instance_id() -> str:
    """One sidecar's id: names its counters hash; shared by its children."""
    return f"{os.uname().nodename}-{os.getpid()}-{secrets.token_hex(3)}"


def counters_key(instance: str) -> str:
    return DRAIN_COUNTERS_PREFIX + instance


class Child:
    """One supervised child process of ``mollifier serve``."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str]) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    @classmethod
    def for_command(cls, name: str, command: str, settings: Settings, instance: str) -> Child:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOLLIFIER_")}
        env |= settings_env(settings)
        argv = [sys.executable, "-m", "mollifier", command, "--instance", instance]
        # The child compares its parent with this pid, not with the parent it
        # finds at startup: serve may die before the child gets that far.
        env[PARENT_PID_ENV] = str(os.getpid())
        return cls(name, argv, env)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self) -> None:
        """Start the child and the loop that restarts it; returns once it is spawned."""
        self._task = asyncio.create_task(self._supervise(), name=f"mollifier-{self.name}")
        await self._started.wait()

    async def _supervise(self) -> None:
        backoff = _FIRST_BACKOFF_S
        while not self._stopping.is_set():
            began = time.monotonic()
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.argv, env=self.env, stdin=asyncio.subprocess.DEVNULL
                )
            except OSError:
                log.exception("cannot start child process", extra={"child": self.name})
                self._started.set()
                code: int | None = None
            else:
                self.starts += 1
                self._started.set()
                log.info("child process started", extra={"child": self.name, "pid": self.pid})
                code = await self.proc.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - began > _STABLE_S:
                backoff = _FIRST_BACKOFF_S
            log.error(
                "child process exited unexpectedly; restarting",
                extra={"child": self.name, "code": code, "restart_in_s": backoff},
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

    async def stop(self, grace: float) -> None:
        """SIGTERM the child; SIGKILL it when ``grace`` seconds pass first."""
        self._stopping.set()
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), max(grace, 0.0))
            except TimeoutError:
                log.warning("child process outlived the grace; killed", extra={"child": self.name})
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None


class CounterPublisher:
    """Publishes a drainer's counters (and its metrics wrappers') to one Redis hash."""

    _COUNTERS = (
        ("materialized", "materialized_total"),
        ("failed", "failed_total"),
        ("dead_lettered", "dead_lettered_total"),
        ("requeued", "requeued_total"),
        ("ticks", "ticks"),
    )

    def __init__(self, redis: Any, key: str, drainer: Any, counters: Any) -> None:
        self.redis = redis
        self.key = key
        self.drainer = drainer
        self.counters = counters
        self._sent: dict[str, float] = {}

    def _values(self) -> dict[str, float]:
        d = self.drainer
        out: dict[str, float] = {name: float(getattr(d, attr)) for name, attr in self._COUNTERS}
        out["resolved"] = float(self.counters.resolved)
        out["reclaimed"] = float(self.counters.reclaimed)
        hist = self.counters.batch_seconds
        if hist is not None:
            for metric in hist.collect():
                for sample in metric.samples:
                    if sample.name.endswith("_bucket"):
                        out["batch_le_" + sample.labels["le"]] = sample.value
                    elif sample.name.endswith("_sum"):
                        out["batch_sum"] = sample.value
        return out

    async def publish(self) -> None:
        values = self._values()
        pipe = self.redis.pipeline(transaction=False)
        for name, value in values.items():
            delta = value - self._sent.get(name, 0.0)
            if delta:
                if name == "batch_sum":
                    pipe.hincrbyfloat(self.key, name, delta)
                else:
                    pipe.hincrby(self.key, name, int(delta))
        pipe.hset(
            self.key,
            mapping={
                "in_flight": self.drainer.in_flight,
                "stale_entries": self.drainer.stale_entries,
            },
        )
        pipe.expire(self.key, COUNTERS_TTL_S)
        await pipe.execute()
        self._sent = values


def _parent_pid() -> int:
    """The serving process that started us (set by Child.for_command).

    Not os.getppid() read at startup: when serve was SIGKILLed while this
    process was still importing, that is already init's pid, and an orphan
    that takes init for its parent drains forever, alone.
    """
    given = os.environ.get(PARENT_PID_ENV, "")
    return int(given) if given.isdigit() else os.getppid()


def _stop_on_signals(stopping: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)


async def drain_main(settings: Settings, instance: str) -> None:
    """The drain process: only the built-in drain loop, until SIGTERM or SIGINT.

    On SIGTERM in-flight batches get the grace (less a margin to publish and
    close); whatever is still leased then comes back when its lease runs out.
    It also stops when its parent is gone, so an orphan never drains alone.
    """
    from prometheus_client import CollectorRegistry

    from .app import App, settle_gc
    from .metrics import DrainCounters, batch_histogram, instrument_drainer

    stopping = asyncio.Event()
    _stop_on_signals(stopping)
    parent = _parent_pid()
    # The serving process has migrated already.
    app = await App.connect(settings.replace(migrate_on_start=False), start_background=False)
    try:
        counters = DrainCounters(batch_seconds=batch_histogram(CollectorRegistry()))
        instrument_drainer(app.drainer, counters)
        publisher = CounterPublisher(app.redis, counters_key(instance), app.drainer, counters)
        app.drainer.start()
        settle_gc()
        log.info("drain process running", extra={"instance": instance})
        while not stopping.is_set():
            try:
                await publisher.publish()
            except Exception as exc:  # Redis blip: the next publish carries the deltas
                log.warning("cannot publish drain counters", extra={"error": repr(exc)})
            if os.getppid() != parent:
                log.warning("serving process gone; drain process stopping")
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), PUBLISH_INTERVAL_S)
        grace = max(settings.shutdown_grace_ms / 1000 - _CLOSE_MARGIN_S, 0.0)
        await app.drainer.stop(grace)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(publisher.publish(), _CLOSE_MARGIN_S / 2)
    finally:
        await app.close(grace=0)
    log.info("drain process stopped")


async def worker_main(settings: Settings, instance: str) -> None:
    """An extra gRPC server process on the shared port, until SIGTERM or SIGINT."""
    from .app import App, settle_gc
    from .server import start_server
    from .tracing import tracer_provider_from_env

    stopping = asyncio.Event()
    _stop_on_signals(stopping)
    parent = _parent_pid()
    provider = tracer_provider_from_env()
    app = await App.connect(settings.replace(migrate_on_start=False), start_background=False)
    try:
        if app.drainer.enabled:
            app.drainer.remote_key = counters_key(instance)
        await app.start_background()
        sidecar = await start_server(app, tracer_provider=provider, reuse_port=True)
        settle_gc()
        log.info("worker serving", extra={"address": sidecar.address, "pid": os.getpid()})
        while not stopping.is_set() and os.getppid() == parent:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 1.0)
        await sidecar.stop(settings.shutdown_grace_ms / 1000)
    finally:
        await app.close(grace=0)
        if provider is not None:
            provider.shutdown()
