"""The materializer against a real Postgres: rows, statuses, conflicts, failures."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from mollifier.codec import now_ms, ts_from_ms
from mollifier.materializer import (
    Entry,
    LeaseLost,
    Outcome,
    is_retryable,
    materialize_batch,
    materialize_one,
    read_run,
    read_run_by_idempotency_key,
    write_batch,
)
from mollifier.migrations import migrate
from mollifier_client.v1 import run_pb2
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

_ids = itertools.count(1)


def snap(env: str = "env_a", **fields: object) -> run_pb2.RunSnapshot:
    s = run_pb2.RunSnapshot(
        run_id=f"run_m{next(_ids)}",
        env_id=env,
        org_id="org_a",
        task_identifier="task-1",
        payload=b'{"n":1}',
        payload_type="application/json",
        tags=["a", "b c", 'q"uote'],
        metadata=b'{"k":[1,2]}',
        metadata_type="application/json",
        queue="q1",
        batch_id="batch_1",
        batch_index=3,
        trace_id="abcd",
        span_id="ef01",
        max_attempts=3,
        priority=2,
        extra={"x": "y"},
    )
    for k, v in fields.items():
        if hasattr(v, "DESCRIPTOR"):
            getattr(s, k).CopyFrom(v)
        else:
            setattr(s, k, v)
    return s


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    p = AsyncConnectionPool(database_url, min_size=1, max_size=4, open=False,
                            kwargs={"autocommit": True})  # fmt: skip
    await p.open(wait=True)
    await migrate(p)
    yield p
    await p.close()


async def assert_reads_back(
    pool: AsyncConnectionPool, run_id: str, written: run_pb2.RunSnapshot
) -> None:
    """The row of env_a's ``run_id`` reads back as the snapshot written."""
    got = await read_run(pool, "env_a", run_id)
    assert got is not None
    # jsonb keeps the document, not its spelling: compare metadata as JSON.
    assert json.loads(got.snapshot.metadata) == json.loads(written.metadata)
    got.snapshot.metadata = written.metadata
    assert got.snapshot == written


async def test_batch_writes_rows_and_is_idempotent(pool: AsyncConnectionPool) -> None:
    entries = [Entry.from_snapshot(snap()) for _ in range(20)]
    first = await materialize_batch(pool, entries)
    assert [r.outcome for r in first] == [Outcome.CREATED] * 20
    again = await materialize_batch(pool, entries)
    assert [r.outcome for r in again] == [Outcome.EXISTS] * 20
    run = await read_run(pool, "env_a", entries[0].run_id)
    assert run is not None
    assert run.source == run_pb2.RUN_SOURCE_POSTGRES
    assert run.status == run_pb2.RUN_STATUS_PENDING
    assert list(run.snapshot.tags) == ["a", "b c", 'q"uote']
    assert run.snapshot.batch_id == "batch_1" and run.snapshot.batch_index == 3
    assert run.snapshot.extra["x"] == "y"
    assert await read_run(pool, "env_other", entries[0].run_id) is None


async def test_statuses(pool: AsyncConnectionPool) -> None:
    delayed = Entry.from_snapshot(snap(delay_until=ts_from_ms(now_ms() + 3_600_000)))
    past = Entry.from_snapshot(snap(delay_until=ts_from_ms(now_ms() - 1000)))
    cancelled = Entry.from_snapshot(snap())
    cancelled.canceled_ms, cancelled.cancel_reason = now_ms(), "user asked"
    await materialize_batch(pool, [delayed, past, cancelled])
    got = {e.run_id: await read_run(pool, "env_a", e.run_id) for e in (delayed, past, cancelled)}
    assert got[delayed.run_id].status == run_pb2.RUN_STATUS_DELAYED  # type: ignore[union-attr]
    assert got[past.run_id].status == run_pb2.RUN_STATUS_PENDING  # type: ignore[union-attr]
    c = got[cancelled.run_id]
    assert c is not None and c.status == run_pb2.RUN_STATUS_CANCELED
    assert c.cancel_reason == "user asked" and c.HasField("canceled_at")


