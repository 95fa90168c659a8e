"""Metrics scraped over HTTP after real traffic, and a span per RPC.

The sidecar, Redis and Postgres are real; the scrape is a plain HTTP GET, parsed
with prometheus_client's own parser, as Prometheus would read it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mollifier.app import App
from mollifier.devstack import free_port
from mollifier.metrics import MetricsServer, start_metrics
from mollifier.server import start_server
from mollifier.tracing import tracer_provider_from_env
from mollifier_client.v1 import gate_pb2, run_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from tests.plugins.sidecar import LiveSidecar, Stubs

ENV = "env_metrics_secret"
ORG = "org_metrics_secret"
FLAGS = {"mollifierEnabled": True}

Samples = dict[str, list[tuple[dict[str, str], float]]]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return str(resp.read().decode())


async def scrape(address: str) -> Samples:
    # A thread: the endpoint runs on this very event loop.
    text = await asyncio.to_thread(_get, f"http://{address}/metrics")
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    )


@pytest.fixture
async def metrics(app: App, sidecar: LiveSidecar) -> AsyncIterator[MetricsServer]:
    server = await start_metrics(app, "127.0.0.1:0")
    yield server
    await server.stop()


async def trip_and_buffer(stubs: Stubs, n: int) -> None:
    await stubs.gate.SetEnvPolicy(
        gate_pb2.SetEnvPolicyRequest(
            env_id=ENV,
            policy=gate_pb2.EnvPolicy(
                threshold=1,
                window=duration_pb2.Duration(seconds=10),
                hold=duration_pb2.Duration(seconds=30),
            ),
        )
    )
    for i in range(n):
        await stubs.gate.Trigger(
            gate_pb2.TriggerRequest(
                env_id=ENV,
                org_id=ORG,
                task_identifier="email",
                org_feature_flags=FLAGS,
                snapshot=run_pb2.RunSnapshot(run_id=f"run_metrics_{i}", payload=b"{}"),
            )
        )


async def test_scrape_after_traffic(app: App, stubs: Stubs, metrics: MetricsServer) -> None:
    before = await scrape(metrics.address)
    mollified_before = value(before, "mollifier_gate_decisions_total", decision="mollify")

    await trip_and_buffer(stubs, 5)
    # An org without the flag: a decision with no Redis involved.
    await stubs.gate.Evaluate(
        gate_pb2.EvaluateRequest(env_id=ENV, org_id=ORG, task_identifier="email")
    )

    # The depth is read at most once a second; the first scrape has just read it.
    await asyncio.sleep(1.05)
    s = await scrape(metrics.address)
    names = set(s)
    for expected in (
        "mollifier_gate_decisions_total",
        "mollifier_gate_decision_seconds_bucket",
        "mollifier_gate_decision_seconds_count",
        "mollifier_buffer_runs",
        "mollifier_buffer_oldest_age_seconds",
        "mollifier_buffer_envs",
        "mollifier_drain_runs_total",
        "mollifier_drain_lease_reclaims_total",
        "mollifier_drain_in_flight",
        "mollifier_drain_stale_entries",
        "mollifier_drain_state",
        "mollifier_drain_batch_seconds_count",
        "mollifier_metrics_redis_up",
    ):
        assert expected in names, expected
    # threshold 1: the first passes, the other four are buffered.
    assert value(s, "mollifier_gate_decisions_total", decision="mollify") - mollified_before == 4
    assert value(s, "mollifier_gate_decisions_total", reason="org_not_enabled") >= 1
    assert value(s, "mollifier_gate_decision_seconds_count", call="trigger") >= 5
    assert value(s, "mollifier_buffer_runs", state="queued") == 4
    assert value(s, "mollifier_buffer_envs") == 1
    assert value(s, "mollifier_metrics_redis_up") == 1
    assert value(s, "mollifier_drain_state", state="disabled") == 1

    # Drain it: materialized outcomes and a batch latency appear.
    while await app.drainer.tick():
        pass
    # The depth is cached for a second between scrapes.
    await asyncio.sleep(1.05)
    s = await scrape(metrics.address)
    assert value(s, "mollifier_drain_runs_total", outcome="materialized") >= 4
    assert value(s, "mollifier_drain_batch_seconds_count") >= 1
    assert value(s, "mollifier_buffer_runs", state="queued") == 0
    assert value(s, "mollifier_buffer_oldest_age_seconds") == 0

    # Never a tenant id as a label, name or value.
    for name, rows in s.items():
        for labels, _ in rows:
            assert not {"env_id", "org_id", "env", "org"} & set(labels), name
            for v in labels.values():
                assert "metrics_secret" not in v, (name, labels)


async def test_scrape_survives_redis_trouble(
    redis_client: aioredis.Redis, metrics: MetricsServer
) -> None:
    s = await scrape(metrics.address)
    assert value(s, "mollifier_metrics_redis_up") == 1
    # From another connection than the App's: Redis stops answering everyone else.
    await redis_client.execute_command("CLIENT", "PAUSE", "6000", "ALL")  # type: ignore[no-untyped-call]
    try:
        await asyncio.sleep(1.05)
        started = time.monotonic()
        s = await scrape(metrics.address)
        # Bounded: the last numbers come back, flagged, well before Redis returns.
        assert time.monotonic() - started < 4.5
        assert value(s, "mollifier_metrics_redis_up") == 0
    finally:
        await redis_client.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]


async def test_every_rpc_gets_a_span(app: App) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = await start_server(app, "127.0.0.1:0", tracer_provider=provider)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            from mollifier_client.v1 import gate_pb2_grpc

            stub = gate_pb2_grpc.GateServiceStub(channel)
            await stub.Evaluate(
                gate_pb2.EvaluateRequest(env_id=ENV, org_id=ORG, task_identifier="email")
            )
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Evaluate(gate_pb2.EvaluateRequest(env_id="bad id!"))
    finally:
        await server.stop(0)
    spans = exporter.get_finished_spans()
    names = [span.name for span in spans]
    assert names.count("/mollifier.v1.GateService/Evaluate") == 2
    codes = sorted(int(span.attributes["rpc.grpc.status_code"]) for span in spans)
    assert codes == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0]]


def test_tracing_follows_otel_variables() -> None:
    assert tracer_provider_from_env({}) is None
    assert tracer_provider_from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
    on = tracer_provider_from_env({"OTEL_TRACES_EXPORTER": "console"})
    assert on is not None
    on.shutdown()
    assert (
        tracer_provider_from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"})
        is None
    )


@pytest.mark.slow
def test_serve_exposes_metrics_and_traces(redis_url: str, database_url: str) -> None:
    """`mollifier serve` with MOLLIFIER_METRICS_LISTEN and OTEL_TRACES_EXPORTER=console."""
    listen, metrics_port = f"127.0.0.1:{free_port()}", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOLLIFIER_", "OTEL_"))}
    env.update(
        MOLLIFIER_LISTEN=listen,
        MOLLIFIER_REDIS_URL=redis_url,
        MOLLIFIER_DATABASE_URL=database_url,
        MOLLIFIER_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
        MOLLIFIER_SHUTDOWN_GRACE_MS="1000",
        OTEL_TRACES_EXPORTER="console",
        OTEL_SERVICE_NAME="mollifier-test",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "mollifier", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        text = ""
        while not text:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "metrics endpoint never answered"
            try:
                text = _get(f"http://127.0.0.1:{metrics_port}/metrics")
            except OSError:
                time.sleep(0.2)
        assert "mollifier_buffer_runs" in text
        assert "mollifier_drain_state" in text
        with grpc.insecure_channel(listen) as channel:
            from mollifier_client.v1 import gate_pb2_grpc

            gate_pb2_grpc.GateServiceStub(channel).Evaluate(
                gate_pb2.EvaluateRequest(env_id=ENV, org_id=ORG, task_identifier="email"),
                timeout=10,
            )
            # Health's Watch streams with tracing on too (the tracing
            # interceptor cannot wrap it, so health is left untraced).
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
            first = next(watch)
            watch.cancel()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
        proc.terminate()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        # The console exporter prints finished spans on stdout at shutdown.
        assert "/mollifier.v1.GateService/Evaluate" in out
        assert "mollifier-test" in out
        assert "grpc.health.v1.Health" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
