"""The drainer against real Redis and Postgres: fairness, exactly once, failures,
external leases, pause and status."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
from mollifier.app import App
from mollifier.buffer import RESULT_ACCEPTED
from mollifier.codec import now_ms, ts_from_ms
from mollifier.config import Settings
from mollifier.drainer import Drainer
from mollifier.errors import FailedPrecondition, InvalidArgument
from mollifier.keys import DRAIN_PAUSED, INDEX_ORGS, env_keys, org_envs_key
from mollifier.materializer import Entry, materialize_batch
from mollifier_client.v1 import drain_pb2, mutate_pb2, run_pb2

from tests.entries import env_depth, queue_ids, queue_scores, read_entry, set_entry

_ids = itertools.count(1)


def snap(env: str, org: str, **fields: Any) -> run_pb2.RunSnapshot:
    s = run_pb2.RunSnapshot(
        run_id=f"run_d{next(_ids)}",
        env_id=env,
        org_id=org,
        task_identifier="task-1",
        payload=b"{}",
        payload_type="application/json",
        tags=["t"],
    )
    for k, v in fields.items():
        setattr(s, k, v)
    return s


async def fill(app: App, snaps: Iterable[run_pb2.RunSnapshot], *, at_once: int = 200) -> list[str]:
    """Accept the runs, ``at_once`` concurrently (1 keeps arrival order = list order)."""
    ids: list[str] = []
    pending: list[Any] = []
    for s in snaps:
        ids.append(s.run_id)
        pending.append(app.buffer.accept(s))
        if len(pending) >= at_once:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    return ids


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[App]:
    a = await App.connect(settings, start_background=False)
    yield a
    await a.close(grace=1)


def drainer(app: App, **changes: Any) -> Drainer:
    s = app.settings.replace(drain_enabled=True, **changes)
    return Drainer(s, app.redis, app.scripts, app.pool)


async def pg_rows(app: App, where: str = "true", params: tuple[Any, ...] = ()) -> list[Any]:
    assert app.pool is not None
    async with app.pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT run_id, env_id, org_id, status FROM mollifier.runs WHERE {where}", params
        )
        return list(await cur.fetchall())


async def buffered(app: App, env: str) -> int:
    return await env_depth(app.redis, env)


async def drain_until_empty(d: Drainer, limit: int = 500) -> int:
    ticks = 0
    idle = 0
    while ticks < limit:
        ticks += 1
        if await d.tick() == 0:
            idle += 1
            if idle >= 2:
                return ticks
        else:
            idle = 0
    raise AssertionError("buffer did not empty")


async def test_drains_everything_and_get_run_switches_source(app: App) -> None:
    ids = await fill(app, (snap(f"env_{i % 3}", "org_1") for i in range(90)))
    before = await app.buffer.get_run("env_0", ids[0])
    assert before.source == run_pb2.RUN_SOURCE_BUFFER
    d = drainer(app, drain_batch_size=25)
    await drain_until_empty(d)
    assert len(await pg_rows(app)) == 90
    assert d.materialized_total == 90
    after = await app.buffer.get_run("env_0", ids[0])
    assert after.source == run_pb2.RUN_SOURCE_POSTGRES
    assert after.status == run_pb2.RUN_STATUS_PENDING
    for env in ("env_0", "env_1", "env_2"):
        assert await buffered(app, env) == 0
    # Drained envs leave the index at once; the empty org once it has stayed
    # empty for a moment (a new org's env may be a moment behind it).
    assert await app.redis.smembers(org_envs_key("org_1")) == set()
    await asyncio.sleep(1.05)
    await d.tick()
    assert await app.redis.smembers(INDEX_ORGS) == set()
    assert await app.redis.hlen(env_keys("env_0").runs) == 0


async def test_heavy_org_and_light_org_drain_one_to_one(app: App) -> None:
    heavy = [snap(f"heavy_{i % 6}", "org_heavy") for i in range(1200)]
    light = [snap("light_0", "org_light") for _ in range(600)]
    await fill(app, heavy + light)
    d = drainer(app, drain_batch_size=10, drain_concurrency=2)
    for _ in range(20):
        await d.tick()
    rows = await pg_rows(app)
    per_org = {"org_heavy": 0, "org_light": 0}
    for _, _, org, _ in rows:
        per_org[org] += 1
    assert per_org["org_light"] > 0
    ratio = per_org["org_heavy"] / per_org["org_light"]
    assert 0.7 <= ratio <= 1.5, per_org


async def test_light_env_is_not_starved(app: App) -> None:
    await fill(app, (snap(f"busy_{i % 5}", "org_x") for i in range(5 * 600)))
    (light_id,) = await fill(app, [snap("quiet", "org_x")])
    d = drainer(app, drain_batch_size=50, drain_concurrency=1)
    for _ in range(6):  # one visit per env in the org: six envs, six ticks
        await d.tick()
    assert [r[0] for r in await pg_rows(app, "env_id = 'quiet'")] == [light_id]
    assert await buffered(app, "quiet") == 0
    assert await buffered(app, "busy_0") > 0


async def test_runs_already_in_postgres_are_not_duplicated(app: App) -> None:
    snaps = [snap("env_dup", "org_1") for _ in range(30)]
    assert app.pool is not None
    # Committed by a drainer that died before its ack: the rows exist already.
    await materialize_batch(app.pool, [Entry.from_snapshot(s) for s in snaps[:20]])
    await fill(app, snaps)
    d = drainer(app, drain_batch_size=7)
    await drain_until_empty(d)
    assert len(await pg_rows(app, "env_id = 'env_dup'")) == 30
    assert d.materialized_total == 10
    assert await buffered(app, "env_dup") == 0


async def test_non_retryable_error_writes_system_failure(app: App) -> None:
    # The webapp's own constraint refuses the row: an honest non-retryable error
    # (23514) for a run that passed the sidecar's checks.
    assert app.pool is not None
    async with app.pool.connection() as conn:
        await conn.execute(
            "ALTER TABLE mollifier.runs ADD CONSTRAINT no_poison CHECK (NOT 'poison' = ANY(tags))"
        )
    bad = snap("env_bad", "org_1")
    bad.tags.append("poison")
    good = [snap("env_bad", "org_1") for _ in range(5)]
    await fill(app, [*good[:2], bad, *good[2:]])
    d = drainer(app)
    await drain_until_empty(d)
    rows = {r[0]: r[3] for r in await pg_rows(app, "env_id = 'env_bad'")}
    assert rows[bad.run_id] == "SYSTEM_FAILURE"
    assert all(rows[g.run_id] == "PENDING" for g in good)
    assert d.failed_total == 1 and d.materialized_total == 5
    run = await app.buffer.get_run("env_bad", bad.run_id)
    assert run.status == run_pb2.RUN_STATUS_SYSTEM_FAILURE and "23514" in run.last_error
    assert list(run.snapshot.tags) == ["t", "poison"]  # rebuilt from the snapshot
    assert await buffered(app, "env_bad") == 0
    # It is the record of a run never created: tags and metadata changes are
    # refused, not answered and then never seen.
    with pytest.raises(FailedPrecondition) as err:
        await app.mutations.add_tags("env_bad", bad.run_id, "req-sf-1", ["more"])
    assert err.value.reason == "RUN_SYSTEM_FAILURE"
    with pytest.raises(FailedPrecondition):
        await app.mutations.update_metadata(
            "env_bad",
            bad.run_id,
            "req-sf-2",
            operations=[
                mutate_pb2.MetadataOperation(
                    type=mutate_pb2.METADATA_OPERATION_TYPE_SET, path="k", value_json="1"
                )
            ],
        )
    again = await app.buffer.get_run("env_bad", bad.run_id)
    assert list(again.snapshot.tags) == ["t", "poison"] and not again.snapshot.metadata


async def test_cancelled_and_batch_fields_carried(app: App) -> None:
    s = snap("env_c", "org_1", batch_id="batch_9", batch_index=4)
    await fill(app, [s])
    # Cancelled while buffered (what MutateService's cancel does to the entry).
    await set_entry(app.redis, "env_c", s.run_id, cx=now_ms(), cr="nope")
    await drain_until_empty(drainer(app))
    run = await app.buffer.get_run("env_c", s.run_id)
    assert run.status == run_pb2.RUN_STATUS_CANCELED and run.cancel_reason == "nope"
    assert run.snapshot.batch_id == "batch_9" and run.snapshot.batch_index == 4


async def test_idempotency_binding_outlives_the_buffer(app: App) -> None:
    s = snap("env_i", "org_1", idempotency_key="key-1")
    await fill(app, [s])
    await drain_until_empty(drainer(app))
    binding = env_keys("env_i").idem("task-1", "key-1")
    assert (await app.redis.get(binding)) == s.run_id.encode()
    ttl = await app.redis.pttl(binding)
    assert 0 < ttl <= app.settings.idempotency_ttl_ms
    again = await app.buffer.accept(snap("env_i", "org_1", idempotency_key="key-1"))
    assert again.existing_run_id == s.run_id
    found = await app.buffer.find_by_idempotency_key("env_i", "task-1", "key-1")
    assert found.source == run_pb2.RUN_SOURCE_POSTGRES


async def test_external_lease_expires_and_is_delivered_again(app: App) -> None:
    ids = await fill(app, (snap("env_ext", "org_1") for _ in range(5)), at_once=1)
    d = drainer(app, drain_sink="external")
    assert not d.enabled
    token1, deadline, runs = await d.lease_external("c1", 10, 300)
    assert sorted(r.run_id for r in runs) == sorted(ids)
    assert all(r.status == run_pb2.RUN_STATUS_DRAINING and r.attempts == 1 for r in runs)
    assert deadline > now_ms()
    # Held: nobody else gets them.
    _, _, none = await d.lease_external("c2", 10, 300)
    assert none == []
    await asyncio.sleep(0.4)
    token2, _, again = await d.lease_external("c2", 10, 5000)
    assert sorted(r.run_id for r in again) == sorted(ids)
    assert [r.run_id for r in again] == ids  # back at the head, in arrival order
    # The first holder's late ack changes nothing.
    acked, rejected = await d.ack_external(token1, [("env_ext", i) for i in ids])
    assert acked == 0 and len(rejected) == 5
    assert await buffered(app, "env_ext") == 5
    run = await app.buffer.get_run("env_ext", ids[0])
    assert run.status == run_pb2.RUN_STATUS_DRAINING
    acked, rejected = await d.ack_external(token2, [("env_ext", i) for i in ids])
    assert acked == 5 and rejected == []
    assert await buffered(app, "env_ext") == 0


async def test_nack_backoff_dead_letter_list_and_retry(app: App) -> None:
    ids = await fill(app, (snap("env_n", "org_1") for _ in range(3)), at_once=1)
    d = drainer(app, drain_sink="external", drain_max_attempts=2)
    token, _, runs = await d.lease_external("c", 10, 5000)
    requeued, dead, rejected = await d.nack_external(
        token, [("env_n", r.run_id) for r in runs], retry_after_ms=300, error="busy"
    )
    assert (requeued, dead, rejected) == (3, 0, [])
    _, _, early = await d.lease_external("c", 10, 5000)
    assert early == []  # not before its backoff ends
    await asyncio.sleep(0.35)
    token, _, runs = await d.lease_external("c", 10, 5000)
    assert [r.run_id for r in runs] == ids and runs[0].last_error == "busy"
    # Second attempt of two: a nack dead-letters.
    requeued, dead, _ = await d.nack_external(token, [("env_n", r.run_id) for r in runs])
    assert (requeued, dead) == (0, 3)
    page, next_token = await d.list_failed("env_n", page_size=2)
    assert [r.run_id for r in page] == ids[:2] and next_token
    assert all(r.status == run_pb2.RUN_STATUS_FAILED for r in page)
    rest, last = await d.list_failed("env_n", page_size=2, page_token=next_token)
    assert [r.run_id for r in rest] == ids[2:] and last == ""
    assert (await app.buffer.get_run("env_n", ids[0])).status == run_pb2.RUN_STATUS_FAILED
    assert await d.retry_failed("env_n", [ids[0]], request_id="r1") == 1
    assert await d.retry_failed("env_n", [ids[0]], request_id="r1") == 1  # applied once
    assert await d.retry_failed("env_n") == 2
    token, _, runs = await d.lease_external("c", 10, 5000)
    assert [r.run_id for r in runs] == ids and runs[0].attempts == 1
    with pytest.raises(InvalidArgument):
        await d.list_failed("")


async def test_retryable_failures_dead_letter_after_max_attempts(app: App) -> None:
    ids = await fill(app, (snap("env_r", "org_1") for _ in range(2)), at_once=1)
    d = drainer(app, drain_max_attempts=2, drain_backoff_ms=1)
    # The drainer's reaction to a retryable error is a nack with backoff; a
    # real outage is in test_drain_faults.py.
    token = "t"
    for attempt in range(2):
        batch = await d.lease_env("env_r", 10, 5000, token)
        assert [r.run_id for r in batch.runs] == ids and batch.runs[0].attempts == attempt + 1
        await d.nack_env("env_r", token, ids, error="57P01: terminating")
        await asyncio.sleep(0.01)
    failed, _ = await d.list_failed("env_r")
    assert [r.run_id for r in failed] == ids and failed[0].last_error.startswith("57P01")
    assert d.dead_lettered_total == 2


async def test_pause_is_shared_and_status_reports(app: App) -> None:
    await fill(app, (snap(f"env_s{i % 2}", "org_s") for i in range(10)))
    a, b = drainer(app), drainer(app)
    assert await a.pause("maintenance") == drain_pb2.DRAIN_STATE_PAUSED
    assert await app.redis.get(DRAIN_PAUSED) == b"maintenance"
    assert await b.tick() == 0
    status = await b.status()
    assert status.state == drain_pb2.DRAIN_STATE_PAUSED
    (org,) = status.orgs
    assert org.org_id == "org_s" and org.queued == 10 and len(org.envs) == 2
    assert await b.resume() == drain_pb2.DRAIN_STATE_RUNNING
    await drain_until_empty(b)
    assert len(await pg_rows(app)) == 10
    status = await b.status()
    assert status.materialized_total == 10 and status.orgs == []
    off = Drainer(app.settings, app.redis, app.scripts, app.pool)
    assert (await off.status()).state == drain_pb2.DRAIN_STATE_DISABLED


async def test_stale_sweep_and_index_repair(app: App) -> None:
    await fill(app, (snap("env_old", "org_o") for _ in range(4)))
    d = drainer(app, stale_after_ms=1000)
    assert await d.sweep_stale() == 0
    # Age the entries: move their arrival scores an hour back.
    for run_id, score in await queue_scores(app.redis, "env_old"):
        await set_entry(app.redis, "env_old", run_id, sc=score - 3_600_000_000)
    assert await d.sweep_stale() == 4
    # The index lost the env (e.g. a cluster write that never happened).
    await app.redis.delete(org_envs_key("org_o"), INDEX_ORGS)
    assert await d.tick() == 0
    assert await d.repair_index() == 1
    await drain_until_empty(d)
    assert len(await pg_rows(app, "env_id = 'env_old'")) == 4
    assert await d.sweep_stale() == 0


async def test_loop_runs_and_stops_gracefully(app: App) -> None:
    await fill(app, (snap(f"env_l{i % 4}", "org_l") for i in range(400)))
    d = drainer(app, drain_batch_size=20, drain_idle_ms=10)
    d.start()
    d.start()  # idempotent
    deadline = asyncio.get_running_loop().time() + 20
    while len(await pg_rows(app)) < 400:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    await d.stop(2)
    await d.stop(2)
    assert not d.running
    assert d.materialized_total == 400


async def test_concurrent_drainers_create_each_run_once(app: App) -> None:
    await fill(app, (snap(f"env_m{i % 3}", f"org_m{i % 2}") for i in range(1500)))
    ds = [drainer(app, drain_batch_size=15, drain_idle_ms=5) for _ in range(3)]
    for d in ds:
        d.start()
    deadline = asyncio.get_running_loop().time() + 30
    while len(await pg_rows(app)) < 1500:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    for d in ds:
        await d.stop(2)
    assert sum(d.materialized_total for d in ds) == 1500
    for i in range(3):
        assert await buffered(app, f"env_m{i}") == 0


async def test_service_validation(app: App) -> None:
    d = drainer(app)
    with pytest.raises(InvalidArgument) as err:
        await d.ack_external("tok", [("bad env!", "run_1")])
    assert err.value.violations[0][0] == "runs[0].env_id"
    with pytest.raises(InvalidArgument):
        await d.lease_external("c", -1, 0)
    with pytest.raises(InvalidArgument):
        await d.retry_failed("env_1", ["bad id!"])


async def test_cancel_of_a_requeued_run_wins_over_its_committed_row(app: App) -> None:
    s = snap("env_cx", "org_1")
    await fill(app, [s])
    d = drainer(app, drain_lease_ms=300)
    assert app.pool is not None
    # A drainer committed the row and died before its ack ...
    batch = await d.lease_env("env_cx", 10, 300, "dead-drainer")
    await materialize_batch(app.pool, [Entry.from_snapshot(s)])
    await asyncio.sleep(0.35)
    # ... the lease ran out, the run is queued again, and is cancelled there.
    reclaim = await d.lease_env("env_cx", 0, 300, "nobody")
    assert reclaim.reclaimed == 1 and batch.runs[0].run_id == s.run_id
    await set_entry(app.redis, "env_cx", s.run_id, cx=now_ms(), cr="late")
    await drain_until_empty(d)
    run = await app.buffer.get_run("env_cx", s.run_id)
    assert run.source == run_pb2.RUN_SOURCE_POSTGRES
    assert run.status == run_pb2.RUN_STATUS_CANCELED and run.cancel_reason == "late"


async def test_a_stalled_drainer_does_not_commit_after_its_lease(app: App) -> None:
    ids = await fill(app, (snap("env_z", "org_1") for _ in range(4)), at_once=1)
    d = drainer(app, drain_lease_ms=300)  # commit margin: 100 ms
    batch = await d.lease_env("env_z", 10, 300, "zombie")
    await asyncio.sleep(0.25)  # stalled (GC pause, slow network) past the margin
    await d.materialize(batch)
    assert await pg_rows(app, "env_id = 'env_z'") == []
    await asyncio.sleep(0.1)
    # The lease ran out: the runs go to the next holder, exactly once.
    await drain_until_empty(d)
    assert sorted(r[0] for r in await pg_rows(app, "env_id = 'env_z'")) == sorted(ids)


async def test_a_run_id_taken_by_another_env_is_dead_lettered(app: App) -> None:
    """Run ids key the table: a run of env B whose id is already env A's row
    can never be created. It is dead-lettered (kept, readable), and A's row is
    untouched: one tenant cannot erase or answer for another's run."""
    a = snap("env_a", "org_1")
    await fill(app, [a])
    d = drainer(app)
    await drain_until_empty(d)
    b = snap("env_b", "org_1", run_id=a.run_id)
    await fill(app, [b])
    await drain_until_empty(d)
    assert [(r[0], r[1]) for r in await pg_rows(app)] == [(a.run_id, "env_a")]
    failed = await app.buffer.get_run("env_b", a.run_id)
    assert failed.status == run_pb2.RUN_STATUS_FAILED
    assert "another env" in failed.last_error
    mine = await app.buffer.get_run("env_a", a.run_id)
    assert mine.source == run_pb2.RUN_SOURCE_POSTGRES


