"""The bundled Python client against a live in-process sidecar over real Redis.

The sidecar runs on this test's event loop, so the blocking client is driven
from a worker thread (``asyncio.to_thread``); calling it on the loop's own
thread would block the server it talks to.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from mollifier.app import App
from mollifier.config import Settings
from mollifier.server import Sidecar, start_server
from mollifier_client import (
    AsyncClient,
    Client,
    InvalidArgumentError,
    MollifierError,
    NotFoundError,
    RetryPolicy,
    UnauthenticatedError,
    UnavailableError,
)
from mollifier_client.v1 import buffer_pb2, gate_pb2, run_pb2

from tests.plugins.sidecar import LiveSidecar

ENABLED = {"mollifierEnabled": True}
CLIENT_DIR = Path(__file__).resolve().parents[1] / "client"
_envs = itertools.count(1)


def new_env() -> str:
    return f"env_client_{os.getpid()}_{next(_envs)}"


def gate_fields(env_id: str) -> dict[str, Any]:
    return {
        "env_id": env_id,
        "org_id": "org_1",
        "task_identifier": "email.send",
        "org_feature_flags": ENABLED,
    }


def snapshot(env_id: str, run_id: str = "") -> run_pb2.RunSnapshot:
    return run_pb2.RunSnapshot(
        run_id=run_id,
        env_id=env_id,
        org_id="org_1",
        task_identifier="email.send",
        payload=b'{"to": "a@example.com"}',
        payload_type="application/json",
        tags=["welcome"],
    )


@pytest.fixture
async def aclient(sidecar: LiveSidecar) -> AsyncIterator[AsyncClient]:
    client = AsyncClient.connect(sidecar.address)
    yield client
    await client.close()


@pytest.fixture
def client(sidecar: LiveSidecar) -> Iterator[Client]:
    sync = Client.connect(sidecar.address)
    yield sync
    sync.close()


@pytest.fixture
def refused_address() -> Iterator[str]:
    """An address where nothing listens: a bound socket that never listens (RST)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture
