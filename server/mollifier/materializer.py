"""Writing runs into ``mollifier.runs`` and reading them back.

``materialize_batch`` writes a whole batch in ONE statement (a COPY straight
into the table; on a conflict, a COPY into a staging table and one
``INSERT ... SELECT ... ON CONFLICT DO NOTHING RETURNING``), so it is idempotent
on run id: a batch committed by a drainer that died before its ack creates
nothing twice when it is leased again. A run whose idempotency key is already
bound in Postgres to another run is not created; it resolves to that run.
``write_batch`` is the same for the drainer, answering None when every run
became a new row.

Errors are classified by SQLSTATE (``is_retryable``). A retryable error is
raised to the caller (which requeues the batch with backoff); any other error
makes the batch fall back to row-by-row so only the bad rows become
SYSTEM_FAILURE rows, written from the snapshot with the error. When even that
write fails retryably, the entry is reported ``RETRY`` and is never dropped.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from google.protobuf.message import DecodeError
from mollifier_client.v1 import run_pb2
from psycopg_pool import AsyncConnectionPool

from .codec import key_expires_ms, ms_from_ts, now_ms, ts_from_ms

__all__ = [
    "RETRYABLE_SQLSTATES",
    "Entry",
    "LeaseLost",
    "Outcome",
    "Result",
    "copy_text",
    "describe_error",
    "is_retryable",
    "materialize_batch",
    "materialize_one",
    "read_run",
    "read_run_by_idempotency_key",
    "row_values",
    "write_batch",
]

# Errors that pass with time: the run is requeued, not failed (see is_retryable).
RETRYABLE_SQLSTATES = frozenset(
    {
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now
        "57014",  # query_canceled (statement_timeout under load)
        "55P03",  # lock_not_available
        "25006",  # read_only_sql_transaction (a standby during failover)
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
    }
)

STATUS_PENDING = "PENDING"
STATUS_DELAYED = "DELAYED"
STATUS_CANCELED = "CANCELED"
STATUS_SYSTEM_FAILURE = "SYSTEM_FAILURE"

_STATUS_TO_PROTO = {
    STATUS_PENDING: run_pb2.RUN_STATUS_PENDING,
    STATUS_DELAYED: run_pb2.RUN_STATUS_DELAYED,
    STATUS_CANCELED: run_pb2.RUN_STATUS_CANCELED,
    STATUS_SYSTEM_FAILURE: run_pb2.RUN_STATUS_SYSTEM_FAILURE,
}

MAX_ERROR_CHARS = 2000


def is_retryable(exc: BaseException) -> bool:
    """Connection loss, shutdown, too many connections, serialization, deadlock."""
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        if state is None:
            # No SQLSTATE: the connection itself failed (refused, reset, closed).
            return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
        # Class 08 (connection) and class 53 (insufficient resources: disk
        # full, out of memory, too many connections) pass; the run does not fail.
        return state.startswith(("08", "53")) or state in RETRYABLE_SQLSTATES
    # The pool could not hand out a connection in time: Postgres is away.
    from psycopg_pool import PoolTimeout

    return isinstance(exc, (PoolTimeout, OSError, TimeoutError))


class LeaseLost(Exception):
    """The lease would run out before commit; the batch was rolled back."""


class Outcome(enum.Enum):
    CREATED = "created"  # a new row
    EXISTS = "exists"  # this run id was already a row (an earlier, unacked commit)
    RESOLVED = "resolved"  # its idempotency key is bound to another run's row
    SYSTEM_FAILURE = "system_failure"  # written as a SYSTEM_FAILURE row
    RETRY = "retry"  # nothing written; requeue (retryable error)
    # Nothing written: another env's row already has this run id. Run ids are
    # the table's key, so the run can never be created; it is dead-lettered.
    CONFLICT = "conflict"


@dataclass(slots=True)
class Entry:
    """One run to materialize: its snapshot and the buffer fields that matter."""

    snapshot: run_pb2.RunSnapshot
    accepted_ms: int = 0
    canceled_ms: int = 0
    cancel_reason: str = ""
    raw: bytes = b""

    @property
    def run_id(self) -> str:
        return self.snapshot.run_id

    @classmethod
    def from_snapshot(cls, snap: run_pb2.RunSnapshot, accepted_ms: int = 0) -> Entry:
        return cls(snap, accepted_ms or now_ms(), raw=snap.SerializeToString())


@dataclass(slots=True)
class Result:
    run_id: str
    outcome: Outcome
    error: str = ""
    # The run the entry resolves to (itself, or the holder of its key).
    resolved_run_id: str = ""
    retryable: bool = field(default=False)
    # EXISTS, but the row does not hold the entry's idempotency key (a retry
    # of a written run under another key): the key must not stay bound to it.
    key_not_held: bool = False


# -- rows ----------------------------------------------------------------------

_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run_id", "text"),
    ("env_id", "text"),
    ("org_id", "text"),
    ("task_identifier", "text"),
    ("status", "text"),
    ("payload", "bytea"),
    ("payload_type", "text"),
    ("idempotency_key", "text"),
    ("idempotency_key_expires_at", "timestamptz"),
    ("tags", "text"),  # an array literal, cast to text[] in SQL (unnest cannot nest arrays)
    ("metadata", "text"),  # cast to jsonb in SQL, so a bad document fails in Postgres
    ("metadata_type", "text"),
    ("delay_until", "timestamptz"),
    ("ttl_ms", "int8"),
    ("queue", "text"),
    ("concurrency_key", "text"),
    ("machine_preset", "text"),
    ("parent_run_id", "text"),
    ("root_run_id", "text"),
    ("batch_id", "text"),
    ("batch_index", "int4"),
    ("trace_id", "text"),
    ("span_id", "text"),
    ("max_attempts", "int4"),
    ("priority", "int4"),
    ("extra", "text"),
    ("error", "text"),
    ("canceled_at", "timestamptz"),
    ("cancel_reason", "text"),
    ("created_at", "timestamptz"),
    ("snapshot", "bytea"),
)
COLUMN_NAMES = tuple(name for name, _ in _COLUMNS)


def _select_expr(name: str, src: str) -> str:
    if name == "tags":
        return f"{src}::text[]"
    if name in ("metadata", "extra"):
        return f"{src}::jsonb"
    return src


def _ts(ms: int) -> dt.datetime | None:
    if not ms:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


def _array_literal(items: Sequence[str]) -> str:
    # Every element quoted, so commas, braces and spaces inside tags are kept.
    if not items:
        return "{}"
    quoted = [t.replace("\\", "\\\\").replace('"', '\\"') for t in items]
    return '{"' + '","'.join(quoted) + '"}'


def _opt(s: str) -> str | None:
    return s or None


def row_values(entry: Entry, *, now: int | None = None, error: str = "") -> tuple[Any, ...]:
    """The row of one run, in COLUMN_NAMES order. With ``error``: a SYSTEM_FAILURE
    row whose JSON columns are left empty (they may be what Postgres refused)."""
    s = entry.snapshot
    t = now if now is not None else now_ms()
    delay_ms = ms_from_ts(s.delay_until) if s.HasField("delay_until") else 0
    if error:
        status = STATUS_SYSTEM_FAILURE
    elif entry.canceled_ms:
        status = STATUS_CANCELED
    elif delay_ms > t:
        status = STATUS_DELAYED
    else:
        status = STATUS_PENDING
    has_key = bool(s.idempotency_key)
    expires_ms = key_expires_ms(s) if has_key else 0
    metadata = None if error or not s.metadata else s.metadata.decode("utf-8", "replace")
    extra = "{}" if error or not s.extra else json.dumps(dict(s.extra))
    return (
        s.run_id,
        s.env_id,
        s.org_id,
        s.task_identifier,
        status,
        s.payload,
        s.payload_type,
        s.idempotency_key if has_key else None,
        _ts(expires_ms),
        "{}" if error else _array_literal(s.tags),
        metadata,
        s.metadata_type,
        _ts(delay_ms),
        s.ttl.ToMilliseconds() if s.HasField("ttl") else None,
        s.queue,
        s.concurrency_key,
        s.machine_preset,
        _opt(s.parent_run_id),
        _opt(s.root_run_id),
        _opt(s.batch_id),
        s.batch_index if s.batch_id else None,
        s.trace_id,
        s.span_id,
        s.max_attempts,
        s.priority,
        extra,
        error[:MAX_ERROR_CHARS] if error else None,
        _ts(entry.canceled_ms),
        entry.cancel_reason or None,
        _ts(entry.accepted_ms or t),
        entry.raw or s.SerializeToString(),
    )


# -- COPY text ------------------------------------------------------------------
#
# The COPY fast path writes a batch as one block of COPY text built straight
# from the snapshots, instead of a tuple per row adapted value by value by
# psycopg: about 3x less Python work per run (see docs/benchmarks.md). Same
# values as row_values(), but the two bytea columns come last.
#
# Reading a field of a decoded snapshot costs about as much as formatting it,
# so each field is read once, and what is shared by the runs of a batch (tags,
# extra, the second of a timestamp) is rendered once per batch. Free text is
# checked for the characters COPY must escape once per batch, with plain
# substring tests (much faster than a regex); a batch that has any is built
# again with every text field escaped.

_COPY_COLUMNS = (
    *(n for n in COLUMN_NAMES if n not in ("payload", "snapshot")),
    "payload",
    "snapshot",
)
# Backslash, newline, carriage return and tab must be escaped in COPY text.
_COPY_SPECIAL = ("\\", "\n", "\r", "\t")
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})
_NULL = "\\N"
_ts_cache: dict[int, str] = {}
# ".000+00" ... ".999+00": the millisecond and zone of a timestamp, by index.
_TS_FRACTIONS = tuple(f".{i:03d}+00" for i in range(1000))


def _ts_head(sec: int) -> str:
    """The whole-second part of a timestamp, cached (a batch spans few seconds)."""
    head = _ts_cache.get(sec)
    if head is None:
        if len(_ts_cache) > 4096:
            _ts_cache.clear()
        head = _ts_cache[sec] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(sec))
    return head


def _ts_text(ms: int) -> str:
    """A timestamptz in COPY text, UTC, to the millisecond; NULL for 0."""
    if not ms:
        return _NULL
    sec, frac = divmod(ms, 1000)
    return _ts_head(sec) + _TS_FRACTIONS[frac]


def _has_copy_special(texts: list[str]) -> bool:
    joined = "".join(texts)
    return any(c in joined for c in _COPY_SPECIAL)


def copy_text(entries: Sequence[Entry], now: int) -> str:
    """The batch as COPY text, columns in ``_COPY_COLUMNS`` order."""
    return _copy_text(entries, now)[0]


def _copy_text(entries: Sequence[Entry], now: int) -> tuple[str, bool]:
    """The batch as COPY text, and whether any entry has an idempotency key."""
    built = _copy_rows(entries, now, escape=False)
    if built is None:
        built = _copy_rows(entries, now, escape=True)
        assert built is not None
    return built


def _copy_rows(entries: Sequence[Entry], now: int, *, escape: bool) -> tuple[str, bool] | None:
    """The rows; None when ``escape`` is off and some free text needs escaping."""
    lines: list[str] = []
    append = lines.append
    free: list[str] = []
    collect = free.extend
    escapes = _COPY_ESCAPES
    null = _NULL
    fractions = _TS_FRACTIONS
    heads = _ts_cache
    keyed = False
    # Runs of a batch mostly share their tags and extra: render each set once.
    tag_texts: dict[tuple[str, ...], str] = {(): "{}"}
    extra_texts: dict[tuple[tuple[str, str], ...], str] = {}
    for entry in entries:
        s = entry.snapshot
        delay_ms = ms_from_ts(s.delay_until) if s.HasField("delay_until") else 0
        if entry.canceled_ms:
            status = STATUS_CANCELED
        elif delay_ms > now:
            status = STATUS_DELAYED
        else:
            status = STATUS_PENDING
        key = s.idempotency_key
        batch_id = s.batch_id
        # A slice is a list, read in one call; tuple() of the container itself
        # goes element by element.
        tags = tuple(s.tags[:])
        tags_t = tag_texts.get(tags)
        if tags_t is None:
            tags_t = tag_texts[tags] = _array_literal(tags)
        extra_map = s.extra
        if extra_map:
            extra = tuple([(k, extra_map[k]) for k in extra_map])
            extra_t = extra_texts.get(extra)
            if extra_t is None:
                extra_t = extra_texts[extra] = json.dumps(dict(extra))
        else:
            extra_t = "{}"
        metadata = s.metadata
        texts: tuple[str, ...] = (
            s.run_id,
            s.env_id,
            s.org_id,
            s.task_identifier,
            s.payload_type,
            key,
            tags_t,
            metadata.decode("utf-8", "replace") if metadata else "",
            s.metadata_type,
            s.queue,
            s.concurrency_key,
            s.machine_preset,
            s.parent_run_id,
            s.root_run_id,
            batch_id,
            s.trace_id,
            s.span_id,
            extra_t,
            entry.cancel_reason,
        )
        if escape:
            texts = tuple([t.translate(escapes) for t in texts])
        else:
            collect(texts)
        (run_id, env_id, org_id, task, payload_type, key_t, tags_t, metadata_t, metadata_type,
         queue, concurrency_key, machine_preset, parent, root, batch_t, trace_id, span_id,
         extra_t, cancel_reason) = texts  # fmt: skip
        if key:
            keyed = True
            expires_ms = key_expires_ms(s)
        else:
            expires_ms = 0
        canceled_ms = entry.canceled_ms
        accepted = entry.accepted_ms or now
        sec = accepted // 1000
        head = heads.get(sec) or _ts_head(sec)
        append(
            f"{run_id}\t{env_id}\t{org_id}\t{task}\t{status}\t{payload_type}\t"
            f"{key_t if key else null}\t{_ts_text(expires_ms) if expires_ms else null}\t"
            f"{tags_t}\t{metadata_t if metadata else null}\t{metadata_type}\t"
            f"{_ts_text(delay_ms) if delay_ms else null}\t"
            f"{s.ttl.ToMilliseconds() if s.HasField('ttl') else null}\t"
            f"{queue}\t{concurrency_key}\t{machine_preset}\t"
            f"{parent or null}\t{root or null}\t{batch_t or null}\t"
            f"{s.batch_index if batch_id else null}\t{trace_id}\t{span_id}\t"
            f"{s.max_attempts}\t{s.priority}\t{extra_t}\t{null}\t"  # error: none
            f"{_ts_text(canceled_ms) if canceled_ms else null}\t{cancel_reason or null}\t"
            f"{head}{fractions[accepted - sec * 1000]}\t"
            f"\\\\x{s.payload.hex()}\t\\\\x{(entry.raw or s.SerializeToString()).hex()}"
        )
    if not escape and _has_copy_special(free):
        return None
    append("")
    return "\n".join(lines), keyed


def _insert_sql(source: str, param: str) -> str:
    """INSERT ... SELECT from ``source`` (an unnest or a VALUES row, ``{}`` for
    the parameters, one ``param`` per column), skipping any conflict and
    returning the ids inserted."""
    params = ", ".join(param.format(t) for _, t in _COLUMNS)
    return (
        "INSERT INTO mollifier.runs ({cols}) SELECT {exprs} FROM {source} AS u({cols}) "
        "ON CONFLICT DO NOTHING RETURNING run_id"
    ).format(
        cols=", ".join(COLUMN_NAMES),
        exprs=", ".join(_select_expr(n, f"u.{n}") for n in COLUMN_NAMES),
        source=source.format(params),
    )


_UNNEST_SQL = _insert_sql("unnest({})", "%s::{}[]")
_ONE_SQL = _insert_sql("(VALUES ({}))", "%s::{}")

# An expired key frees itself: clear it on the old row so a new run may bind it.
_RELEASE_EXPIRED_SQL = (
    "UPDATE mollifier.runs r SET idempotency_key = NULL "
    "FROM unnest(%s::text[], %s::text[], %s::text[]) AS k(env_id, task, key) "
    "WHERE r.env_id = k.env_id AND r.task_identifier = k.task AND r.idempotency_key = k.key "
    "AND r.idempotency_key_expires_at IS NOT NULL AND r.idempotency_key_expires_at <= now()"
)

# Who holds the keys of the entries that were not inserted.
_HOLDERS_SQL = (
    "SELECT r.run_id, r.env_id, r.task_identifier, r.idempotency_key FROM mollifier.runs r "
    "JOIN unnest(%s::text[], %s::text[], %s::text[]) AS k(env_id, task, key) "
    "ON r.env_id = k.env_id AND r.task_identifier = k.task AND r.idempotency_key = k.key"
)

# Per session (pool connections live long); emptied by every commit or rollback.
_STAGE_SQL = (
    "CREATE TEMP TABLE IF NOT EXISTS mollifier_stage "
    "(LIKE mollifier.runs INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
_COPY_DIRECT_SQL = "COPY mollifier.runs ({cols}) FROM STDIN".format(cols=", ".join(_COPY_COLUMNS))
_COPY_STAGE_SQL = "COPY mollifier_stage ({cols}) FROM STDIN".format(cols=", ".join(_COPY_COLUMNS))
_FROM_STAGE_SQL = (
    "INSERT INTO mollifier.runs ({cols}) SELECT {cols} FROM mollifier_stage "
    "ON CONFLICT DO NOTHING RETURNING run_id"
).format(cols=", ".join(COLUMN_NAMES))

_CANCEL_EXISTING_SQL = (
    "UPDATE mollifier.runs SET status = 'CANCELED', canceled_at = %s, cancel_reason = %s "
    "WHERE run_id = %s AND env_id = %s AND status IN ('PENDING', 'DELAYED')"
)

_EXISTING_SQL = (
    "SELECT run_id, env_id, task_identifier, idempotency_key FROM mollifier.runs "
    "WHERE run_id = ANY(%s::text[])"
)


Conn = psycopg.AsyncConnection[Any]
CommitCheck = Callable[[], bool]


async def rows_of(pool: AsyncConnectionPool, env_id: str, run_ids: Sequence[str]) -> set[str]:
    """Which of the env's ``run_ids`` are rows already."""
    async with pool.connection() as conn:
        cur = await conn.execute(_EXISTING_SQL, (list(run_ids),))
        return {row[0] for row in await cur.fetchall() if row[1] == env_id}


