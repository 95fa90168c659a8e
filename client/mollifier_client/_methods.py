"""The table of RPCs the clients call, shared by the sync and async facades."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from mollifier_client._trigger import ensure_run_id, new_request_id
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

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)

# Service key -> generated stub class (untyped generated code).
STUBS: dict[str, Callable[[Any], Any]] = {
    "gate": gate_pb2_grpc.GateServiceStub,
    "buffer": buffer_pb2_grpc.BufferServiceStub,
    "mutate": mutate_pb2_grpc.MutateServiceStub,
    "drain": drain_pb2_grpc.DrainServiceStub,
}


def _fill_run_id(request: Any) -> None:
    ensure_run_id(request)


def _fill_request_id(request: Any) -> None:
    if not request.request_id:
        request.request_id = new_request_id()


@dataclass(frozen=True)
class Method(Generic[Req, Resp]):
    """One RPC: where it lives, its message types and how it may be retried."""

    service: str
    name: str
    request_type: type[Req]
    response_type: type[Resp]
    # Also retry DEADLINE_EXCEEDED (the request carries a request_id).
    retry_deadline: bool = False
    # Fills client-made ids so that a retried request is the same request.
    prepare: Callable[[Any], None] | None = None
    # Retry UNAVAILABLE. Off where running twice is not the same as once: an
    # UNAVAILABLE can come after the server ran the request (the connection
    # dropped before the answer), and a second Evaluate counts twice, a second
    # Claim or Lease takes anew while the first's token is lost, a second Ack
    # or Nack finds its runs settled. (A request that never left the client is
    # retried by gRPC itself.)
    retry_unavailable: bool = True

    def build(self, request: Req | None, fields: Mapping[str, Any]) -> Req:
        """The request to send: ``request`` (copied) or one made from ``fields``."""
        if request is not None:
            if fields:
                raise TypeError(f"{self.name}: pass a request message or fields, not both")
            if not isinstance(request, self.request_type):
                raise TypeError(
                    f"{self.name} takes a {self.request_type.__name__},"
                    f" not a {type(request).__name__}"
                )
            built = self.request_type()
            built.CopyFrom(request)
        else:
            built = self.request_type(**fields)
        if self.prepare is not None:
            self.prepare(built)
        return built


def _m(
    service: str,
    name: str,
    req: type[Req],
    resp: type[Resp],
    *,
    retry_deadline: bool = False,
    prepare: Callable[[Any], None] | None = None,
    retry_unavailable: bool = True,
) -> Method[Req, Resp]:
    return Method(service, name, req, resp, retry_deadline, prepare, retry_unavailable)


# GateService
EVALUATE = _m(
    "gate",
    "Evaluate",
    gate_pb2.EvaluateRequest,
    gate_pb2.EvaluateResponse,
    retry_unavailable=False,
)
TRIGGER = _m(
    "gate", "Trigger", gate_pb2.TriggerRequest, gate_pb2.TriggerResponse, prepare=_fill_run_id
)
EVALUATE_BATCH = _m(
    "gate",
    "EvaluateBatch",
    gate_pb2.EvaluateBatchRequest,
    gate_pb2.EvaluateBatchResponse,
    retry_unavailable=False,
)
CLAIM_IDEMPOTENCY_KEY = _m(
    "gate",
    "ClaimIdempotencyKey",
    gate_pb2.ClaimIdempotencyKeyRequest,
    gate_pb2.ClaimIdempotencyKeyResponse,
    retry_unavailable=False,
)
PUBLISH_IDEMPOTENCY_KEY = _m(
    "gate",
    "PublishIdempotencyKey",
    gate_pb2.PublishIdempotencyKeyRequest,
    gate_pb2.PublishIdempotencyKeyResponse,
)
RELEASE_IDEMPOTENCY_KEY = _m(
    "gate",
    "ReleaseIdempotencyKey",
    gate_pb2.ReleaseIdempotencyKeyRequest,
    gate_pb2.ReleaseIdempotencyKeyResponse,
)
GET_ENV_STATE = _m("gate", "GetEnvState", gate_pb2.GetEnvStateRequest, gate_pb2.GetEnvStateResponse)
SET_ENV_POLICY = _m(
    "gate", "SetEnvPolicy", gate_pb2.SetEnvPolicyRequest, gate_pb2.SetEnvPolicyResponse
)

# BufferService
ACCEPT = _m(
    "buffer", "Accept", buffer_pb2.AcceptRequest, buffer_pb2.AcceptResponse, prepare=_fill_run_id
)
GET_RUN = _m("buffer", "GetRun", buffer_pb2.GetRunRequest, buffer_pb2.GetRunResponse)
FIND_RUN_BY_IDEMPOTENCY_KEY = _m(
    "buffer",
    "FindRunByIdempotencyKey",
    buffer_pb2.FindRunByIdempotencyKeyRequest,
    buffer_pb2.FindRunByIdempotencyKeyResponse,
)
LIST_RUNS = _m("buffer", "ListRuns", buffer_pb2.ListRunsRequest, buffer_pb2.ListRunsResponse)


def _once(service: str, name: str, req: type[Req], resp: type[Resp]) -> Method[Req, Resp]:
    """A call carrying a request_id: applied once, so DEADLINE_EXCEEDED is retried too."""
    return Method(service, name, req, resp, retry_deadline=True, prepare=_fill_request_id)


# MutateService
CANCEL_RUN = _once("mutate", "CancelRun", mutate_pb2.CancelRunRequest, mutate_pb2.CancelRunResponse)
RESCHEDULE_RUN = _once(
    "mutate", "RescheduleRun", mutate_pb2.RescheduleRunRequest, mutate_pb2.RescheduleRunResponse
)
UPDATE_METADATA = _once(
    "mutate", "UpdateMetadata", mutate_pb2.UpdateMetadataRequest, mutate_pb2.UpdateMetadataResponse
)
ADD_TAGS = _once("mutate", "AddTags", mutate_pb2.AddTagsRequest, mutate_pb2.AddTagsResponse)
RESET_IDEMPOTENCY_KEY = _once(
    "mutate",
    "ResetIdempotencyKey",
    mutate_pb2.ResetIdempotencyKeyRequest,
    mutate_pb2.ResetIdempotencyKeyResponse,
)
REPLAY_RUN = _once("mutate", "ReplayRun", mutate_pb2.ReplayRunRequest, mutate_pb2.ReplayRunResponse)

# DrainService
GET_STATUS = _m("drain", "GetStatus", drain_pb2.GetStatusRequest, drain_pb2.GetStatusResponse)
PAUSE = _m("drain", "Pause", drain_pb2.PauseRequest, drain_pb2.PauseResponse)
RESUME = _m("drain", "Resume", drain_pb2.ResumeRequest, drain_pb2.ResumeResponse)
LEASE = _m(
    "drain", "Lease", drain_pb2.LeaseRequest, drain_pb2.LeaseResponse, retry_unavailable=False
)
ACK = _m("drain", "Ack", drain_pb2.AckRequest, drain_pb2.AckResponse, retry_unavailable=False)
NACK = _m("drain", "Nack", drain_pb2.NackRequest, drain_pb2.NackResponse, retry_unavailable=False)
LIST_FAILED = _m("drain", "ListFailed", drain_pb2.ListFailedRequest, drain_pb2.ListFailedResponse)
RETRY_FAILED = _once(
    "drain", "RetryFailed", drain_pb2.RetryFailedRequest, drain_pb2.RetryFailedResponse
)
