"""The stores `mollifier dev` (and the tests) start: a server left running on a
folder by an owner that was killed is stopped before a new one starts there."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from mollifier.devstack import PostgresProcess, RedisProcess


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_leftover_redis_on_the_folder_is_stopped_first(tmp_path: Path) -> None:
    left = RedisProcess(tmp_path / "redis", appendonly=True)
    left.start()
    assert left.proc is not None
    orphan = left.proc.pid  # its owner is "gone": nobody will stop it
    fresh = RedisProcess(tmp_path / "redis", appendonly=True)
    try:
        fresh.start()
        assert fresh.proc is not None and fresh.proc.pid != orphan
        # Not a child we reap here only when Popen does: poll for it.
        left.proc.poll()
        assert _wait_gone(orphan) or left.proc.returncode is not None
    finally:
        fresh.stop()
        left.kill()


def test_a_leftover_postmaster_on_the_cluster_is_stopped_first() -> None:
    # Not under pytest's tmp_path: the postgres user must reach the folder.
    folder = Path(tempfile.mkdtemp(prefix="mollifier-pg-"))
    left = PostgresProcess(folder)
    left.start()
    orphan = int((folder / "pgdata" / "postmaster.pid").read_text().split()[0])
    fresh = PostgresProcess(folder)
    try:
        fresh.start()  # failed on the cluster's lock before
        pid = int((folder / "pgdata" / "postmaster.pid").read_text().split()[0])
        assert pid != orphan
        assert left.proc is not None
        left.proc.wait(30)  # runuser exits once its postmaster has
    finally:
        fresh.stop()
        left.kill()
        shutil.rmtree(folder, ignore_errors=True)
    assert not _alive(orphan)
