"""Prometheus metrics, served on MOLLIFIER_METRICS_LISTEN.

Three kinds of numbers, none labelled by env or org id (a label per tenant would
make the series count grow with the customer base):

- Gate decisions and their latency: process-wide counters in ``GATE_REGISTRY``,
  bumped by ``gate.py`` through ``decided`` (one counter increment and one
  histogram observation per decision).
- The buffer's depth, oldest age and the drain state: read from Redis when
  scraped, at most once a second, bounded in envs and in time, by
  ``BufferStats``. A scraper polling fast costs Redis nothing more.
- Drain outcomes, in flight and stale entries: the Drainer's own counters, read
  at scrape time by ``AppCollector``; batch latency, lease reclaims and
  resolved runs come from thin wrappers put around the App's drainer
  (``instrument_drainer``), which the Drainer does not count itself.

``start_metrics(app, listen)`` starts the endpoint on the running event loop (no
thread: the Redis reads share the App's async client) and returns a handle
with ``port`` and ``stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from mollifier_client.v1 import drain_pb2, gate_pb2
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .buffer import depths
from .codec import as_text, now_ms
from .keys import INDEX_ORGS, org_envs_key

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from .app import App
    from .drainer import Drainer

__all__ = [
    "GATE_REGISTRY",
    "AppCollector",
    "BufferStats",
    "MetricsServer",
    "batch_histogram",
    "decided",
    "direct_write_deferred",
    "direct_write_fallback",
    "instrument_drainer",
    "start_metrics",
]

log = logging.getLogger("mollifier.metrics")

# -- gate: process-wide, bumped on the hot path ---------------------------------

GATE_REGISTRY = CollectorRegistry(auto_describe=True)

_DECISIONS = Counter(
    "mollifier_gate_decisions",
    "Gate decisions, by decision and reason.",
    ["decision", "reason"],
    registry=GATE_REGISTRY,
)
_DECISION_SECONDS = Histogram(
    "mollifier_gate_decision_seconds",
    "Time to reach a gate decision (Redis round trip included; for Trigger, the buffer "
    "write too), by call.",
    ["call"],
    # The gate answers in well under a millisecond; the top buckets catch FAIL_OPEN
    # timeouts at MOLLIFIER_GATE_TIMEOUT_MS.
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=GATE_REGISTRY,
)
_DIRECT_FALLBACKS = Counter(
    "mollifier_gate_direct_write_fallbacks",
    "Write-through triggers buffered because Postgres failed or was too slow.",
    registry=GATE_REGISTRY,
)
_DIRECT_DEFERRED = Counter(
    "mollifier_gate_direct_write_deferrals",
    "Write-through triggers buffered because every Postgres write slot was in use.",
    registry=GATE_REGISTRY,
)


def _enum_label(enum: Any, value: int, prefix: str) -> str:
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix).lower()


# Label values are computed once per (decision, reason) pair, not per call.
_children: dict[tuple[int, int], Any] = {}
_timers: dict[str, Any] = {}

OutcomeT = TypeVar("OutcomeT")


def decided(outcome: OutcomeT, started: float, call: str = "evaluate") -> OutcomeT:
    """Count one gate decision and its latency since ``started`` (perf_counter); returns it.

    ``outcome`` is anything with ``decision`` and ``reason`` ints (gate.Outcome).
    """
    key = (getattr(outcome, "decision", 0), getattr(outcome, "reason", 0))
    (_children.get(key) or _child(key)).inc()
    (_timers.get(call) or _timer(call)).observe(time.perf_counter() - started)
    return outcome


def _child(key: tuple[int, int]) -> Any:
    child = _children[key] = _DECISIONS.labels(
        _enum_label(gate_pb2.Decision, key[0], "DECISION_"),
        _enum_label(gate_pb2.DecisionReason, key[1], "DECISION_REASON_"),
    )
    return child


def _timer(call: str) -> Any:
    timer = _timers[call] = _DECISION_SECONDS.labels(call)
    return timer


def decided_many(outcomes: list[OutcomeT], started: float, call: str) -> list[OutcomeT]:
    """Count a batch's decisions (one increment per distinct decision and
    reason) and observe the batch's latency once; returns them."""
    counts: dict[tuple[int, int], int] = {}
    for outcome in outcomes:
        key = (getattr(outcome, "decision", 0), getattr(outcome, "reason", 0))
        counts[key] = counts.get(key, 0) + 1
    for key, n in counts.items():
        (_children.get(key) or _child(key)).inc(n)
    (_timers.get(call) or _timer(call)).observe(time.perf_counter() - started)
    return outcomes


