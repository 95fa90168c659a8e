"""examples/node against a live sidecar: a trigger, a read and a cancel from Node.

Runs when node and npm are on PATH and the npm registry answers; otherwise it is
skipped with the reason. The packages are installed once into a folder keyed by
package.json's hash (the example folder stays clean), found through NODE_PATH.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.plugins.sidecar import LiveSidecar

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"


def _node_modules() -> Path:
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("node or npm is not on PATH")
    manifest = (EXAMPLE / "package.json").read_bytes()
    folder = Path(tempfile.gettempdir()) / (
        "mollifier-node-example-" + hashlib.sha256(manifest).hexdigest()[:12]
    )
    modules = folder / "node_modules"
    if (modules / "@grpc" / "grpc-js").is_dir() and (modules / "@grpc" / "proto-loader").is_dir():
        return modules
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "package.json").write_bytes(manifest)
    try:
        done = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=240,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("npm install timed out (no npm registry?)")
    if done.returncode != 0:
        pytest.skip(f"npm install failed (no npm registry?): {done.stderr.strip()[-300:]}")
    return modules


async def test_node_example_against_live_sidecar(sidecar: LiveSidecar) -> None:
    modules = await asyncio.to_thread(_node_modules)
    env = {
        **os.environ,
        "NODE_PATH": str(modules),
        "MOLLIFIER_TARGET": sidecar.address,
        "MOLLIFIER_ENV_ID": "env_node",
        "MOLLIFIER_ORG_ID": "org_node",
    }
    env.pop("MOLLIFIER_AUTH_TOKEN", None)
    # Not subprocess.run: the sidecar answering it runs on this event loop.
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(EXAMPLE / "index.js"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out_b, err_b = await asyncio.wait_for(proc.communicate(), 120)
    out, err = out_b.decode(), err_b.decode()
    assert proc.returncode == 0, err
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    assert lines["trigger"].startswith("DECISION_PASS_THROUGH")
    # write_through: the sidecar wrote the run to Postgres, so GetRun finds it there.
    assert lines["get_run"] == "RUN_STATUS_PENDING from RUN_SOURCE_POSTGRES"
    assert lines["cancel_run"] in (
        "RUN_STATUS_CANCELED applied to MUTATION_TARGET_POSTGRES",
        "UNIMPLEMENTED (this sidecar has no mutations yet)",
    )