async def _release_expired(conn: Conn, entries: Sequence[Entry]) -> None:
    keyed = [e.snapshot for e in entries if e.snapshot.idempotency_key]
    if keyed:
        await conn.execute(
            _RELEASE_EXPIRED_SQL,
            (
                [s.env_id for s in keyed],
                [s.task_identifier for s in keyed],
                [s.idempotency_key for s in keyed],
            ),
        )


async def _resolve_missing(
    conn: Conn, entries: Sequence[Entry], inserted: set[str]
) -> list[Result]:
    """Results for a written batch: CREATED, or why a row was not inserted."""
    missing = [e for e in entries if e.run_id not in inserted]
    existing: set[str] = set()
    foreign: set[str] = set()
    owners: dict[str, str] = {}
    row_keys: dict[str, tuple[str, str]] = {}
    holders: dict[tuple[str, str, str], str] = {}
    if missing:
        cur = await conn.execute(_EXISTING_SQL, ([e.run_id for e in missing],))
        for run_id, env_id, task, key in await cur.fetchall():
            owners[run_id] = env_id
            row_keys[run_id] = (task, key or "")
        # Only a row of the entry's own env is "this run, already written".
        existing = {e.run_id for e in missing if owners.get(e.run_id) == e.snapshot.env_id}
        foreign = {e.run_id for e in missing if e.run_id in owners} - existing
        # A row committed before a lost ack, whose entry was then cancelled
        # while queued again: the cancel must still win (never a live row
        # for a run the caller was told is cancelled).
        for e in missing:
            if e.run_id in existing and e.canceled_ms:
                await conn.execute(
                    _CANCEL_EXISTING_SQL,
                    (_ts(e.canceled_ms), e.cancel_reason or None, e.run_id, e.snapshot.env_id),
                )
        keyed = [e.snapshot for e in missing if e.run_id not in owners]
        if keyed:
            cur = await conn.execute(
                _HOLDERS_SQL,
                (
                    [s.env_id for s in keyed],
                    [s.task_identifier for s in keyed],
                    [s.idempotency_key for s in keyed],
                ),
            )
            for run_id, env_id, task, key in await cur.fetchall():
                holders[(env_id, task, key)] = run_id
    results: list[Result] = []
    for e in entries:
        s = e.snapshot
        if e.run_id in inserted:
            results.append(Result(e.run_id, Outcome.CREATED, resolved_run_id=e.run_id))
        elif e.run_id in existing:
            not_held = bool(s.idempotency_key) and row_keys[e.run_id] != (
                s.task_identifier,
                s.idempotency_key,
            )
            results.append(
                Result(e.run_id, Outcome.EXISTS, resolved_run_id=e.run_id, key_not_held=not_held)
            )
        elif e.run_id in foreign:
            results.append(Result(e.run_id, Outcome.CONFLICT, "run id already used by another env"))
        else:
            holder = holders.get((s.env_id, s.task_identifier, s.idempotency_key))
            if holder is None:
                # Neither the id nor the key is taken now: the row that blocked it
                # was written and removed in between. Try again later.
                results.append(Result(e.run_id, Outcome.RETRY, "conflict vanished", retryable=True))
            else:
                results.append(Result(e.run_id, Outcome.RESOLVED, resolved_run_id=holder))
    return results


