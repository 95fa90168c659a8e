"""Bad input: INVALID_ARGUMENT naming the field, and nothing written to Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from mollifier.app import App
from mollifier.errors import InvalidArgument, to_status
from mollifier_client.v1 import gate_pb2, run_pb2

from tests.gate_helpers import (
    env_key_dump,
    evaluate_request,
    open_app,
    snapshot,
    trigger_request,
)

ENV = "env_v"
MAX_TS = 253402300799


@pytest.fixture
async def app(redis_url: str) -> AsyncIterator[App]:
    async with open_app(
        redis_url,
        max_payload_bytes=1024,
        max_metadata_bytes=64,
        max_tags=4,
        trip_threshold=1,
        trip_hold_ms=60_000,
    ) as a:
        # Trip the env, so a valid Trigger would buffer (and write) its run.
        for _ in range(2):
            await a.gate.evaluate(evaluate_request(ENV))
        yield a


def _ts(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


# (case id, snapshot fields over a valid one, the field named)
BAD_SNAPSHOTS: list[tuple[str, dict[str, Any], str]] = [
    ("run id too long", {"run_id": "r" * 129}, "run_id"),
    ("run id with space", {"run_id": "run 1"}, "run_id"),
    ("run id with brace", {"run_id": "run_{1}"}, "run_id"),
    ("task with colon", {"task_identifier": "task:a"}, "task_identifier"),
    ("task too long", {"task_identifier": "t" * 129}, "task_identifier"),
    ("payload over limit", {"payload": b"x" * 1025}, "payload"),
    ("metadata not json", {"metadata": b"{not json"}, "metadata"),
    ("metadata not utf-8", {"metadata": b'"\xff\xfe"'}, "metadata"),
    ("metadata utf-16", {"metadata": '{"a": 1}'.encode("utf-16")}, "metadata"),
    ("metadata nul escape", {"metadata": b'{"a": "x\\u0000y"}'}, "metadata"),
    ("metadata lone surrogate", {"metadata": b'["\\ud800"]'}, "metadata"),
    ("metadata NaN", {"metadata": b'{"a": NaN}'}, "metadata"),
    ("metadata Infinity", {"metadata": b"[-Infinity]"}, "metadata"),
    ("metadata too big", {"metadata": b'{"k": "' + b"v" * 64 + b'"}'}, "metadata"),
    ("too many tags", {"tags": ["a", "b", "c", "d", "e"]}, "tags"),
    ("tag too long", {"tags": ["t" * 129]}, "tags[0]"),
    ("empty tag", {"tags": ["a", ""]}, "tags[1]"),
    ("tag with newline", {"tags": ["a\nb"]}, "tags[0]"),
    ("idempotency key too long", {"idempotency_key": "k" * 513}, "idempotency_key"),
    ("idempotency key control char", {"idempotency_key": "k\x00"}, "idempotency_key"),
    (
        "expiry before 1970",
        {"idempotency_key": "k", "idempotency_key_expires_at": _ts(-1)},
        "idempotency_key_expires_at",
    ),
    (
        "expiry after 9999",
        {"idempotency_key": "k", "idempotency_key_expires_at": _ts(MAX_TS + 1)},
        "idempotency_key_expires_at",
    ),
    (
        "expiry without a key",
        {"idempotency_key_expires_at": _ts(2_000_000_000)},
        "idempotency_key_expires_at",
    ),
    ("delay before 1970", {"delay_until": _ts(-100)}, "delay_until"),
    ("delay after 9999", {"delay_until": _ts(MAX_TS + 1)}, "delay_until"),
    ("delay bad nanos", {"delay_until": _ts(10, 1_000_000_000)}, "delay_until"),
    ("negative ttl", {"ttl": duration_pb2.Duration(seconds=-1)}, "ttl"),
    ("parent id bad", {"parent_run_id": "run/1"}, "parent_run_id"),
    ("batch id too long", {"batch_id": "b" * 129}, "batch_id"),
    ("trace id not hex", {"trace_id": "xyz"}, "trace_id"),
    ("span id too long", {"span_id": "a" * 65}, "span_id"),
    ("batch index negative", {"batch_index": -1}, "batch_index"),
    ("max attempts negative", {"max_attempts": -2}, "max_attempts"),
    ("queue too long", {"queue": "q" * 257}, "queue"),
    ("payload type control", {"payload_type": "a\x07"}, "payload_type"),
    ("extra too many", {"extra": {f"k{i}": "v" for i in range(65)}}, "extra"),
    ("extra value too long", {"extra": {"k": "v" * 4097}}, "extra['k']"),
    ("extra value with nul", {"extra": {"k": "a\x00b"}}, "extra['k']"),
]


def _bad_snapshot(fields: dict[str, Any]) -> run_pb2.RunSnapshot:
    snap = snapshot(ENV, "run_ok")
    for name, value in fields.items():
        if name == "tags":
            snap.tags.extend(value)
        elif name == "extra":
            snap.extra.update(value)
        elif isinstance(value, (timestamp_pb2.Timestamp, duration_pb2.Duration)):
            getattr(snap, name).CopyFrom(value)
        else:
            setattr(snap, name, value)
    return snap


def _fields(err: InvalidArgument) -> list[str]:
    return [f for f, _ in err.violations]


async def _refused_and_nothing_written(
    redis_client: aioredis.Redis, call: Callable[[], Awaitable[Any]], field: str
) -> InvalidArgument:
    dbsize = await redis_client.dbsize()
    dump = await env_key_dump(redis_client, ENV)
    with pytest.raises(InvalidArgument) as err:
        await call()
    assert field in _fields(err.value), err.value.violations
    assert all(desc for _, desc in err.value.violations)
    assert await redis_client.dbsize() == dbsize
    assert await env_key_dump(redis_client, ENV) == dump
    return err.value


async def test_valid_requests_do_write(app: App, redis_client: aioredis.Redis) -> None:
    """The baseline the bad cases differ from: a valid Trigger and Accept write."""
    before = await env_key_dump(redis_client, ENV)
    req = trigger_request(ENV, snapshot=_bad_snapshot({}))
    t = await app.gate.trigger(req, req.snapshot)
    assert t.outcome.decision == gate_pb2.DECISION_MOLLIFY and t.run is not None
    assert await env_key_dump(redis_client, ENV) != before
    out = await app.buffer.accept(snapshot(ENV, "run_ok2"))
    assert out.run is not None


@pytest.mark.parametrize(
    ("fields", "field"),
    [c[1:] for c in BAD_SNAPSHOTS],
    ids=[c[0] for c in BAD_SNAPSHOTS],
)
async def test_bad_snapshot_on_accept(
    app: App, redis_client: aioredis.Redis, fields: dict[str, Any], field: str
) -> None:
    snap = _bad_snapshot(fields)
    await _refused_and_nothing_written(
        redis_client, lambda: app.buffer.accept(snap), "snapshot." + field
    )


@pytest.mark.parametrize(
    ("fields", "field"),
    [c[1:] for c in BAD_SNAPSHOTS],
    ids=[c[0] for c in BAD_SNAPSHOTS],
)
async def test_bad_snapshot_on_trigger(
    app: App, redis_client: aioredis.Redis, fields: dict[str, Any], field: str
) -> None:
    req = trigger_request(ENV, snapshot=_bad_snapshot(fields))
    await _refused_and_nothing_written(
        redis_client, lambda: app.gate.trigger(req, req.snapshot), "snapshot." + field
    )


ACCEPT_IDS: list[tuple[str, dict[str, str], str]] = [
    ("env id missing", {"env_id": ""}, "snapshot.env_id"),
    ("env id with braces", {"env_id": "env_{v}"}, "snapshot.env_id"),
    ("env id with colon", {"env_id": "env:v"}, "snapshot.env_id"),
    ("env id too long", {"env_id": "e" * 129}, "snapshot.env_id"),
    ("org id missing", {"org_id": ""}, "snapshot.org_id"),
    ("org id with brace", {"org_id": "org}"}, "snapshot.org_id"),
    ("task missing", {"task_identifier": ""}, "snapshot.task_identifier"),
]


@pytest.mark.parametrize(
    ("fields", "field"), [c[1:] for c in ACCEPT_IDS], ids=[c[0] for c in ACCEPT_IDS]
)
async def test_bad_ids_on_accept(
    app: App, redis_client: aioredis.Redis, fields: dict[str, str], field: str
) -> None:
    snap = snapshot(ENV, "run_ok")
    for name, value in fields.items():
        setattr(snap, name, value)
    await _refused_and_nothing_written(redis_client, lambda: app.buffer.accept(snap), field)


TRIGGER_CASES: list[tuple[str, dict[str, Any], dict[str, str], str]] = [
    ("env id with braces", {"env_id": "env_{v}"}, {"env_id": ""}, "env_id"),
    ("env id missing", {"env_id": ""}, {}, "env_id"),
    ("org id missing", {"org_id": ""}, {"org_id": ""}, "org_id"),
    ("task missing", {"task_identifier": ""}, {"task_identifier": ""}, "task_identifier"),
    ("snapshot env contradicts", {}, {"env_id": "env_other"}, "snapshot.env_id"),
    ("snapshot org contradicts", {}, {"org_id": "org_other"}, "snapshot.org_id"),
    ("snapshot task contradicts", {}, {"task_identifier": "task-b"}, "snapshot.task_identifier"),
    ("token too long", {"one_time_use_token": "t" * 1025}, {}, "one_time_use_token"),
]


@pytest.mark.parametrize(
    ("req_fields", "snap_fields", "field"),
    [c[1:] for c in TRIGGER_CASES],
    ids=[c[0] for c in TRIGGER_CASES],
)
async def test_bad_trigger_request(
    app: App,
    redis_client: aioredis.Redis,
    req_fields: dict[str, Any],
    snap_fields: dict[str, str],
    field: str,
) -> None:
    snap = snapshot(ENV, "run_ok")
    for name, value in snap_fields.items():
        setattr(snap, name, value)
    req = trigger_request(ENV, snapshot=snap)
    for name, value in req_fields.items():
        setattr(req, name, value)
    await _refused_and_nothing_written(
        redis_client, lambda: app.gate.trigger(req, req.snapshot), field
    )


EVALUATE_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("env id missing", {"env_id": ""}, "env_id"),
    ("env id with braces", {"env_id": "{env_v}"}, "env_id"),
    ("org id missing", {"org_id": ""}, "org_id"),
    ("task with colon", {"task_identifier": "a:b"}, "task_identifier"),
    ("token with control", {"one_time_use_token": "a\x01"}, "one_time_use_token"),
]


@pytest.mark.parametrize(
    ("fields", "field"), [c[1:] for c in EVALUATE_CASES], ids=[c[0] for c in EVALUATE_CASES]
)
async def test_bad_evaluate_request(
    app: App, redis_client: aioredis.Redis, fields: dict[str, Any], field: str
) -> None:
    req = evaluate_request(ENV)
    for name, value in fields.items():
        setattr(req, name, value)
    await _refused_and_nothing_written(redis_client, lambda: app.gate.evaluate(req), field)
    with pytest.raises(InvalidArgument) as err:
        await app.gate.evaluate_batch([evaluate_request(ENV), req])
    assert f"inputs[1].{field}" in _fields(err.value)


async def test_evaluate_batch_too_big(app: App) -> None:
    with pytest.raises(InvalidArgument) as err:
        await app.gate.evaluate_batch([evaluate_request(ENV)] * 1001)
    assert _fields(err.value) == ["inputs"]


async def test_bad_claim_publish_release(app: App, redis_client: aioredis.Redis) -> None:
    g = app.gate
    cases: list[tuple[Callable[[], Awaitable[Any]], str]] = [
        (lambda: g.claim("env{x}", "task-a", "k"), "env_id"),
        (lambda: g.claim(ENV, "", "k"), "task_identifier"),
        (lambda: g.claim(ENV, "task-a", ""), "idempotency_key"),
        (lambda: g.claim(ENV, "task-a", "k" * 513), "idempotency_key"),
        (lambda: g.claim(ENV, "task-a", "k", ttl_ms=-1), "claim_ttl"),
        (lambda: g.claim(ENV, "task-a", "k", ttl_ms=600_001), "claim_ttl"),
        (lambda: g.publish(ENV, "task-a", "k", "", "run_1"), "claim_token"),
        (lambda: g.publish(ENV, "task-a", "k", "tok", "run 1"), "run_id"),
        (lambda: g.publish(ENV, "task-a", "k", "tok", "run_1", expires_at_ms=1000), "expires_at"),
        (lambda: g.release(ENV, "task-a", "k", ""), "claim_token"),
        (lambda: g.release(ENV, "task-a", "k", "t" * 129), "claim_token"),
        (lambda: g.env_state("env{x}"), "env_id"),
    ]
    for call, field in cases:
        await _refused_and_nothing_written(redis_client, call, field)


async def test_bad_reads(app: App, redis_client: aioredis.Redis) -> None:
    b = app.buffer
    cases: list[tuple[Callable[[], Awaitable[Any]], str]] = [
        (lambda: b.get_run("", "run_1"), "env_id"),
        (lambda: b.get_run("env}", "run_1"), "env_id"),
        (lambda: b.get_run(ENV, ""), "run_id"),
        (lambda: b.get_run(ENV, "r" * 129), "run_id"),
        (lambda: b.find_by_idempotency_key(ENV, "task-a", ""), "idempotency_key"),
        (lambda: b.find_by_idempotency_key(ENV, "task:a", "k"), "task_identifier"),
        (lambda: b.list_runs(ENV, page_size=-1), "page_size"),
        (lambda: b.list_runs("{env}"), "env_id"),
    ]
    for call, field in cases:
        await _refused_and_nothing_written(redis_client, call, field)


async def test_every_violation_is_reported_at_once(app: App) -> None:
    snap = _bad_snapshot({"run_id": "bad id", "payload": b"x" * 2000, "tags": list("abcde")})
    with pytest.raises(InvalidArgument) as err:
        await app.buffer.accept(snap)
    assert {"snapshot.run_id", "snapshot.payload", "snapshot.tags"} <= set(_fields(err.value))


async def test_invalid_argument_status_carries_bad_request(app: App) -> None:
    with pytest.raises(InvalidArgument) as err:
        await app.buffer.accept(_bad_snapshot({"tags": ["t" * 129]}))
    status = to_status(err.value)
    assert status.code.name == "INVALID_ARGUMENT"
    raw = dict(status.trailing_metadata)["grpc-status-details-bin"]
    assert isinstance(raw, bytes)
    details = status_pb2.Status.FromString(raw).details
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in details)
    assert [v.field for v in bad.field_violations] == ["snapshot.tags[0]"]


def test_metadata_nested_deeper_than_the_parser_is_a_field_violation() -> None:
    from mollifier.validation import Violations

    v = Violations()
    v.json_document("snapshot.metadata", b"[" * 100_000 + b"]" * 100_000, 1 << 20)
    assert v.items == [("snapshot.metadata", "is nested too deeply")]