async def test_idempotency_key_bound_to_another_run_resolves(pool: AsyncConnectionPool) -> None:
    first = Entry.from_snapshot(snap(idempotency_key="k1"))
    await materialize_batch(pool, [first])
    second = Entry.from_snapshot(snap(idempotency_key="k1"))
    other_env = Entry.from_snapshot(snap(env="env_b", idempotency_key="k1"))
    results = await materialize_batch(pool, [second, other_env])
    assert results[0].outcome is Outcome.RESOLVED
    assert results[0].resolved_run_id == first.run_id
    assert results[1].outcome is Outcome.CREATED
    assert await read_run(pool, "env_a", second.run_id) is None
    found = await read_run_by_idempotency_key(pool, "env_a", "task-1", "k1")
    assert found is not None and found.run_id == first.run_id


async def test_expired_key_is_free_again(pool: AsyncConnectionPool) -> None:
    old = Entry.from_snapshot(
        snap(idempotency_key="k2", idempotency_key_expires_at=ts_from_ms(now_ms() - 1000))
    )
    await materialize_batch(pool, [old])
    assert await read_run_by_idempotency_key(pool, "env_a", "task-1", "k2") is None
    new = Entry.from_snapshot(snap(idempotency_key="k2"))
    assert (await materialize_batch(pool, [new]))[0].outcome is Outcome.CREATED
    found = await read_run_by_idempotency_key(pool, "env_a", "task-1", "k2")
    assert found is not None and found.run_id == new.run_id


async def test_a_key_expiring_at_the_epoch_is_expired_not_everlasting(
    pool: AsyncConnectionPool,
) -> None:
    # Set, at 0: long past, as the buffer reads it; never a NULL ("no expiry").
    for method in ("copy", "unnest"):
        key = f"k_epoch_{method}"
        runs = [snap(idempotency_key=key), snap(idempotency_key=f"{key}_2")]
        for s in runs:
            s.idempotency_key_expires_at.SetInParent()
        await materialize_batch(pool, [Entry.from_snapshot(s) for s in runs], method=method)
        assert await read_run_by_idempotency_key(pool, "env_a", "task-1", key) is None
        one = snap(idempotency_key=key)
        one.idempotency_key_expires_at.SetInParent()
        assert (await materialize_one(pool, Entry.from_snapshot(one))).outcome is Outcome.CREATED


async def test_rejected_row_becomes_system_failure(pool: AsyncConnectionPool) -> None:
    # Valid JSON to Python (and to the sidecar's validation) but jsonb refuses
    # \u0000: an honest non-retryable error from Postgres itself.
    bad = Entry.from_snapshot(snap(metadata=b'{"k":"\\u0000"}'))
    good = [Entry.from_snapshot(snap()) for _ in range(3)]
    results = await materialize_batch(pool, [good[0], bad, good[1], good[2]])
    assert [r.outcome for r in results] == [
        Outcome.CREATED,
        Outcome.SYSTEM_FAILURE,
        Outcome.CREATED,
        Outcome.CREATED,
    ]
    assert "22P05" in results[1].error
    row = await read_run(pool, "env_a", bad.run_id)
    assert row is not None and row.status == run_pb2.RUN_STATUS_SYSTEM_FAILURE
    assert row.last_error and row.snapshot.batch_id == "batch_1"
    assert row.snapshot.metadata == b'{"k":"\\u0000"}'  # the snapshot is kept whole


def test_retryable_classification() -> None:
    import psycopg

    assert is_retryable(psycopg.OperationalError("connection refused"))
    assert not is_retryable(ValueError("x"))

    class Fake(psycopg.errors.DeadlockDetected):
        pass

    assert is_retryable(psycopg.errors.DeadlockDetected())
    assert is_retryable(psycopg.errors.SerializationFailure())
    assert is_retryable(psycopg.errors.AdminShutdown())
    assert is_retryable(psycopg.errors.TooManyConnections())
    assert not is_retryable(psycopg.errors.CheckViolation())
    assert not is_retryable(psycopg.errors.UntranslatableCharacter())


async def test_materialize_one_through_the_pool(pool: AsyncConnectionPool) -> None:
    entry = Entry.from_snapshot(snap(idempotency_key="one"))
    first = await materialize_one(pool, entry)
    assert first.outcome is Outcome.CREATED
    assert (await materialize_one(pool, entry)).outcome is Outcome.EXISTS
    other = await materialize_one(pool, Entry.from_snapshot(snap(idempotency_key="one")))
    assert other.outcome is Outcome.RESOLVED and other.resolved_run_id == entry.run_id


