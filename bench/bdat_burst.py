"""What bounding pipelined BDAT transactions costs (``bdat_burst``, issue 10 item 1).

BDAT has no 354, so the only proof that the replies of pipelined BDAT
transactions were in step is the queue of expected replies draining. The
engine therefore sends at most ``bdat_burst`` unproven BDAT transactions,
then waits for the drain. This measures ``lmtpfast bench`` (pipelined, a
window of 32 transactions per connection, the worst case for the bound)
against ``lmtpfast sink`` over a unix socket for several bursts, each cell
the median of ``--repeat`` runs in fresh processes, the sink in its own::

    python bench/bdat_burst.py                       # bursts 1 2 4 8 16 32 and unbounded
    python bench/bdat_burst.py --bursts 4 8 --baseline /path/to/old/checkout

``unbounded`` is this checkout with a burst too large to bind (the holding
of transactions until proven still applies); ``--baseline`` adds a checkout
without either (the code before the change) measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import asyncio, functools, json, sys
burst, dest, msgs, conns, rcpts, size = sys.argv[1:7]
if burst != "-":
    from lmtpfast import _session, proto
    if hasattr(_session, "Connection"):  # a checkout from before the engine parameter
        _session.Connection = functools.partial(_session.Connection, bdat_burst=int(burst))
    else:  # the engine every session of this process gets, with the burst set
        eng = proto.get_engine()
        proto._ENGINES[eng.name] = eng._replace(
            Connection=functools.partial(eng.Connection, bdat_burst=int(burst)))
try:
    from lmtpfast.cli._loadgen import BenchConfig, run_bench
except ImportError:  # a checkout from before the layout commit
    from lmtpfast.loadgen import BenchConfig, run_bench
import uvloop
cfg = BenchConfig(server=dest, messages=int(msgs), connections=int(conns),
                  recipients=int(rcpts), size=int(size))
with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
    report = runner.run(run_bench(cfg))
assert report.chunking, "the sink must offer CHUNKING"
assert report.messages == int(msgs) and not report.errors, report.errors
print(json.dumps({"rate": report.messages_per_second, "cpu_us": report.cpu_per_message_us}))
"""


def run_child(tree: Path, burst: str, dest: str, msgs: int, conns: int, rcpts: int,
              size: int) -> tuple[float, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", CHILD, burst, dest, str(msgs), str(conns),
                          str(rcpts), str(size)], capture_output=True, env=env, timeout=600,
                         check=False, cwd=tree)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.decode()[-800:])
    data = json.loads(out.stdout)
    return data["rate"], data["cpu_us"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bursts", nargs="+", default=["1", "2", "4", "8", "16", "32", "unbounded"])
    ap.add_argument("--baseline", type=Path, help="a checkout without the bound, measured too")
    ap.add_argument("--messages", type=int, default=30_000)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--recipients", type=int, default=1)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lmtpfast-burst-"))
    ready = work / "ready"
    sink = subprocess.Popen(
        [sys.executable, "-m", "lmtpfast", "sink", "--listen", f"unix:{work}/sink",
         "--ready-file", str(ready)], env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if ready.exists():
                break
            time.sleep(0.05)
        dest = ready.read_text().split()[0]
        rows: list[tuple[str, Path, str]] = [
            (b, ROOT, "1000000000" if b == "unbounded" else b) for b in args.bursts]
        if args.baseline is not None:
            rows.append(("baseline (no hold, no bound)", args.baseline, "-"))
        print(f"# lmtpfast bench -> lmtpfast sink (unix, BDAT), {args.connections} connections x "
              f"window 32, {args.recipients} rcpt, {args.size} B, {args.messages} messages; "
              f"median of {args.repeat}; {os.cpu_count()} CPUs; load "
              f"{os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M')}")
        print("| bdat_burst | msg/s | client us/msg |")
        print("|---|---|---|")
        results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in rows}
        for _ in range(args.repeat):  # interleaved, so drift hits every row alike
            for name, tree, burst in rows:
                results[name].append(run_child(tree, burst, dest, args.messages,
                                               args.connections, args.recipients, args.size))
        for name, _, _ in rows:
            rate = statistics.median(r for r, _ in results[name])
            cpu = statistics.median(c for _, c in results[name])
            print(f"| {name} | {rate:,.0f} | {cpu:.1f} |", flush=True)
    finally:
        sink.terminate()
        sink.wait(10)


if __name__ == "__main__":
    main()