async def test_a_run_resolved_to_an_earlier_one_still_reads(app: App) -> None:
    """The Redis binding of a drained key lapses before the Postgres row's key
    does. A later run with the key is then accepted, and at drain resolves to
    the earlier row; reading it must answer with that run, not NOT_FOUND."""
    first = snap("env_r", "org_1", idempotency_key="key-r")
    await fill(app, [first])
    d = drainer(app)
    await drain_until_empty(d)
    await app.redis.delete(env_keys("env_r").idem("task-1", "key-r"))  # lapsed
    second = snap("env_r", "org_1", idempotency_key="key-r")
    accepted = await app.buffer.accept(second)
    assert accepted.run is not None and accepted.existing_run_id == ""
    await drain_until_empty(d)
    assert [r[0] for r in await pg_rows(app)] == [first.run_id]
    read = await app.buffer.get_run("env_r", second.run_id)
    assert read.run_id == first.run_id
    assert read.source == run_pb2.RUN_SOURCE_POSTGRES
    bound = await app.redis.get(env_keys("env_r").idem("task-1", "key-r"))
    assert bound == first.run_id.encode()


async def test_an_ack_naming_a_run_twice_acks_it_once(app: App) -> None:
    """ack.lua deletes the acked hashes together at the end: a run named twice
    in one ack is acked once and its second mention rejected, as before."""
    ids = await fill(app, (snap("env_twice", "org_1") for _ in range(3)), at_once=1)
    d = drainer(app)
    batch = await d.lease_env("env_twice", 10, 30_000, "tok-twice")
    assert [r.run_id for r in batch.runs] == ids
    acked, rejected = await d.ack_env(
        "env_twice", "tok-twice", [(ids[0], ""), (ids[1], ""), (ids[0], ""), (ids[2], "")]
    )
    assert (acked, rejected) == (3, [ids[0]])
    assert await buffered(app, "env_twice") == 0
    k = env_keys("env_twice")
    assert [await app.redis.hexists(k.runs, i) for i in ids] == [False, False, False]


