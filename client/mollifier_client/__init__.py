"""Python client for the Mollifier gRPC sidecar.

Two facades over the generated stubs, with the same methods:
:class:`AsyncClient` (asyncio, ``grpc.aio``) and :class:`Client` (blocking).
Failures raise a :class:`MollifierError` subclass per kind of error. The
request and response messages live in ``mollifier_client.v1``; the ones most
callers need are re-exported here.
"""

from __future__ import annotations

from mollifier_client._async import AsyncClient
from mollifier_client._errors import (
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    MollifierError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from mollifier_client._retry import RetryPolicy
from mollifier_client._sync import Client
from mollifier_client._trigger import new_run_id
from mollifier_client.v1.gate_pb2 import (
    Decision,
    DecisionReason,
    EvaluateResponse,
    GateInput,
    TriggerResponse,
)
from mollifier_client.v1.mutate_pb2 import MetadataOperation, MetadataOperationType
from mollifier_client.v1.run_pb2 import Run, RunRef, RunSnapshot, RunSource, RunStatus

__version__ = "0.1.0"

__all__ = [
    "AlreadyExistsError",
    "AsyncClient",
    "CancelledError",
    "Client",
    "DataLossError",
    "DeadlineExceededError",
    "Decision",
    "DecisionReason",
    "EvaluateResponse",
    "FailedPreconditionError",
    "GateInput",
    "InternalError",
    "InvalidArgumentError",
    "MetadataOperation",
    "MetadataOperationType",
    "MollifierError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "Run",
    "RunRef",
    "RunSnapshot",
    "RunSource",
    "RunStatus",
    "TriggerResponse",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "__version__",
    "new_run_id",
]
