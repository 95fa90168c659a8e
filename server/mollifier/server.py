"""The gRPC runtime: one grpc.aio server carrying the four services.

``start_server`` builds and starts a server for an already connected ``App``
(tests use it on port 0); ``serve`` is what ``mollifier serve`` runs: connect,
check Redis, serve until SIGTERM/SIGINT, then shut down in order (health goes
NOT_SERVING, in-flight RPCs get the grace period, then the stores are closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer
from mollifier_client.v1 import (
    buffer_pb2,
    buffer_pb2_grpc,
    drain_pb2,
    drain_pb2_grpc,
    gate_pb2,
    gate_pb2_grpc,
    mutate_pb2,
    mutate_pb2_grpc,
)

from .app import App, settle_gc
from .config import Settings
from .decoding import GenericOnly, Guarded
from .drain_service import DrainServicer
from .services import BufferServicer, GateServicer, MutateServicer

__all__ = [
    "SERVICE_NAMES",
    "Sidecar",
    "StartupError",
    "check_redis",
    "run",
    "serve",
    "start_server",
]

log = logging.getLogger("mollifier.server")

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    _Interceptor = grpc.aio.ServerInterceptor

SERVICE_NAMES: tuple[str, ...] = (
    gate_pb2.DESCRIPTOR.services_by_name["GateService"].full_name,
    buffer_pb2.DESCRIPTOR.services_by_name["BufferService"].full_name,
    mutate_pb2.DESCRIPTOR.services_by_name["MutateService"].full_name,
    drain_pb2.DESCRIPTOR.services_by_name["DrainService"].full_name,
)
HEALTH_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

# Health and reflection stay open without a token: probes and grpcurl's `list`
# must work before anyone has a secret, and they reveal nothing about runs.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# Room above the largest valid request for ids, tags and framing, so an
# oversized payload reaches validation (INVALID_ARGUMENT naming the field)
# instead of being cut off by the transport with a bare RESOURCE_EXHAUSTED.
_MESSAGE_HEADROOM = 256 * 1024


class StartupError(RuntimeError):
    """The sidecar refuses to start (e.g. strict mode and an unsafe Redis)."""


class _AuthInterceptor(_Interceptor):
    """Require ``authorization: Bearer <token>`` on every RPC but health and reflection."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        method = handler_call_details.method or ""
        if method.startswith(_OPEN_PREFIXES):
            return await continuation(handler_call_details)
        presented = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                presented = value.encode() if isinstance(value, str) else value
                break
        # Constant time, so the token cannot be guessed byte by byte from latency.
        if hmac.compare_digest(presented, self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _deny(handler)


def _deny(handler: Handler | None) -> Handler:
    async def abort(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    async def abort_stream(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        yield  # pragma: no cover - makes this an async generator

    deser = handler.request_deserializer if handler is not None else None
    ser = handler.response_serializer if handler is not None else None
    if handler is None or (not handler.request_streaming and not handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(
            abort, request_deserializer=deser, response_serializer=ser
        )
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            abort_stream, request_deserializer=deser, response_serializer=ser
        )
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            abort, request_deserializer=deser, response_serializer=ser
        )
    return grpc.unary_stream_rpc_method_handler(
        abort_stream, request_deserializer=deser, response_serializer=ser
    )


class Sidecar:
    """A started server: where it listens, its health servicer, and how to stop it."""

    def __init__(
        self,
        server: grpc.aio.Server,
        health_servicer: HealthServicer,
        host: str,
        port: int,
    ) -> None:
        self.server = server
        self.health = health_servicer
        self.host = host
        self.port = port
        self._stopped = False

    @property
    def address(self) -> str:
        """``host:port`` a client can dial (IPv6 hosts bracketed)."""
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Go NOT_SERVING, give in-flight RPCs ``grace`` seconds, then close."""
        if self._stopped:
            return
        self._stopped = True
        # Flips every service to NOT_SERVING and ignores later changes.
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def _split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert_file:
        return None
    key = Path(settings.tls_key_file).read_bytes()
    cert = Path(settings.tls_cert_file).read_bytes()
    ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


async def start_server(
    app: App,
    listen: str | None = None,
    *,
    tracer_provider: Any | None = None,
    reuse_port: bool = False,
) -> Sidecar:
    """Build, bind and start the server for ``app``; ``listen`` may use port 0.

    With ``tracer_provider`` (an OpenTelemetry SDK TracerProvider) every RPC
    gets a span, rejected ones included. ``reuse_port`` lets several worker
    processes of one sidecar bind the same port (MOLLIFIER_WORKERS).
    """
    settings = app.settings
    address = listen or settings.listen
    limit = settings.max_payload_bytes + settings.max_metadata_bytes + _MESSAGE_HEADROOM
    interceptors: list[_Interceptor] = []
    if tracer_provider is not None:
        from .tracing import server_interceptor

        # First, so a call refused for its token is traced too.
        interceptors.append(server_interceptor(tracer_provider))
    if settings.auth_token:
        interceptors.append(_AuthInterceptor(settings.auth_token))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # A restarted sidecar must not share its port with a stale one;
            # only the workers of one sidecar share it, on purpose.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )
    # An undecodable request is INVALID_ARGUMENT, not UNKNOWN: handlers are
    # guarded once here rather than by a per-call interceptor.
    guarded: Any = Guarded(server)
    gate_pb2_grpc.add_GateServiceServicer_to_server(GateServicer(app), guarded)
    buffer_pb2_grpc.add_BufferServiceServicer_to_server(BufferServicer(app), guarded)
    mutate_pb2_grpc.add_MutateServiceServicer_to_server(MutateServicer(app), guarded)
    drain_pb2_grpc.add_DrainServiceServicer_to_server(DrainServicer(app), guarded)
    health_servicer = HealthServicer()
    generic: Any = GenericOnly(server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, generic)
    # What reflection.enable_server_reflection does for an aio server, with
    # the methods added as generic handlers (see GenericOnly).
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        ReflectionServicer((*SERVICE_NAMES, HEALTH_NAME, reflection.SERVICE_NAME)),
        generic,
    )
    creds = _credentials(settings)
    try:
        if creds is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, creds)
    except RuntimeError as exc:
        raise StartupError(
            f"cannot listen on {address} (MOLLIFIER_LISTEN): in use, or not an address of this host"
        ) from exc
    host, _ = _split_listen(address)
    await server.start()
    sidecar = Sidecar(server, health_servicer, host, port)
    await sidecar.set_serving(True)
    return sidecar


async def check_redis(redis: Any, settings: Settings) -> list[str]:
    """Warn (or refuse, with MOLLIFIER_STRICT_REDIS) when Redis may lose buffered runs.

    Returns the problems found. CONFIG is often disabled on managed Redis; then
    nothing can be learned and nothing is said.
    """
    problems: list[str] = []
    try:
        policy = await redis.config_get("maxmemory-policy")
        persistence = await redis.config_get("appendonly")
        save = await redis.config_get("save")
    except Exception as exc:  # managed Redis often forbids CONFIG
        log.info("cannot read Redis CONFIG; skipping safety check", extra={"error": repr(exc)})
        return problems

    def value(found: Any, key: str) -> str:
        for k, v in dict(found).items():
            k = k.decode() if isinstance(k, bytes) else str(k)
            if k == key:
                return v.decode() if isinstance(v, bytes) else str(v)
        return ""

    eviction = value(policy, "maxmemory-policy")
    if eviction and eviction != "noeviction":
        problems.append(
            f"Redis maxmemory-policy is {eviction!r}: buffered runs may be evicted "
            "(set it to noeviction)"
        )
    if value(persistence, "appendonly") != "yes" and not value(save, "save").strip():
        problems.append(
            "Redis keeps nothing on disk (no AOF, no RDB save): a restart loses buffered runs"
        )
    for problem in problems:
        if settings.strict_redis:
            log.error(problem)
        else:
            log.warning(problem)
    if problems and settings.strict_redis:
        raise StartupError("refusing to start (MOLLIFIER_STRICT_REDIS): " + "; ".join(problems))
    return problems


async def serve(settings: Settings, *, ready: Callable[[Sidecar], None] | None = None) -> None:
    """Run the sidecar until SIGTERM or SIGINT, then stop gracefully.

    With MOLLIFIER_DRAIN_PROCESS (or MOLLIFIER_WORKERS above 1) the drainer runs
    in a supervised child process, and N-1 more gRPC workers share the port;
    see supervisor.py. Shutdown stops the server, the drainer and the children
    at once, all within one MOLLIFIER_SHUTDOWN_GRACE_MS.
    """
    from .metrics import MetricsServer, start_metrics
    from .supervisor import DRAIN_COMMAND, WORKER_COMMAND, Child, counters_key, new_instance_id
    from .tracing import tracer_provider_from_env

    provider = tracer_provider_from_env()
    metrics: MetricsServer | None = None
    children: list[Child] = []
    instance = new_instance_id()
    app = await App.connect(settings, start_background=False)
    loop = asyncio.get_running_loop()
    deadline: float | None = None
    try:
        drain_elsewhere = app.drainer.enabled and (settings.drain_process or settings.workers > 1)
        if drain_elsewhere:
            app.drainer.remote_key = counters_key(instance)
        await app.start_background()
        await check_redis(app.redis, settings)
        if settings.metrics_listen:
            metrics = await start_metrics(app, settings.metrics_listen)
            log.info("metrics serving", extra={"address": metrics.address})
        sidecar = await start_server(app, tracer_provider=provider, reuse_port=settings.workers > 1)
        if drain_elsewhere:
            children.append(Child.for_command("drain", DRAIN_COMMAND, settings, instance))
        for n in range(1, settings.workers):
            worker = Child.for_command(f"worker-{n}", WORKER_COMMAND, settings, instance)
            children.append(worker)
        for child in children:
            await child.start()
        settle_gc()
        log.info(
            "mollifier serving",
            extra={
                "address": sidecar.address,
                "workers": settings.workers,
                "drain_process": drain_elsewhere,
                "settings": settings.redacted(),
            },
        )
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        if ready is not None:
            ready(sidecar)
        try:
            await stopping.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        grace = settings.shutdown_grace_ms / 1000
        deadline = loop.time() + grace
        log.info("shutting down", extra={"grace_s": grace})
        # One grace for everything: in-flight RPCs, the drainer's in-flight
        # batches (here or in the drain process) and the workers, all at once.
        await asyncio.gather(
            sidecar.stop(grace),
            app.drainer.stop(grace),
            *(child.stop(grace) for child in children),
        )
    finally:
        left = None if deadline is None else max(deadline - loop.time(), 0.0)
        for child in children:
            with contextlib.suppress(Exception):
                await child.stop(settings.shutdown_grace_ms / 1000 if left is None else left)
        if metrics is not None:
            await metrics.stop()
        await app.close(grace=left)
        if provider is not None:
            # Flushes the spans still batched for export.
            provider.shutdown()
    log.info("stopped")


T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