async def test_a_lease_writes_state_token_and_attempts_and_a_reclaim_raises_the_version(
    app: App,
) -> None:
    """A lease writes only st, lt and at (its deadline is the lease zset's
    score). It leaves the version alone: a leased run cannot be mutated, and
    the only ways back to the queue (reclaim, nack) raise the version, so a
    compare-and-set against a version read before the lease still fails."""
    (run_id,) = await fill(app, [snap("env_lv", "org_1")])
    k = env_keys("env_lv")
    before = await read_entry(app.redis, "env_lv", run_id)
    assert before is not None
    d = drainer(app)
    batch = await d.lease_env("env_lv", 10, 200, "tok-lv")
    leased = await read_entry(app.redis, "env_lv", run_id)
    assert leased is not None
    assert (leased["st"], leased["lt"], leased["at"]) == (b"D", b"tok-lv", 1)
    assert {f: v for f, v in leased.items() if f not in ("st", "lt", "at")} == {
        f: v for f, v in before.items() if f not in ("st", "at")
    }
    deadline = await app.redis.zscore(k.lease, run_id)
    assert deadline is not None and int(deadline) == batch.deadline_ms
    await asyncio.sleep(0.25)
    reclaim = await d.lease_env("env_lv", 0, 200, "nobody")
    assert reclaim.reclaimed == 1
    back = await read_entry(app.redis, "env_lv", run_id)
    assert back is not None
    assert back["st"] == b"Q" and "lt" not in back
    assert back["v"] > before["v"]
    # Leased and nacked: the version is raised on the way back too.
    again = await d.lease_env("env_lv", 10, 30_000, "tok-lv2")
    assert again.runs[0].attempts == 2
    await d.nack_env("env_lv", "tok-lv2", [run_id], delay_ms=60_000)
    again_entry = await read_entry(app.redis, "env_lv", run_id)
    assert again_entry is not None and again_entry["v"] > back["v"]


