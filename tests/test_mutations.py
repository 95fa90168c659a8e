"""MutateService against real Redis and Postgres: each mutation on a buffered run
(then drained) and on a materialized run, concurrency, request ids, isolation,
damaged entries, routing of parent and root operations, DRAINING runs."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from mollifier.app import App
from mollifier.codec import now_ms, ts_from_ms
from mollifier.config import Settings
from mollifier.drainer import Drainer
from mollifier.errors import (
    AlreadyExists,
    DamagedEntry,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from mollifier.keys import env_keys
from mollifier.mutations import Mutations
from mollifier_client.v1 import mutate_pb2, run_pb2

from tests.entries import read_entry, set_entry
from tests.plugins.sidecar import Stubs

BUFFER = mutate_pb2.MUTATION_TARGET_BUFFER
POSTGRES = mutate_pb2.MUTATION_TARGET_POSTGRES
OP = mutate_pb2.MetadataOperation
SET = mutate_pb2.METADATA_OPERATION_TYPE_SET
DELETE = mutate_pb2.METADATA_OPERATION_TYPE_DELETE
APPEND = mutate_pb2.METADATA_OPERATION_TYPE_APPEND
REMOVE = mutate_pb2.METADATA_OPERATION_TYPE_REMOVE
INCREMENT = mutate_pb2.METADATA_OPERATION_TYPE_INCREMENT

_ids = itertools.count(1)


def rid(prefix: str = "req") -> str:
    return f"{prefix}_{next(_ids)}"


@pytest.fixture
def settings(redis_url: str, database_url: str) -> Settings:
    return Settings.from_env(
        {},
        redis_url=redis_url,
        database_url=database_url,
        drain_enabled=False,
        max_tags=200,
        mutation_wait_ms=3000,
    )


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[App]:
    a = await App.connect(settings, start_background=False)
    yield a
    await a.close(grace=1)


def snap(env: str, run_id: str = "", **fields: Any) -> run_pb2.RunSnapshot:
    s = run_pb2.RunSnapshot(
        run_id=run_id or rid("run"),
        env_id=env,
        org_id="org_1",
        task_identifier="task-a",
        payload=b"{}",
        payload_type="application/json",
    )
    for k, v in fields.items():
        if k == "delay_ms":
            s.delay_until.CopyFrom(ts_from_ms(now_ms() + v))
        elif k == "tags":
            s.tags.extend(v)
        else:
            setattr(s, k, v)
    return s


async def put(app: App, env: str, run_id: str = "", **fields: Any) -> str:
    s = snap(env, run_id, **fields)
    await app.buffer.accept(s)
    return s.run_id


def drainer(app: App, **changes: Any) -> Drainer:
    s = app.settings.replace(drain_enabled=True, **changes)
    return Drainer(s, app.redis, app.scripts, app.pool)


async def drain_all(app: App, **changes: Any) -> None:
    d = drainer(app, **changes)
    idle = 0
    for _ in range(500):
        if await d.tick() == 0:
            idle += 1
            if idle >= 2:
                return
        else:
            idle = 0
    raise AssertionError("buffer did not empty")


async def row(app: App, run_id: str) -> dict[str, Any]:
    assert app.pool is not None
    async with app.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT status, tags, metadata, delay_until, canceled_at, cancel_reason, "
            "idempotency_key FROM mollifier.runs WHERE run_id = %s",
            (run_id,),
        )
        r = await cur.fetchone()
    assert r is not None, f"no row for {run_id}"
    names = ("status", "tags", "metadata", "delay_until", "canceled_at", "cancel_reason", "key")
    return dict(zip(names, r, strict=True))


def inc(path: str, n: int = 1) -> mutate_pb2.MetadataOperation:
    return OP(type=INCREMENT, path=path, value_json=str(n))


def op(kind: Any, path: str, value: Any = None) -> mutate_pb2.MetadataOperation:
    return OP(type=kind, path=path, value_json="" if value is None else json.dumps(value))


# -- each mutation, buffered then drained, and on a materialized run -----------


async def test_buffered_mutations_reach_the_row(app: App) -> None:
    env, m = "env_b", app.mutations
    a = await put(app, env, delay_ms=600_000, tags=["t0"], metadata=b'{"keep":1}')
    b = await put(app, env)
    c = await put(app, env)

    r1 = await m.add_tags(env, a, rid(), ["t1", "t0", "t2", "t1"])
    assert (list(r1.tags), r1.applied_to) == (["t0", "t1", "t2"], BUFFER)
    r2 = await m.update_metadata(
        env,
        a,
        rid(),
        operations=[
            op(SET, "$.progress.step", "one"),
            inc("progress.done", 3),
            op(APPEND, "log", "a"),
            op(APPEND, "log", "b"),
            op(REMOVE, "log", "a"),
            op(DELETE, "keep"),
        ],
    )
    assert r2.run.applied_to == BUFFER
    expected = {"progress": {"step": "one", "done": 3}, "log": ["b"]}
    assert json.loads(r2.run.metadata_json) == expected
    later = now_ms() + 3_600_000
    r3 = await m.reschedule(env, a, rid(), ts_from_ms(later))
    assert (r3.applied_to, r3.run.status) == (BUFFER, run_pb2.RUN_STATUS_DELAYED)
    r4 = await m.cancel(env, b, rid(), "not needed")
    assert (r4.applied_to, r4.already_final) == (BUFFER, False)
    assert r4.run.status == run_pb2.RUN_STATUS_CANCELED
    again = await m.cancel(env, b, rid(), "twice")
    assert again.already_final and again.run.cancel_reason == "not needed"
    r5 = await m.update_metadata(env, c, rid(), metadata_json='{"x":[1]}')
    assert json.loads(r5.run.metadata_json) == {"x": [1]}

    # Reads see the buffered changes before the drain.
    got = await app.buffer.get_run(env, b)
    assert got.status == run_pb2.RUN_STATUS_CANCELED and got.cancel_reason == "not needed"

    await drain_all(app)
    ra = await row(app, a)
    assert ra["status"] == "DELAYED"
    assert ra["tags"] == ["t0", "t1", "t2"]
    assert ra["metadata"] == expected
    assert int(ra["delay_until"].timestamp() * 1000) == later
    rb = await row(app, b)
    assert (rb["status"], rb["cancel_reason"]) == ("CANCELED", "not needed")
    assert rb["canceled_at"] is not None
    assert (await row(app, c))["metadata"] == {"x": [1]}


async def test_mutations_on_materialized_runs(app: App) -> None:
    env, m = "env_p", app.mutations
    a = await put(app, env, delay_ms=600_000, tags=["t0"])
    b = await put(app, env)
    await drain_all(app)

    r1 = await m.add_tags(env, a, rid(), ["t1"])
    assert (list(r1.tags), r1.applied_to) == (["t0", "t1"], POSTGRES)
    r2 = await m.update_metadata(env, a, rid(), operations=[inc("n", 2), inc("n", 3)])
    assert (r2.run.applied_to, json.loads(r2.run.metadata_json)) == (POSTGRES, {"n": 5})
    later = now_ms() + 7_200_000
    r3 = await m.reschedule(env, a, rid(), ts_from_ms(later))
    assert r3.applied_to == POSTGRES
    r4 = await m.cancel(env, b, rid(), "stop")
    assert (r4.applied_to, r4.already_final, r4.run.status) == (
        POSTGRES,
        False,
        run_pb2.RUN_STATUS_CANCELED,
    )
    assert (await m.cancel(env, b, rid())).already_final

    ra, rb = await row(app, a), await row(app, b)
    assert (ra["tags"], ra["metadata"], ra["status"]) == (["t0", "t1"], {"n": 5}, "DELAYED")
    assert int(ra["delay_until"].timestamp() * 1000) == later
    assert (rb["status"], rb["cancel_reason"]) == ("CANCELED", "stop")
    read = await app.buffer.get_run(env, a)
    assert read.source == run_pb2.RUN_SOURCE_POSTGRES and list(read.snapshot.tags) == ["t0", "t1"]


async def test_reschedule_needs_a_delayed_run_in_both_stores(app: App) -> None:
    env, m = "env_r", app.mutations
    queued = await put(app, env)
    later = ts_from_ms(now_ms() + 60_000)
    with pytest.raises(FailedPrecondition) as e1:
        await m.reschedule(env, queued, rid(), later)
    assert e1.value.reason == "RUN_NOT_DELAYED"
    cancelled = await put(app, env, delay_ms=60_000)
    await m.cancel(env, cancelled, rid())
    with pytest.raises(FailedPrecondition):
        await m.reschedule(env, cancelled, rid(), later)
    await drain_all(app)
    with pytest.raises(FailedPrecondition) as e2:
        await m.reschedule(env, queued, rid(), later)
    assert e2.value.reason == "RUN_NOT_DELAYED"
    # Nothing was injected: the row stays PENDING without a delay.
    r = await row(app, queued)
    assert (r["status"], r["delay_until"]) == ("PENDING", None)
    with pytest.raises(InvalidArgument) as e3:
        await m.reschedule(env, queued, rid(), ts_from_ms(now_ms() - 1000))
    assert e3.value.violations[0][0] == "delay_until"


# -- concurrency -------------------------------------------------------------


async def test_100_concurrent_tags_and_increments_all_land(app: App) -> None:
    env, m = "env_c", app.mutations
    run = await put(app, env)
    tags = [f"tag{i}" for i in range(100)]
    await asyncio.gather(*(m.add_tags(env, run, rid(), [t]) for t in tags))
    await asyncio.gather(
        *(m.update_metadata(env, run, rid(), operations=[inc("count")]) for _ in range(100))
    )
    got = await app.buffer.get_run(env, run)
    assert sorted(got.snapshot.tags) == sorted(tags)
    assert json.loads(got.snapshot.metadata) == {"count": 100}
    await drain_all(app)
    r = await row(app, run)
    assert sorted(r["tags"]) == sorted(tags) and r["metadata"] == {"count": 100}
    # And the same on the row.
    await asyncio.gather(
        *(m.update_metadata(env, run, rid(), operations=[inc("count")]) for _ in range(100))
    )
    assert (await row(app, run))["metadata"] == {"count": 200}


async def test_200_runs_mutated_while_the_drainer_takes_them(app: App) -> None:
    env, m = "env_live", app.mutations
    ids = [await put(app, env) for _ in range(200)]
    d = drainer(app, drain_batch_size=7, drain_concurrency=2)
    stop = asyncio.Event()

    async def drain_loop() -> None:
        while not stop.is_set():
            if await d.tick() == 0:
                await asyncio.sleep(0.005)

    async def mutate(i: int, run_id: str) -> None:
        await asyncio.sleep(0.001 * (i % 20))
        await m.add_tags(env, run_id, rid(), [f"x{i}"])
        await m.update_metadata(env, run_id, rid(), operations=[inc("n", i)])
        if i % 5 == 0:
            await m.cancel(env, run_id, rid(), f"c{i}")

    loop_task = asyncio.create_task(drain_loop())
    try:
        await asyncio.gather(*(mutate(i, r) for i, r in enumerate(ids)))
    finally:
        stop.set()
        await loop_task
    await drain_all(app)
    for i, run_id in enumerate(ids):
        r = await row(app, run_id)
        assert r["tags"] == [f"x{i}"], run_id
        assert r["metadata"] == {"n": i}, run_id
        if i % 5 == 0:
            assert (r["status"], r["cancel_reason"]) == ("CANCELED", f"c{i}"), run_id
        else:
            assert r["status"] == "PENDING", run_id


async def test_a_draining_run_is_waited_for_then_changed_in_postgres(app: App) -> None:
    env = "env_d"
    run = await put(app, env)
    d = drainer(app)
    batch = await d.lease_env(env, 10, 30_000, "tok")
    assert [r.run_id for r in batch.runs] == [run]

    pending = asyncio.create_task(app.mutations.cancel(env, run, rid(), "late"))
    await asyncio.sleep(0.2)
    assert not pending.done()
    await d.materialize(batch)
    resp = await pending
    assert (resp.applied_to, resp.already_final) == (POSTGRES, False)
    assert (await row(app, run))["status"] == "CANCELED"

    # Past the bound: a retryable error, nothing lost silently.
    other = await put(app, env)
    await d.lease_env(env, 10, 30_000, "tok2")
    quick = Mutations(
        app.settings.replace(mutation_wait_ms=100),
        app.redis,
        app.scripts,
        app.pool,
        app.buffer,
        app.gate,
    )
    with pytest.raises(Unavailable) as e:
        await quick.add_tags(env, other, rid(), ["t"])
    assert e.value.reason == "RUN_DRAINING" and e.value.retry_after_ms


# -- request ids -------------------------------------------------------------


async def test_a_retried_request_id_is_applied_once(app: App) -> None:
    env, m = "env_q", app.mutations
    run = await put(app, env)
    req = rid()
    first = await m.update_metadata(env, run, req, operations=[inc("n")])
    second = await m.update_metadata(env, run, req, operations=[inc("n")])
    assert first == second
    same = rid()
    answers = await asyncio.gather(
        *(m.update_metadata(env, run, same, operations=[inc("n")]) for _ in range(20))
    )
    assert all(a == answers[0] for a in answers)
    assert json.loads((await app.buffer.get_run(env, run)).snapshot.metadata) == {"n": 2}

    c1 = await m.cancel(env, run, "cancel-1", "r")
    await drain_all(app)
    # Retried after the run was drained: still the first answer.
    assert await m.cancel(env, run, "cancel-1", "r") == c1
    assert (await m.cancel(env, run, "cancel-1", "r")).already_final is False

    pg_req = rid()
    answers = await asyncio.gather(
        *(m.update_metadata(env, run, pg_req, operations=[inc("n")]) for _ in range(20))
    )
    assert all(a == answers[0] for a in answers)
    assert (await row(app, run))["metadata"] == {"n": 3}
    with pytest.raises(InvalidArgument) as e:
        await m.add_tags(env, run, pg_req, ["t"])
    assert e.value.violations[0][0] == "request_id"

    # The same kind of call with the same request id on another run: refused,
    # not answered with the first run's answer (and the other run unchanged).
    tag_req = rid()
    await m.add_tags(env, run, tag_req, ["mine"])
    other = await put(app, env)
    for call in (
        lambda: m.add_tags(env, other, tag_req, ["theirs"]),
        lambda: m.cancel(env, other, "cancel-1", "r"),
    ):
        with pytest.raises(InvalidArgument) as e:
            await call()
        assert e.value.violations[0][0] == "request_id"
    untouched = await app.buffer.get_run(env, other)
    assert list(untouched.snapshot.tags) == []
    assert untouched.status == run_pb2.RUN_STATUS_QUEUED


# -- isolation, damage, routing ------------------------------------------------


async def test_another_envs_run_is_not_found_through_every_call(app: App) -> None:
    m = app.mutations
    buffered = await put(app, "env_own", idempotency_key="k1", delay_ms=60_000)
    drained = await put(app, "env_own", idempotency_key="k2", delay_ms=60_000)
    await drain_all(app)
    buffered = await put(app, "env_own", idempotency_key="k3", delay_ms=60_000)
    later = ts_from_ms(now_ms() + 120_000)
    for run in (buffered, drained):
        calls = [
            m.cancel("env_other", run, rid()),
            m.reschedule("env_other", run, rid(), later),
            m.update_metadata("env_other", run, rid(), operations=[inc("n")]),
            m.add_tags("env_other", run, rid(), ["t"]),
            m.replay("env_other", run, rid()),
        ]
        for call in calls:
            with pytest.raises(NotFound):
                await call
    for key in ("k2", "k3"):
        with pytest.raises(NotFound):
            await m.reset_idempotency_key("env_other", rid(), "task-a", key)
    # Nothing changed in the owner's env.
    assert (await app.buffer.get_run("env_own", buffered)).status == run_pb2.RUN_STATUS_DELAYED
    assert (await row(app, drained))["status"] == "DELAYED"


async def test_a_damaged_snapshot_is_reported_never_passed_on(app: App) -> None:
    env, m = "env_x", app.mutations
    run = await put(app, env)
    await set_entry(app.redis, env, run, s=b"\xff\xfe not a snapshot")
    for call in (
        m.cancel(env, run, rid()),
        m.add_tags(env, run, rid(), ["t"]),
        m.update_metadata(env, run, rid(), operations=[inc("n")]),
        m.replay(env, run, rid()),
    ):
        with pytest.raises(DamagedEntry):
            await call
    entry = await read_entry(app.redis, env, run)
    assert entry is not None and entry["s"] == b"\xff\xfe not a snapshot"


async def test_parent_and_root_operations_go_to_parent_and_root(app: App) -> None:
    env, m = "env_tree", app.mutations
    root = await put(app, env)
    parent = await put(app, env, root_run_id=root, parent_run_id=root)
    await drain_all(app)  # the root and the parent are rows, the child is buffered
    child = await put(app, env, root_run_id=root, parent_run_id=parent)
    resp = await m.update_metadata(
        env,
        child,
        rid(),
        operations=[op(SET, "own", True)],
        parent_operations=[op(SET, "from_child", "parent")],
        root_operations=[op(SET, "from_child", "root")],
    )
    assert (resp.run.run_id, resp.run.applied_to) == (child, BUFFER)
    assert (resp.parent.run_id, resp.parent.applied_to) == (parent, POSTGRES)
    assert (resp.root.run_id, resp.root.applied_to) == (root, POSTGRES)
    assert (await row(app, parent))["metadata"] == {"from_child": "parent"}
    assert (await row(app, root))["metadata"] == {"from_child": "root"}
    assert json.loads((await app.buffer.get_run(env, child)).snapshot.metadata) == {"own": True}

    # No root and no parent: both fall back to the run itself, applied together.
    lone = await put(app, env)
    r = await m.update_metadata(
        env, lone, rid(), parent_operations=[inc("p")], root_operations=[inc("r", 2)]
    )
    assert json.loads(r.run.metadata_json) == {"p": 1, "r": 2}
    assert r.root.run_id == lone and r.parent.run_id == lone

    with pytest.raises(InvalidArgument) as e:
        await m.update_metadata(
            env,
            lone,
            rid(),
            operations=[inc("a"), OP(type=SET, path="a..b", value_json="1")],
            root_operations=[OP(type=INCREMENT, path="n", value_json='"x"')],
        )
    assert [f for f, _ in e.value.violations] == [
        "operations[1].path",
        "root_operations[0].value_json",
    ]


async def test_a_part_that_cannot_apply_changes_nothing(app: App) -> None:
    """The parent's part fails (its value is not a number): the run's own part,
    which could apply, is not applied either, so a retry is not a second one."""
    env, m = "env_tree_fail", app.mutations
    parent = await put(app, env)
    await m.update_metadata(env, parent, rid(), operations=[op(SET, "x", "text")])
    child = await put(app, env, parent_run_id=parent)
    for _ in range(2):
        with pytest.raises(InvalidArgument) as e:
            await m.update_metadata(
                env, child, rid(), operations=[inc("n")], parent_operations=[inc("x")]
            )
        assert [f for f, _ in e.value.violations] == ["parent_operations[0].path"]
    assert not (await app.buffer.get_run(env, child)).snapshot.metadata
    assert json.loads((await app.buffer.get_run(env, parent)).snapshot.metadata) == {"x": "text"}


async def test_a_run_buffered_again_after_its_drain_is_not_changed_blindly(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between a change's read and its compare-and-set the run is drained and
    accepted again under its id (a retried Accept): the new entry must not
    take a change computed for the old one, which the drain would then drop
    (the row exists); the change goes to the row."""
    env, m = "env_aba", app.mutations
    s = snap(env)
    await app.buffer.accept(s)
    real = app.scripts.mutate
    fired: list[bool] = []

    async def drained_in_between(client: Any, keys: Any, args: Any) -> Any:
        if not fired:
            fired.append(True)
            await drain_all(app)
            await app.buffer.accept(s)
        return await real(client, keys, args)

    monkeypatch.setattr(app.scripts, "mutate", drained_in_between)
    answer = await m.add_tags(env, s.run_id, rid(), ["important"])
    assert "important" in answer.tags
    await drain_all(app)
    assert "important" in (await row(app, s.run_id))["tags"]


