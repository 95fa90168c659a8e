"""Hostile input through a live sidecar: hypothesis builds requests for every RPC
from the proto descriptors (random and well-formed ids, empty and huge fields,
invalid UTF-8 in byte fields, bad JSON, bad metadata paths, timestamps out of
range, unknown enum values). Every answer is OK or a deliberate error code,
never UNKNOWN or INTERNAL, and the buffer's invariants hold afterwards.

Also: a message over the size limit gets RESOURCE_EXHAUSTED without harming
other clients, a string field holding invalid UTF-8 on the wire is refused,
and many concurrent streams from one client do not starve another.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import hypothesis.strategies as st
import pytest
import redis.asyncio as aioredis
from google.protobuf import descriptor as _d
from google.protobuf.message import Message
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from mollifier.config import Settings
from mollifier_client.v1 import buffer_pb2, drain_pb2, gate_pb2, mutate_pb2, run_pb2

from tests.fault_helpers import assert_buffer_consistent
from tests.plugins.sidecar import LiveSidecar, Stubs

FD = _d.FieldDescriptor

SERVICES = {
    "gate": gate_pb2.DESCRIPTOR.services_by_name["GateService"],
    "buffer": buffer_pb2.DESCRIPTOR.services_by_name["BufferService"],
    "mutate": mutate_pb2.DESCRIPTOR.services_by_name["MutateService"],
    "drain": drain_pb2.DESCRIPTOR.services_by_name["DrainService"],
}
RPCS = [(svc, m.name, m) for svc, d in SERVICES.items() for m in d.methods]

# Never acceptable: an unhandled exception or a broken invariant in the sidecar.
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}

ENVS = ["env_h1", "env_h2"]

_ids = st.sampled_from(
    ["env_h1", "env_h2", "org_h1", "run_h1", "run_h2", "task-h", "req_1", "k1", "tag"]
)
_weird_text = st.sampled_from(
    [
        "",
        " ",
        "{env_h1}",
        "a:b:c",
        "..",
        "$.",
        "a..b",
        "$.a[0]",
        "a.-1",
        "\x00",
        "\n\r\t",
        "é" * 3,
        "💥",
        "run_" + "x" * 300,
        "null",
        "NaN",
        "Infinity",
        "1e999",
        "{",
        '{"a":',
        "[1,2",
        '{"a":1}',
        "[]",
        '"s"',
        "-0",
        "9" * 400,
    ]
)
_text = st.one_of(_ids, _weird_text, st.text(max_size=40))
_huge_text = st.integers(1_000, 70_000).map(lambda n: "y" * n)
_bytes = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"\xff\xfe\xfd", b"\xc3\x28", b"{", b'{"a":NaN}', b"[]", b"{}", b'"x"']),
    st.integers(1_000, 300_000).map(lambda n: b"z" * n),
)
_int64 = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, -1, 253402300800, -62135596801, 2**62]),
)
_int32 = st.integers(-(2**31), 2**31 - 1)


def message_strategy(desc: _d.Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any instance of ``desc``'s message class, fields filled or left empty."""
    cls = _message_class(desc)

    @st.composite
    def build(draw: Any) -> Message:
        msg = cls()
        for f in desc.fields:
            if not draw(st.booleans()):
                continue
            _fill(draw, msg, f, depth)
        return msg

    return build()


def _message_class(desc: _d.Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(desc)


def _scalar(f: _d.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    t = f.type
    if t == FD.TYPE_STRING:
        return st.one_of(_text, _huge_text) if depth == 0 else _text
    if t == FD.TYPE_BYTES:
        return _bytes
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_ENUM:
        assert f.enum_type is not None
        known = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-5, 1000))
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return _int64
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    return _int32


def _fill(draw: Any, msg: Message, f: _d.FieldDescriptor, depth: int) -> None:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        key_f, val_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        target = getattr(msg, f.name)
        for _ in range(draw(st.integers(0, 3))):
            k = draw(_scalar(key_f, depth + 1))
            if val_f.message_type is not None:
                target[k].CopyFrom(draw(message_strategy(val_f.message_type, depth + 1)))
            else:
                target[k] = draw(_scalar(val_f, depth + 1))
        return
    if f.message_type is not None:
        if depth >= 3:
            return
        if f.is_repeated:
            for _ in range(draw(st.integers(0, 3))):
                getattr(msg, f.name).add().CopyFrom(
                    draw(message_strategy(f.message_type, depth + 1))
                )
        else:
            getattr(msg, f.name).CopyFrom(draw(message_strategy(f.message_type, depth + 1)))
        return
    if f.is_repeated:
        n = draw(st.sampled_from([0, 1, 2, 5, 100]))
        getattr(msg, f.name).extend(draw(st.lists(_scalar(f, depth + 1), min_size=n, max_size=n)))
        return
    setattr(msg, f.name, draw(_scalar(f, depth)))


@pytest.fixture
def settings(redis_url: str, database_url: str) -> Settings:
    """Drainer off (tests drive it), low threshold so triggers get buffered, and
    a 16 KiB payload limit so 'huge' fields cross it cheaply."""
    return Settings.from_env(
        {},
        redis_url=redis_url,
        database_url=database_url,
        drain_enabled=False,
        trip_threshold=1,
        max_payload_bytes=16_384,
        max_metadata_bytes=8_192,
        mutation_wait_ms=200,
    )


async def _seed(stubs: Stubs) -> None:
    """A few real runs, so random requests sometimes hit existing ones."""
    for env in ENVS:
        for r in ("run_h1", "run_h2"):
            await stubs.buffer.Accept(
                buffer_pb2.AcceptRequest(
                    snapshot=run_pb2.RunSnapshot(
                        run_id=r,
                        env_id=env,
                        org_id="org_h1",
                        task_identifier="task-h",
                        payload=b"{}",
                        metadata=b'{"a":[1,2],"n":1}',
                        idempotency_key="k1" if r == "run_h1" else "",
                    )
                )
            )