async def test_the_loop_drains_while_an_index_repair_is_running(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index repair (a SCAN of every key) runs beside the ticks: a start
    with a deep buffer does not wait for it before the first lease, and a
    repair still running when the loop stops is cancelled."""
    ids = await fill(app, (snap("env_rp", "org_rp") for _ in range(30)))
    d = drainer(app)
    started, release = asyncio.Event(), asyncio.Event()
    real_repair = d.repair_index

    async def slow_repair() -> int:
        started.set()
        await release.wait()
        return await real_repair()

    monkeypatch.setattr(d, "repair_index", slow_repair)
    d.start()
    try:
        await asyncio.wait_for(started.wait(), 5)
        for _ in range(500):
            if await buffered(app, "env_rp") == 0:
                break
            await asyncio.sleep(0.01)
        assert not release.is_set()
        assert sorted(r[0] for r in await pg_rows(app, "env_id = 'env_rp'")) == sorted(ids)
    finally:
        await d.stop(5)
    assert not d.running


async def test_a_trickle_gathers_into_batches_while_the_drainer_lingers(app: App) -> None:
    """Runs arriving a few at a time are leased in batches, not one lease,
    transaction and ack per arrival: after a tick that leased under a quarter
    of a batch the loop waits MOLLIFIER_DRAIN_LINGER_MS."""

    async def trickle(linger_ms: int, env: str) -> tuple[int, float]:
        d = drainer(app, drain_batch_size=100, drain_idle_ms=5, drain_linger_ms=linger_ms)
        loop = asyncio.get_running_loop()
        d.start()
        try:
            started = loop.time()
            for _ in range(40):  # 2 runs every 20 ms: 0.8 s on a quiet machine
                await fill(app, [snap(env, "org_trickle"), snap(env, "org_trickle")])
                await asyncio.sleep(0.02)
            deadline = loop.time() + 10
            while d.materialized_total < 80:
                assert loop.time() < deadline
                await asyncio.sleep(0.02)
            took = loop.time() - started
        finally:
            await d.stop(2)
        return d.materialized_total, took

    eager_done, _ = await trickle(0, "env_trickle_eager")
    linger_done, took = await trickle(300, "env_trickle_linger")
    assert eager_done == linger_done == 80
    assert app.pool is not None
    async with app.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT env_id, count(DISTINCT materialized_at) FROM mollifier.runs "
            "WHERE env_id LIKE %s GROUP BY env_id",
            ("env_trickle_%",),
        )
        batches = {env: int(n) for env, n in await cur.fetchall()}
    # One transaction per batch, one materialized_at per transaction. Without
    # a linger nearly every arrival is its own batch (40 here on a quiet
    # machine); with one, each 300 ms brings at most the batch that gathered
    # and one small one after it (6 here).
    assert batches["env_trickle_linger"] <= 2 * (took / 0.3 + 1), (batches, took)
    assert batches["env_trickle_eager"] > batches["env_trickle_linger"], batches
    assert len(await pg_rows(app, "env_id LIKE %s", ("env_trickle_%",))) == 160


async def test_many_small_envs_drain_without_lingering(app: App) -> None:
    """The linger is for a trickle, not for many envs with a few runs each:
    a tick that reached only some of the envs with runs is followed at once
    by the next (with a 5 s linger per tick, these 60 envs would take a
    minute)."""
    for i in range(60):
        await fill(app, [snap(f"env_small_{i}", "org_small") for _ in range(2)])
    d = drainer(app, drain_batch_size=100, drain_linger_ms=5000)
    loop = asyncio.get_running_loop()
    d.start()
    try:
        deadline = loop.time() + 30
        while d.materialized_total < 120:
            assert loop.time() < deadline, (d.materialized_total, d.lingers)
            await asyncio.sleep(0.02)
    finally:
        await d.stop(2)
    # At most the last tick, which reached the last few envs, lingered.
    assert d.lingers <= 1, (d.lingers, d.ticks)
    assert len(await pg_rows(app, "env_id LIKE %s", ("env_small_%",))) == 120


async def test_a_resume_wakes_the_loop_once(app: App) -> None:
    """Resume wakes an idle drainer for one tick; later idle sleeps sleep
    again, instead of the loop spinning on Redis."""
    d = drainer(app, drain_idle_ms=200)
    loop = asyncio.get_running_loop()
    d.start()
    try:
        await d.resume()
        ticks, started = d.ticks, loop.time()
        await asyncio.sleep(1.0)
        elapsed = loop.time() - started
    finally:
        await d.stop(2)
    # One tick per idle pause (200 ms), and a few more for a slow machine.
    assert d.ticks - ticks <= elapsed / 0.2 + 3, (d.ticks - ticks, elapsed)


async def test_two_runs_with_one_expired_key_in_one_batch_are_both_written(app: App) -> None:
    """A key whose expiry passed is free again: a second run may take it while
    the first is still buffered. Drained in one batch, both become rows (the
    older without the key), neither resolved to the other."""
    first = snap("env_twins", "org_twins", idempotency_key="kk")
    first.idempotency_key_expires_at.CopyFrom(ts_from_ms(now_ms() + 300))
    assert (await app.buffer.accept(first)).result == RESULT_ACCEPTED
    await asyncio.sleep(0.4)
    second = snap("env_twins", "org_twins", idempotency_key="kk")
    second.idempotency_key_expires_at.CopyFrom(ts_from_ms(now_ms() + 60_000))
    assert (await app.buffer.accept(second)).result == RESULT_ACCEPTED
    d = drainer(app, drain_batch_size=100)
    await drain_until_empty(d)
    assert app.pool is not None
    async with app.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT run_id, idempotency_key FROM mollifier.runs WHERE env_id = %s",
            ("env_twins",),
        )
        rows: dict[str, str | None] = dict(await cur.fetchall())
    assert rows == {first.run_id: None, second.run_id: "kk"}
    assert (await app.buffer.get_run("env_twins", second.run_id)).run_id == second.run_id


async def test_a_damaged_field_dead_letters_its_run_alone(app: App) -> None:
    bad = snap("env_dmg", "org_dmg")
    good = [snap("env_dmg", "org_dmg") for _ in range(5)]
    await fill(app, [bad, *good], at_once=1)
    k = env_keys("env_dmg")
    await set_entry(app.redis, "env_dmg", bad.run_id, ca="garbage")
    await drain_until_empty(drainer(app))
    assert sorted(r[0] for r in await pg_rows(app, "env_id = 'env_dmg'")) == sorted(
        g.run_id for g in good
    )
    assert [m.decode() for m in await app.redis.zrange(k.failed, 0, -1)] == [bad.run_id]
    entry = await read_entry(app.redis, "env_dmg", bad.run_id)
    assert entry is not None and b"damaged" in entry.get("le", b"")


async def test_an_entry_missing_what_the_drain_needs_is_dead_lettered_not_dropped(
    app: App,
) -> None:
    """An entry without its snapshot (or its queue place) cannot be drained: it
    goes to the failed set, readable, instead of into no set at all; and
    RetryFailed leaves one without its queue place there."""
    no_snapshot, no_place = snap("env_hole", "org_hole"), snap("env_hole", "org_hole")
    await fill(app, [no_snapshot, no_place], at_once=1)
    k = env_keys("env_hole")
    await set_entry(app.redis, "env_hole", no_snapshot.run_id, s=None)
    d = drainer(app, drain_lease_ms=200)
    # The second is leased, then loses its queue place while leased; its
    # lease runs out and the reclaim finds the entry without it.
    batch = await d.lease_env("env_hole", 10, 200, "tok")
    assert [r.run_id for r in batch.runs] == [no_place.run_id]
    await set_entry(app.redis, "env_hole", no_place.run_id, sc=None)
    await asyncio.sleep(0.3)
    await d.lease_env("env_hole", 10, 200, "tok2")
    failed = {m.decode() for m in await app.redis.zrange(k.failed, 0, -1)}
    assert failed == {no_snapshot.run_id, no_place.run_id}
    for run_id in failed:
        entry = await read_entry(app.redis, "env_hole", run_id)
        assert entry is not None and entry["st"] == b"F"
    listed, _ = await d.list_failed("env_hole")
    assert {r.run_id: r.status for r in listed} == {
        no_snapshot.run_id: run_pb2.RUN_STATUS_FAILED,
        no_place.run_id: run_pb2.RUN_STATUS_FAILED,
    }
    assert all(r.last_error for r in listed)
    await d.retry_failed("env_hole", [no_place.run_id])
    assert await app.redis.zscore(k.failed, no_place.run_id) is not None


async def test_a_run_committed_on_its_last_attempt_before_a_crash_is_not_left_failed(
    app: App,
) -> None:
    """The holder committed the run's row on its last attempt and died before
    its ack: when the lease runs out the run is not listed as failed while it
    exists; it leaves the buffer as the ack would have taken it."""
    s = snap("env_last", "org_last")
    await fill(app, [s])
    d = drainer(app, drain_max_attempts=1, drain_lease_ms=200)
    batch = await d.lease_env("env_last", 10, 200, "tok-dead")
    assert [r.run_id for r in batch.runs] == [s.run_id]
    assert app.pool is not None
    await materialize_batch(app.pool, [Entry.from_snapshot(s)])  # committed, never acked
    await asyncio.sleep(0.3)
    await drain_until_empty(d)
    k = env_keys("env_last")
    assert await app.redis.zcard(k.failed) == 0
    assert not await app.redis.hexists(k.runs, s.run_id)
    got = await app.buffer.get_run("env_last", s.run_id)
    assert got.source == run_pb2.RUN_SOURCE_POSTGRES
    # One out of attempts without a row stays dead-lettered.
    lost = snap("env_last", "org_last")
    await fill(app, [lost])
    await d.lease_env("env_last", 10, 200, "tok-dead-2")
    await asyncio.sleep(0.3)
    await drain_until_empty(d)
    assert [m.decode() for m in await app.redis.zrange(k.failed, 0, -1)] == [lost.run_id]


async def test_close_returns_while_the_depth_refresh_is_busy(settings: Settings) -> None:
    """A cancel landing inside a redis-py command can be swallowed there; the
    background loops end on the app's stop event too, and close waits for them
    a bounded time, so a shutdown never hangs on them."""
    a = await App.connect(settings.replace(drain_enabled=False), start_background=True)
    await a.redis.sadd(INDEX_ORGS, *[f"org_many_{i}" for i in range(20_000)])
    await asyncio.sleep(0.3)  # the refresh now walks 20,000 orgs, one call each
    await asyncio.wait_for(a.close(grace=1), 15)
    assert all(t.done() for t in a._tasks) or not a._tasks


async def test_runs_buffered_in_the_old_layout_are_moved_and_drained_once(app: App) -> None:
    """The earlier layout kept a hash per run and the queue as a ZSET. The
    drainer moves such runs into the current layout when it starts: queued ones
    are leased before anything queued since, a dead letter stays one, a leased
    one keeps its lease until it runs out, and every run becomes one row."""
    env, org = "env_old_layout", "org_ol"
    k = env_keys(env)
    tag = k.tag
    now = now_ms()
    old = [snap(env, org) for _ in range(5)]
    fresh = snap(env, org)

    async def put_old(i: int, s: run_pb2.RunSnapshot, state: str, **more: Any) -> int:
        score = (now - 60_000) * 1000 + i
        fields: dict[str, Any] = {
            "s": s.SerializeToString(), "st": state, "sc": score, "ca": now - 60_000,
            "org": org, "du": 0, "ik": "", "at": 0, "v": score, **more,
        }  # fmt: skip
        await app.redis.hset(f"{tag}:run:{s.run_id}", mapping=fields)
        return score

    for i, s in enumerate(old[:3]):
        await app.redis.zadd(f"{tag}:q", {s.run_id: await put_old(i, s, "Q")})
    await put_old(3, old[3], "F", le="boom", at=3)
    await app.redis.zadd(k.failed, {old[3].run_id: now - 1000})
    await put_old(4, old[4], "D", lt="gone-holder", at=1)
    await app.redis.zadd(k.lease, {old[4].run_id: now - 1})  # its holder is gone
    backed_off = snap(env, org)
    await put_old(5, backed_off, "Q", at=1)
    await app.redis.zadd(k.retry, {backed_off.run_id: now - 1})  # its backoff is over
    await app.redis.hset(k.env, mapping={"org": org, "ls": now * 1000})
    await app.redis.sadd(org_envs_key(org), env)
    await app.redis.sadd(INDEX_ORGS, org)
    # A run accepted by this sidecar before the old ones were moved.
    await fill(app, [fresh])

    # A lease that comes before the move leaves the old runs' references alone.
    r = await app.scripts.lease(app.redis, [*k.buffered, k.runs], [0, 1000, "early", 5, 1000])
    assert (int(r[2]), int(r[3])) == (0, 0)
    assert await app.redis.zscore(k.lease, old[4].run_id) is not None
    assert await app.redis.zscore(k.retry, backed_off.run_id) is not None

    d = drainer(app)
    assert await d.upgrade_layout() == 6
    assert await d.upgrade_layout() == 0
    assert await app.redis.exists(f"{tag}:q") == 0
    assert [key async for key in app.redis.scan_iter(match=f"{tag}:run:*")] == []
    got = await app.buffer.get_run(env, old[0].run_id)
    assert got.status == run_pb2.RUN_STATUS_QUEUED and got.snapshot.run_id == old[0].run_id
    failed = await app.buffer.get_run(env, old[3].run_id)
    assert (failed.status, failed.last_error, failed.attempts) == (
        run_pb2.RUN_STATUS_FAILED,
        "boom",
        3,
    )
    # Old queued runs first, in their order, then the one queued since.
    assert await queue_ids(app.redis, env) == [s.run_id for s in old[:3]] + [fresh.run_id]
    batch = await d.lease_env(env, 10, 30_000, "tok-ol")
    assert batch.reclaimed == 1
    # The expired lease and the ended backoff came back at their arrival
    # scores, among the old ones.
    expected = [*(s.run_id for s in old[:3]), old[4].run_id, backed_off.run_id, fresh.run_id]
    assert [r.run_id for r in batch.runs] == expected
    await d.nack_env(env, "tok-ol", [r.run_id for r in batch.runs], delay_ms=1)
    await asyncio.sleep(0.01)
    await drain_until_empty(d)
    rows = await pg_rows(app, "env_id = %s", (env,))
    assert sorted(r[0] for r in rows) == sorted(
        s.run_id for s in [*old[:3], old[4], backed_off, fresh]
    )
    assert await app.redis.zrange(k.failed, 0, -1) == [old[3].run_id.encode()]


async def test_a_dead_letter_of_the_old_layout_retried_before_the_move_is_kept(app: App) -> None:
    """RetryFailed meeting a dead letter still in the earlier layout neither
    drops its reference (the script alone) nor retries it unmoved (the call)."""
    env, org = "env_old_failed", "org_of"
    k = env_keys(env)
    s = snap(env, org)
    now = now_ms()
    score = (now - 60_000) * 1000
    await app.redis.hset(
        f"{k.tag}:run:{s.run_id}",
        mapping={"s": s.SerializeToString(), "st": "F", "sc": score, "ca": now - 60_000,
                 "org": org, "du": 0, "ik": "", "at": 5, "v": score, "le": "boom"},
    )  # fmt: skip
    await app.redis.zadd(k.failed, {s.run_id: now})
    await app.redis.hset(k.env, mapping={"org": org, "ls": score})
    await app.redis.sadd(org_envs_key(org), env)
    await app.redis.sadd(INDEX_ORGS, org)
    request_key = k.env
    assert (
        await app.scripts.retry_failed(
            app.redis, [k.back, k.failed, request_key], [k.runs, "0", "0", s.run_id]
        )
        == 0
    )
    assert await app.redis.zscore(k.failed, s.run_id) is not None
    d = drainer(app)
    assert await d.retry_failed(env, [s.run_id]) == 1
    await drain_until_empty(d)
    assert [r[0] for r in await pg_rows(app, "env_id = %s", (env,))] == [s.run_id]