# -- ResetIdempotencyKey and ReplayRun -----------------------------------------


async def test_reset_idempotency_key_in_both_stores(app: App) -> None:
    env, m = "env_k", app.mutations
    run = await put(app, env, idempotency_key="key-1")
    resp = await m.reset_idempotency_key(env, rid(), "task-a", "key-1")
    assert (resp.reset_in_buffer, resp.reset_in_postgres, resp.run_id) == (True, False, run)
    assert await app.redis.get(env_keys(env).idem("task-a", "key-1")) is None
    assert (await app.buffer.get_run(env, run)).snapshot.idempotency_key == ""
    with pytest.raises(NotFound):
        await m.reset_idempotency_key(env, rid(), "task-a", "key-1")
    await drain_all(app)
    assert (await row(app, run))["key"] is None

    other = await put(app, env, idempotency_key="key-2")
    await drain_all(app)
    req = rid()
    resp2 = await m.reset_idempotency_key(env, req, "task-a", "key-2")
    # The binding outlived the drained run (with a TTL): both are cleared.
    assert (resp2.reset_in_buffer, resp2.reset_in_postgres, resp2.run_id) == (True, True, other)
    assert (await row(app, other))["key"] is None
    assert await m.reset_idempotency_key(env, req, "task-a", "key-2") == resp2


