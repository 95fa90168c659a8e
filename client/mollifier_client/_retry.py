"""Retry policy and the bookkeeping of one call's attempts.

Only failures that are safe to repeat are retried. ``UNAVAILABLE`` may come
after the server ran the request (the connection dropped before the answer),
so it is retried only for calls that are the same run twice as once: reads,
Trigger and Accept (they carry a run id the client fills in), calls with a
``request_id`` (the MutateService calls and RetryFailed, applied once by the
server), and the calls that set a state (SetEnvPolicy, Pause, Resume, Publish,
Release). Evaluate, EvaluateBatch, ClaimIdempotencyKey, Lease, Ack and Nack
are not retried: a second one counts, takes or settles anew. (A request that
never left the client is retried by gRPC itself.) ``DEADLINE_EXCEEDED`` is
retried only for calls with a ``request_id``. Every attempt and every pause
fits inside the call's overall deadline.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from mollifier_client._errors import CancelledError, MollifierError

if TYPE_CHECKING:
    from mollifier_client._methods import Method

__all__ = ["RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """How a call is retried after a retryable failure.

    Attributes:
        max_attempts: Attempts in all, the first included; 1 disables retries.
        initial_backoff: Upper bound of the first pause, in seconds.
        max_backoff: Upper bound of any pause, in seconds.
        multiplier: Growth of the bound from one pause to the next.

    Pauses are drawn uniformly between 0 and the bound ("full jitter"); a
    ``RetryInfo`` delay sent by the server is honoured as a minimum. A retry
    is skipped, and the last error raised, when the pause would not leave
    time for another attempt before the call's deadline.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")


NO_RETRY = RetryPolicy(max_attempts=1)

# Leave at least this much of the deadline for an attempt after a pause.
_MIN_ATTEMPT = 0.005


class Attempts:
    """The attempts of one call: per-attempt timeouts and pauses between them."""

    @classmethod
    def of(
        cls, method: Method[Any, Any], policy: RetryPolicy, timeout: float | None, *, closed: bool
    ) -> Attempts:
        """The attempts of a call of ``method``; raises when the client is closed
        (a MollifierError, not gRPC's own ValueError or UsageError, so the
        fail-open helpers pass through as for any unreachable sidecar)."""
        if closed:
            raise CancelledError("the client is closed", reason="CLIENT_CLOSED")
        return cls(
            policy,
            timeout,
            retry_deadline=method.retry_deadline,
            retry_unavailable=method.retry_unavailable,
        )

    def __init__(
        self,
        policy: RetryPolicy,
        timeout: float | None,
        *,
        retry_deadline: bool,
        retry_unavailable: bool = True,
    ) -> None:
        self._policy = policy
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._retry_deadline = retry_deadline
        self._retry_unavailable = retry_unavailable
        self._attempt = 0

    def timeout(self) -> float | None:
        """The time left for the next attempt (None: no deadline)."""
        self._attempt += 1
        if self._deadline is None:
            return None
        return max(self._deadline - time.monotonic(), 0.0)

    def pause(self, err: MollifierError) -> float | None:
        """Seconds to wait before retrying after ``err``, or None to give up."""
        if self._attempt >= self._policy.max_attempts:
            return None
        retryable = (err.code is grpc.StatusCode.UNAVAILABLE and self._retry_unavailable) or (
            err.code is grpc.StatusCode.DEADLINE_EXCEEDED and self._retry_deadline
        )
        if not retryable:
            return None
        p = self._policy
        bound = min(p.max_backoff, p.initial_backoff * p.multiplier ** (self._attempt - 1))
        delay = random.uniform(0.0, bound)
        if err.retry_after is not None:
            delay = max(delay, err.retry_after)
        if self._deadline is not None and time.monotonic() + delay + _MIN_ATTEMPT >= self._deadline:
            return None
        return delay
