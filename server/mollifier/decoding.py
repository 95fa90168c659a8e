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

__all__ = ["GenericOnly", "Guarded", "guard"]

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


class GenericOnly:
    """Stands in for the server while a generated ``add_*Servicer_to_server``
    registers a service: its methods are added as generic handlers only.

    Why not registered methods too: grpc.aio keeps one pending request task
    per registered method and its accept loop calls ``asyncio.wait`` over all
    of them for every RPC, so with our ~30 methods each call paid for ~30
    callbacks added and removed in pure Python (the largest single cost of an
    Evaluate in the profile). With generic handlers alone there is one task.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        return None


class Guarded(GenericOnly):
    """Like :class:`GenericOnly`, guarding each handler once, at start-up.

    An interceptor would do the same per call, and grpc.aio interceptors cost
    a coroutine and a new handler on every RPC of the hot path.
    """

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        # The unguarded copy; the guarded one is added with the method table below.
        return None

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        guarded = {name: guard(h) for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, guarded),)
        )