async def test_reset_with_redis_down_is_unavailable_not_not_found(
    app: App, settings: Settings
) -> None:
    env = "env_down"
    run = await put(app, env, idempotency_key="key-9")
    await drain_all(app)
    down = await App.connect(
        settings.replace(redis_url="redis://127.0.0.1:1/0"), start_background=False
    )
    try:
        with pytest.raises(Unavailable):
            await down.mutations.reset_idempotency_key(env, rid(), "task-a", "key-9")
        with pytest.raises(Unavailable):
            await down.mutations.reset_idempotency_key(env, rid(), "task-a", "no-such-key")
    finally:
        await down.close(grace=0)
    # Rolled back: the key is still on the row.
    assert (await row(app, run))["key"] == "key-9"


async def test_replay_makes_a_new_run_once(app: App) -> None:
    env, m = "env_rp", app.mutations
    old = await put(app, env, idempotency_key="k", tags=["a"], metadata=b'{"m":1}')
    req = rid()
    first = await m.replay(env, old, req)
    assert first.run.run_id != old
    assert first.run.snapshot.idempotency_key == ""
    assert list(first.run.snapshot.tags) == ["a"]
    assert await m.replay(env, old, req) == first
    # Retried concurrently under a fresh request id: one new run.
    req2 = rid()
    answers = await asyncio.gather(*(m.replay(env, old, req2) for _ in range(5)))
    assert len({a.run.run_id for a in answers}) == 1
    await drain_all(app)
    new = await app.buffer.get_run(env, first.run.run_id)
    assert new.source == run_pb2.RUN_SOURCE_POSTGRES
    replayed_from_row = await m.replay(env, old, rid(), new_run_id="run_replay_x")
    assert replayed_from_row.run.run_id == "run_replay_x"
    # The same new_run_id under another request id: this replay again, fine.
    again = await m.replay(env, old, rid(), new_run_id="run_replay_x")
    assert again.run.run_id == "run_replay_x"
    # A new_run_id naming another run (buffered or a row) makes no replay.
    other = await put(app, env, payload=b'{"other":true}')
    with pytest.raises(AlreadyExists) as err:
        await m.replay(env, old, rid(), new_run_id=other)
    assert err.value.reason == "RUN_ID_TAKEN"
    await drain_all(app)
    with pytest.raises(AlreadyExists):
        await m.replay(env, old, rid(), new_run_id=other)