async def _write(
    conn: Conn,
    entries: Sequence[Entry],
    rows: Sequence[tuple[Any, ...]],
    check: CommitCheck | None,
    method: str = "copy",
    text: str = "",
    keyed: bool = True,
) -> list[Result] | None:
    """Insert the rows in one transaction; results in the entries' order, or
    None when every entry became a new row (so no result is built per run).

    With ``method="copy"`` the batch is first COPYed straight into the table,
    the whole transaction being that one statement. Conflicts are rare (a batch
    committed before a lost ack, a key bound to another run); on one, Postgres
    rolls the COPY back and the batch goes again through a session-local
    staging table and one INSERT ... SELECT ... ON CONFLICT DO NOTHING, which
    says which rows were new. Either way one statement writes the batch,
    several times faster than binding 31 arrays (see docs/benchmarks.md).
    The COPY is fed ``text`` (copy_text of the entries), built once; ``keyed``
    says whether any entry has an idempotency key (expired bindings of those
    keys are released first).
    """
    if method == "copy" and len(entries) > 1:
        if not text:
            text, keyed = _copy_text(entries, now_ms())
        try:
            if keyed:
                async with conn.transaction():
                    await _release_expired(conn, entries)
                    await _copy_direct(conn, text, check)
            else:
                # Pool connections are autocommit: the COPY alone is the
                # transaction, committed as it ends, so no BEGIN and COMMIT
                # round trips (two of a batch's three).
                await _copy_direct(conn, text, check)
            return None
        except psycopg.errors.UniqueViolation:
            pass
    async with conn.transaction():
        await _release_expired(conn, entries)
        if method == "copy" and len(entries) > 1:
            await conn.execute(_STAGE_SQL)
            async with conn.cursor() as cur:
                async with cur.copy(_COPY_STAGE_SQL) as copy:
                    await copy.write(text)
                await cur.execute(_FROM_STAGE_SQL)
                inserted = {r[0] for r in await cur.fetchall()}
        elif len(rows) == 1:
            cur = await conn.execute(_ONE_SQL, rows[0])
            inserted = {r[0] for r in await cur.fetchall()}
        else:
            cur = await conn.execute(_UNNEST_SQL, _columns(rows))
            inserted = {r[0] for r in await cur.fetchall()}
        results = await _resolve_missing(conn, entries, inserted)
        if check is not None and not check():
            raise LeaseLost("lease too close to its deadline to commit")
    return results


