"""Thin gRPC handlers for GateService, BufferService and MutateService.

Each handler unpacks the request, calls one method of the App's parts and packs
the answer; ``grpc_errors`` maps every failure to a rich status.
"""

from __future__ import annotations

from typing import Any

import grpc
from mollifier_client.v1 import (
    buffer_pb2,
    buffer_pb2_grpc,
    gate_pb2,
    gate_pb2_grpc,
    mutate_pb2,
    mutate_pb2_grpc,
)

from .app import App
from .codec import ms_from_ts
from .errors import grpc_errors

__all__ = ["BufferServicer", "GateServicer", "MutateServicer"]

Ctx = grpc.aio.ServicerContext[Any, Any]


class GateServicer(gate_pb2_grpc.GateServiceServicer):
    def __init__(self, app: App) -> None:
        self.app = app

    @grpc_errors
    async def Evaluate(
        self, request: gate_pb2.EvaluateRequest, context: Ctx
    ) -> gate_pb2.EvaluateResponse:
        outcome = await self.app.gate.evaluate(request)
        return outcome.fill(gate_pb2.EvaluateResponse())

    @grpc_errors
    async def EvaluateBatch(
        self, request: gate_pb2.EvaluateBatchRequest, context: Ctx
    ) -> gate_pb2.EvaluateBatchResponse:
        outcomes = await self.app.gate.evaluate_batch(list(request.inputs))
        resp = gate_pb2.EvaluateBatchResponse()
        for outcome in outcomes:
            outcome.fill(resp.outcomes.add())
        return resp

    @grpc_errors
    async def Trigger(
        self, request: gate_pb2.TriggerRequest, context: Ctx
    ) -> gate_pb2.TriggerResponse:
        result = await self.app.gate.trigger(request, request.snapshot)
        resp = result.outcome.fill(gate_pb2.TriggerResponse())
        resp.run_id = result.run_id
        resp.duplicate = result.duplicate
        if result.run is not None:
            resp.run.CopyFrom(result.run)
        return resp

    @grpc_errors
    async def ClaimIdempotencyKey(
        self, request: gate_pb2.ClaimIdempotencyKeyRequest, context: Ctx
    ) -> gate_pb2.ClaimIdempotencyKeyResponse:
        claim = await self.app.gate.claim(
            request.env_id,
            request.task_identifier,
            request.idempotency_key,
            request.claim_ttl.ToMilliseconds(),
        )
        resp = gate_pb2.ClaimIdempotencyKeyResponse(
            state=claim.state,  # type: ignore[arg-type]
            claim_token=claim.claim_token,
            run_id=claim.run_id,
        )
        if claim.retry_after_ms:
            resp.retry_after.FromMilliseconds(claim.retry_after_ms)
        return resp

    @grpc_errors
    async def PublishIdempotencyKey(
        self, request: gate_pb2.PublishIdempotencyKeyRequest, context: Ctx
    ) -> gate_pb2.PublishIdempotencyKeyResponse:
        run_id = await self.app.gate.publish(
            request.env_id,
            request.task_identifier,
            request.idempotency_key,
            request.claim_token,
            request.run_id,
            ms_from_ts(request.expires_at) if request.HasField("expires_at") else 0,
        )
        return gate_pb2.PublishIdempotencyKeyResponse(run_id=run_id)

    @grpc_errors
    async def ReleaseIdempotencyKey(
        self, request: gate_pb2.ReleaseIdempotencyKeyRequest, context: Ctx
    ) -> gate_pb2.ReleaseIdempotencyKeyResponse:
        released = await self.app.gate.release(
            request.env_id, request.task_identifier, request.idempotency_key, request.claim_token
        )
        return gate_pb2.ReleaseIdempotencyKeyResponse(released=released)

    @grpc_errors
    async def GetEnvState(
        self, request: gate_pb2.GetEnvStateRequest, context: Ctx
    ) -> gate_pb2.GetEnvStateResponse:
        return await self.app.gate.env_state(request.env_id)

    @grpc_errors
    async def SetEnvPolicy(
        self, request: gate_pb2.SetEnvPolicyRequest, context: Ctx
    ) -> gate_pb2.SetEnvPolicyResponse:
        policy = await self.app.gate.set_policy(request.env_id, request.policy)
        return gate_pb2.SetEnvPolicyResponse(effective_policy=policy)