TAGS = ["tab\there", "a,b", "NULL", "x\\y", '{"q"}', "日本"]
EXTRA = {"k\t1": "v\nw", 'quote"d': "back\\slash"}
AWKWARD = "tab\there, new\nline, back\\slash, \"quote\", 'single', {brace}, [x], é, 日本, \\N"


def awkward_snap(run_id: str, key: str, **fields: Any) -> run_pb2.RunSnapshot:
    """A snapshot whose free text holds every character COPY treats specially."""
    s = snap(
        run_id=run_id,
        payload=bytes(range(256)),
        payload_type=AWKWARD[:200],
        queue=AWKWARD[:50],
        idempotency_key=key,
        **fields,
    )
    del s.tags[:]
    s.tags.extend(TAGS)
    s.extra.clear()
    s.extra.update(EXTRA)
    return s


async def test_copy_and_insert_write_awkward_text_identically(
    pool: AsyncConnectionPool,
) -> None:
    """The COPY fast path builds its text by hand: it must store exactly what
    the one-row INSERT stores, for every character COPY treats specially."""

    def awkward(run_id: str) -> run_pb2.RunSnapshot:
        return awkward_snap(
            run_id,
            AWKWARD,
            metadata=json.dumps({"k": AWKWARD, "n": [1, 2.5, None, True]}).encode(),
            concurrency_key="",
        )

    copied = awkward("run_awk_copy")
    inserted = awkward("run_awk_insert")
    inserted.idempotency_key = AWKWARD + "-2"  # the key is unique per task
    results = await materialize_batch(pool, [Entry.from_snapshot(copied, now_ms())])
    assert results[0].outcome is Outcome.CREATED
    async with pool.connection() as conn:
        one = await materialize_one(conn, Entry.from_snapshot(inserted, now_ms()))
        assert one.outcome is Outcome.CREATED
        cur = await conn.execute(
            "SELECT * FROM mollifier.runs WHERE run_id = ANY(%s) ORDER BY run_id",
            (["run_awk_copy", "run_awk_insert"],),
        )
        names = [d.name for d in cur.description or []]
        rows = [dict(zip(names, r, strict=True)) for r in await cur.fetchall()]
    by_id = {r["run_id"]: r for r in rows}
    a, b = by_id["run_awk_copy"], by_id["run_awk_insert"]
    skip = {"run_id", "idempotency_key", "snapshot", "created_at", "materialized_at"}
    for name in names:
        if name not in skip:
            assert a[name] == b[name], name
    assert bytes(a["payload"]) == bytes(range(256))
    assert a["tags"] == TAGS
    assert a["extra"] == EXTRA
    assert a["idempotency_key"] == AWKWARD
    await assert_reads_back(pool, "run_awk_copy", copied)


