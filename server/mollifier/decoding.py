"""Requests that cannot be decoded get INVALID_ARGUMENT, not UNKNOWN.

grpcio decodes a request before any servicer code runs; when that fails (a
string field holding bytes that are not UTF-8, a truncated message, a wrong
wire type) grpc.aio answers UNKNOWN with the Python exception's text. That is
bad input, so this interceptor swaps each of our unary handlers' decoder for
one that hands the failure to the handler, which then answers INVALID_ARGUMENT
(with a BadRequest naming ``request``) and writes nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from .errors import InvalidArgument, to_status

__all__ = ["DecodeGuard"]

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


class DecodeGuard(_Interceptor):
    """Wrap the unary handlers of the named services (``/<service>/`` prefixes)."""

    def __init__(self, services: Sequence[str]) -> None:
        self._prefixes = tuple(f"/{name}/" for name in services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if (
            handler is None
            or not method.startswith(self._prefixes)
            or handler.request_streaming
            or handler.response_streaming
            or handler.unary_unary is None
            or handler.request_deserializer is None
        ):
            return handler
        decode = handler.request_deserializer
        behavior = handler.unary_unary

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