HYP = hyp_settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.parametrize(("service", "method", "desc"), RPCS, ids=[f"{s}.{m}" for s, m, _ in RPCS])
@HYP
@given(data=st.data())
async def test_every_rpc_answers_hostile_input_deliberately(
    stubs: Stubs,
    redis_client: aioredis.Redis,
    service: str,
    method: str,
    desc: _d.MethodDescriptor,
    data: st.DataObject,
) -> None:
    if not await redis_client.hexists("mf:{env_h1}:runs", "run_h1"):
        await _seed(stubs)
    request = data.draw(message_strategy(desc.input_type), label="request")
    call = getattr(getattr(stubs, service), method)
    try:
        await call(request, timeout=15)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() not in FORBIDDEN, (method, exc.code(), exc.details())
        assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED, (method, "hung")
    # Every env the calls touched, not only the seeded ones.
    envs = set(ENVS)
    async for raw in redis_client.scan_iter(match="mf:{*}:*", count=1000):
        name = raw.decode(errors="replace")
        envs.add(name[len("mf:{") : name.index("}:")])
    await assert_buffer_consistent(redis_client, sorted(envs))


# Field 1 of every request here is a string; its bytes are not UTF-8.
_BAD_UTF8 = b"\x0a\x03\xff\xfe\xfd"


@pytest.mark.parametrize(("service", "method", "desc"), RPCS, ids=[f"{s}.{m}" for s, m, _ in RPCS])
async def test_invalid_utf8_in_a_string_field_is_refused(
    sidecar: LiveSidecar, service: str, method: str, desc: _d.MethodDescriptor
) -> None:
    first = desc.input_type.fields_by_number.get(1)
    if first is None or first.type != FD.TYPE_STRING:
        pytest.skip("field 1 is not a string")
    path = f"/{desc.containing_service.full_name}/{method}"
    call = sidecar.channel.unary_unary(
        path, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(_BAD_UTF8, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()


async def test_oversized_message_is_refused_without_harming_others(
    app: Any, sidecar: LiveSidecar, stubs: Stubs
) -> None:
    limit = app.settings.max_payload_bytes + app.settings.max_metadata_bytes
    big = run_pb2.RunSnapshot(
        run_id="run_big",
        env_id="env_h1",
        org_id="org_h1",
        task_identifier="task-h",
        payload=b"p" * (limit + 2_000_000),
    )
    other = grpc.aio.insecure_channel(sidecar.address)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stubs.buffer.Accept(buffer_pb2.AcceptRequest(snapshot=big), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Another client, and the same one, are still served.
        from mollifier_client.v1 import buffer_pb2_grpc

        stub = buffer_pb2_grpc.BufferServiceStub(other)
        ok = await stub.Accept(
            buffer_pb2.AcceptRequest(
                snapshot=run_pb2.RunSnapshot(
                    run_id="run_small",
                    env_id="env_h1",
                    org_id="org_h1",
                    task_identifier="task-h",
                    payload=b"{}",
                )
            ),
            timeout=10,
        )
        assert ok.result == buffer_pb2.ACCEPT_RESULT_ACCEPTED
        got = await stubs.buffer.GetRun(
            buffer_pb2.GetRunRequest(env_id="env_h1", run_id="run_small"), timeout=10
        )
        assert got.run.run_id == "run_small"
    finally:
        await other.close(None)


async def test_many_streams_from_one_client_do_not_starve_another(
    sidecar: LiveSidecar, stubs: Stubs
) -> None:
    """One client keeps 500 calls in flight at all times; another client's
    Evaluate calls still get answers, well within a generous bound."""
    from mollifier_client.v1 import gate_pb2_grpc

    noisy = grpc.aio.insecure_channel(sidecar.address)
    quiet = grpc.aio.insecure_channel(sidecar.address)
    noisy_gate = gate_pb2_grpc.GateServiceStub(noisy)
    quiet_gate = gate_pb2_grpc.GateServiceStub(quiet)
    stop = asyncio.Event()
    sent = 0

    async def flood(w: int) -> None:
        nonlocal sent
        n = 0
        while not stop.is_set():
            n += 1
            sent += 1
            await noisy_gate.Trigger(
                gate_pb2.TriggerRequest(
                    env_id=f"env_n{w % 20}",
                    org_id="org_noisy",
                    task_identifier="task-n",
                    org_feature_flags={"mollifierEnabled": True},
                    snapshot=run_pb2.RunSnapshot(run_id=f"run_n{w}_{n}", payload=b"{}"),
                ),
                timeout=60,
            )

    floods = [asyncio.create_task(flood(w)) for w in range(500)]
    try:
        await asyncio.sleep(0.5)
        latencies = []
        for _ in range(30):
            started = time.monotonic()
            resp = await quiet_gate.Evaluate(
                gate_pb2.EvaluateRequest(
                    env_id="env_quiet",
                    org_id="org_quiet",
                    task_identifier="task-q",
                    org_feature_flags={"mollifierEnabled": True},
                ),
                timeout=10,
            )
            latencies.append(time.monotonic() - started)
            assert resp.decision != gate_pb2.DECISION_UNSPECIFIED
        latencies.sort()
        # Generous: the point is that the quiet client is served at all, and
        # promptly, while 500 calls of the noisy one queue up.
        assert latencies[len(latencies) // 2] < 2.0, latencies
        assert sent > 1000
    finally:
        stop.set()
        await asyncio.gather(*floods, return_exceptions=True)
        await noisy.close(None)
        await quiet.close(None)
