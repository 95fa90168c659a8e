"""Thin gRPC handlers for DrainService: each calls one Drainer method."""

from __future__ import annotations

from typing import Any

import grpc
from mollifier_client.v1 import drain_pb2, drain_pb2_grpc, run_pb2

from .app import App
from .codec import ts_from_ms
from .errors import grpc_errors
from .validation import Violations

__all__ = ["DrainServicer"]

Ctx = grpc.aio.ServicerContext[Any, Any]


def _refs(refs: Any) -> list[tuple[str, str]]:
    return [(r.env_id, r.run_id) for r in refs]


def _ref_msgs(pairs: list[tuple[str, str]]) -> list[run_pb2.RunRef]:
    return [run_pb2.RunRef(env_id=e, run_id=r) for e, r in pairs]


class DrainServicer(drain_pb2_grpc.DrainServiceServicer):
    def __init__(self, app: App) -> None:
        self.app = app

    @grpc_errors
    async def GetStatus(
        self, request: drain_pb2.GetStatusRequest, context: Ctx
    ) -> drain_pb2.GetStatusResponse:
        return await self.app.drainer.status(request.org_id)

    @grpc_errors
    async def Pause(self, request: drain_pb2.PauseRequest, context: Ctx) -> drain_pb2.PauseResponse:
        v = Violations()
        v.text("reason", request.reason, max_len=256)
        v.raise_if_any()
        state = await self.app.drainer.pause(request.reason)
        return drain_pb2.PauseResponse(state=state)  # type: ignore[arg-type]

    @grpc_errors
    async def Resume(
        self, request: drain_pb2.ResumeRequest, context: Ctx
    ) -> drain_pb2.ResumeResponse:
        state = await self.app.drainer.resume()
        return drain_pb2.ResumeResponse(state=state)  # type: ignore[arg-type]

    @grpc_errors
    async def Lease(self, request: drain_pb2.LeaseRequest, context: Ctx) -> drain_pb2.LeaseResponse:
        v = Violations()
        v.text("consumer_id", request.consumer_id, max_len=128)
        if request.HasField("lease_duration"):
            v.duration("lease_duration", request.lease_duration, max_ms=3_600_000)
        if request.max_runs > 1000:
            v.add("max_runs", "must be at most 1000")
        v.raise_if_any()
        lease_ms = (
            request.lease_duration.ToMilliseconds() if request.HasField("lease_duration") else 0
        )
        token, deadline, runs = await self.app.drainer.lease_external(
            request.consumer_id, request.max_runs, lease_ms
        )
        resp = drain_pb2.LeaseResponse(lease_token=token, runs=runs)
        if deadline:
            resp.lease_deadline.CopyFrom(ts_from_ms(deadline))
        return resp

    @grpc_errors
    async def Ack(self, request: drain_pb2.AckRequest, context: Ctx) -> drain_pb2.AckResponse:
        acked, rejected = await self.app.drainer.ack_external(
            request.lease_token, _refs(request.runs)
        )
        return drain_pb2.AckResponse(acked=acked, rejected=_ref_msgs(rejected))

    @grpc_errors
    async def Nack(self, request: drain_pb2.NackRequest, context: Ctx) -> drain_pb2.NackResponse:
        v = Violations()
        if request.HasField("retry_after"):
            v.duration("retry_after", request.retry_after, max_ms=86_400_000)
        v.raise_if_any()
        delay = request.retry_after.ToMilliseconds() if request.HasField("retry_after") else 0
        requeued, dead, rejected = await self.app.drainer.nack_external(
            request.lease_token,
            _refs(request.runs),
            retry_after_ms=delay,
            dead_letter=request.dead_letter,
            error=request.error,
        )
        return drain_pb2.NackResponse(
            requeued=requeued, dead_lettered=dead, rejected=_ref_msgs(rejected)
        )

    @grpc_errors
    async def ListFailed(
        self, request: drain_pb2.ListFailedRequest, context: Ctx
    ) -> drain_pb2.ListFailedResponse:
        runs, token = await self.app.drainer.list_failed(
            request.env_id, request.page_size, request.page_token
        )
        return drain_pb2.ListFailedResponse(runs=runs, next_page_token=token)

    @grpc_errors
    async def RetryFailed(
        self, request: drain_pb2.RetryFailedRequest, context: Ctx
    ) -> drain_pb2.RetryFailedResponse:
        n = await self.app.drainer.retry_failed(
            request.env_id, list(request.run_ids), request.request_id
        )
        return drain_pb2.RetryFailedResponse(retried=n)
