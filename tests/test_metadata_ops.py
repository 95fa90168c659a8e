"""Metadata operations on plain documents (no stores): what each one makes."""

from __future__ import annotations

from typing import Any

import pytest
from mollifier.errors import InvalidArgument
from mollifier.metadata_ops import apply_operations, parse_operations
from mollifier.validation import Violations
from mollifier_client.v1 import mutate_pb2


def op(kind: str, path: str, value_json: str = "") -> mutate_pb2.MetadataOperation:
    return mutate_pb2.MetadataOperation(
        type=f"METADATA_OPERATION_TYPE_{kind}", path=path, value_json=value_json
    )


def apply(doc: dict[str, Any], *ops: mutate_pb2.MetadataOperation) -> dict[str, Any]:
    v = Violations()
    parsed = parse_operations(v, "operations", ops)
    v.raise_if_any()
    return apply_operations(doc, parsed)


def test_remove_compares_json_values_not_python_ones() -> None:
    # true is not 1 and false is not 0 in JSON; 1 and 1.0 are one number.
    doc = {"l": [1, True, 1.0, "1", 0, False]}
    assert apply(doc, op("REMOVE", "l", "1")) == {"l": [True, "1", 0, False]}
    assert apply(doc, op("REMOVE", "l", "false")) == {"l": [1, True, 1.0, "1", 0]}
    nested = {"l": [{"a": 1}, {"a": True}]}
    assert apply(nested, op("REMOVE", "l", '{"a": true}')) == {"l": [{"a": 1}]}


def test_an_increment_past_what_json_holds_names_its_value() -> None:
    # 4,000 digits and more: Python would refuse to write the result as text.
    with pytest.raises(InvalidArgument) as err:
        apply({"n": 9 * 10**3999}, op("INCREMENT", "n", "1" + "0" * 3999))
    assert err.value.violations == [("operations[0].value_json", "makes a number JSON cannot hold")]
    with pytest.raises(InvalidArgument) as err:
        apply({"f": 1e308}, op("INCREMENT", "f", "1e308"))
    assert err.value.violations == [("operations[0].value_json", "makes a number JSON cannot hold")]


@pytest.mark.parametrize("path", ["$.a[0]", '$["b"]', "a.'c'", "x]"])
def test_jsonpath_brackets_and_quotes_are_refused(path: str) -> None:
    v = Violations()
    parse_operations(v, "operations", [op("SET", path, "1")])
    assert [f for f, _ in v.items] == ["operations[0].path"]
