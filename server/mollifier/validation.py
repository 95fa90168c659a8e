"""Request checks. Every problem found is reported, each naming its field.

Limits (also in the README):
- env_id, org_id: 1-128 of ``[A-Za-z0-9_-]`` (they form Redis hash tags, so no braces).
- run ids (run, parent, root, batch, replay): 1-128 of ``[A-Za-z0-9_.:@-]``.
- task_identifier: 1-128 of ``[A-Za-z0-9_.@/-]`` (no ':').
- idempotency_key: 1-512 characters, no control characters.
- request_id: 1-128 of ``[A-Za-z0-9_.:@-]``.
- tags: at most MOLLIFIER_MAX_TAGS, each 1-128 characters, no control characters.
- payload at most MOLLIFIER_MAX_PAYLOAD_BYTES; metadata at most
  MOLLIFIER_MAX_METADATA_BYTES and a JSON document when set.
- short strings (payload_type, queue, ...): at most 256 characters, no control characters.
- extra: at most 64 entries, keys 1-128 and values at most 4,096 characters.
- timestamps: between 1970-01-01 and 9999-12-31, nanos in range; durations >= 0.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2
from mollifier_client.v1 import run_pb2

from .config import Settings
from .errors import InvalidArgument

__all__ = ["Limits", "Violations", "check_snapshot", "loads_json"]

ENV_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
RUN_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
TASK_ID = re.compile(r"[A-Za-z0-9_.@/-]{1,128}")
HEX_ID = re.compile(r"[0-9a-fA-F]{1,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

MAX_TS_SECONDS = 253402300799  # 9999-12-31T23:59:59Z
MAX_SHORT = 256
MAX_EXTRA = 64


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_json(text: str | bytes) -> Any:
    """json.loads without NaN and Infinity, which Postgres jsonb refuses."""
    return json.loads(text, parse_constant=_no_constant)


@dataclass(frozen=True, slots=True)
class Limits:
    max_payload_bytes: int = 1_048_576
    max_metadata_bytes: int = 262_144
    max_tags: int = 64

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(s.max_payload_bytes, s.max_metadata_bytes, s.max_tags)


class Violations:
    """Collects field violations; ``raise_if_any`` turns them into INVALID_ARGUMENT."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        self.items.append((field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)

    def pattern(
        self, field: str, value: str, rx: re.Pattern[str], what: str, *, required: bool = True
    ) -> None:
        if not value:
            if required:
                self.add(field, "is required")
            return
        if not rx.fullmatch(value):
            self.add(field, f"must be {what}")

    def env_id(self, field: str, value: str) -> None:
        self.pattern(field, value, ENV_ID, "1-128 characters of [A-Za-z0-9_-]")

    def org_id(self, field: str, value: str) -> None:
        self.pattern(field, value, ENV_ID, "1-128 characters of [A-Za-z0-9_-]")

    def run_id(self, field: str, value: str, *, required: bool = True) -> None:
        self.pattern(
            field, value, RUN_ID, "1-128 characters of [A-Za-z0-9_.:@-]", required=required
        )

    def task(self, field: str, value: str) -> None:
        self.pattern(field, value, TASK_ID, "1-128 characters of [A-Za-z0-9_.@/-]")

    def request_id(self, field: str, value: str) -> None:
        self.pattern(field, value, RUN_ID, "1-128 characters of [A-Za-z0-9_.:@-]")

    def text(
        self, field: str, value: str, *, max_len: int = MAX_SHORT, required: bool = False
    ) -> None:
        if not value:
            if required:
                self.add(field, "is required")
            return
        if len(value) > max_len:
            self.add(field, f"must be at most {max_len} characters")
        elif _CONTROL.search(value):
            self.add(field, "must not contain control characters")

    def idempotency_key(self, field: str, value: str, *, required: bool = True) -> None:
        self.text(field, value, max_len=512, required=required)

    def timestamp(self, field: str, ts: timestamp_pb2.Timestamp) -> None:
        if not 0 <= ts.seconds <= MAX_TS_SECONDS:
            self.add(field, "must lie between 1970-01-01 and 9999-12-31")
        elif not 0 <= ts.nanos <= 999_999_999:
            self.add(field, "nanos must be 0 to 999999999")

    def duration(self, field: str, d: duration_pb2.Duration, *, max_ms: int | None = None) -> None:
        if d.seconds < 0 or d.nanos < 0 or d.nanos > 999_999_999:
            self.add(field, "must not be negative")
        elif d.seconds > 315_576_000_000:
            self.add(field, "is too long")
        elif max_ms is not None and d.ToMilliseconds() > max_ms:
            self.add(field, f"must be at most {max_ms} ms")

    def json_document(self, field: str, raw: bytes | str, max_bytes: int) -> None:
        size = len(raw.encode() if isinstance(raw, str) else raw)
        if size > max_bytes:
            self.add(field, f"must be at most {max_bytes} bytes")
            return
        try:
            # Strictly UTF-8: json.loads would also take UTF-16/32 bytes.
            doc = loads_json(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        except (ValueError, UnicodeDecodeError):
            self.add(field, "must be a JSON document (UTF-8, no NaN or Infinity)")
            return
        except RecursionError:
            # Deeper than the parser goes (about a thousand levels).
            self.add(field, "is nested too deeply")
            return
        if not _jsonb_safe(doc):
            # Postgres jsonb refuses these; the run could never be materialized.
            self.add(field, "must not contain \\u0000 or unpaired surrogate escapes")

    def tags(self, field: str, tags: list[str] | tuple[str, ...], max_tags: int) -> None:
        if len(tags) > max_tags:
            self.add(field, f"must hold at most {max_tags} tags")
            return
        for i, tag in enumerate(tags):
            self.text(f"{field}[{i}]", tag, max_len=128, required=True)


def _jsonb_safe(doc: object) -> bool:
    """No NUL character and no lone surrogate in any string or key (jsonb's rules)."""
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                return False
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
    return True


def check_snapshot(
    v: Violations, snap: run_pb2.RunSnapshot, limits: Limits, prefix: str = "snapshot"
) -> None:
    """Check every field of a snapshot; env/org/task must be filled in already."""
    p = prefix + "."
    v.run_id(p + "run_id", snap.run_id)
    v.env_id(p + "env_id", snap.env_id)
    v.org_id(p + "org_id", snap.org_id)
    v.task(p + "task_identifier", snap.task_identifier)
    if len(snap.payload) > limits.max_payload_bytes:
        v.add(p + "payload", f"must be at most {limits.max_payload_bytes} bytes")
    if snap.metadata:
        v.json_document(p + "metadata", snap.metadata, limits.max_metadata_bytes)
    for name in ("payload_type", "metadata_type", "queue", "concurrency_key", "machine_preset"):
        v.text(p + name, getattr(snap, name))
    v.idempotency_key(p + "idempotency_key", snap.idempotency_key, required=False)
    for name in ("parent_run_id", "root_run_id", "batch_id"):
        v.run_id(p + name, getattr(snap, name), required=False)
    for name in ("trace_id", "span_id"):
        v.pattern(p + name, getattr(snap, name), HEX_ID, "1-64 hex digits", required=False)
    for name in ("idempotency_key_expires_at", "delay_until"):
        if snap.HasField(name):
            v.timestamp(p + name, getattr(snap, name))
    if snap.HasField("ttl"):
        v.duration(p + "ttl", snap.ttl)
    if snap.HasField("idempotency_key_expires_at") and not snap.idempotency_key:
        v.add(p + "idempotency_key_expires_at", "is set but idempotency_key is empty")
    v.tags(p + "tags", list(snap.tags), limits.max_tags)
    if snap.batch_index < 0:
        v.add(p + "batch_index", "must not be negative")
    if snap.max_attempts < 0:
        v.add(p + "max_attempts", "must not be negative")
    if len(snap.extra) > MAX_EXTRA:
        v.add(p + "extra", f"must hold at most {MAX_EXTRA} entries")
    else:
        for key, value in snap.extra.items():
            if not key or len(key) > 128 or "\x00" in key:
                v.add(f"{p}extra[{key[:32]!r}]", "keys must be 1-128 characters, no NUL")
            elif len(value) > 4096:
                v.add(f"{p}extra[{key!r}]", "values must be at most 4096 characters")
            elif "\x00" in value:
                v.add(f"{p}extra[{key!r}]", "values must not contain NUL")
