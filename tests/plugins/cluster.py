"""A local Redis Cluster: three masters (and, when asked, one replica each),
real redis-server processes with --cluster-enabled, joined by
`redis-cli --cluster create`.

    def test_x(redis_cluster_factory):
        cluster = redis_cluster_factory(replicas=1)
        cluster.url          # redis://127.0.0.1:<first master>
        cluster.masters()    # [(port, RedisProcess)] as CLUSTER NODES says now
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mollifier.devstack import RedisProcess

__all__ = ["LocalCluster"]


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (so below 55536)."""
    for _ in range(1000):
        port = random.randint(20000, 55000)
        ok = True
        for p in (port, port + 10000):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _cli(port: int, *args: str, timeout: float = 10) -> str:
    out = subprocess.run(
        [shutil.which("redis-cli") or "redis-cli", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return out.stdout


class LocalCluster:
    """Nodes of one cluster, their folders, and a few checks on its state."""

    def __init__(self, replicas: int = 0, node_timeout_ms: int = 1000) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="mollifier-cluster-"))
        self.nodes: list[RedisProcess] = []
        for i in range(3 * (1 + replicas)):
            node = RedisProcess(
                self.folder / f"n{i}",
                port=_cluster_port(),
                extra_args=(
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(node_timeout_ms),
                    # A replica may take over even if it lagged a little.
                    "--cluster-replica-validity-factor", "0",
                ),
            )  # fmt: skip
            self.nodes.append(node)
        try:
            self._create(replicas)
        except BaseException:
            self.stop()  # nothing half-started is left running
            raise

    def _create(self, replicas: int) -> None:
        for node in self.nodes:
            node.start()
        _cli(
            self.nodes[0].port,
            "--cluster",
            "create",
            *(f"127.0.0.1:{n.port}" for n in self.nodes),
            "--cluster-replicas",
            str(replicas),
            "--cluster-yes",
            timeout=60,
        )
        self.wait_ok()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def alive(self) -> list[RedisProcess]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every live node says cluster_state:ok and every slot is served."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = [_cli(n.port, "cluster", "info") for n in self.alive()]
                if all("cluster_state:ok" in s and "cluster_slots_ok:16384" in s for s in states):
                    return
            except subprocess.SubprocessError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster did not become ok")
            time.sleep(0.1)

    def wait_failover(self, dead_port: int, timeout: float = 30) -> None:
        """Until a replica has taken over from the dead master and all is ok."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                masters = [p for p, _ in self.masters()]
                if dead_port not in masters and len(masters) == 3:
                    break
            except subprocess.SubprocessError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("no replica took over")
            time.sleep(0.1)
        self.wait_ok(timeout)

    def masters(self) -> list[tuple[int, RedisProcess]]:
        by_port = {n.port: n for n in self.alive()}
        out = _cli(next(iter(by_port)), "cluster", "nodes")
        found = []
        for line in out.splitlines():
            parts = line.split()
            flags = parts[2].split(",")
            port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
            if "master" in flags and "fail" not in flags and port in by_port:
                found.append((port, by_port[port]))
        return sorted(found, key=lambda x: x[0])

    def master_of(self, key: str) -> RedisProcess:
        """The live master serving ``key``'s slot (its own CLUSTER NODES line)."""
        slot = int(_cli(self.alive()[0].port, "cluster", "keyslot", key).strip())
        for port, node in self.masters():
            for line in _cli(port, "cluster", "nodes").splitlines():
                if "myself" not in line:
                    continue
                for rng in line.split()[8:]:
                    lo, _, hi = rng.partition("-")
                    if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                        return node
        raise LookupError(f"no master owns slot {slot}")

    def stop(self) -> None:
        for n in self.nodes:
            n.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def redis_cluster_factory() -> Iterator[Callable[..., LocalCluster]]:
    """Start local clusters; each is killed at the end of the test."""
    started: list[LocalCluster] = []

    def make(replicas: int = 0) -> LocalCluster:
        cluster = LocalCluster(replicas=replicas)
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        cluster.stop()
