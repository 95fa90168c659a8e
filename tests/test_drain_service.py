"""DrainService over real gRPC: the handlers are thin, so this checks the wiring,
the field mapping and the error statuses."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from mollifier.app import App
from mollifier.config import Settings
from mollifier.server import Sidecar, start_server
from mollifier_client.v1 import drain_pb2, drain_pb2_grpc, run_pb2


@pytest.fixture
async def served(settings: Settings) -> AsyncIterator[tuple[App, Sidecar]]:
    app = await App.connect(settings.replace(drain_sink="external"), start_background=False)
    sidecar = await start_server(app, "127.0.0.1:0")
    yield app, sidecar
    await sidecar.stop(0)
    await app.close(grace=1)


async def test_lease_ack_status_and_errors(served: tuple[App, Sidecar]) -> None:
    app, sidecar = served
    for i in range(3):
        await app.buffer.accept(
            run_pb2.RunSnapshot(
                run_id=f"run_svc{i}", env_id="env_svc", org_id="org_svc", task_identifier="t"
            )
        )
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        stub = drain_pb2_grpc.DrainServiceStub(channel)
        status = await stub.GetStatus(drain_pb2.GetStatusRequest())
        assert status.state == drain_pb2.DRAIN_STATE_DISABLED  # external sink
        assert status.orgs[0].envs[0].queued == 3

        lease = await stub.Lease(
            drain_pb2.LeaseRequest(
                consumer_id="webapp",
                max_runs=2,
                lease_duration=duration_pb2.Duration(seconds=30),
            )
        )
        assert len(lease.runs) == 2 and lease.lease_token
        assert lease.runs[0].status == run_pb2.RUN_STATUS_DRAINING
        assert lease.lease_deadline.seconds > 0
        refs = [run_pb2.RunRef(env_id=r.env_id, run_id=r.run_id) for r in lease.runs]

        status = await stub.GetStatus(drain_pb2.GetStatusRequest(org_id="org_svc"))
        assert status.in_flight == 2

        bad = await stub.Ack(drain_pb2.AckRequest(lease_token="not-mine", runs=refs))
        assert bad.acked == 0 and len(bad.rejected) == 2
        good = await stub.Ack(drain_pb2.AckRequest(lease_token=lease.lease_token, runs=refs))
        assert good.acked == 2 and not good.rejected

        lease = await stub.Lease(drain_pb2.LeaseRequest(consumer_id="webapp"))
        nack = await stub.Nack(
            drain_pb2.NackRequest(
                lease_token=lease.lease_token,
                runs=[run_pb2.RunRef(env_id="env_svc", run_id="run_svc2")],
                dead_letter=True,
                error="refused by the webapp",
            )
        )
        assert nack.dead_lettered == 1
        failed = await stub.ListFailed(drain_pb2.ListFailedRequest(env_id="env_svc"))
        assert [r.run_id for r in failed.runs] == ["run_svc2"]
        assert failed.runs[0].last_error == "refused by the webapp"
        retried = await stub.RetryFailed(drain_pb2.RetryFailedRequest(env_id="env_svc"))
        assert retried.retried == 1

        paused = await stub.Pause(drain_pb2.PauseRequest(reason="deploy"))
        # The pause flag is shared: every drainer on this Redis is paused.
        assert paused.state == drain_pb2.DRAIN_STATE_PAUSED
        await stub.Resume(drain_pb2.ResumeRequest())

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListFailed(drain_pb2.ListFailedRequest())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status_proto = rpc_status.from_call(err.value)  # type: ignore[arg-type]
        assert status_proto is not None
        fields = []
        for detail in status_proto.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                fields = [v.field for v in bad_request.field_violations]
        assert fields == ["env_id"]
