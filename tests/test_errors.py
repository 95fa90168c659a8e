"""The one table from failures to gRPC codes: store trouble is never INTERNAL."""

from __future__ import annotations

import grpc
import psycopg
import pytest
import redis.exceptions
from mollifier.errors import classify
from psycopg_pool import PoolTimeout


@pytest.mark.parametrize(
    ("exc", "code", "reason"),
    [
        (redis.exceptions.ConnectionError("x"), grpc.StatusCode.UNAVAILABLE, "REDIS_UNAVAILABLE"),
        (redis.exceptions.ReadOnlyError("x"), grpc.StatusCode.UNAVAILABLE, "REDIS_UNAVAILABLE"),
        (redis.exceptions.ClusterDownError("x"), grpc.StatusCode.UNAVAILABLE, "REDIS_UNAVAILABLE"),
        (redis.exceptions.TryAgainError("x"), grpc.StatusCode.UNAVAILABLE, "REDIS_UNAVAILABLE"),
        (
            redis.exceptions.OutOfMemoryError("x"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "REDIS_OUT_OF_MEMORY",
        ),
        (psycopg.OperationalError("x"), grpc.StatusCode.UNAVAILABLE, "POSTGRES_UNAVAILABLE"),
        (psycopg.InterfaceError("x"), grpc.StatusCode.UNAVAILABLE, "POSTGRES_UNAVAILABLE"),
        (PoolTimeout("x"), grpc.StatusCode.UNAVAILABLE, "POSTGRES_UNAVAILABLE"),
        (TimeoutError(), grpc.StatusCode.UNAVAILABLE, "TIMEOUT"),
        (KeyError("x"), grpc.StatusCode.INTERNAL, "INTERNAL"),
    ],
)
def test_classify(exc: BaseException, code: grpc.StatusCode, reason: str) -> None:
    err = classify(exc)
    assert (err.code, err.reason) == (code, reason)
