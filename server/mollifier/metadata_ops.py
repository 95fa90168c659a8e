"""Metadata operations at a dotted JSON path: set, delete, append, remove, increment.

Operations are parsed and checked up front (``parse_operations``), each problem
naming its field (``operations[2].path``), so a bad request writes nothing.
They are then applied in order to a copy of the document (``apply_operations``);
the caller writes the result only when every operation succeeded, which makes a
list of operations atomic.

A path is ``a.b.c`` (an optional leading ``$.`` is dropped). A segment of digits
indexes into an array when the value there is an array, else it is an object
key. Intermediate objects are made as needed by SET, APPEND and INCREMENT.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mollifier_client.v1 import mutate_pb2

from .errors import InvalidArgument
from .validation import Violations, loads_json

__all__ = ["MetadataOp", "apply_operations", "parse_document", "parse_operations"]

SET = mutate_pb2.METADATA_OPERATION_TYPE_SET
DELETE = mutate_pb2.METADATA_OPERATION_TYPE_DELETE
APPEND = mutate_pb2.METADATA_OPERATION_TYPE_APPEND
REMOVE = mutate_pb2.METADATA_OPERATION_TYPE_REMOVE
INCREMENT = mutate_pb2.METADATA_OPERATION_TYPE_INCREMENT

MAX_PATH_CHARS = 1024
MAX_SEGMENTS = 32
MAX_OPERATIONS = 1000


@dataclass(frozen=True, slots=True)
class MetadataOp:
    """One checked operation; ``field`` names it for errors met while applying."""

    kind: int
    path: tuple[str, ...]
    value: Any
    field: str


def _parse_path(v: Violations, field: str, path: str) -> tuple[str, ...]:
    if not path:
        v.add(field, "is required")
        return ()
    if len(path) > MAX_PATH_CHARS:
        v.add(field, f"must be at most {MAX_PATH_CHARS} characters")
        return ()
    text = path[2:] if path.startswith("$.") else path
    segments = tuple(text.split("."))
    if any(not s for s in segments):
        v.add(field, "must be dotted keys such as a.b.c (no empty segment)")
        return ()
    if any(c in path for c in "[]\"'"):
        # A JSONPath index or quoted key would otherwise become a key of its own.
        v.add(field, "must be dotted keys such as a.b.c (array items as a.0, no [ ] or quotes)")
        return ()
    if len(segments) > MAX_SEGMENTS:
        v.add(field, f"must have at most {MAX_SEGMENTS} segments")
        return ()
    return segments


def _is_number(value: Any) -> bool:
    # bool is an int in Python but not a number in JSON.
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_operations(
    v: Violations, field: str, ops: Sequence[mutate_pb2.MetadataOperation]
) -> list[MetadataOp]:
    """Checked operations; every problem is added to ``v`` naming ``field[i].x``."""
    if len(ops) > MAX_OPERATIONS:
        v.add(field, f"must hold at most {MAX_OPERATIONS} operations")
        return []
    out: list[MetadataOp] = []
    for i, op in enumerate(ops):
        name = f"{field}[{i}]"
        if op.type not in (SET, DELETE, APPEND, REMOVE, INCREMENT):
            v.add(f"{name}.type", "must be SET, DELETE, APPEND, REMOVE or INCREMENT")
            continue
        path = _parse_path(v, f"{name}.path", op.path)
        value: Any = None
        if op.type != DELETE:
            if not op.value_json:
                v.add(f"{name}.value_json", "is required")
                continue
            try:
                value = loads_json(op.value_json)
            except ValueError:
                v.add(f"{name}.value_json", "must be JSON text")
                continue
            if op.type == INCREMENT and not _is_number(value):
                v.add(f"{name}.value_json", "must be a number for INCREMENT")
                continue
        if path:
            out.append(MetadataOp(op.type, path, value, name))
    return out


def parse_document(v: Violations, field: str, text: str | bytes) -> dict[str, Any] | None:
    """A metadata document: a JSON object (empty text is an empty object)."""
    if not text:
        return {}
    try:
        doc = loads_json(text)
    except (ValueError, UnicodeDecodeError):
        v.add(field, "must be a JSON object")
        return None
    if not isinstance(doc, dict):
        v.add(field, "must be a JSON object")
        return None
    return doc


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values: true is not 1, 1 is 1.0 (one JSON number)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


# Python's own limit on the digits of an int it turns into text (json.dumps).
_MAX_DIGITS = 4000


def _representable(number: Any) -> bool:
    if isinstance(number, float):
        return math.isfinite(number)
    return bool(abs(number) < 10**_MAX_DIGITS)


def _bad(op: MetadataOp, why: str) -> InvalidArgument:
    return InvalidArgument([(f"{op.field}.path", why)])


def _step(container: Any, segment: str) -> tuple[bool, Any]:
    """(found, value) one segment down."""
    if isinstance(container, dict):
        return (segment in container, container.get(segment))
    if isinstance(container, list) and segment.isdigit():
        i = int(segment)
        return (i < len(container), container[i] if i < len(container) else None)
    return (False, None)


def _parent(doc: dict[str, Any], op: MetadataOp, *, create: bool) -> Any:
    """The container holding the last segment; made on the way when ``create``."""
    node: Any = doc
    for segment in op.path[:-1]:
        found, child = _step(node, segment)
        if not found:
            if not create:
                return None
            if not isinstance(node, dict):
                raise _bad(op, f"cannot make key {segment!r} inside an array")
            child = {}
            node[segment] = child
        elif not isinstance(child, dict | list):
            if not create:
                return None
            raise _bad(op, f"{segment!r} holds a value that is neither an object nor an array")
        node = child
    return node


def _put(container: Any, segment: str, value: Any, op: MetadataOp) -> None:
    if isinstance(container, dict):
        container[segment] = value
    elif isinstance(container, list) and segment.isdigit() and int(segment) < len(container):
        container[int(segment)] = value
    else:
        raise _bad(op, f"{segment!r} is not an index inside the array")


def apply_operations(doc: dict[str, Any], ops: Sequence[MetadataOp]) -> dict[str, Any]:
    """A new document with the operations applied in order; ``doc`` is unchanged."""
    out = copy.deepcopy(doc)
    for op in ops:
        last = op.path[-1]
        if op.kind == DELETE:
            container = _parent(out, op, create=False)
            if isinstance(container, dict):
                container.pop(last, None)
            elif isinstance(container, list) and last.isdigit() and int(last) < len(container):
                del container[int(last)]
            continue
        if op.kind == REMOVE:
            container = _parent(out, op, create=False)
            found, current = _step(container, last)
            if found and isinstance(current, list):
                current[:] = [x for x in current if not _same_json(x, op.value)]
            continue
        container = _parent(out, op, create=True)
        found, current = _step(container, last)
        if op.kind == SET:
            _put(container, last, copy.deepcopy(op.value), op)
        elif op.kind == APPEND:
            if not found or current is None:
                _put(container, last, [copy.deepcopy(op.value)], op)
            elif isinstance(current, list):
                current.append(copy.deepcopy(op.value))
            else:
                # A single value becomes an array holding it and the new one.
                _put(container, last, [current, copy.deepcopy(op.value)], op)
        elif op.kind == INCREMENT:
            if not found or current is None:
                _put(container, last, op.value, op)
            elif _is_number(current):
                total = current + op.value
                if not _representable(total):
                    raise InvalidArgument(
                        [(f"{op.field}.value_json", "makes a number JSON cannot hold")]
                    )
                _put(container, last, total, op)
            else:
                raise _bad(op, "holds a value that is not a number")
    return out
