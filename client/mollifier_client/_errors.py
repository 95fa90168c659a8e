"""Exceptions raised by the client, decoded from the sidecar's rich gRPC errors.

The sidecar sends a ``google.rpc.Status`` in the ``grpc-status-details-bin``
trailer, with an ``ErrorInfo`` (an UPPER_SNAKE reason and string metadata), a
``BadRequest`` (field violations) for bad input, and a ``RetryInfo`` when it
knows how long to wait. They are decoded here with private, wire-compatible
copies of those messages (``mollifier_client._rpc``), so the client needs only
grpcio and protobuf.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc

from mollifier_client._rpc import details_pb2

__all__ = [
    "AlreadyExistsError",
    "CancelledError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "MollifierError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "error_from_rpc",
]

_DETAILS_KEY = "grpc-status-details-bin"
_ERROR_INFO = "google.rpc.ErrorInfo"
_BAD_REQUEST = "google.rpc.BadRequest"
_RETRY_INFO = "google.rpc.RetryInfo"


class MollifierError(Exception):
    """Base class of every error the client raises for a failed call.

    Attributes:
        code: The gRPC status code.
        message: The status message the server (or gRPC) gave.
        reason: The ``ErrorInfo`` reason, e.g. ``"RUN_NOT_FOUND"``; for errors
            without one (transport failures), the code's name.
        domain: The ``ErrorInfo`` domain (``"mollifier.v1"`` for the sidecar),
            or ``""``.
        metadata: The ``ErrorInfo`` metadata, e.g. ``{"run_id": "run_..."}``.
        field_violations: ``(field, description)`` pairs from a ``BadRequest``.
        retry_after: Seconds the server asks to wait before retrying
            (``RetryInfo``), or ``None``.

    The original :class:`grpc.RpcError` is the exception's ``__cause__``.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        domain: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: Iterable[tuple[str, str]] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.reason = reason or self.code.name
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        self.retry_after = retry_after

    def __str__(self) -> str:
        text = f"{self.code.name} ({self.reason}): {self.message}"
        if self.field_violations:
            fields = "; ".join(f"{f}: {d}" for f, d in self.field_violations)
            text += f" [{fields}]"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"


class InvalidArgumentError(MollifierError):
    """The request is malformed (``INVALID_ARGUMENT``): a bug in the caller.

    ``field_violations`` names every offending field. Nothing was written.
    """

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(MollifierError):
    """The run or key does not exist in this env (``NOT_FOUND``).

    Reasons: ``RUN_NOT_FOUND``, ``IDEMPOTENCY_KEY_NOT_FOUND``.
    """

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(MollifierError):
    """The thing to create exists already (``ALREADY_EXISTS``)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(MollifierError):
    """The system is not in a state that allows the call (``FAILED_PRECONDITION``).

    Reasons include ``CLAIM_NOT_HELD`` and ``IDEMPOTENCY_KEY_BOUND``. Retrying
    the same call will fail the same way until the state changes.
    """

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(MollifierError):
    """The buffer is full (``RESOURCE_EXHAUSTED``, reason ``BUFFER_FULL``).

    ``retry_after`` says when to try again. Not retried by the client.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(MollifierError):
    """The sidecar or one of its stores cannot be reached (``UNAVAILABLE``).

    Reasons from the server: ``REDIS_UNAVAILABLE``, ``POSTGRES_UNAVAILABLE``,
    ``TIMEOUT``; a transport failure (nothing listening, connection reset) has
    reason ``UNAVAILABLE``. Raised only once the client's retries ran out.
    """

    code = grpc.StatusCode.UNAVAILABLE


class UnauthenticatedError(MollifierError):
    """The bearer token is missing or wrong (``UNAUTHENTICATED``)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(MollifierError):
    """The caller may not do this (``PERMISSION_DENIED``)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceededError(MollifierError):
    """The call's deadline passed before an answer (``DEADLINE_EXCEEDED``)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(MollifierError):
    """The call was cancelled (``CANCELLED``), e.g. the channel was closed.

    Not to be confused with :class:`asyncio.CancelledError`, which the client
    never swallows.
    """

    code = grpc.StatusCode.CANCELLED


class DataLossError(MollifierError):
    """A buffered entry is damaged (``DATA_LOSS``, reason ``DAMAGED_ENTRY``)."""

    code = grpc.StatusCode.DATA_LOSS


class UnimplementedError(MollifierError):
    """The sidecar does not implement this RPC (``UNIMPLEMENTED``), e.g. an older version."""

    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(MollifierError):
    """Any other failure (``INTERNAL``, ``UNKNOWN``, ``ABORTED``, ...)."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[MollifierError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnavailableError,
        UnauthenticatedError,
        PermissionDeniedError,
        DeadlineExceededError,
        CancelledError,
        DataLossError,
        UnimplementedError,
        InternalError,
    )
}


for _cls in (MollifierError, *_BY_CODE.values()):
    _cls.__module__ = "mollifier_client"  # shown as mollifier_client.NotFoundError


def _call_attr(err: grpc.RpcError, name: str) -> Any:
    method = getattr(err, name, None)
    if method is None:
        return None
    try:
        return method()
    except Exception:  # a half-built error object must not hide the real one
        return None


def _details_status(trailers: Any) -> details_pb2.Status | None:
    if not trailers:
        return None
    for item in trailers:
        key, value = item[0], item[1]
        if key == _DETAILS_KEY and isinstance(value, bytes):
            try:
                return details_pb2.Status.FromString(value)
            except Exception:  # undecodable details: fall back to code and message
                return None
    return None


def error_from_rpc(err: grpc.RpcError) -> MollifierError:
    """The :class:`MollifierError` subclass for a failed gRPC call.

    The caller should ``raise error_from_rpc(err) from err``.
    """
    code = _call_attr(err, "code")
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    message = _call_attr(err, "details") or ""
    reason: str | None = None
    domain = ""
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    retry_after: float | None = None

    status = _details_status(_call_attr(err, "trailing_metadata"))
    if status is not None:
        message = message or status.message
        for detail in status.details:
            type_name = detail.type_url.rpartition("/")[2]
            try:
                if type_name == _ERROR_INFO:
                    info = details_pb2.ErrorInfo.FromString(detail.value)
                    reason = info.reason or None
                    domain = info.domain
                    metadata = dict(info.metadata)
                elif type_name == _BAD_REQUEST:
                    bad = details_pb2.BadRequest.FromString(detail.value)
                    violations.extend((v.field, v.description) for v in bad.field_violations)
                elif type_name == _RETRY_INFO:
                    retry = details_pb2.RetryInfo.FromString(detail.value)
                    retry_after = retry.retry_delay.ToTimedelta().total_seconds()
            except Exception:  # one bad detail must not hide the others
                continue

    cls = _BY_CODE.get(code, InternalError)
    return cls(
        str(message),
        code=code,
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=violations,
        retry_after=retry_after,
    )
