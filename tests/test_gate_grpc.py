"""GateService and BufferService through a live in-process gRPC server."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from mollifier.config import Settings
from mollifier_client.v1 import buffer_pb2, gate_pb2, run_pb2

from tests.gate_helpers import evaluate_request, make_settings, new_env, snapshot, trigger_request
from tests.plugins.sidecar import Stubs


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return make_settings(redis_url, trip_threshold=2, trip_hold_ms=60_000, max_tags=4)


def bad_request_fields(err: grpc.aio.AioRpcError) -> list[str]:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    fields: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields.extend(v.field for v in bad.field_violations)
    return fields


async def test_evaluate_trips_over_grpc(stubs: Stubs) -> None:
    env = new_env()
    outs = [await stubs.gate.Evaluate(evaluate_request(env)) for _ in range(3)]
    assert [(o.decision, o.reason) for o in outs] == [
        (gate_pb2.DECISION_PASS_THROUGH, gate_pb2.DECISION_REASON_UNDER_THRESHOLD),
        (gate_pb2.DECISION_PASS_THROUGH, gate_pb2.DECISION_REASON_UNDER_THRESHOLD),
        (gate_pb2.DECISION_MOLLIFY, gate_pb2.DECISION_REASON_TRIPPED),
    ]
    assert [o.window_count for o in outs] == [1, 2, 3]
    assert outs[-1].threshold == 2 and outs[-1].HasField("tripped_until")
    assert not outs[0].HasField("tripped_until")
    off = await stubs.gate.Evaluate(evaluate_request(env, flags={}))
    assert off.reason == gate_pb2.DECISION_REASON_ORG_NOT_ENABLED


async def test_trigger_buffers_and_reads_back_over_grpc(stubs: Stubs) -> None:
    env = new_env()
    for _ in range(3):
        await stubs.gate.Evaluate(evaluate_request(env))
    req = trigger_request(env, snapshot=snapshot(env, "run_g1", idempotency_key="k"))
    resp = await stubs.gate.Trigger(req)
    assert resp.decision == gate_pb2.DECISION_MOLLIFY
    assert (resp.run_id, resp.duplicate) == ("run_g1", False)
    assert resp.run.status == run_pb2.RUN_STATUS_QUEUED

    dup = await stubs.gate.Trigger(
        trigger_request(env, snapshot=snapshot(env, "run_g2", idempotency_key="k"))
    )
    assert (dup.run_id, dup.duplicate, dup.run.run_id) == ("run_g1", True, "run_g1")

    got = await stubs.buffer.GetRun(buffer_pb2.GetRunRequest(env_id=env, run_id="run_g1"))
    assert got.run.source == run_pb2.RUN_SOURCE_BUFFER
    assert got.run.snapshot == resp.run.snapshot
    found = await stubs.buffer.FindRunByIdempotencyKey(
        buffer_pb2.FindRunByIdempotencyKeyRequest(
            env_id=env, task_identifier="task-a", idempotency_key="k"
        )
    )
    assert found.run.run_id == "run_g1"
    listed = await stubs.buffer.ListRuns(buffer_pb2.ListRunsRequest(env_id=env))
    assert [r.run_id for r in listed.runs] == ["run_g1"]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.buffer.GetRun(buffer_pb2.GetRunRequest(env_id=new_env(), run_id="run_g1"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_claims_over_grpc(stubs: Stubs) -> None:
    env = new_env()
    req = gate_pb2.ClaimIdempotencyKeyRequest(
        env_id=env, task_identifier="task-a", idempotency_key="k"
    )
    first = await stubs.gate.ClaimIdempotencyKey(req)
    second = await stubs.gate.ClaimIdempotencyKey(req)
    assert first.state == gate_pb2.CLAIM_STATE_CLAIMED and first.claim_token
    assert second.state == gate_pb2.CLAIM_STATE_BUSY and second.retry_after.ToMilliseconds() > 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.gate.PublishIdempotencyKey(
            gate_pb2.PublishIdempotencyKeyRequest(
                env_id=env,
                task_identifier="task-a",
                idempotency_key="k",
                claim_token="not-mine",
                run_id="run_x",
            )
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    pub = await stubs.gate.PublishIdempotencyKey(
        gate_pb2.PublishIdempotencyKeyRequest(
            env_id=env,
            task_identifier="task-a",
            idempotency_key="k",
            claim_token=first.claim_token,
            run_id="run_x",
        )
    )
    assert pub.run_id == "run_x"
    third = await stubs.gate.ClaimIdempotencyKey(req)
    assert (third.state, third.run_id) == (gate_pb2.CLAIM_STATE_RESOLVED, "run_x")


async def test_bad_input_is_invalid_argument_naming_the_field(stubs: Stubs) -> None:
    env = new_env()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.gate.Evaluate(evaluate_request("env{1}"))
    assert bad_request_fields(err.value) == ["env_id"]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.gate.Trigger(
            trigger_request(env, snapshot=snapshot(env, "run_1", tags=["a", "t" * 129]))
        )
    assert bad_request_fields(err.value) == ["snapshot.tags[1]"]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.gate.Trigger(trigger_request(env, snapshot=snapshot("env_other", "run_1")))
    assert bad_request_fields(err.value) == ["snapshot.env_id"]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.buffer.Accept(
            buffer_pb2.AcceptRequest(snapshot=snapshot(env, "run_1", metadata=b"{nope"))
        )
    assert bad_request_fields(err.value) == ["snapshot.metadata"]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.buffer.GetRun(buffer_pb2.GetRunRequest(env_id=env, run_id=""))
    assert bad_request_fields(err.value) == ["run_id"]


async def test_env_state_and_policy_over_grpc(stubs: Stubs) -> None:
    env = new_env()
    # An hour's window: the count read back cannot have decayed into the next
    # bucket between the two calls (with the default second it could).
    policy = gate_pb2.EnvPolicy(threshold=7, window=duration_pb2.Duration(seconds=3600))
    set_resp = await stubs.gate.SetEnvPolicy(
        gate_pb2.SetEnvPolicyRequest(env_id=env, policy=policy)
    )
    assert set_resp.effective_policy.threshold == 7
    decided = await stubs.gate.Evaluate(evaluate_request(env), timeout=10)
    assert decided.reason != gate_pb2.DECISION_REASON_FAIL_OPEN
    state = await stubs.gate.GetEnvState(gate_pb2.GetEnvStateRequest(env_id=env))
    assert (state.env_id, state.window_count, state.threshold) == (env, 1, 7)
    assert state.overrides.threshold == 7
