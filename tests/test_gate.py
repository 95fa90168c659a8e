"""GateService against a real Redis: the cascade, the sliding window, hold, backlog,
fail-open, claims and the idempotent Trigger burst."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from google.protobuf import duration_pb2
from mollifier.app import App
from mollifier.devstack import RedisProcess
from mollifier.errors import FailedPrecondition, InvalidArgument
from mollifier.keys import env_keys
from mollifier_client.v1 import gate_pb2, run_pb2

from tests.gate_helpers import (
    evaluate_request,
    new_env,
    open_app,
    queue_ids,
    redis_now_ms,
    sleep_until_redis_ms,
    snapshot,
    trigger_request,
)

PASS = gate_pb2.DECISION_PASS_THROUGH
SHADOW = gate_pb2.DECISION_SHADOW_LOG
MOLLIFY = gate_pb2.DECISION_MOLLIFY
R = gate_pb2.DecisionReason

# A bound far above the 50 ms gate timeout, so a slow machine cannot flake it,
# yet far below anything that would block a trigger in practice.
FAIL_OPEN_BOUND_S = 1.0


async def trip(app: App, env_id: str, times: int) -> gate_pb2.EvaluateResponse:
    """Count ``times`` triggers for the env; returns the last outcome."""
    last = gate_pb2.EvaluateResponse()
    for _ in range(times):
        last = (await app.gate.evaluate(evaluate_request(env_id))).fill(gate_pb2.EvaluateResponse())
    return last


# -- the cascade -----------------------------------------------------------------

# (name, app overrides, request kwargs, env over its threshold first, decision, reason)
CASCADE: list[tuple[str, dict[str, Any], dict[str, Any], bool, int, int]] = [
    ("kill switch", {"enabled": False}, {}, False, PASS, R.DECISION_REASON_DISABLED),
    ("kill switch beats trip", {"enabled": False}, {}, True, PASS, R.DECISION_REASON_DISABLED),
    (
        "kill switch beats shadow",
        {"enabled": False, "shadow_mode": True},
        {},
        True,
        PASS,
        R.DECISION_REASON_DISABLED,
    ),
    ("org flag missing", {}, {"flags": {}}, True, PASS, R.DECISION_REASON_ORG_NOT_ENABLED),
    (
        "org flag false",
        {},
        {"flags": {"mollifierEnabled": False}},
        True,
        PASS,
        R.DECISION_REASON_ORG_NOT_ENABLED,
    ),
    (
        "another flag only",
        {},
        {"flags": {"someBeta": True}},
        True,
        PASS,
        R.DECISION_REASON_ORG_NOT_ENABLED,
    ),
    ("debounce", {}, {"debounce": True}, True, PASS, R.DECISION_REASON_BYPASS_DEBOUNCE),
    (
        "one-time-use token",
        {},
        {"one_time_use_token": "tok_1"},
        True,
        PASS,
        R.DECISION_REASON_BYPASS_ONE_TIME_USE_TOKEN,
    ),
    (
        "wait for completion",
        {},
        {"wait_for_completion": True},
        True,
        PASS,
        R.DECISION_REASON_BYPASS_WAIT_FOR_COMPLETION,
    ),
    (
        "debounce beats shadow",
        {"shadow_mode": True},
        {"debounce": True},
        True,
        PASS,
        R.DECISION_REASON_BYPASS_DEBOUNCE,
    ),
    ("shadow under", {"shadow_mode": True}, {}, False, PASS, R.DECISION_REASON_UNDER_THRESHOLD),
    ("shadow over", {"shadow_mode": True}, {}, True, SHADOW, R.DECISION_REASON_SHADOW_TRIPPED),
    ("under threshold", {}, {}, False, PASS, R.DECISION_REASON_UNDER_THRESHOLD),
    ("tripped", {}, {}, True, MOLLIFY, R.DECISION_REASON_TRIPPED),
]

THRESHOLD = 3


@pytest.mark.parametrize(
    ("overrides", "req_kwargs", "over", "decision", "reason"),
    [row[1:] for row in CASCADE],
    ids=[row[0] for row in CASCADE],
)
async def test_cascade_truth_table(
    redis_url: str,
    redis_client: aioredis.Redis,
    overrides: dict[str, Any],
    req_kwargs: dict[str, Any],
    over: bool,
    decision: int,
    reason: int,
) -> None:
    env = new_env()
    common: dict[str, Any] = {
        "trip_threshold": THRESHOLD,
        "trip_hold_ms": 30_000,
        # A day: the window's buckets are aligned to the clock, and once one
        # ends the previous bucket's count decays, so a count could drop
        # between the two reads below if a boundary fell between them.
        "trip_window_ms": 86_400_000,
    }
    async with (
        open_app(redis_url, **common) as counter,
        open_app(redis_url, **common, **overrides) as app,
    ):
        if over:
            before = await trip(counter, env, THRESHOLD + 1)
            assert before.decision == MOLLIFY
        state_before = await app.gate.env_state(env)

        out = await app.gate.evaluate(evaluate_request(env, **req_kwargs))
        assert (gate_pb2.Decision.Name(out.decision), R.Name(out.reason)) == (
            gate_pb2.Decision.Name(decision),
            R.Name(reason),
        )
        state_after = await app.gate.env_state(env)
        decided_in_redis = reason in (
            R.DECISION_REASON_UNDER_THRESHOLD,
            R.DECISION_REASON_TRIPPED,
            R.DECISION_REASON_SHADOW_TRIPPED,
        )
        if decided_in_redis:
            # The evaluator counted this trigger and reports its numbers.
            assert state_after.window_count == state_before.window_count + 1
            assert out.window_count == state_after.window_count
            assert out.threshold == THRESHOLD
            assert bool(out.tripped_until_ms) == over
        else:
            # Decided before Redis: nothing counted, no numbers invented.
            assert state_after.window_count == state_before.window_count
            assert (out.window_count, out.threshold, out.tripped_until_ms) == (0, 0, 0)

        # Trigger takes the same decision and buffers only when it is MOLLIFY.
        trig_req = trigger_request(env, snapshot=snapshot(env, f"run_cascade_{env}"))
        for name, value in req_kwargs.items():
            if name == "flags":
                trig_req.org_feature_flags.clear()
                trig_req.org_feature_flags.update(value)
            else:
                setattr(trig_req, name, value)
        t = await app.gate.trigger(trig_req, trig_req.snapshot)
        assert t.outcome.reason == reason
        assert t.run_id == f"run_cascade_{env}"
        buffered = await queue_ids(redis_client, env)
        if decision == MOLLIFY:
            assert t.run is not None
            assert t.run.status == run_pb2.RUN_STATUS_QUEUED
            assert buffered == [t.run_id]
        else:
            assert t.run is None
            assert buffered == []


async def test_kill_switch_touches_no_redis(redis_url: str, redis_client: aioredis.Redis) -> None:
    env = new_env()
    async with open_app(redis_url, enabled=False) as app:
        before = await redis_client.dbsize()
        for _ in range(5):
            await app.gate.evaluate(evaluate_request(env))
            req = trigger_request(env, snapshot=snapshot(env))
            await app.gate.trigger(req, req.snapshot)
        assert await redis_client.dbsize() == before


# -- the sliding window ------------------------------------------------------------


async def test_no_double_admission_across_a_window_edge(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    threshold, window = 20, 1000
    env = new_env()
    async with open_app(
        redis_url, trip_threshold=threshold, trip_window_ms=window, trip_hold_ms=1
    ) as app:
        for _attempt in range(3):
            now = await redis_now_ms(redis_client)
            boundary = now - now % window + window
            if boundary - now < 300:
                boundary += window
            await sleep_until_redis_ms(redis_client, boundary - 150)
            first = [await app.gate.evaluate(evaluate_request(env)) for _ in range(threshold)]
            if await redis_now_ms(redis_client) < boundary:
                break
            env = new_env()  # the burst straddled the edge; try a clean env
        else:
            pytest.fail("could not place a burst before a window edge")
        assert all(o.decision == PASS for o in first), [o.reason for o in first]

        await sleep_until_redis_ms(redis_client, boundary + 10)
        second = [await app.gate.evaluate(evaluate_request(env)) for _ in range(threshold)]
        admitted = sum(o.decision == PASS for o in second)
        # A fixed window would admit all `threshold` again (2x in ~160 ms); the
        # sliding window still counts the first burst almost fully.
        assert admitted <= 3, [R.Name(o.reason) for o in second]
        assert second[-1].decision == MOLLIFY
        assert second[-1].reason == R.DECISION_REASON_TRIPPED
        assert second[-1].window_count > threshold


async def test_window_forgets_after_it_slides_past(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    env = new_env()
    async with open_app(redis_url, trip_threshold=5, trip_window_ms=100, trip_hold_ms=1) as app:
        for _ in range(5):
            assert (await app.gate.evaluate(evaluate_request(env))).decision == PASS
        await asyncio.sleep(0.25)  # more than two windows
        out = await app.gate.evaluate(evaluate_request(env))
        assert (out.decision, out.window_count) == (PASS, 1)


async def test_hold_rearmed_under_sustained_load_and_ends_after(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    env = new_env()
    hold, window = 300, 200
    async with open_app(
        redis_url, trip_threshold=5, trip_window_ms=window, trip_hold_ms=hold
    ) as app:
        outcomes = []
        start = time.monotonic()
        while time.monotonic() - start < 1.2:
            outcomes.append(await app.gate.evaluate(evaluate_request(env)))
            await asyncio.sleep(0.005)
        first_trip = next(i for i, o in enumerate(outcomes) if o.decision == MOLLIFY)
        assert first_trip <= 6
        after = outcomes[first_trip:]
        assert all((o.decision, o.reason) == (MOLLIFY, R.DECISION_REASON_TRIPPED) for o in after), (
            "the hold lapsed while the rate stayed over the threshold"
        )
        # Re-armed: the env is held long past the first trip's hold.
        assert after[-1].tripped_until_ms >= after[0].tripped_until_ms + 700

        state = await app.gate.env_state(env)
        assert state.tripped_until.ToMilliseconds() > await redis_now_ms(redis_client)
        await sleep_until_redis_ms(redis_client, after[-1].tripped_until_ms + window + 50)
        state = await app.gate.env_state(env)
        assert not state.HasField("tripped_until")
        out = await app.gate.evaluate(evaluate_request(env))
        assert (out.decision, out.reason) == (PASS, R.DECISION_REASON_UNDER_THRESHOLD)


async def test_zero_hold_still_trips_while_over(redis_url: str) -> None:
    env = new_env()
    async with open_app(redis_url, trip_threshold=2, trip_window_ms=60_000, trip_hold_ms=0) as app:
        decisions = [(await app.gate.evaluate(evaluate_request(env))).decision for _ in range(4)]
        assert decisions == [PASS, PASS, MOLLIFY, MOLLIFY]


# -- order: a backlog keeps the env buffered ---------------------------------------


async def test_backlog_keeps_env_buffered_until_empty(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    env = new_env()
    k = env_keys(env)
    async with open_app(redis_url, trip_threshold=3, trip_window_ms=100, trip_hold_ms=100) as app:
        results = []
        for i in range(8):
            req = trigger_request(env, snapshot=snapshot(env, f"run_{i}"))
            results.append(await app.gate.trigger(req, req.snapshot))
        assert [r.outcome.decision for r in results[:3]] == [PASS] * 3
        assert all(r.outcome.decision == MOLLIFY for r in results[3:])
        assert await queue_ids(redis_client, env) == [f"run_{i}" for i in range(3, 8)]

        # The rate falls under the threshold and the hold lapses; from here on at
        # most one call per window, so the rate stays under it.
        await asyncio.sleep(0.35)

        async def check() -> tuple[int, int]:
            ev = await app.gate.evaluate(evaluate_request(env))
            await asyncio.sleep(0.11)
            return ev.decision, ev.reason

        backlog = (MOLLIFY, R.DECISION_REASON_BACKLOG)
        for i in range(8, 10):
            req = trigger_request(env, snapshot=snapshot(env, f"run_{i}"))
            t = await app.gate.trigger(req, req.snapshot)
            await asyncio.sleep(0.11)
            # ... but runs are still buffered: the env stays on the buffered path.
            assert (t.outcome.decision, t.outcome.reason) == backlog
            assert not t.outcome.tripped_until_ms
            assert t.run is not None
        assert await check() == backlog
        assert await queue_ids(redis_client, env) == [f"run_{i}" for i in range(3, 10)]
        runs, _ = await app.buffer.list_runs(env)
        assert [r.run_id for r in runs] == [f"run_{i}" for i in range(3, 10)]

        # Drain all but one by hand (no drainer here): still BACKLOG.
        for i in range(3, 9):
            assert await redis_client.lrem(k.queue, 0, f"run_{i}") == 1
            await redis_client.hdel(k.runs, f"run_{i}")
        assert await check() == backlog
        # A run leased by a drainer is still a backlog.
        assert await redis_client.lrem(k.queue, 0, "run_9") == 1
        await redis_client.zadd(k.lease, {"run_9": 1})
        assert await check() == backlog
        await redis_client.zrem(k.lease, "run_9")
        # And so is one that came back to the queue (its back set).
        await redis_client.zadd(k.back, {"run_9": 1})
        assert await check() == backlog
        await redis_client.zrem(k.back, "run_9")
        await redis_client.hdel(k.runs, "run_9")

        assert await check() == (PASS, R.DECISION_REASON_UNDER_THRESHOLD)
        req = trigger_request(env, snapshot=snapshot(env, "run_last"))
        t = await app.gate.trigger(req, req.snapshot)
        assert (t.outcome.decision, t.run) == (PASS, None)
        assert await queue_ids(redis_client, env) == []


# -- fail open ---------------------------------------------------------------------


async def _assert_fails_open(app: App, env: str) -> None:
    t0 = time.monotonic()
    out = await app.gate.evaluate(evaluate_request(env))
    elapsed_eval = time.monotonic() - t0
    assert (out.decision, out.reason) == (PASS, R.DECISION_REASON_FAIL_OPEN)
    assert elapsed_eval < FAIL_OPEN_BOUND_S

    req = trigger_request(env, snapshot=snapshot(env, "run_failopen"))
    t0 = time.monotonic()
    t = await app.gate.trigger(req, req.snapshot)
    elapsed_trig = time.monotonic() - t0
    assert (t.outcome.decision, t.outcome.reason) == (PASS, R.DECISION_REASON_FAIL_OPEN)
    assert t.run is None and t.run_id == "run_failopen"
    assert elapsed_trig < FAIL_OPEN_BOUND_S

    outs = await app.gate.evaluate_batch([evaluate_request(env), evaluate_request(env)])
    assert [o.reason for o in outs] == [R.DECISION_REASON_FAIL_OPEN] * 2


@pytest.mark.fault
async def test_fail_open_when_redis_is_killed(
    redis_factory: Callable[..., RedisProcess],
) -> None:
    server = redis_factory()
    env = new_env()
    async with open_app(server.url, trip_threshold=1, gate_timeout_ms=50) as app:
        assert (await app.gate.evaluate(evaluate_request(env))).decision == PASS
        assert (await app.gate.evaluate(evaluate_request(env))).decision == MOLLIFY
        server.kill()
        await _assert_fails_open(app, env)


@pytest.mark.fault
async def test_fail_open_when_redis_is_frozen(
    redis_factory: Callable[..., RedisProcess],
) -> None:
    server = redis_factory()
    env = new_env()
    async with open_app(server.url, trip_threshold=1, gate_timeout_ms=50) as app:
        # Warm the pool and the scripts first, so the freeze hits a live connection.
        await app.gate.evaluate(evaluate_request(env))
        server.pause()
        try:
            await _assert_fails_open(app, env)
        finally:
            server.resume()
        # Once Redis answers again the gate decides normally.
        for _ in range(20):
            out = await app.gate.evaluate(evaluate_request(env))
            if out.reason != R.DECISION_REASON_FAIL_OPEN:
                break
            await asyncio.sleep(0.05)
        assert (out.decision, out.reason) == (MOLLIFY, R.DECISION_REASON_TRIPPED)


@pytest.mark.fault
async def test_fail_open_under_client_pause(
    redis_factory: Callable[..., RedisProcess],
) -> None:
    server = redis_factory()
    env = new_env()
    admin = aioredis.Redis.from_url(server.url)
    try:
        async with open_app(server.url, trip_threshold=1, gate_timeout_ms=50) as app:
            await app.gate.evaluate(evaluate_request(env))
            await admin.client_pause(1000, all=True)
            try:
                await _assert_fails_open(app, env)
            finally:
                await admin.client_unpause()
    finally:
        await admin.aclose()


# -- idempotency claims --------------------------------------------------------------


async def test_two_hundred_claimers_one_wins(redis_url: str) -> None:
    env = new_env()
    async with open_app(redis_url) as app:
        claims = await asyncio.gather(*(app.gate.claim(env, "task-a", "key-1") for _ in range(200)))
        states = [c.state for c in claims]
        assert states.count(gate_pb2.CLAIM_STATE_CLAIMED) == 1
        assert states.count(gate_pb2.CLAIM_STATE_BUSY) == 199
        winner = next(c for c in claims if c.state == gate_pb2.CLAIM_STATE_CLAIMED)
        assert winner.claim_token
        assert all(0 < c.retry_after_ms <= 30_000 for c in claims if c is not winner)

        # Losers retry while the winner publishes: every answer is BUSY or RESOLVED.
        async def publish_soon() -> str:
            await asyncio.sleep(0.005)
            return await app.gate.publish(env, "task-a", "key-1", winner.claim_token, "run_win")

        retries, published = await asyncio.gather(
            asyncio.gather(*(app.gate.claim(env, "task-a", "key-1") for _ in range(200))),
            publish_soon(),
        )
        assert published == "run_win"
        assert {c.state for c in retries} <= {
            gate_pb2.CLAIM_STATE_BUSY,
            gate_pb2.CLAIM_STATE_RESOLVED,
        }
        after = await app.gate.claim(env, "task-a", "key-1")
        assert (after.state, after.run_id) == (gate_pb2.CLAIM_STATE_RESOLVED, "run_win")


async def test_stale_holder_cannot_publish_or_release(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    env = new_env()
    k = env_keys(env)
    async with open_app(redis_url) as app:
        stale = await app.gate.claim(env, "task-a", "key-2", ttl_ms=50)
        assert stale.state == gate_pb2.CLAIM_STATE_CLAIMED
        await asyncio.sleep(0.1)
        fresh = await app.gate.claim(env, "task-a", "key-2")
        assert fresh.state == gate_pb2.CLAIM_STATE_CLAIMED
        assert fresh.claim_token != stale.claim_token

        with pytest.raises(FailedPrecondition) as err:
            await app.gate.publish(env, "task-a", "key-2", stale.claim_token, "run_stale")
        assert err.value.reason == "CLAIM_NOT_HELD"
        assert not await app.gate.release(env, "task-a", "key-2", stale.claim_token)
        # The new holder's claim is untouched and nothing got bound.
        assert await redis_client.get(k.claim("task-a", "key-2")) == fresh.claim_token.encode()
        assert await redis_client.get(k.idem("task-a", "key-2")) is None
        busy = await app.gate.claim(env, "task-a", "key-2")
        assert busy.state == gate_pb2.CLAIM_STATE_BUSY

        assert await app.gate.publish(env, "task-a", "key-2", fresh.claim_token, "run_fresh")
        assert await redis_client.get(k.idem("task-a", "key-2")) == b"run_fresh"
        assert await redis_client.get(k.claim("task-a", "key-2")) is None
        # The same publish again (a client retrying a lost answer) answers as
        # the first did; the stale holder's still cannot.
        again = await app.gate.publish(env, "task-a", "key-2", fresh.claim_token, "run_fresh")
        assert again == "run_fresh"
        with pytest.raises(FailedPrecondition):
            await app.gate.publish(env, "task-a", "key-2", stale.claim_token, "run_stale")


async def test_release_frees_the_key_for_the_next_claimer(redis_url: str) -> None:
    env = new_env()
    async with open_app(redis_url) as app:
        first = await app.gate.claim(env, "task-a", "key-3")
        assert not await app.gate.release(env, "task-a", "key-3", "not-the-token")
        assert (await app.gate.claim(env, "task-a", "key-3")).state == gate_pb2.CLAIM_STATE_BUSY
        assert await app.gate.release(env, "task-a", "key-3", first.claim_token)
        assert not await app.gate.release(env, "task-a", "key-3", first.claim_token)
        again = await app.gate.claim(env, "task-a", "key-3")
        assert again.state == gate_pb2.CLAIM_STATE_CLAIMED


async def test_publish_onto_a_key_bound_elsewhere_is_refused(redis_url: str) -> None:
    env = new_env()
    async with open_app(redis_url, trip_threshold=1, trip_hold_ms=60_000) as app:
        await trip(app, env, 2)
        req = trigger_request(env, snapshot=snapshot(env, "run_bound", idempotency_key="key-4"))
        t = await app.gate.trigger(req, req.snapshot)
        assert t.outcome.decision == MOLLIFY and not t.duplicate
        # The binding is in the claim's way: a claim resolves to the buffered run.
        c = await app.gate.claim(env, "task-a", "key-4")
        assert (c.state, c.run_id) == (gate_pb2.CLAIM_STATE_RESOLVED, "run_bound")


# -- Trigger: one idempotency key, a thousand callers ------------------------------


async def test_thousand_triggers_one_key_buffer_one_run(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    env = new_env()
    k = env_keys(env)
    async with open_app(
        redis_url, trip_threshold=1, trip_hold_ms=60_000, gate_timeout_ms=5000
    ) as app:
        await trip(app, env, 2)

        async def one(i: int) -> Any:
            req = trigger_request(
                env, snapshot=snapshot(env, f"run_burst_{i}", idempotency_key="the-key")
            )
            return await app.gate.trigger(req, req.snapshot)

        results = await asyncio.gather(*(one(i) for i in range(1000)))
        reasons = {R.Name(r.outcome.reason) for r in results}
        assert all(r.outcome.decision == MOLLIFY for r in results), reasons
        winners = [r for r in results if not r.duplicate]
        assert len(winners) == 1
        winner = winners[0]
        assert winner.run is not None and winner.run.run_id == winner.run_id
        for r in results:
            if r.duplicate:
                assert r.run_id == winner.run_id
                assert r.run is not None and r.run.run_id == winner.run_id
                assert r.run.status == run_pb2.RUN_STATUS_QUEUED
        assert await queue_ids(redis_client, env) == [winner.run_id]
        assert await redis_client.get(k.idem("task-a", "the-key")) == winner.run_id.encode()
        assert await redis_client.hkeys(k.runs) == [winner.run_id.encode()]


async def test_trigger_duplicate_run_id_answers_existing(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    env = new_env()
    async with open_app(redis_url, trip_threshold=1, trip_hold_ms=60_000) as app:
        await trip(app, env, 2)
        req = trigger_request(env, snapshot=snapshot(env, "run_dup", payload=b"first"))
        first = await app.gate.trigger(req, req.snapshot)
        req2 = trigger_request(env, snapshot=snapshot(env, "run_dup", payload=b"second"))
        second = await app.gate.trigger(req2, req2.snapshot)
        assert (first.duplicate, second.duplicate) == (False, True)
        assert second.run is not None and second.run.snapshot.payload == b"first"
        assert await queue_ids(redis_client, env) == ["run_dup"]


async def test_trigger_makes_a_run_id_when_none_given(redis_url: str) -> None:
    env = new_env()
    async with open_app(redis_url, trip_threshold=1, trip_hold_ms=60_000) as app:
        await trip(app, env, 2)
        req = trigger_request(env)
        t = await app.gate.trigger(req, req.snapshot)
        assert t.run_id.startswith("run_") and len(t.run_id) > 10
        assert t.run is not None and t.run.snapshot.env_id == env
        assert t.run.snapshot.org_id == "org_1" and t.run.snapshot.task_identifier == "task-a"
        got = await app.buffer.get_run(env, t.run_id)
        assert got.snapshot == t.run.snapshot


# -- GetEnvState / SetEnvPolicy ------------------------------------------------------


def _policy(threshold: int = 0, window_ms: int = 0, hold_ms: int = 0) -> gate_pb2.EnvPolicy:
    p = gate_pb2.EnvPolicy(threshold=threshold)
    if window_ms:
        p.window.FromMilliseconds(window_ms)
    if hold_ms:
        p.hold.FromMilliseconds(hold_ms)
    return p


async def test_env_state_and_policy_overrides(redis_url: str) -> None:
    env, other = new_env(), new_env()
    async with open_app(
        redis_url, trip_threshold=100, trip_window_ms=60_000, trip_hold_ms=30_000
    ) as app:
        state = await app.gate.env_state(env)
        assert (state.window_count, state.threshold, state.buffer_depth) == (0, 100, 0)
        assert state.effective_policy.window.ToMilliseconds() == 60_000
        assert state.effective_policy.hold.ToMilliseconds() == 30_000
        assert state.overrides == gate_pb2.EnvPolicy()

        effective = await app.gate.set_policy(env, _policy(threshold=2, hold_ms=10_000))
        assert effective.threshold == 2
        assert effective.window.ToMilliseconds() == 60_000
        assert effective.hold.ToMilliseconds() == 10_000

        outs = [await app.gate.evaluate(evaluate_request(env)) for _ in range(3)]
        assert [o.decision for o in outs] == [PASS, PASS, MOLLIFY]
        assert outs[-1].threshold == 2
        # The other env keeps the default.
        other_out = [await app.gate.evaluate(evaluate_request(other)) for _ in range(3)]
        assert {o.decision for o in other_out} == {PASS}

        req = trigger_request(env, snapshot=snapshot(env, "run_state"))
        await app.gate.trigger(req, req.snapshot)
        state = await app.gate.env_state(env)
        assert state.window_count == 4
        assert state.threshold == 2 and state.overrides.threshold == 2
        assert state.overrides.hold.ToMilliseconds() == 10_000
        assert not state.overrides.HasField("window")
        assert state.buffer_depth == 1
        assert state.HasField("tripped_until")

        # Zero resets to the default.
        effective = await app.gate.set_policy(env, _policy())
        assert effective.threshold == 100
        assert effective.hold.ToMilliseconds() == 30_000
        state = await app.gate.env_state(env)
        assert state.overrides == gate_pb2.EnvPolicy()
        assert state.threshold == 100


async def test_policy_window_override_changes_the_window(redis_url: str) -> None:
    env = new_env()
    async with open_app(redis_url, trip_threshold=3, trip_window_ms=60_000, trip_hold_ms=1) as app:
        await app.gate.set_policy(env, _policy(window_ms=50))
        for _ in range(3):
            await app.gate.evaluate(evaluate_request(env))
        await asyncio.sleep(0.15)
        out = await app.gate.evaluate(evaluate_request(env))
        assert (out.decision, out.window_count) == (PASS, 1)


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (gate_pb2.EnvPolicy(threshold=-1), "policy.threshold"),
        (gate_pb2.EnvPolicy(window=duration_pb2.Duration(nanos=5_000_000)), "policy.window"),
        (gate_pb2.EnvPolicy(window=duration_pb2.Duration(seconds=-1)), "policy.window"),
        (gate_pb2.EnvPolicy(window=duration_pb2.Duration(seconds=7200)), "policy.window"),
        (gate_pb2.EnvPolicy(hold=duration_pb2.Duration(seconds=-5)), "policy.hold"),
    ],
)
async def test_bad_policy_is_refused_and_changes_nothing(
    redis_url: str, redis_client: aioredis.Redis, policy: gate_pb2.EnvPolicy, field: str
) -> None:
    env = new_env()
    async with open_app(redis_url) as app:
        await app.gate.set_policy(env, _policy(threshold=7))
        before = await redis_client.hgetall(env_keys(env).policy)
        with pytest.raises(InvalidArgument) as err:
            await app.gate.set_policy(env, policy)
        assert field in [f for f, _ in err.value.violations]
        assert await redis_client.hgetall(env_keys(env).policy) == before


async def test_evaluate_batch_matches_single_decisions(redis_url: str) -> None:
    env = new_env()
    async with open_app(redis_url, trip_threshold=2, trip_hold_ms=60_000) as app:
        reqs = [
            evaluate_request(env),
            evaluate_request(env, debounce=True),
            evaluate_request(env),
            evaluate_request(env, flags={}),
            evaluate_request(env),
        ]
        outs = await app.gate.evaluate_batch(reqs)
        assert [(o.decision, o.reason) for o in outs] == [
            (PASS, R.DECISION_REASON_UNDER_THRESHOLD),
            (PASS, R.DECISION_REASON_BYPASS_DEBOUNCE),
            (PASS, R.DECISION_REASON_UNDER_THRESHOLD),
            (PASS, R.DECISION_REASON_ORG_NOT_ENABLED),
            (MOLLIFY, R.DECISION_REASON_TRIPPED),
        ]


async def test_evaluate_batch_per_env_call_matches_evaluates_in_a_row(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """One script call per env decides its inputs exactly as Evaluates in a
    row would: the same answers and window counts, and the same gate state."""
    batch_a, batch_b, single_a, single_b = (new_env() for _ in range(4))
    # A day's window: a bucket boundary between the batch and the singles
    # would decay one side's counts.
    async with open_app(
        redis_url, trip_threshold=3, trip_hold_ms=60_000, trip_window_ms=86_400_000
    ) as app:
        order = [batch_a, batch_b, batch_a, batch_a, batch_b, batch_a, batch_a]
        outs = await app.gate.evaluate_batch([evaluate_request(e) for e in order])
        singles = {batch_a: single_a, batch_b: single_b}
        expected = [await app.gate.evaluate(evaluate_request(singles[e])) for e in order]
        assert [(o.decision, o.reason, o.window_count, o.threshold) for o in outs] == [
            (o.decision, o.reason, o.window_count, o.threshold) for o in expected
        ]
        # Env a tripped at its 4th trigger; b never did.
        assert [o.decision for o in outs] == [PASS, PASS, PASS, PASS, PASS, MOLLIFY, MOLLIFY]
        assert outs[5].tripped_until_ms > 0 and outs[4].tripped_until_ms == 0
        for batched, single in singles.items():
            got = await redis_client.hmget(env_keys(batched).gate, ["wc", "tu"])
            want = await redis_client.hmget(env_keys(single).gate, ["wc", "tu"])
            assert got[0] == want[0]
            assert (got[1] == b"0") == (want[1] == b"0")


@pytest.mark.parametrize("direct", [True, False], ids=["direct-connection", "redis-py-pool"])
async def test_both_redis_paths_decide_alike(redis_url: str, direct: bool) -> None:
    """MOLLIFIER_GATE_DIRECT_REDIS picks the gate's own connection or redis-py's
    pool; the decisions are the same either way."""
    env = new_env()
    async with open_app(
        redis_url, trip_threshold=2, trip_hold_ms=60_000, gate_direct_redis=direct
    ) as app:
        assert (app.gate._direct is not None) is direct
        singles = [await app.gate.evaluate(evaluate_request(env)) for _ in range(2)]
        batch = await app.gate.evaluate_batch([evaluate_request(env)] * 2)
        req = trigger_request(env, snapshot=snapshot(env, f"run_paths_{direct}"))
        t = await app.gate.trigger(req, req.snapshot)
        assert [o.window_count for o in singles + batch] == [1, 2, 3, 4]
        assert [o.decision for o in singles + batch] == [PASS, PASS, MOLLIFY, MOLLIFY]
        assert t.outcome.decision == MOLLIFY and t.run is not None
