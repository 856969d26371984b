"""lmtpfast against Postfix's C client and the other ways to speak LMTP from Python.

Starts Postfix's ``smtp-sink -L`` itself (installed by scripts/install-test-deps.sh)
and, for every row, measures in the same run:

- ``lmtpfast bench`` (pipelined, N connections),
- Postfix's ``smtp-source -L -d`` (C, no pipelining, N sessions),
- with ``--full``: ``smtplib.LMTP`` with N threads and the bare pipelined
  uvloop loop (``bench/bare_pipelined.py``), TCP as well as the unix socket,
  10 KiB and 100 KiB messages, 1 and 32 connections.

Each cell is the median of ``--repeat`` runs (the machine is noisy: 2 cores).
Prints messages/s and client CPU per message, and the ratio of lmtpfast to
each peer. Usage::

    python bench/compare.py                 # issue 2's rows: unix, 1 KiB, 1 and 10 rcpts, 8 conns
    python bench/compare.py --full          # the whole matrix
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmtpfast._testing.postfix import SmtpSink, run_smtp_source  # noqa: E402


def run_json(cmd: list[str], timeout: float = 600) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.decode()[-500:]}")
    data: dict[str, float] = json.loads(out.stdout)
    return data


def lmtpfast_run(dest: str, msgs: int, conns: int, rcpts: int, size: int) -> tuple[float, float]:
    r = run_json([sys.executable, "-m", "lmtpfast", "bench", "--server", dest, "--messages",
                  str(msgs), "--connections", str(conns), "--recipients", str(rcpts),
                  "--size", str(size), "--json"])
    return r["messages_per_second"], r["cpu_per_message_us"]


def script_run(script: str, dest: str, msgs: int, conns: int, rcpts: int,
               size: int) -> tuple[float, float]:
    r = run_json([sys.executable, str(ROOT / "bench" / script), dest, str(msgs), str(conns),
                  str(rcpts), str(size)])
    return r["messages"] / r["elapsed"], r["cpu"] / r["messages"] * 1e6


def source_run(dest: str, msgs: int, conns: int, rcpts: int, size: int) -> tuple[float, float]:
    run = run_smtp_source(dest, messages=msgs, sessions=conns, recipients=rcpts, size=size)
    if not run.ok:
        raise RuntimeError(f"smtp-source failed: {run.output[-500:]!r}")
    return msgs / run.elapsed, run.cpu / msgs * 1e6


def median_of(fn, repeat: int, *args: object) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    rates, cpus = [], []
    for _ in range(repeat):
        rate, cpu = fn(*args)
        rates.append(rate)
        cpus.append(cpu)
    return statistics.median(rates), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the whole matrix (slow)")
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--bare", action="store_true",
                    help="add the bare pipelined loop as a peer (implied by --full)")
    args = ap.parse_args()

    transports = ["unix", "tcp"] if args.full else ["unix"]
    sizes = [1024, 10 * 1024, 100 * 1024] if args.full else [1024]
    rcpt_counts = [1, 10]
    conn_counts = [1, 8, 32] if args.full else [8]
    peers = {"smtp-source": source_run}
    if args.full:
        peers["smtplib"] = lambda *a: script_run("smtplib_threads.py", *a)
    if args.full or args.bare:
        peers["bare"] = lambda *a: script_run("bare_pipelined.py", *a)

    print(f"# lmtpfast vs peers against smtp-sink -L; median of {args.repeat}; "
          f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}")
    head = ["via", "size", "rcpt", "conns", "lmtpfast msg/s", "us/msg"]
    for p in peers:
        head += [f"{p} msg/s", "us/msg", "ratio"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for via in transports:
        sink = SmtpSink(tcp=via == "tcp").start()
        try:
            for size, rcpts, conns in itertools.product(sizes, rcpt_counts, conn_counts):
                # Big messages: fewer of them, so each cell takes seconds, not minutes.
                msgs = max(2_000, args.messages * 1024 // size) if size > 1024 else args.messages
                if rcpts > 1 or conns == 1:
                    msgs = max(2_000, msgs // 2)
                ours = median_of(lmtpfast_run, args.repeat, sink.destination, msgs, conns,
                                 rcpts, size)
                row = [via, f"{size // 1024} KiB", str(rcpts), str(conns), f"{ours[0]:,.0f}",
                       f"{ours[1]:.1f}"]
                for fn in peers.values():
                    n = msgs if fn is not peers.get("smtplib") else max(1_000, msgs // 10)
                    theirs = median_of(fn, args.repeat, sink.destination, n, conns, rcpts, size)
                    row += [f"{theirs[0]:,.0f}", f"{theirs[1]:.1f}", f"{ours[0] / theirs[0]:.2f}x"]
                print("| " + " | ".join(row) + " |", flush=True)
        finally:
            sink.close()


if __name__ == "__main__":
    main()
