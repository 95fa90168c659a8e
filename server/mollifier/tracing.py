"""OpenTelemetry tracing of every RPC, configured by the standard OTEL_* variables.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter other than
``none``, or when ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set (then the exporter defaults to
``otlp``); ``OTEL_SDK_DISABLED=true`` turns it off whatever else is set.
Exporters are found through the SDK's ``opentelemetry_traces_exporter`` entry
points: ``console`` ships with the SDK, ``otlp`` needs
``opentelemetry-exporter-otlp`` installed. The service name and resource come
from ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` (default service name
``mollifier``); sampling from ``OTEL_TRACES_SAMPLER``.

When nothing is configured no interceptor is installed, so an untraced sidecar
pays nothing per call.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

__all__ = ["server_interceptor", "tracer_provider_from_env"]

log = logging.getLogger("mollifier.tracing")


def _exporter_names(env: Mapping[str, str]) -> list[str]:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if not raw:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    return [n.strip() for n in raw.split(",") if n.strip() and n.strip() != "none"]


def tracer_provider_from_env(environ: Mapping[str, str] | None = None) -> Any | None:
    """A TracerProvider exporting as the OTEL_* variables say, or None when tracing is off."""
    env = os.environ if environ is None else environ
    names = _exporter_names(env)
    if not names:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {}
    if not env.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = "mollifier"
    # Resource.create also reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    provider = TracerProvider(resource=Resource.create(attributes))
    found = {ep.name: ep for ep in entry_points(group="opentelemetry_traces_exporter")}
    added = 0
    for name in names:
        ep = found.get(name)
        if ep is None:
            log.warning(
                "tracing exporter not installed; spans for it are dropped",
                extra={"exporter": name, "hint": "pip install opentelemetry-exporter-otlp"},
            )
            continue
        provider.add_span_processor(BatchSpanProcessor(ep.load()()))
        added += 1
    if not added:
        return None
    log.info("tracing on", extra={"exporters": names})
    return provider


def server_interceptor(provider: Any) -> Any:
    """The grpc.aio server interceptor that opens a span per RPC under ``provider``."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    from opentelemetry.instrumentation.grpc.filters import negate, service_name

    _record_abort_with_status()
    # Health is left untraced: its probes are noise in a trace store, and the
    # interceptor iterates a streaming handler's result with `async for`,
    # which fails for Watch (it writes with context.write instead).
    return aio_server_interceptor(
        tracer_provider=provider, filter_=negate(service_name("grpc.health.v1.Health"))
    )


def _record_abort_with_status() -> None:
    """Teach the instrumentation's context wrapper about ``abort_with_status``.

    The sidecar fails calls with ``context.abort_with_status`` (rich error
    details), which the wrapper only forwards: the span would end with status
    code 0. This adds the same bookkeeping its ``abort`` does. It touches a
    private class, so any surprise leaves the instrumentation as it was.
    """
    try:
        from opentelemetry.instrumentation.grpc import _aio_server
        from opentelemetry.instrumentation.grpc._utilities import _server_status
        from opentelemetry.semconv._incubating.attributes.rpc_attributes import (
            RPC_GRPC_STATUS_CODE,
        )

        cls: Any = _aio_server._OpenTelemetryAioServicerContext
    except Exception:  # pragma: no cover - a newer instrumentation may move these
        return
    if "abort_with_status" in vars(cls):
        return

    async def abort_with_status(self: Any, status: Any) -> Any:
        self._self_code = status.code
        self._self_details = status.details
        self._self_active_span.set_attribute(RPC_GRPC_STATUS_CODE, status.code.value[0])
        self._self_active_span.set_status(_server_status(status.code, status.details))
        return await self.__wrapped__.abort_with_status(status)

    cls.abort_with_status = abort_with_status