def black_hole_address() -> Iterator[str]:
    """A port that completes TCP handshakes but never answers a byte."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


# Calls that work


async def test_async_client_evaluate_trigger_and_get_run(aclient: AsyncClient) -> None:
    env = new_env()
    decided = await aclient.evaluate(**gate_fields(env))
    assert isinstance(decided, gate_pb2.EvaluateResponse)
    assert decided.decision == gate_pb2.DECISION_PASS_THROUGH
    assert decided.reason == gate_pb2.DECISION_REASON_UNDER_THRESHOLD

    # Not enabled for the org: the cascade says so.
    off = await aclient.evaluate(env_id=env, org_id="org_1", task_identifier="t")
    assert off.reason == gate_pb2.DECISION_REASON_ORG_NOT_ENABLED

    # Threshold 1: the second trigger in the window trips and is buffered.
    await aclient.set_env_policy(env_id=env, policy={"threshold": 1})
    answers = [
        await aclient.trigger(**gate_fields(env), snapshot={"payload": b"{}"}) for _ in range(3)
    ]
    for answer in answers:
        assert answer.run_id.startswith("run_")  # filled in by the client
    assert len({a.run_id for a in answers}) == 3
    buffered = [a for a in answers if a.decision == gate_pb2.DECISION_MOLLIFY]
    assert buffered, [gate_pb2.Decision.Name(a.decision) for a in answers]

    got = await aclient.get_run(env_id=env, run_id=buffered[0].run_id)
    assert isinstance(got, buffer_pb2.GetRunResponse)
    assert got.run.run_id == buffered[0].run_id
    assert got.run.source == run_pb2.RUN_SOURCE_BUFFER
    assert got.run.status == run_pb2.RUN_STATUS_QUEUED
    assert got.run.snapshot.task_identifier == "email.send"


async def test_async_client_accepts_request_messages(aclient: AsyncClient) -> None:
    env = new_env()
    accepted = await aclient.accept(buffer_pb2.AcceptRequest(snapshot=snapshot(env)))
    assert accepted.result == buffer_pb2.ACCEPT_RESULT_ACCEPTED
    assert accepted.run.run_id.startswith("run_")

    got = await aclient.get_run(buffer_pb2.GetRunRequest(env_id=env, run_id=accepted.run.run_id))
    assert list(got.run.snapshot.tags) == ["welcome"]

    page = await aclient.list_runs(env_id=env)
    assert [r.run_id for r in page.runs] == [accepted.run.run_id]

    with pytest.raises(TypeError):
        await aclient.get_run(buffer_pb2.GetRunRequest(env_id=env), run_id="run_x")


async def test_sync_client_evaluate_trigger_and_get_run(client: Client) -> None:
    env = new_env()

    def scenario() -> tuple[gate_pb2.EvaluateResponse, gate_pb2.TriggerResponse, str]:
        decided = client.evaluate(**gate_fields(env))
        client.set_env_policy(env_id=env, policy={"threshold": 1})
        answers = [client.trigger(**gate_fields(env), snapshot=snapshot(env)) for _ in range(3)]
        buffered = next(a for a in answers if a.decision == gate_pb2.DECISION_MOLLIFY)
        got = client.get_run(env_id=env, run_id=buffered.run_id)
        return decided, buffered, got.run.run_id

    decided, buffered, read_back = await asyncio.to_thread(scenario)
    assert decided.decision == gate_pb2.DECISION_PASS_THROUGH
    assert buffered.run.status == run_pb2.RUN_STATUS_QUEUED
    assert read_back == buffered.run_id


async def test_helpers_return_the_sidecars_answer_when_it_is_up(
    aclient: AsyncClient, client: Client
) -> None:
    env = new_env()
    answer = await aclient.trigger_or_pass(
        **gate_fields(env), snapshot={"run_id": "run_mine_1"}, timeout=2.0
    )
    assert answer.run_id == "run_mine_1"
    assert answer.reason == gate_pb2.DECISION_REASON_UNDER_THRESHOLD

    decided = await asyncio.to_thread(lambda: client.evaluate_or_pass(**gate_fields(env)))
    assert decided.reason != gate_pb2.DECISION_REASON_FAIL_OPEN


# Errors


async def test_bad_input_raises_invalid_argument_naming_the_field(
    aclient: AsyncClient, client: Client
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await aclient.evaluate(env_id="not an env!", org_id="org_1", task_identifier="t")
    err = caught.value
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "env_id" in [field for field, _ in err.field_violations]
    assert isinstance(err.__cause__, grpc.RpcError)
    assert isinstance(err, MollifierError)

    # The helpers do not swallow the caller's bugs.
    # A generous deadline: on a loaded machine the default 0.1 s could pass
    # first, and the helper would rightly answer FAIL_OPEN instead.
    with pytest.raises(InvalidArgumentError):
        await aclient.trigger_or_pass(env_id="", org_id="org_1", task_identifier="t", timeout=10)

    def sync_bad() -> InvalidArgumentError:
        try:
            client.get_run(env_id="env_1", run_id="")
        except InvalidArgumentError as e:
            return e
        raise AssertionError("no error")

    sync_err = await asyncio.to_thread(sync_bad)
    assert "run_id" in [field for field, _ in sync_err.field_violations]


async def test_unknown_run_raises_not_found(aclient: AsyncClient, client: Client) -> None:
    env = new_env()
    with pytest.raises(NotFoundError) as caught:
        await aclient.get_run(env_id=env, run_id="run_missing")
    assert caught.value.reason == "RUN_NOT_FOUND"
    assert caught.value.domain == "mollifier.v1"

    def sync_missing() -> NotFoundError:
        try:
            client.get_run(env_id=env, run_id="run_missing")
        except NotFoundError as e:
            return e
        raise AssertionError("no error")

    assert (await asyncio.to_thread(sync_missing)).reason == "RUN_NOT_FOUND"


async def test_mutation_of_unknown_run_raises_not_found(aclient: AsyncClient) -> None:
    with pytest.raises(NotFoundError) as caught:
        await aclient.cancel_run(env_id="env_a", run_id="run_1", reason="no longer needed")
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert caught.value.reason == "RUN_NOT_FOUND"


# A sidecar that is down or silent


async def test_helpers_fail_open_when_nothing_listens(refused_address: str) -> None:
    async with AsyncClient.connect(refused_address) as aclient:
        started = time.monotonic()
        answer = await aclient.trigger_or_pass(**gate_fields("env_1"), snapshot={"payload": b""})
        elapsed = time.monotonic() - started
        assert answer.decision == gate_pb2.DECISION_PASS_THROUGH
        assert answer.reason == gate_pb2.DECISION_REASON_FAIL_OPEN
        assert answer.run_id.startswith("run_")
        assert elapsed < 2.0

        given = await aclient.trigger_or_pass(
            **gate_fields("env_1"), snapshot={"run_id": "run_given"}
        )
        assert given.run_id == "run_given"

        decided = await aclient.evaluate_or_pass(**gate_fields("env_1"))
        assert decided.decision == gate_pb2.DECISION_PASS_THROUGH
        assert decided.reason == gate_pb2.DECISION_REASON_FAIL_OPEN

    with Client.connect(refused_address) as sync:
        started = time.monotonic()
        answer = sync.trigger_or_pass(**gate_fields("env_1"))
        assert answer.reason == gate_pb2.DECISION_REASON_FAIL_OPEN
        assert answer.run_id.startswith("run_")
        assert sync.evaluate_or_pass(**gate_fields("env_1")).reason == (
            gate_pb2.DECISION_REASON_FAIL_OPEN
        )
        assert time.monotonic() - started < 4.0


async def test_helpers_fail_open_on_their_deadline(black_hole_address: str) -> None:
    async with AsyncClient.connect(black_hole_address, gate_timeout=0.2) as aclient:
        started = time.monotonic()
        answer = await aclient.trigger_or_pass(**gate_fields("env_1"))
        assert answer.reason == gate_pb2.DECISION_REASON_FAIL_OPEN
        assert time.monotonic() - started < 2.0

    def sync_side() -> gate_pb2.TriggerResponse:
        with Client.connect(black_hole_address) as sync:
            return sync.trigger_or_pass(**gate_fields("env_1"), timeout=0.2)

    started = time.monotonic()
    assert (await asyncio.to_thread(sync_side)).reason == gate_pb2.DECISION_REASON_FAIL_OPEN
    assert time.monotonic() - started < 2.0


async def test_a_closed_client_raises_a_client_error_and_helpers_fail_open(
    sidecar: LiveSidecar,
) -> None:
    from mollifier_client import CancelledError

    aclient = AsyncClient.connect(sidecar.address)
    await aclient.close()
    with pytest.raises(CancelledError) as caught:
        await aclient.get_run(env_id="env_1", run_id="run_1")
    assert caught.value.reason == "CLIENT_CLOSED"
    answer = await aclient.trigger_or_pass(env_id="env_1", org_id="org_1", task_identifier="t")
    assert answer.reason == gate_pb2.DECISION_REASON_FAIL_OPEN

    def sync_side() -> gate_pb2.TriggerResponse:
        client = Client.connect(sidecar.address)
        client.close()
        with pytest.raises(CancelledError):
            client.get_run(env_id="env_1", run_id="run_1")
        return client.trigger_or_pass(env_id="env_1", org_id="org_1", task_identifier="t")

    assert (await asyncio.to_thread(sync_side)).reason == gate_pb2.DECISION_REASON_FAIL_OPEN


async def test_plain_calls_retry_unavailable_then_raise_within_deadline(
    refused_address: str,
) -> None:
    retry = RetryPolicy(max_attempts=50, initial_backoff=0.01, max_backoff=0.05)
    async with AsyncClient.connect(refused_address, retry=retry) as aclient:
        started = time.monotonic()
        with pytest.raises(UnavailableError) as caught:
            await aclient.get_run(env_id="env_1", run_id="run_1", timeout=0.5)
        assert time.monotonic() - started < 3.0
        assert isinstance(caught.value.__cause__, grpc.RpcError)


# Authentication and TLS


@pytest.fixture
async def secured(settings: Settings) -> AsyncIterator[Sidecar]:
    app = await App.connect(settings.replace(auth_token="s3cret"), start_background=False)
    server = await start_server(app, "127.0.0.1:0")
    yield server
    await server.stop(0)
    await app.close()


async def test_token_is_sent_and_a_wrong_one_is_unauthenticated(secured: Sidecar) -> None:
    env = new_env()
    async with AsyncClient.connect(secured.address, token="s3cret") as good:
        decided = await good.evaluate(**gate_fields(env))
        assert decided.decision == gate_pb2.DECISION_PASS_THROUGH

    async with AsyncClient.connect(secured.address, token="wrong") as bad:
        with pytest.raises(UnauthenticatedError) as caught:
            await bad.evaluate(**gate_fields(env))
        assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED
        # The helper still never blocks the webapp (and logs a warning).
        answer = await bad.trigger_or_pass(**gate_fields(env))
        assert answer.reason == gate_pb2.DECISION_REASON_FAIL_OPEN

    def sync_wrong() -> None:
        with Client.connect(secured.address) as none:
            none.get_env_state(env_id=env)

    with pytest.raises(UnauthenticatedError):
        await asyncio.to_thread(sync_wrong)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs() -> Iterator[Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = Path(tempfile.mkdtemp(prefix="mollifier-client-tls-"))
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=mollifier test CA",
        cwd=folder,
    )  # fmt: skip
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (folder / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem",
            "-extfile", f"{name}.ext", cwd=folder,
        )  # fmt: skip
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def mtls_sidecar(settings: Settings, certs: Path) -> AsyncIterator[Sidecar]:
    app = await App.connect(
        settings.replace(
            tls_cert_file=str(certs / "server.pem"),
            tls_key_file=str(certs / "server.key"),
            tls_client_ca_file=str(certs / "ca.pem"),
        ),
        start_background=False,
    )
    server = await start_server(app, "127.0.0.1:0")
    yield server
    await server.stop(0)
    await app.close()


async def test_mutual_tls(mtls_sidecar: Sidecar, certs: Path) -> None:
    env = new_env()
    async with AsyncClient.connect(
        f"127.0.0.1:{mtls_sidecar.port}",
        root_certificates=certs / "ca.pem",
        client_certificate=certs / "client.pem",
        client_private_key=(certs / "client.key").read_bytes(),
    ) as aclient:
        decided = await aclient.evaluate(**gate_fields(env))
        assert decided.decision == gate_pb2.DECISION_PASS_THROUGH

    # Without a client certificate the handshake fails: UNAVAILABLE, after retries.
    async with AsyncClient.connect(
        f"127.0.0.1:{mtls_sidecar.port}", root_certificates=certs / "ca.pem"
    ) as no_cert:
        with pytest.raises(UnavailableError):
            await no_cert.evaluate(**gate_fields(env), timeout=1.0)


# Packaging


def test_client_imports_with_only_grpcio_and_protobuf() -> None:
    """In an isolated interpreter that cannot import the server or google.rpc."""
    site_dirs = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    code = f"""
