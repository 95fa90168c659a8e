"""Conversions between protobuf messages, buffer entries and plain values."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Any

import msgpack
from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError
from mollifier_client.v1 import run_pb2

from .errors import DamagedEntry

__all__ = [
    "ENTRY_FIELDS",
    "ENTRY_PACKED",
    "as_text",
    "bare_snapshot",
    "decode_snapshot",
    "entry_to_run",
    "entry_view",
    "env_field",
    "full_snapshot",
    "key_expires_ms",
    "ms_from_ts",
    "new_run_id",
    "now_ms",
    "ts_from_ms",
]

# The fields entry_view() in lua/includes/entry.lua returns, in order.
ENTRY_FIELDS = ("s", "st", "ca", "at", "le", "cx", "cr", "du", "v")
# A packed entry's values, in order (lua/includes/entry.lua, E_S ... E_CR).
ENTRY_PACKED = ("s", "st", "sc", "ca", "du", "ik", "at", "v", "lt", "le", "cx", "cr")
_VIEW_POSITIONS = tuple(ENTRY_PACKED.index(name) for name in ENTRY_FIELDS)
_SC, _V = ENTRY_PACKED.index("sc"), ENTRY_PACKED.index("v")
_VIEW_V = ENTRY_FIELDS.index("v")
_NO_ENTRY: tuple[None, ...] = (None,) * len(ENTRY_FIELDS)

_RUN_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_run_id() -> str:
    """A fresh run id: "run_" and 25 random base-36 characters (129 bits)."""
    return "run_" + "".join(secrets.choice(_RUN_ID_ALPHABET) for _ in range(25))


def ts_from_ms(ms: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def ms_from_ts(ts: timestamp_pb2.Timestamp) -> int:
    """Milliseconds since the epoch; 0 for an unset timestamp."""
    if ts.seconds == 0 and ts.nanos == 0:
        return 0
    return ts.seconds * 1000 + ts.nanos // 1_000_000


def key_expires_ms(snap: run_pb2.RunSnapshot) -> int:
    """When the snapshot's idempotency key expires (ms); 0 for never. An expiry
    set at the epoch itself is long past, not "never": at least 1."""
    if not snap.HasField("idempotency_key_expires_at"):
        return 0
    return max(1, ms_from_ts(snap.idempotency_key_expires_at))


def as_text(value: object) -> str:
    """A Redis reply (bytes, str, number or nil) as text; nil is ""."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: bytes | str | int | None) -> int:
    if value is None or value == b"" or value == "":
        return 0
    return int(value)


def entry_view(packed: bytes | None) -> tuple[Any, ...]:
    """The ENTRY_FIELDS of a packed entry (HGET of mf:{env}:runs), as entry_view()
    in Lua returns them; all None for no entry. A value that cannot be unpacked
    reads as an entry with nothing set, which entry_to_run calls damaged."""
    if packed is None:
        return _NO_ENTRY
    try:
        e = msgpack.unpackb(packed, raw=True)
    except (ValueError, msgpack.UnpackException):
        e = None
    if not isinstance(e, list):
        return (None, b"", *_NO_ENTRY[2:])
    n = len(e)
    # cmsgpack packs Lua's false as False: not set.
    view = [None if i >= n or e[i] is False else e[i] for i in _VIEW_POSITIONS]
    # The version is packed as its distance from the arrival score, and a value
    # that is not a number counts as 0: the rule of entry_unpack in entry.lua,
    # so a compare-and-set sends the version the script will compare with.
    view[_VIEW_V] = _number(e, _V) + _number(e, _SC)
    return tuple(view)


def _number(values: list[Any], i: int) -> int:
    v = values[i] if i < len(values) else None
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def bare_snapshot(snap: run_pb2.RunSnapshot) -> bytes:
    """The snapshot's bytes as the buffer keeps them: without run_id and env_id,
    which the entry's key holds (full_snapshot puts them back)."""
    run_id, env_id = snap.run_id, snap.env_id
    snap.run_id = snap.env_id = ""
    try:
        return snap.SerializeToString()
    finally:
        snap.run_id, snap.env_id = run_id, env_id


