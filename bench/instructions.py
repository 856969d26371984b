"""Instructions per message, which machine noise does not change (valgrind's callgrind).

Runs one client command twice under ``valgrind --tool=callgrind``, with a small
and a large message count, against a ``smtp-sink -L`` it starts, and prints
(instructions(large) - instructions(small)) / (large - small): start-up, imports
and connection set-up cancel out. Clients::

    python bench/instructions.py                       # lmtpfast bench, send_many
    python bench/instructions.py --client bare         # bench/bare_pipelined.py
    python bench/instructions.py --rcpts 10 --small 500 --large 3000

Client-side user-space instructions only (the kernel and the sink are not counted).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmtpfast._testing.postfix import SmtpSink  # noqa: E402


def client_cmd(client: str, dest: str, n: int, conns: int, rcpts: int, size: int,
               extra: list[str]) -> list[str]:
    if client == "bare":
        return [sys.executable, str(ROOT / "bench" / "bare_pipelined.py"), dest, str(n),
                str(conns), str(rcpts), str(size)]
    return [sys.executable, "-m", "lmtpfast", "bench", "--server", dest, "--messages", str(n),
            "--connections", str(conns), "--recipients", str(rcpts), "--size", str(size),
            "--json", *extra]


def instructions(cmd: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out", *cmd],
            capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=1800,
            check=False)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.decode()[-800:]}")
        found = re.search(rb"Collected : (\d+)", out.stderr)
        if found is None:
            raise RuntimeError("valgrind printed no instruction count")
        return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--client", choices=("lmtpfast", "bare"), default="lmtpfast")
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=6000)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--rcpts", type=int, default=1)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("extra", nargs="*", help="more `lmtpfast bench` arguments (after --)")
    args = ap.parse_args()
    sink = SmtpSink().start()
    try:
        counts = [instructions(client_cmd(args.client, sink.destination, n, args.connections,
                                          args.rcpts, args.size, args.extra))
                  for n in (args.small, args.large)]
    finally:
        sink.close()
    per = (counts[1] - counts[0]) / (args.large - args.small)
    print(f"{args.client}: {per:,.0f} instructions/message ({args.rcpts} rcpt, "
          f"{args.connections} conns, {args.size} bytes; {counts[0]:,} at {args.small}, "
          f"{counts[1]:,} at {args.large})")


if __name__ == "__main__":
    main()