# -- through gRPC ---------------------------------------------------------------


def _fields(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    out: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            out.extend(v.field for v in bad.field_violations)
    return out


async def test_mutations_over_grpc(app: App, stubs: Stubs) -> None:
    env = "env_g"
    run = await put(app, env)
    tags = await stubs.mutate.AddTags(
        mutate_pb2.AddTagsRequest(env_id=env, run_id=run, request_id="g1", tags=["a", "a"])
    )
    assert (list(tags.tags), tags.applied_to) == (["a"], BUFFER)
    cancel = await stubs.mutate.CancelRun(
        mutate_pb2.CancelRunRequest(env_id=env, run_id=run, request_id="g2", reason="r")
    )
    assert cancel.run.status == run_pb2.RUN_STATUS_CANCELED

    with pytest.raises(grpc.aio.AioRpcError) as e1:
        await stubs.mutate.UpdateMetadata(
            mutate_pb2.UpdateMetadataRequest(
                env_id="bad env",
                run_id=run,
                operations=[OP(type=SET, path="", value_json="1")],
                parent_operations=[OP(type=APPEND, path="x", value_json="{")],
            )
        )
    assert e1.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _fields(e1.value) == [
        "env_id",
        "request_id",
        "operations[0].path",
        "parent_operations[0].value_json",
    ]
    with pytest.raises(grpc.aio.AioRpcError) as e2:
        await stubs.mutate.RescheduleRun(
            mutate_pb2.RescheduleRunRequest(env_id=env, run_id=run, request_id="g3")
        )
    assert _fields(e2.value) == ["delay_until"]
    with pytest.raises(grpc.aio.AioRpcError) as e3:
        await stubs.mutate.ReplayRun(
            mutate_pb2.ReplayRunRequest(env_id="env_none", run_id=run, request_id="g4")
        )
    assert e3.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as e4:
        await stubs.mutate.ResetIdempotencyKey(
            mutate_pb2.ResetIdempotencyKeyRequest(
                env_id=env, request_id="g5", task_identifier="task-a", idempotency_key="none"
            )
        )
    assert e4.value.code() == grpc.StatusCode.NOT_FOUND
    await set_entry(app.redis, env, run, s=b"junk")
    with pytest.raises(grpc.aio.AioRpcError) as e5:
        await stubs.mutate.AddTags(
            mutate_pb2.AddTagsRequest(env_id=env, run_id=run, request_id="g6", tags=["b"])
        )
    assert e5.value.code() == grpc.StatusCode.DATA_LOSS


async def test_kept_answers_are_pruned_after_the_retry_window(app: App) -> None:
    env, m = "env_prune", app.mutations
    run_id = await put(app, env)
    await drain_all(app)
    first = rid()
    await m.add_tags(env, run_id, first, ["a"])
    assert app.pool is not None
    async with app.pool.connection() as conn:
        await conn.execute(
            "UPDATE mollifier.mutation_requests SET created_at = now() - interval '2 days' "
            "WHERE env_id = %s AND request_id = %s",
            (env, first),
        )
    await m.add_tags(env, run_id, rid(), ["b"])
    assert await m.prune_requests() == 1
    async with app.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT request_id FROM mollifier.mutation_requests WHERE env_id = %s", (env,)
        )
        assert len(await cur.fetchall()) == 1


async def test_buffer_only_traffic_prunes_kept_answers_too(app: App) -> None:
    """UpdateMetadata keeps its whole answer in Postgres even when its change
    landed in the buffer: that path prunes too, from the first call on."""
    env, m = "env_prune_buf", app.mutations
    assert app.pool is not None
    async with app.pool.connection() as conn:
        await conn.execute(
            "INSERT INTO mollifier.mutation_requests (env_id, request_id, kind, response, "
            "created_at) VALUES (%s, 'old', 'tags/x', '', now() - interval '3 days')",
            (env,),
        )
    run_id = await put(app, env)  # buffered: the change lands in Redis
    await m.update_metadata(env, run_id, rid(), operations=[inc("n")])
    for _ in range(200):
        async with app.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT 1 FROM mollifier.mutation_requests WHERE request_id = 'old'"
            )
            if await cur.fetchone() is None:
                return
        await asyncio.sleep(0.02)
    raise AssertionError("the old answer was not pruned")