def _field(number: int, text: str) -> bytes:
    """One length-delimited protobuf field (a string of any length)."""
    data = text.encode()
    n = len(data)
    if n < 0x80:
        # Ids are short: a one-byte length, without building a varint.
        return bytes((number << 3 | 2, n)) + data
    out = bytearray([number << 3 | 2])
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + data


def env_field(env_id: str) -> bytes:
    """The env id as the snapshot field full_snapshot appends (field 2): made
    once for every run of a batch."""
    return _field(2, env_id)


def full_snapshot(env_id: str, run_id: str, bare: bytes, env_bytes: bytes = b"") -> bytes:
    """A buffered snapshot's bytes with its ids put back: fields 1 (run_id) and
    2 (env_id, or ``env_bytes`` from env_field) appended, which a parser reads
    as if they came first. An id the bytes already hold (an entry written
    before ids were left out) is written again with the same value, which
    reads the same."""
    return bare + _field(1, run_id) + (env_bytes or _field(2, env_id))


def decode_snapshot(env_id: str, run_id: str, raw: bytes | None) -> run_pb2.RunSnapshot:
    """Decode and check a buffered snapshot (kept without its ids, which are put
    back here); a damaged one raises DamagedEntry."""
    if not raw:
        raise DamagedEntry(f"buffered run {run_id} has no snapshot", metadata={"run_id": run_id})
    try:
        snap = run_pb2.RunSnapshot.FromString(raw)
    except DecodeError:
        raise DamagedEntry(
            f"buffered run {run_id} has a snapshot that cannot be decoded",
            metadata={"run_id": run_id},
        ) from None
    snap.run_id = snap.run_id or run_id
    snap.env_id = snap.env_id or env_id
    if snap.run_id != run_id or snap.env_id != env_id or not snap.task_identifier:
        raise DamagedEntry(
            f"buffered run {run_id} has a snapshot for another run or env",
            metadata={"run_id": run_id},
        )
    return snap


def entry_to_run(
    env_id: str,
    run_id: str,
    fields: Sequence[bytes | str | int | None],
    *,
    now: int | None = None,
) -> run_pb2.Run:
    """A Run (source BUFFER) from the fields of ENTRY_FIELDS, in that order."""
    s, st, ca, at, le, cx, cr, du, _v = fields
    snap = decode_snapshot(env_id, run_id, s if isinstance(s, bytes) else None)
    state = as_text(st)
    try:
        canceled_at, delay_until = _int(cx), _int(du)
        created_at, attempts = _int(ca), _int(at)
    except ValueError:
        raise DamagedEntry(
            f"buffered run {run_id} has a field that is not a number",
            metadata={"run_id": run_id},
        ) from None
    if state == "D":
        status = run_pb2.RUN_STATUS_DRAINING
    elif state == "F":
        status = run_pb2.RUN_STATUS_FAILED
    elif state == "Q":
        if canceled_at:
            status = run_pb2.RUN_STATUS_CANCELED
        elif delay_until > (now if now is not None else now_ms()):
            status = run_pb2.RUN_STATUS_DELAYED
        else:
            status = run_pb2.RUN_STATUS_QUEUED
    else:
        raise DamagedEntry(
            f"buffered run {run_id} has an unknown state {state!r}", metadata={"run_id": run_id}
        )
    run = run_pb2.Run(
        run_id=run_id,
        env_id=env_id,
        status=status,
        source=run_pb2.RUN_SOURCE_BUFFER,
        snapshot=snap,
        attempts=attempts,
        last_error=as_text(le),
        cancel_reason=as_text(cr),
    )
    if created_at:
        run.created_at.CopyFrom(ts_from_ms(created_at))
    if canceled_at:
        run.canceled_at.CopyFrom(ts_from_ms(canceled_at))
    return run