import sys
# -S: no site-packages, no .pth files (so no editable-install hooks) until added here.
sys.path[:0] = [{str(CLIENT_DIR)!r}, *{site_dirs!r}]

class Block:
    BLOCKED = ("google.rpc", "grpc_status", "mollifier")
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in self.BLOCKED):
            raise ImportError("blocked: " + name)
        return None

sys.meta_path.insert(0, Block())
import mollifier_client
from mollifier_client import AsyncClient, Client, MollifierError
client = Client.connect("127.0.0.1:1")
client.close()
bad = [m for m in sys.modules if m.startswith(("google.rpc", "grpc_status"))
       or m == "mollifier" or m.startswith("mollifier.")]
assert not bad, bad
assert mollifier_client.__file__.startswith({str(CLIENT_DIR)!r}), mollifier_client.__file__
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# Retry rules (pure logic, no network)


def test_only_safe_failures_are_retried() -> None:
    from mollifier_client import DeadlineExceededError, FailedPreconditionError
    from mollifier_client._methods import CANCEL_RUN, GET_RUN, RETRY_FAILED, TRIGGER
    from mollifier_client._retry import Attempts

    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.01)
    unavailable = UnavailableError("down")
    deadline = DeadlineExceededError("slow")

    plain = Attempts(policy, 5.0, retry_deadline=GET_RUN.retry_deadline)
    plain.timeout()
    assert plain.pause(unavailable) is not None
    assert plain.pause(deadline) is None
    assert plain.pause(FailedPreconditionError("no")) is None
    assert not TRIGGER.retry_deadline

    for method in (CANCEL_RUN, RETRY_FAILED):
        once = Attempts(policy, 5.0, retry_deadline=method.retry_deadline)
        once.timeout()
        assert once.pause(deadline) is not None
        # The request_id is filled in before the first attempt, so retries repeat it.
        built = method.build(None, {"env_id": "env_1"})
        assert built.request_id

    bounded = Attempts(policy, 5.0, retry_deadline=False)
    for _ in range(3):
        bounded.timeout()
    assert bounded.pause(unavailable) is None  # attempts ran out

    # A server-sent RetryInfo delay longer than the time left ends the retries.
    short = Attempts(policy, 0.5, retry_deadline=False)
    short.timeout()
    assert short.pause(UnavailableError("busy", retry_after=2.0)) is None

    # UNAVAILABLE can follow a request the server ran: calls that would count,
    # take or settle anew are not sent twice.
    from mollifier_client import _methods as m

    not_again: tuple[m.Method[Any, Any], ...] = (
        m.EVALUATE, m.EVALUATE_BATCH, m.CLAIM_IDEMPOTENCY_KEY, m.LEASE, m.ACK, m.NACK,
    )  # fmt: skip
    for one in not_again:
        once_only = Attempts(
            policy, 5.0, retry_deadline=one.retry_deadline, retry_unavailable=one.retry_unavailable
        )
        once_only.timeout()
        assert once_only.pause(unavailable) is None, one.name
    again: tuple[m.Method[Any, Any], ...] = (
        m.TRIGGER, m.ACCEPT, m.GET_RUN, m.CANCEL_RUN, m.PUBLISH_IDEMPOTENCY_KEY,
    )  # fmt: skip
    assert all(one.retry_unavailable for one in again)

    # Trigger and Accept requests get a run id before the first attempt.
    assert TRIGGER.build(None, {"env_id": "env_1"}).snapshot.run_id.startswith("run_")
