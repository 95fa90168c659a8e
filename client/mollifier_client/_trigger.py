"""Client-made ids and the fail-open answers of the gate helpers."""

from __future__ import annotations

import secrets

from mollifier_client._errors import InvalidArgumentError, MollifierError
from mollifier_client.v1 import buffer_pb2, gate_pb2

__all__ = [
    "ensure_run_id",
    "fail_open_evaluate",
    "fail_open_trigger",
    "fills_open",
    "new_request_id",
    "new_run_id",
]

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def new_run_id() -> str:
    """A fresh run id in the sidecar's own format: "run_" + 25 base-36 characters."""
    return "run_" + "".join(secrets.choice(_ALPHABET) for _ in range(25))


def new_request_id() -> str:
    """A fresh request id for calls the server applies once per request id."""
    return "req_" + secrets.token_hex(16)


def ensure_run_id(request: gate_pb2.TriggerRequest | buffer_pb2.AcceptRequest) -> str:
    """Fill ``request.snapshot.run_id`` when empty, and return it."""
    snapshot = request.snapshot
    if not snapshot.run_id:
        snapshot.run_id = new_run_id()
    return str(snapshot.run_id)


def fills_open(err: MollifierError) -> bool:
    """Whether a gate helper answers pass-through instead of raising ``err``.

    Everything fails open (the sidecar must never block a trigger) except bad
    input, which is the caller's bug and would fail the same way every time.
    """
    return not isinstance(err, InvalidArgumentError)


def fail_open_trigger(run_id: str) -> gate_pb2.TriggerResponse:
    """The answer of a Trigger that could not reach a decision: write it yourself."""
    return gate_pb2.TriggerResponse(
        decision=gate_pb2.DECISION_PASS_THROUGH,
        reason=gate_pb2.DECISION_REASON_FAIL_OPEN,
        run_id=run_id,
    )


def fail_open_evaluate() -> gate_pb2.EvaluateResponse:
    """The answer of an Evaluate that could not reach a decision."""
    return gate_pb2.EvaluateResponse(
        decision=gate_pb2.DECISION_PASS_THROUGH,
        reason=gate_pb2.DECISION_REASON_FAIL_OPEN,
    )