def direct_write_fallback() -> None:
    """A write-through trigger went to the buffer because Postgres failed."""
    _DIRECT_FALLBACKS.inc()


def direct_write_deferred() -> None:
    """A write-through trigger went to the buffer: no write slot was free."""
    _DIRECT_DEFERRED.inc()


class _Forward(Collector):
    """Exposes another registry's metrics (the process-wide gate ones) in this one."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        yield from self.source.collect()


# -- buffer depth, read from Redis at scrape time --------------------------------

# Bounds on one scrape's Redis work: past this many envs the totals are partial
# (and mollifier_buffer_envs_truncated says so); past the timeout the last
# answer is served.
MAX_ENVS = 10_000
REFRESH_TIMEOUT_S = 2.0
# Buckets of mollifier_drain_batch_seconds (the drain process publishes the same).
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MIN_REFRESH_INTERVAL_S = 1.0


@dataclass
class BufferStats:
    """Whole-buffer totals, recomputed at most once per ``MIN_REFRESH_INTERVAL_S``."""

    app: App
    queued: int = 0
    retrying: int = 0
    draining: int = 0
    failed: int = 0
    envs: int = 0
    truncated: bool = False
    oldest_age_s: float = 0.0
    drain_state: int = drain_pb2.DRAIN_STATE_UNSPECIFIED
    redis_up: bool = False
    refreshed_at: float = 0.0
    # The drain process's published counters (empty when the drainer runs here).
    remote: dict[str, float] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self.refreshed_at < MIN_REFRESH_INTERVAL_S:
                return
            try:
                async with asyncio.timeout(REFRESH_TIMEOUT_S):
                    await self._read()
                self.redis_up = True
            except Exception as exc:  # keep the last numbers; say Redis is not answering
                self.redis_up = False
                log.warning("metrics: cannot read the buffer", extra={"error": type(exc).__name__})
            self.refreshed_at = time.monotonic()

    async def _read(self) -> None:
        redis = self.app.redis
        orgs = [as_text(o) for o in await redis.smembers(INDEX_ORGS)]
        envs: list[str] = []
        if orgs:
            pipe = redis.pipeline(transaction=False)
            for org in orgs:
                pipe.smembers(org_envs_key(org))
            envs = sorted({as_text(e) for group in await pipe.execute() for e in group})
        self.truncated = len(envs) > MAX_ENVS
        envs = envs[:MAX_ENVS]
        queued = retrying = draining = failed = 0
        oldest = now = now_ms()
        if envs:
            for depth in await depths(self.app.scripts, redis, envs):
                queued += depth.queued
                retrying += depth.retrying
                draining += depth.draining
                failed += depth.failed
                # Arrival scores are ms * 1000, so the head is the oldest arrival.
                if depth.head_score:
                    oldest = min(oldest, depth.head_score // 1000)
        self.queued, self.retrying, self.draining, self.failed = queued, retrying, draining, failed
        self.envs = len(envs)
        self.oldest_age_s = max(0, now - oldest) / 1000
        self.drain_state = await self.app.drainer.state()
        self.remote = await self.app.drainer.remote_counters()


def _le(bound: float | str) -> str:
    return bound if isinstance(bound, str) else repr(float(bound))


# -- drain instrumentation -------------------------------------------------------


@dataclass
class DrainCounters:
    """What the Drainer does not count itself, filled by ``instrument_drainer``."""

    reclaimed: int = 0
    resolved: int = 0
    batch_seconds: Histogram | None = None


_WRAPPED = ("materialize", "lease_env", "ack_env")


def instrument_drainer(drainer: Drainer, counters: DrainCounters) -> Callable[[], None]:
    """Wrap the drainer's batch, lease and ack steps to count what it does not.

    Instance attributes shadow the class's methods, so ``self.materialize`` in
    the drain loop goes through the wrapper; the returned function removes
    them again. Wrapping twice would double count, so an instrumented drainer
    is left as it is (and the second endpoint sees no batch latency).
    """
    if any(name in vars(drainer) for name in _WRAPPED):
        return lambda: None
    materialize = drainer.materialize
    lease_env = drainer.lease_env
    ack_env = drainer.ack_env
    hist = counters.batch_seconds

    async def timed_materialize(batch: Any) -> None:
        started = time.perf_counter()
        try:
            await materialize(batch)
        finally:
            if hist is not None:
                hist.observe(time.perf_counter() - started)

    async def counted_lease(env_id: str, max_runs: int, lease_ms: int, token: str) -> Any:
        batch = await lease_env(env_id, max_runs, lease_ms, token)
        counters.reclaimed += int(getattr(batch, "reclaimed", 0))
        return batch

    async def counted_ack(env_id: str, token: str, runs: Sequence[tuple[str, str]]) -> Any:
        result = await ack_env(env_id, token, runs)
        # A non-empty second member: the key was already held by another run,
        # which this one resolved to instead of creating a row.
        counters.resolved += sum(1 for _, resolved in runs if resolved)
        return result

    setattr(drainer, "materialize", timed_materialize)  # noqa: B010
    setattr(drainer, "lease_env", counted_lease)  # noqa: B010
    setattr(drainer, "ack_env", counted_ack)  # noqa: B010

    def undo() -> None:
        for name in _WRAPPED:
            vars(drainer).pop(name, None)

    return undo


def batch_histogram(registry: CollectorRegistry) -> Histogram:
    """mollifier_drain_batch_seconds, registered in ``registry``."""
    return Histogram(
        "mollifier_drain_batch_seconds",
        "Time to write one leased batch to Postgres and settle it in Redis.",
        buckets=BATCH_BUCKETS,
        registry=registry,
    )


class AppCollector(Collector):
    """The App's buffer and drain numbers, as of the last ``BufferStats.refresh``."""

    def __init__(self, app: App, stats: BufferStats, counters: DrainCounters) -> None:
        self.app = app
        self.stats = stats
        self.counters = counters

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        runs = GaugeMetricFamily(
            "mollifier_buffer_runs", "Buffered runs in Redis, by state.", labels=["state"]
        )
        runs.add_metric(["queued"], s.queued)
        runs.add_metric(["retrying"], s.retrying)
        runs.add_metric(["draining"], s.draining)
        runs.add_metric(["failed"], s.failed)
        yield runs
        yield GaugeMetricFamily(
            "mollifier_buffer_oldest_age_seconds",
            "Age of the oldest queued run (0 when the queues are empty).",
            value=s.oldest_age_s,
        )
        yield GaugeMetricFamily(
            "mollifier_buffer_envs", "Envs with buffered runs (in the index).", value=s.envs
        )
        yield GaugeMetricFamily(
            "mollifier_buffer_envs_truncated",
            f"1 when more than {MAX_ENVS} envs are buffered and the totals are partial.",
            value=int(s.truncated),
        )
        yield GaugeMetricFamily(
            "mollifier_buffer_full",
            "1 when the whole buffer is at MOLLIFIER_BUFFER_CAPACITY_TOTAL.",
            value=int(self.app.buffer.total_full),
        )
        yield GaugeMetricFamily(
            "mollifier_metrics_redis_up",
            "1 when the last scrape could read the buffer from Redis.",
            value=int(s.redis_up),
        )
        state = GaugeMetricFamily(
            "mollifier_drain_state",
            "The built-in drainer's state: 1 on the current one.",
            labels=["state"],
        )
        for name in ("running", "paused", "disabled"):
            value = drain_pb2.DrainState.Value("DRAIN_STATE_" + name.upper())
            state.add_metric([name], int(s.drain_state == value))
        yield state

        d = self.app.drainer
        # Counted here (external acks) plus what the drain process published.
        r = s.remote

        def both(local: float, name: str) -> float:
            return local + r.get(name, 0.0)

        materialized = both(d.materialized_total, "materialized")
        failed = both(d.failed_total, "failed")
        dead = both(d.dead_lettered_total, "dead_lettered")
        outcomes = CounterMetricFamily(
            "mollifier_drain_runs",
            "Buffered runs settled by this sidecar, by outcome.",
            labels=["outcome"],
        )
        outcomes.add_metric(["materialized"], materialized)
        outcomes.add_metric(["resolved"], both(self.counters.resolved, "resolved"))
        # failed_total counts dead letters and SYSTEM_FAILURE rows together.
        outcomes.add_metric(["system_failure"], max(0, failed - dead))
        outcomes.add_metric(["retried"], both(d.requeued_total, "requeued"))
        outcomes.add_metric(["dead_lettered"], dead)
        yield outcomes
        yield CounterMetricFamily(
            "mollifier_drain_lease_reclaims",
            "Leased runs whose lease ran out and were taken back into the queue.",
            value=both(self.counters.reclaimed, "reclaimed"),
        )
        yield CounterMetricFamily(
            "mollifier_drain_ticks",
            "Drain loop ticks.",
            value=both(getattr(d, "ticks", 0), "ticks"),
        )
        yield GaugeMetricFamily(
            "mollifier_drain_in_flight",
            "Runs this sidecar's drainer is writing to Postgres right now.",
            value=both(d.in_flight, "in_flight"),
        )
        yield GaugeMetricFamily(
            "mollifier_drain_stale_entries",
            "Buffered runs older than MOLLIFIER_STALE_AFTER_MS at the last sweep.",
            value=both(d.stale_entries, "stale_entries"),
        )
        if self.counters.batch_seconds is None:
            # The drain process times its batches and publishes the buckets.
            buckets = [
                (_le(le), r.get(f"batch_le_{_le(le)}", 0.0)) for le in (*BATCH_BUCKETS, "+Inf")
            ]
            yield HistogramMetricFamily(
                "mollifier_drain_batch_seconds",
                "Time to write one leased batch to Postgres and settle it in Redis.",
                buckets=buckets,
                sum_value=r.get("batch_sum", 0.0),
            )