async def _copy_direct(conn: Conn, text: str, check: CommitCheck | None) -> None:
    """COPY ``text`` into the table. The lease is checked after the data and
    before the end of the COPY: outside a transaction the end is the commit, and
    an error raised before it makes psycopg fail the COPY, so nothing is written."""
    async with conn.cursor() as cur, cur.copy(_COPY_DIRECT_SQL) as copy:
        await copy.write(text)
        if check is not None and not check():
            raise LeaseLost("lease too close to its deadline to commit")


def _columns(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    return [list(col) for col in zip(*rows, strict=True)]


async def _write_failure(conn: Conn, entry: Entry, error: str, check: CommitCheck | None) -> Result:
    """A SYSTEM_FAILURE row from the snapshot; RETRY when Postgres is away."""
    try:
        r = _first(await _write(conn, [entry], [row_values(entry, error=error)], check), entry)
    except LeaseLost:
        raise
    except Exception as exc:
        # Never drop a run: whatever stops the failure row, it goes back to the
        # queue and is dead-lettered (kept, readable) once its attempts run out.
        return Result(entry.run_id, Outcome.RETRY, describe_error(exc), retryable=is_retryable(exc))
    if r.outcome is Outcome.CREATED:
        return Result(entry.run_id, Outcome.SYSTEM_FAILURE, error, resolved_run_id=entry.run_id)
    return r


def describe_error(exc: BaseException) -> str:
    """One line for an error: its SQLSTATE (or type) and the first line of its text."""
    state = getattr(exc, "sqlstate", None)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{state}: {text}" if state else f"{type(exc).__name__}: {text}"


async def materialize_one(
    target: AsyncConnectionPool | Conn, entry: Entry, *, check: CommitCheck | None = None
) -> Result:
    """One run: created, already there, resolved to its key's holder, or a
    SYSTEM_FAILURE row. Raises on a retryable error (nothing was written).

    Also the write path for pass-through runs the sidecar writes itself:
    ``materialize_one(pool, Entry.from_snapshot(snap))``.
    """
    if isinstance(target, AsyncConnectionPool):
        async with target.connection() as conn:
            return await materialize_one(conn, entry, check=check)
    try:
        return _first(await _write(target, [entry], [row_values(entry)], check), entry)
    except LeaseLost:
        raise
    except Exception as exc:
        if is_retryable(exc):
            raise
        return await _write_failure(target, entry, describe_error(exc), check)


def _created(entries: Sequence[Entry]) -> list[Result]:
    return [Result(e.run_id, Outcome.CREATED, resolved_run_id=e.run_id) for e in entries]


def _first(results: list[Result] | None, entry: Entry) -> Result:
    return results[0] if results is not None else _created([entry])[0]


async def materialize_batch(
    target: AsyncConnectionPool | Conn,
    entries: Sequence[Entry],
    *,
    check: CommitCheck | None = None,
    method: str = "copy",
) -> list[Result]:
    """Write a batch in one statement; results in the entries' order.

    ``method`` "copy" (COPY straight into the table; on a conflict, through a
    staging table and one INSERT ... SELECT) or "unnest" (one INSERT ... SELECT
    FROM unnest of per-column arrays).

    Raises a retryable psycopg error (nothing committed) or ``LeaseLost`` (rolled
    back because ``check()`` said the lease would not last until commit).
    """
    results = await write_batch(target, entries, check=check, method=method)
    return _created(entries) if results is None else results


async def write_batch(
    target: AsyncConnectionPool | Conn,
    entries: Sequence[Entry],
    *,
    check: CommitCheck | None = None,
    method: str = "copy",
) -> list[Result] | None:
    """``materialize_batch``, answering None when every entry became a new row:
    the drainer's common case, where building a Result per run is wasted work."""
    if not entries:
        return []
    entries = _free_expired_twins(entries)
    text, keyed = "", True
    if method == "copy" and len(entries) > 1:
        # Built before a connection is taken: the connection waits for no CPU.
        text, keyed = _copy_text(entries, now_ms())
    if isinstance(target, AsyncConnectionPool):
        async with target.connection() as conn:
            return await _write_batch(conn, entries, check, method, text, keyed)
    return await _write_batch(target, entries, check, method, text, keyed)


def _free_expired_twins(entries: Sequence[Entry]) -> Sequence[Entry]:
    """The batch with a key left off every run that held it before a newer run
    of the batch took it.

    A key whose expiry passed is free again, so one batch can hold two runs
    with the same key: the older one (expired) and the newer one (accepted
    after that). Written as they are, the second would meet the first's key
    and be resolved to it: a run its caller was told exists would never be
    written. The older row is written without the key, as it would be once
    released (``_RELEASE_EXPIRED_SQL``) had it been written first.
    """
    newest: dict[tuple[str, str, str], int] = {}
    twins = False
    for i, e in enumerate(entries):
        s = e.snapshot
        if s.idempotency_key:
            key = (s.env_id, s.task_identifier, s.idempotency_key)
            twins = twins or key in newest
            newest[key] = i  # the batch is in arrival order
    if not twins:
        return entries
    out = list(entries)
    for i, e in enumerate(entries):
        s = e.snapshot
        expires = key_expires_ms(s) if s.idempotency_key else 0
        if not expires:
            continue
        later = newest[(s.env_id, s.task_identifier, s.idempotency_key)]
        if later != i and expires <= entries[later].accepted_ms:
            freed = run_pb2.RunSnapshot()
            freed.CopyFrom(s)
            freed.ClearField("idempotency_key")
            freed.ClearField("idempotency_key_expires_at")
            out[i] = Entry(freed, e.accepted_ms, e.canceled_ms, e.cancel_reason, e.raw)
    return out


async def _write_batch(
    conn: Conn,
    entries: Sequence[Entry],
    check: CommitCheck | None,
    method: str,
    text: str,
    keyed: bool,
) -> list[Result] | None:
    copying = method == "copy" and len(entries) > 1
    if copying:
        rows: list[tuple[Any, ...]] = []
    else:
        now = now_ms()
        rows = [row_values(e, now=now) for e in entries]
        text = ""
    try:
        return await _write(conn, entries, rows, check, method, text, keyed)
    except LeaseLost:
        raise
    except Exception as exc:
        if is_retryable(exc):
            raise
        if len(entries) == 1:
            return [await _write_failure(conn, entries[0], describe_error(exc), check)]
    # A non-retryable error in a batch: isolate the rows Postgres refuses.
    results: list[Result] = []
    for i, e in enumerate(entries):
        try:
            results.append(await materialize_one(conn, e, check=check))
        except LeaseLost:
            raise
        except Exception as exc:
            if not is_retryable(exc):
                raise
            text = describe_error(exc)
            results.extend(
                Result(x.run_id, Outcome.RETRY, text, retryable=True) for x in entries[i:]
            )
            break
    return results


# -- reading -------------------------------------------------------------------

_READ_COLS = (
    "run_id, env_id, status, snapshot, created_at, materialized_at, error, canceled_at, "
    "cancel_reason, tags, metadata::text, metadata_type, delay_until, idempotency_key, "
    "idempotency_key_expires_at"
)


def _ms(value: dt.datetime | None) -> int:
    return int(value.timestamp() * 1000) if value is not None else 0


def _row_to_run(row: Sequence[Any]) -> run_pb2.Run:
    (
        run_id,
        env_id,
        status,
        snapshot,
        created_at,
        materialized_at,
        error,
        canceled_at,
        cancel_reason,
        tags,
        metadata,
        metadata_type,
        delay_until,
        idem_key,
        idem_expires,
    ) = row
    snap = run_pb2.RunSnapshot()
    try:
        snap.ParseFromString(bytes(snapshot or b""))
    except DecodeError:
        snap = run_pb2.RunSnapshot(run_id=run_id, env_id=env_id)
    # Columns win over the stored snapshot: a mutation applied in Postgres
    # changes the columns, and the reader must see it.
    if status != STATUS_SYSTEM_FAILURE:
        del snap.tags[:]
        snap.tags.extend(tags or [])
        if metadata is not None:
            snap.metadata = metadata.encode()
            snap.metadata_type = metadata_type or snap.metadata_type
        else:
            snap.ClearField("metadata")
        if delay_until is not None:
            snap.delay_until.CopyFrom(ts_from_ms(_ms(delay_until)))
        else:
            snap.ClearField("delay_until")
        snap.idempotency_key = idem_key or ""
        if idem_key and idem_expires is not None:
            snap.idempotency_key_expires_at.CopyFrom(ts_from_ms(_ms(idem_expires)))
        else:
            snap.ClearField("idempotency_key_expires_at")
    run = run_pb2.Run(
        run_id=run_id,
        env_id=env_id,
        status=_STATUS_TO_PROTO.get(status, run_pb2.RUN_STATUS_UNSPECIFIED),
        source=run_pb2.RUN_SOURCE_POSTGRES,
        snapshot=snap,
        last_error=error or "",
        cancel_reason=cancel_reason or "",
    )
    run.created_at.CopyFrom(ts_from_ms(_ms(created_at)))
    run.materialized_at.CopyFrom(ts_from_ms(_ms(materialized_at)))
    if canceled_at is not None:
        run.canceled_at.CopyFrom(ts_from_ms(_ms(canceled_at)))
    return run


async def read_run(pool: AsyncConnectionPool, env_id: str, run_id: str) -> run_pb2.Run | None:
    """The materialized run, scoped by env (another env's run is None)."""
    if not env_id or not run_id:
        return None
    async with pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT {_READ_COLS} FROM mollifier.runs WHERE run_id = %s AND env_id = %s",
            (run_id, env_id),
        )
        row = await cur.fetchone()
    return _row_to_run(row) if row is not None else None


async def read_run_by_idempotency_key(
    pool: AsyncConnectionPool, env_id: str, task: str, key: str
) -> run_pb2.Run | None:
    """The run a live key is bound to in Postgres; an expired binding finds nothing."""
    if not env_id or not task or not key:
        return None
    async with pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT {_READ_COLS} FROM mollifier.runs WHERE env_id = %s AND task_identifier = %s "
            "AND idempotency_key = %s "
            "AND (idempotency_key_expires_at IS NULL OR idempotency_key_expires_at > now())",
            (env_id, task, key),
        )
        row = await cur.fetchone()
    return _row_to_run(row) if row is not None else None
