"""The committed client stubs are exactly what the proto generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_stubs_match_proto() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-proto"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, (
        "generated stubs drift from proto/ (run `python scripts/gen-proto`):\n"
        + done.stdout
        + done.stderr
    )