class BufferServicer(buffer_pb2_grpc.BufferServiceServicer):
    def __init__(self, app: App) -> None:
        self.app = app

    @grpc_errors
    async def Accept(
        self, request: buffer_pb2.AcceptRequest, context: Ctx
    ) -> buffer_pb2.AcceptResponse:
        outcome = await self.app.buffer.accept(request.snapshot)
        resp = buffer_pb2.AcceptResponse(
            result=outcome.result,  # type: ignore[arg-type]
            existing_run_id=outcome.existing_run_id,
        )
        if outcome.run is not None:
            resp.run.CopyFrom(outcome.run)
        return resp

    @grpc_errors
    async def GetRun(
        self, request: buffer_pb2.GetRunRequest, context: Ctx
    ) -> buffer_pb2.GetRunResponse:
        run = await self.app.buffer.get_run(request.env_id, request.run_id)
        return buffer_pb2.GetRunResponse(run=run)

    @grpc_errors
    async def FindRunByIdempotencyKey(
        self, request: buffer_pb2.FindRunByIdempotencyKeyRequest, context: Ctx
    ) -> buffer_pb2.FindRunByIdempotencyKeyResponse:
        run = await self.app.buffer.find_by_idempotency_key(
            request.env_id, request.task_identifier, request.idempotency_key
        )
        return buffer_pb2.FindRunByIdempotencyKeyResponse(run=run)

    @grpc_errors
    async def ListRuns(
        self, request: buffer_pb2.ListRunsRequest, context: Ctx
    ) -> buffer_pb2.ListRunsResponse:
        runs, token = await self.app.buffer.list_runs(
            request.env_id, request.page_size, request.page_token
        )
        return buffer_pb2.ListRunsResponse(runs=runs, next_page_token=token)


class MutateServicer(mutate_pb2_grpc.MutateServiceServicer):
    """Thin handlers over ``app.mutations`` (see mollifier.mutations)."""

    def __init__(self, app: App) -> None:
        self.app = app

    @grpc_errors
    async def CancelRun(
        self, request: mutate_pb2.CancelRunRequest, context: Ctx
    ) -> mutate_pb2.CancelRunResponse:
        return await self.app.mutations.cancel(
            request.env_id, request.run_id, request.request_id, request.reason
        )

    @grpc_errors
    async def RescheduleRun(
        self, request: mutate_pb2.RescheduleRunRequest, context: Ctx
    ) -> mutate_pb2.RescheduleRunResponse:
        return await self.app.mutations.reschedule(
            request.env_id,
            request.run_id,
            request.request_id,
            request.delay_until if request.HasField("delay_until") else None,
        )

    @grpc_errors
    async def UpdateMetadata(
        self, request: mutate_pb2.UpdateMetadataRequest, context: Ctx
    ) -> mutate_pb2.UpdateMetadataResponse:
        return await self.app.mutations.update_metadata(
            request.env_id,
            request.run_id,
            request.request_id,
            metadata_json=request.metadata_json,
            operations=list(request.operations),
            parent_operations=list(request.parent_operations),
            root_operations=list(request.root_operations),
        )

    @grpc_errors
    async def AddTags(
        self, request: mutate_pb2.AddTagsRequest, context: Ctx
    ) -> mutate_pb2.AddTagsResponse:
        return await self.app.mutations.add_tags(
            request.env_id, request.run_id, request.request_id, list(request.tags)
        )

    @grpc_errors
    async def ResetIdempotencyKey(
        self, request: mutate_pb2.ResetIdempotencyKeyRequest, context: Ctx
    ) -> mutate_pb2.ResetIdempotencyKeyResponse:
        return await self.app.mutations.reset_idempotency_key(
            request.env_id, request.request_id, request.task_identifier, request.idempotency_key
        )

    @grpc_errors
    async def ReplayRun(
        self, request: mutate_pb2.ReplayRunRequest, context: Ctx
    ) -> mutate_pb2.ReplayRunResponse:
        return await self.app.mutations.replay(
            request.env_id, request.run_id, request.request_id, request.new_run_id
        )
