"""Private redis-server and postgres processes in a local folder.

``mollifier dev`` uses these when no URLs are configured, and the test
fixtures use them to start servers on free ports that they can stop, kill,
pause and restart. Postgres refuses to run as root, so when we are root the
data folder is given to the ``postgres`` user and the server runs as it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["PostgresProcess", "RedisProcess", "free_port", "pg_bin"]


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on port {port} within {timeout}s")


def pg_bin(name: str) -> str:
    """Path of a Postgres program (initdb, postgres, pg_ctl)."""
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return candidate
    raise FileNotFoundError(f"{name} not found: install PostgreSQL (15 or newer)")


def _as_postgres_user() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


class RedisProcess:
    """A redis-server on 127.0.0.1, its files in ``data_dir``."""

    def __init__(
        self,
        data_dir: str | Path,
        port: int = 0,
        *,
        appendonly: bool = False,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.data_dir / "redis.log"
        pidfile = self.data_dir / "redis.pid"
        # Two servers on one append-only folder would both write it.
        _stop_leftover(pidfile, b"redis-server", signal.SIGTERM, timeout)
        args = [
            shutil.which("redis-server") or "redis-server",
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--logfile", str(log),
            "--pidfile", str(pidfile),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        _wait_port(self.port, timeout, self.proc, log)

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections hang, nothing answers."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: whatever is not on disk is gone."""
        if self.proc is not None:
            self._signal(signal.SIGCONT)
            self._signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self._signal(signal.SIGCONT)
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def _read_pid(pidfile: Path) -> int | None:
    """The pid on the first line of a server's pid file; None when there is none."""
    try:
        return int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop_leftover(pidfile: Path, marker: bytes, sig: int, timeout: float) -> None:
    """Stop the server named by ``pidfile`` when it still runs (its command
    line holding ``marker``): one a killed owner left behind on this folder."""
    pid = _read_pid(pidfile)
    if pid is None:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return  # its process is gone
    if marker not in cmdline:
        return  # the pid now belongs to something else
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)


class PostgresProcess:
    """A postgres cluster made with initdb in ``data_dir``, listening on 127.0.0.1."""

    def __init__(self, data_dir: str | Path, port: int = 0, *, fsync: bool = False) -> None:
        self.root = Path(data_dir)
        self.pgdata = self.root / "pgdata"
        self.port = port or free_port()
        self.fsync = fsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _own(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            for path in self.root.rglob("*"):
                with contextlib.suppress(FileNotFoundError):
                    shutil.chown(path, "postgres", "postgres")

    def init(self) -> None:
        """initdb once; a folder that has a cluster already is kept."""
        self.root.mkdir(parents=True, exist_ok=True)
        if (self.pgdata / "PG_VERSION").exists():
            return
        self._own()
        subprocess.run(
            [
                *_as_postgres_user(),
                pg_bin("initdb"),
                "-D", str(self.pgdata),
                "-U", "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip

    def start(self, timeout: float = 30.0) -> None:
        # A postmaster left running on this cluster (whoever started it was
        # killed) holds its lock: stop it (fast shutdown) rather than fail.
        _stop_leftover(
            self.pgdata / "postmaster.pid", str(self.pgdata).encode(), signal.SIGINT, timeout
        )
        self.init()
        self._own()
        log = self.root / "postgres.log"
        log.touch()
        self._own()
        args = [
            *_as_postgres_user(),
            pg_bin("postgres"),
            "-D", str(self.pgdata),
            "-p", str(self.port),
            "-k", str(self.root),
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"fsync={'on' if self.fsync else 'off'}",
            "-c", "synchronous_commit=off" if not self.fsync else "synchronous_commit=on",
            "-c", "full_page_writes=off",
            "-c", "max_connections=200",
        ]  # fmt: skip
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        _wait_port(self.port, timeout, self.proc, log)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _signal(self, sig: int) -> None:
        # runuser forwards nothing useful; signal the postmaster by its pid file.
        pid = _read_pid(self.pgdata / "postmaster.pid")
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def _reap(self, timeout: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        """Fast shutdown: open sessions are cut, committed data is kept."""
        self._signal(signal.SIGINT)
        self._reap(30)

    def kill(self) -> None:
        """SIGKILL the postmaster (its children follow); the next start recovers."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._reap(10)

    def restart(self) -> None:
        self.stop()
        self.start()
