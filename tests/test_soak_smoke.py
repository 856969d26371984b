"""A short soak in every CI run: 20,000 messages through the agent into four
sinks with ~1% random faults of every kind, over DATA and over BDAT.

``bench/soak.py`` fails (exit 1) when any recipient is unaccounted for
(delivered + failed + undecided != sent), when the agent reports a delivery
its sink never acknowledged (lost mail), or when a sink acknowledged more than
the agent saw without flagging it possibly delivered. The million-message
run and the memory figures are in docs/reliability.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("transfer", ["bdat", "data"])
def test_short_soak_loses_nothing(transfer: str) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "soak.py"), "--messages", "20000",
           "--seed", "7", "--rss-slack", "64"]
    if transfer == "data":
        cmd.append("--data")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, check=False)
    tail = run.stdout[-2000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    assert "\nOK" in run.stdout, tail
    assert "undecided" in run.stdout and "LOST" not in run.stdout