# -- the endpoint ----------------------------------------------------------------


class MetricsServer:
    """A minimal HTTP/1.1 endpoint on the event loop: GET /metrics (any path works)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        before_scrape: Callable[[], Awaitable[None]],
        undo: Callable[[], None],
    ) -> None:
        self.registry = registry
        self._before = before_scrape
        self._undo = undo
        self._server: asyncio.Server | None = None
        self.host = ""
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        self._server = await asyncio.start_server(self._handle, host.strip("[]"), int(port))
        sock = self._server.sockets[0].getsockname()
        self.host, self.port = str(sock[0]), int(sock[1])

    async def stop(self) -> None:
        self._undo()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readline()
                # Headers are read and ignored; the body of a GET is empty.
                while await reader.readline() not in (b"\r\n", b"\n", b""):
                    pass
                parts = request.split()
                if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
                    status, body, ctype = b"405 Method Not Allowed", b"", b"text/plain"
                else:
                    await self._before()
                    body = generate_latest(self.registry)
                    status, ctype = b"200 OK", CONTENT_TYPE_LATEST.encode()
                    if parts[0] == b"HEAD":
                        body = b""
                writer.write(
                    b"HTTP/1.1 "
                    + status
                    + b"\r\nContent-Type: "
                    + ctype
                    + b"\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\nConnection: close\r\n\r\n"
                    + body
                )
                await writer.drain()
        except Exception as exc:  # a broken scrape must never hurt the sidecar
            log.debug("metrics request failed", extra={"error": type(exc).__name__})
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def start_metrics(app: App, listen: str) -> MetricsServer:
    """Serve ``app``'s metrics on ``listen`` (host:port; port 0 picks one)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_Forward(GATE_REGISTRY))
    with contextlib.suppress(Exception):  # /proc is Linux-only
        ProcessCollector(registry=registry)
    counters = DrainCounters()
    if app.drainer.remote_key is None:
        counters.batch_seconds = batch_histogram(registry)
    stats = BufferStats(app)
    registry.register(AppCollector(app, stats, counters))
    undo = instrument_drainer(app.drainer, counters)
    server = MetricsServer(registry, stats.refresh, undo)
    try:
        await server.start(listen)
    except BaseException:
        undo()
        raise
    return server