async def test_copy_batch_writes_awkward_text_like_the_one_row_insert(
    pool: AsyncConnectionPool,
) -> None:
    """A batch of more than one run takes the COPY path, whose text is built by
    hand and checked for characters COPY must escape once per batch: awkward
    runs among plain ones must be stored exactly as the one-row INSERT stores
    them, and the plain ones as they are."""

    def awkward(run_id: str, key: str) -> run_pb2.RunSnapshot:
        return awkward_snap(
            run_id, key, metadata=json.dumps({"k": AWKWARD}).encode(), trace_id="t\\r"
        )

    now = now_ms()
    plain = [snap(run_id=f"run_plain_{i}") for i in range(3)]
    copied = awkward("run_awk_b1", AWKWARD + "-b1")
    cancelled = Entry.from_snapshot(awkward("run_awk_b2", ""), now)
    cancelled.canceled_ms, cancelled.cancel_reason = now, "tab\tand\nnewline \\N"
    batch = [Entry.from_snapshot(s, now) for s in (plain[0], copied, plain[1])]
    batch += [cancelled, Entry.from_snapshot(plain[2], now)]
    # None: the one COPY took the whole batch (a COPY that Postgres refused
    # would have gone row by row, and answered with results).
    assert await write_batch(pool, batch) is None
    async with pool.connection() as conn:
        for run_id, key, entry in (
            ("run_awk_i1", AWKWARD + "-i1", Entry.from_snapshot(copied, now)),
            ("run_awk_i2", "", cancelled),
        ):
            s = run_pb2.RunSnapshot()
            s.CopyFrom(entry.snapshot)
            s.run_id, s.idempotency_key = run_id, key
            one = Entry(s, entry.accepted_ms, entry.canceled_ms, entry.cancel_reason)
            assert (await materialize_one(conn, one)).outcome is Outcome.CREATED
        cur = await conn.execute(
            "SELECT * FROM mollifier.runs "
            "WHERE run_id LIKE 'run_awk_%' OR run_id LIKE 'run_plain_%'"
        )
        names = [d.name for d in cur.description or []]
        by_id = {r[0]: dict(zip(names, r, strict=True)) for r in await cur.fetchall()}
    skip = {"run_id", "idempotency_key", "snapshot", "materialized_at"}
    for a, b in (("run_awk_b1", "run_awk_i1"), ("run_awk_b2", "run_awk_i2")):
        for name in names:
            if name not in skip:
                assert by_id[a][name] == by_id[b][name], (a, name)
    assert by_id["run_awk_b1"]["idempotency_key"] == AWKWARD + "-b1"
    assert by_id["run_awk_b2"]["cancel_reason"] == "tab\tand\nnewline \\N"
    assert by_id["run_awk_b2"]["status"] == "CANCELED"
    assert by_id["run_awk_b1"]["trace_id"] == "t\\r"
    for s in plain:
        row = by_id[s.run_id]
        assert row["tags"] == list(s.tags) and row["queue"] == s.queue
        assert bytes(row["snapshot"]) == s.SerializeToString()
    await assert_reads_back(pool, "run_awk_b1", copied)


async def test_write_batch_answers_none_only_when_every_run_is_new(
    pool: AsyncConnectionPool,
) -> None:
    """The drainer's fast path: None means every entry became a new row; any
    other outcome in the batch gives the results, run by run."""
    entries = [Entry.from_snapshot(snap()) for _ in range(3)]
    assert await write_batch(pool, entries) is None
    again = [*entries[:2], Entry.from_snapshot(snap())]
    results = await write_batch(pool, again)
    assert results is not None
    assert [r.outcome for r in results] == [Outcome.EXISTS, Outcome.EXISTS, Outcome.CREATED]
    full = await materialize_batch(pool, [Entry.from_snapshot(snap()) for _ in range(2)])
    assert [(r.outcome, r.resolved_run_id == r.run_id) for r in full] == [
        (Outcome.CREATED, True)
    ] * 2


@pytest.mark.parametrize(
    ("how", "keyed"),
    [("copy", False), ("copy", True), ("unnest", False), ("one", False)],
)
async def test_a_lease_lost_before_commit_writes_nothing(
    pool: AsyncConnectionPool, how: str, keyed: bool
) -> None:
    """The commit check runs after the rows are sent and before they commit: an
    unkeyed COPY is its own transaction (no BEGIN), a keyed one shares one with
    the release of expired keys; either way a lost lease leaves no row."""
    n = 1 if how == "one" else 3
    extra = {"idempotency_key": "k-lost"} if keyed else {}
    entries = [Entry.from_snapshot(snap(**extra if i == 0 else {})) for i in range(n)]
    method = "unnest" if how == "unnest" else "copy"
    async with pool.connection() as conn:
        with pytest.raises(LeaseLost):
            await write_batch(conn, entries, check=lambda: False, method=method)
        # Nothing left open on the connection, and the same batch commits on it.
        assert conn.info.transaction_status == TransactionStatus.IDLE
        for e in entries:
            assert await read_run(pool, "env_a", e.run_id) is None
        results = await write_batch(conn, entries, check=lambda: True, method=method)
        assert results is None or [r.outcome for r in results] == [Outcome.CREATED] * n
        assert conn.info.transaction_status == TransactionStatus.IDLE
    for e in entries:
        assert await read_run(pool, "env_a", e.run_id) is not None
