"""Every benchmark script in ``bench/`` runs from a clone after README's test set-up.

Issue 12 asks that each benchmark runs from a fresh clone; a script that
rots (a renamed internal, a peer it no longer finds) fails here, not on the
day someone needs its figures. Each runs with a tiny workload: these are
smoke runs, so nothing is asserted about rates -- only that the script
finishes with status 0 and prints its table.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

#: script -> the arguments of a small run (the figures mean nothing at this size).
RUNS: dict[str, list[str]] = {
    "bench_engine.py": ["--quick"],
    "bench_content.py": ["--repeat", "1"],
    "bench_ops.py": ["--lines", "2000", "--runs", "1"],
    "bench_maps.py": ["--keys", "200", "--runs", "1"],
    "bench_agent.py": ["--messages", "300", "--runs", "1"],
    "bench_pgshape.py": ["--n", "50", "--runs", "1"],
    "bench_pgqueue.py": ["--messages", "100", "--runs", "1", "--workers", "1"],
    "compare.py": ["--messages", "500", "--repeat", "1", "--bare"],
    "bench_send.py": ["--runs", "2"],
    "sink_speed.py": ["--messages", "500", "--repeat", "1"],
    "bench_queue.py": ["--messages", "300", "--repeat", "1"],
    "bench_replay.py": ["--messages", "300", "--dovecot-messages", "50", "--big-count", "1",
                        "--big-mib", "2", "--memory-small", "100", "--memory-large", "300"],
    "crash_pgqueue.py": ["--messages", "100", "--kills", "2", "--workers", "2"],
    "soak.py": ["--messages", "200"],
    "bdat_burst.py": ["--messages", "300", "--repeat", "1", "--bursts", "1", "8"],
    "proxy_compare.py": ["--messages", "200", "--rounds", "1", "--probe", "20"],
    "proxy_verify.py": ["--messages", "40", "--rounds", "1"],
    "instructions.py": ["--small", "20", "--large", "60"],
    "proxy_instructions.py": ["--small", "20", "--large", "60"],
    "sink_profile.py": ["--messages", "20", "--what", "engine", "--engines", "c"],
}

#: Run by another script above, not on their own (they take positional arguments).
HELPERS = {"bare_pipelined.py", "smtplib_threads.py"}


def test_every_script_is_listed() -> None:
    scripts = {p.name for p in BENCH.glob("*.py")}
    assert scripts - HELPERS == set(RUNS), "add the new bench script to RUNS"


@pytest.mark.peers
@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(RUNS))
def test_bench_script_runs(script: str) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / script), *RUNS[script]],
                          capture_output=True, text=True, timeout=900, cwd=BENCH.parent,
                          check=False)
    assert proc.returncode == 0, (f"{script} exited {proc.returncode}\n--- stdout ---\n"
                                  f"{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}")
    assert proc.stdout.strip(), f"{script} printed nothing"
