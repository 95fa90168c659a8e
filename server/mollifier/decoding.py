"""Requests that cannot be decoded get INVALID_ARGUMENT, not UNKNOWN.

grpcio decodes a request before any servicer code runs; when that fails (a
string field holding bytes that are not UTF-8, a truncated message, a wrong
wire type) grpc.aio answers UNKNOWN with the Python exception's text. That is
bad input, so each of our unary handlers gets, once at registration, a decoder
that hands the failure to the handler, which then answers INVALID_ARGUMENT
(with a BadRequest naming ``request``) and writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc

from .errors import InvalidArgument, to_status

__all__ = ["Guarded", "guard"]

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    _Interceptor = grpc.aio.ServerInterceptor


class _Undecodable:
    """What the lenient decoder returns instead of raising."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def guard(handler: Handler) -> Handler:
    """The same unary handler, with a decoder that hands failures to it."""
    decode = handler.request_deserializer
    behavior = handler.unary_unary
    if (
        decode is None
        or behavior is None
        or handler.request_streaming
        or handler.response_streaming
    ):
        return handler

    def lenient(raw: bytes) -> Any:
        try:
            return decode(raw)
        except Exception as exc:
            return _Undecodable(str(exc) or type(exc).__name__)

    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, _Undecodable):
            err = InvalidArgument([("request", f"cannot be decoded: {request.error[:200]}")])
            await context.abort_with_status(to_status(err))  # type: ignore[attr-defined]
        return await behavior(request, context)  # type: ignore[arg-type]

    return grpc.unary_unary_rpc_method_handler(
        guarded, request_deserializer=lenient, response_serializer=handler.response_serializer
    )


class Guarded:
    """Stands in for the server while generated ``add_*Servicer_to_server``
    functions register a service, guarding each handler once, at start-up.

    An interceptor would do the same per call, and grpc.aio interceptors cost
    a coroutine and a new handler on every RPC of the hot path.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        # The unguarded copy; the guarded one is added with the method table below.
        return None

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        guarded = {name: guard(h) for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, guarded),)
        )
        self._server.add_registered_method_handlers(service, guarded)  # type: ignore[attr-defined]
