"""Domain errors and the one table that maps them to gRPC statuses.

Handlers raise these; ``grpc_errors`` turns them into a google.rpc.Status with
one ErrorInfo (an UPPER_SNAKE reason) and, for bad input, a BadRequest listing
every field violation. Store failures become UNAVAILABLE and anything else
INTERNAL, so nothing ever reaches a caller as UNKNOWN.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import grpc
import psycopg
import redis.exceptions
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from psycopg_pool import PoolClosed, PoolTimeout, TooManyRequests

__all__ = [
    "DOMAIN",
    "AlreadyExists",
    "DamagedEntry",
    "FailedPrecondition",
    "InvalidArgument",
    "MollifierError",
    "NotFound",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "grpc_errors",
    "to_status",
]

DOMAIN = "mollifier.v1"
log = logging.getLogger("mollifier.errors")


class MollifierError(Exception):
    """Base of every error a caller may see; subclasses fix the gRPC code."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        violations: Sequence[tuple[str, str]] = (),
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.violations = list(violations)
        self.retry_after_ms = retry_after_ms


class InvalidArgument(MollifierError):
    """A request field is missing, malformed or over its limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[tuple[str, str]]) -> None:
        fields = ", ".join(f for f, _ in violations)
        first = violations[0][1] if violations else "invalid request"
        text = f"invalid {fields}: {first}" if fields else first
        super().__init__(text, violations=violations, metadata={"fields": fields})


class NotFound(MollifierError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(MollifierError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(MollifierError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(MollifierError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "BUFFER_FULL"


class Unavailable(MollifierError):
    """A store cannot be reached, or an operation must be retried later."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class Unauthenticated(MollifierError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class DamagedEntry(MollifierError):
    """A buffered entry cannot be decoded; it is reported, never passed on."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = "DAMAGED_ENTRY"


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(err: MollifierError) -> grpc.Status:
    """The gRPC status, with ErrorInfo / BadRequest / RetryInfo details."""
    code_value = err.code.value[0]
    details = [
        _pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata))
    ]
    if err.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in err.violations
            ]
        )
        details.append(_pack(bad))
    if err.retry_after_ms is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(err.retry_after_ms)
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(code=code_value, message=err.message, details=details)
    return rpc_status.to_status(status)


def classify(exc: BaseException) -> MollifierError:
    """Map any exception to the error a caller sees."""
    if isinstance(exc, MollifierError):
        return exc
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return Unavailable(f"redis unavailable: {type(exc).__name__}", reason="REDIS_UNAVAILABLE")
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        return Unavailable("redis is loading its data", reason="REDIS_UNAVAILABLE")
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        # maxmemory reached under noeviction: the buffer cannot take more now.
        return ResourceExhausted("redis is out of memory", reason="REDIS_OUT_OF_MEMORY")
    if isinstance(
        exc,
        (
            redis.exceptions.ReadOnlyError,
            redis.exceptions.ClusterDownError,
            redis.exceptions.TryAgainError,
            redis.exceptions.MasterDownError,
        ),
    ):
        # A failover or resharding in progress: worth retrying shortly.
        return Unavailable(f"redis unavailable: {type(exc).__name__}", reason="REDIS_UNAVAILABLE")
    if isinstance(
        exc,
        (
            psycopg.OperationalError,
            psycopg.InterfaceError,
            PoolTimeout,
            PoolClosed,
            TooManyRequests,
        ),
    ):
        return Unavailable(
            f"postgres unavailable: {type(exc).__name__}", reason="POSTGRES_UNAVAILABLE"
        )
    if isinstance(exc, TimeoutError):
        return Unavailable("a store did not answer in time", reason="TIMEOUT")
    return MollifierError(f"internal error: {type(exc).__name__}")


assert grpc.StatusCode.INTERNAL.value[0] == code_pb2.INTERNAL

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def grpc_errors(method: F) -> F:
    """Wrap an async servicer method so every failure leaves as a rich status."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # every failure must leave with a known code
            err = classify(exc)
            if err.code is grpc.StatusCode.INTERNAL:
                log.exception("internal error in %s", method.__qualname__)
            await _abort(context, err)

    return wrapper  # type: ignore[return-value]


async def _abort(context: grpc.aio.ServicerContext[Any, Any], err: MollifierError) -> NoReturn:
    # The code and details are set first too, so interceptors that only watch
    # set_code (tracing) see the failure.
    context.set_code(err.code)
    context.set_details(err.message)
    await context.abort_with_status(to_status(err))  # type: ignore[attr-defined]
    raise AssertionError("abort_with_status returned")  # pragma: no cover
