"""Helpers shared by the gate and buffer tests: an App without gRPC, requests, keys."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from mollifier.app import App
from mollifier.config import Settings
from mollifier.keys import env_keys
from mollifier_client.v1 import gate_pb2, run_pb2

from tests import entries

ENABLED = {"mollifierEnabled": True}

_envs = itertools.count(1)


def new_env(prefix: str = "env") -> str:
    """A fresh env id, so tests sharing one Redis never see each other's keys."""
    return f"{prefix}_{next(_envs)}"


def make_settings(redis_url: str, database_url: str = "", **overrides: Any) -> Settings:
    # A loose gate bound unless a test sets one: on a loaded machine 50 ms can
    # pass and the answer would rightly be FAIL_OPEN, which is not what most
    # tests check. The fail-open tests pass the real default explicitly.
    overrides.setdefault("gate_timeout_ms", 2000)
    return Settings.from_env(
        {}, redis_url=redis_url, database_url=database_url, drain_enabled=False, **overrides
    )


@contextlib.asynccontextmanager
async def open_app(redis_url: str, database_url: str = "", **overrides: Any) -> AsyncIterator[App]:
    app = await App.connect(
        make_settings(redis_url, database_url, **overrides), start_background=False
    )
    try:
        yield app
    finally:
        await app.close()


def evaluate_request(
    env_id: str,
    *,
    org_id: str = "org_1",
    flags: dict[str, bool] | None = None,
    debounce: bool = False,
    one_time_use_token: str = "",
    wait_for_completion: bool = False,
) -> gate_pb2.EvaluateRequest:
    return gate_pb2.EvaluateRequest(
        env_id=env_id,
        org_id=org_id,
        task_identifier="task-a",
        org_feature_flags=ENABLED if flags is None else flags,
        debounce=debounce,
        one_time_use_token=one_time_use_token,
        wait_for_completion=wait_for_completion,
    )


def trigger_request(
    env_id: str,
    *,
    org_id: str = "org_1",
    task: str = "task-a",
    flags: dict[str, bool] | None = None,
    snapshot: run_pb2.RunSnapshot | None = None,
) -> gate_pb2.TriggerRequest:
    return gate_pb2.TriggerRequest(
        env_id=env_id,
        org_id=org_id,
        task_identifier=task,
        org_feature_flags=ENABLED if flags is None else flags,
        snapshot=snapshot if snapshot is not None else run_pb2.RunSnapshot(),
    )


def snapshot(
    env_id: str,
    run_id: str = "",
    *,
    org_id: str = "org_1",
    task: str = "task-a",
    **fields: Any,
) -> run_pb2.RunSnapshot:
    return run_pb2.RunSnapshot(
        run_id=run_id, env_id=env_id, org_id=org_id, task_identifier=task, **fields
    )


async def redis_now_ms(redis: aioredis.Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def sleep_until_redis_ms(redis: aioredis.Redis, target_ms: int) -> None:
    """Sleep until Redis's clock reads at least ``target_ms``."""
    while True:
        now = await redis_now_ms(redis)
        if now >= target_ms:
            return
        await asyncio.sleep((target_ms - now) / 1000)


async def env_key_dump(redis: aioredis.Redis, env_id: str) -> dict[bytes, bytes]:
    """Every key of one env (by hash tag) with its DUMP, to prove nothing changed."""
    pattern = env_keys(env_id).tag + ":*"
    out: dict[bytes, bytes] = {}
    async for key in redis.scan_iter(match=pattern, count=1000):
        dumped = await redis.dump(key)
        if dumped is not None:
            out[key] = dumped
    return out


# The queued run ids in lease order: tests.entries.queue_ids, kept here for
# the gate tests that import their helpers from this module.
queue_ids = entries.queue_ids
