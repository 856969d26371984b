"""Soak: many messages through the agent into several `lmtpfast sink` back ends with random faults.

    python bench/soak.py --messages 1000000            # the full soak
    python bench/soak.py --messages 20000 --json out   # a CI-sized one

Several ``lmtpfast sink`` processes (``--backends``, default 4) listen on unix
sockets (offering CHUNKING, so the client sends BDAT; ``--data`` hides it); each injects
about ``--fault-rate`` (default 1%) random faults of
every kind the sink knows (disconnects, resets, 421s, stalls, garbage,
oversized and unsolicited replies, too few final replies, transient
refusals), from fixed seeds so a run can be replayed. One agent routes each
recipient by domain to its back end; messages have 1-3 recipients spread
over the back ends, so one ``deliver()`` often fans out to several pools.
``--concurrency`` deliveries run at once.

What it checks (exit status 1 if any check fails):

* accounted: every recipient of every message has exactly one result, so
  delivered + failed (permanent) + undecided (transient) = sent;
* none lost: per back end, the recipients the agent reports delivered are
  at most the 2xx final replies the sink sent, and the 2xx replies the
  agent did not see are covered by recipients flagged possibly delivered
  (a server may store a message whose reply the client never got);
* memory flat: RSS sampled through the run; after the first tenth (warm-up)
  it may not grow by more than ``--rss-slack`` MiB, and over the second half
  (runs of 500k messages or more) by more than 1 MiB per 100k messages;
* no fd leak: /proc/self/fd counted before the agent is made and after it
  is closed.

``--retries N`` re-sends the undecided recipients up to N times (what a queue
would do), reporting how many converged.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmtpfast import Agent, PoolSettings, Timeouts, Transport  # noqa: E402

# (command, effect, weight): the fault kinds, each drawn at its share of the rate.
FAULTS: list[tuple[str, str, float]] = [
    ("greeting", "disconnect", 1), ("greeting", "421 4.3.2 Too busy", 1),
    ("greeting", "stall", 0.25),
    ("lhlo", "garbage", 1), ("lhlo", "oversize:9000", 0.5), ("lhlo", "421 4.3.2 Bye", 1),
    ("mail", "421 4.3.2 Going away", 1), ("mail", "disconnect", 1), ("mail", "reset", 1),
    ("mail", "451 4.3.0 Try later", 1),
    ("rcpt", "450 4.2.1 Busy", 2), ("rcpt", "550 5.1.1 No such user", 2),
    ("rcpt", "garbage", 1), ("rcpt", "oversize:9000", 0.5), ("rcpt", "disconnect", 1),
    ("rcpt", "extra", 0.5), ("rcpt", "stall", 0.25),
    ("data", "disconnect", 1), ("data", "421 4.3.2 Going away", 1), ("data", "554 5.3.0 No", 1),
    ("data", "extra", 0.5),
    ("dot", "452 4.2.2 Over quota", 2), ("dot", "550 5.2.2 Mailbox full", 1),
    ("dot", "disconnect", 1), ("dot", "reset", 1), ("dot", "garbage", 1),
    ("dot", "extra", 0.5), ("dot", "stall", 0.25), ("dot", "short:1", 1),
    # Replies lost and the session goes on: with pipelining the next
    # transaction's replies would read as the missing ones (issue 10.1).
    ("dot", "short:1:continue", 0.5), ("dot", "short:0:continue", 0.25),
    ("rset", "disconnect", 0.5), ("quit", "stall", 0.25), ("quit", "garbage", 0.5),
]


def fault_specs(rate: float, seed: int, exclude: tuple[str, ...] = ()) -> list[str]:
    """The sink's --fault specs: about ``rate`` of the commands of each kind misbehave.

    ``exclude`` drops kinds given as ``command:effect`` prefixes (``rcpt:extra``).
    """
    kinds = [(c, e, w) for c, e, w in FAULTS
             if not any(f"{c}:{e}".startswith(x) for x in exclude)]
    total = sum(w for _, _, w in kinds)
    # A message crosses ~6 fault points (greeting/lhlo amortised, mail, rcpt*2,
    # data, dot*2): spread the per-message rate over them.
    specs = []
    for i, (cmd, effect, weight) in enumerate(kinds):
        p = rate * weight / total * (6 if cmd in ("mail", "rcpt", "data", "dot") else 20)
        p = min(max(p, 1e-6), 1.0)
        specs.append(f"{cmd}@rate={p:.6f}:seed={seed * 1000 + i}={effect}")
    return specs


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def fd_count() -> int:
    """Open fds, less libuv's reserved /dev/null (opened once, lazily, by uvloop)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "/dev/null":
                continue
        except OSError:
            continue
        n += 1
    return n


@dataclass
class Report:
    messages: int = 0
    recipients_sent: int = 0
    delivered: int = 0
    failed: int = 0
    undecided: int = 0
    possibly_delivered: int = 0
    results_missing: int = 0
    retried: int = 0
    converged: int = 0
    wall_s: float = 0.0
    rate_msg_s: float = 0.0
    rss_start_mib: float = 0.0
    rss_after_warmup_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_slope_mib_per_100k: float = 0.0
    rss_samples: list[tuple[int, float]] = field(default_factory=list)
    max_rss_mib: float = 0.0
    fds_before: int = 0
    fds_after: int = 0
    faults_fired: int = 0
    sink_2xx: dict[str, int] = field(default_factory=dict)
    agent_delivered: dict[str, int] = field(default_factory=dict)
    agent_possibly: dict[str, int] = field(default_factory=dict)
    stages: dict[str, int] = field(default_factory=dict)
    agent_stats: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def start_sinks(n: int, tmp: Path, rate: float, seed: int, exclude: tuple[str, ...] = (),
                data: bool = False) -> list[tuple[subprocess.Popen[bytes], Path, Path]]:
    sinks = []
    for k in range(n):
        ready, stats = tmp / f"ready{k}", tmp / f"stats{k}.json"
        cmd = [sys.executable, "-m", "lmtpfast", "sink", "--listen", f"unix:{tmp}/s{k}.sock",
               "--ready-file", str(ready), "--stats-json", str(stats), "--quiet",
               "--hostname", f"sink{k}"] + (["--hide", "CHUNKING"] if data else [])
        for spec in fault_specs(rate, seed + k, exclude) if rate > 0 else []:
            cmd += ["--fault", spec]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        sinks.append((subprocess.Popen(cmd, env=env), ready, stats))
    deadline = time.monotonic() + 30
    for proc, ready, _ in sinks:
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"a sink did not start (status {proc.poll()})")
            time.sleep(0.05)
    return sinks


def stop_sinks(sinks: list[tuple[subprocess.Popen[bytes], Path, Path]]) -> list[dict[str, Any]]:
    out = []
    for proc, _, _ in sinks:
        proc.send_signal(signal.SIGTERM)
    for proc, _, stats in sinks:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.append(json.loads(stats.read_text()) if stats.exists() else {})
    return out


def message(i: int, size: int) -> bytes:
    head = (f"From: <soak@example.net>\r\nTo: <rcpt@example.org>\r\nSubject: soak {i}\r\n"
            f"Message-ID: <soak-{i}@example.net>\r\n\r\n")
    body = ("." if i % 7 == 0 else "") + "x" * 70 + "\r\n"
    n = max(1, (size - len(head)) // len(body))
    return (head + body * n).encode()


async def soak(args: argparse.Namespace, tmp: Path, report: Report) -> None:
    backends = args.backends
    timeouts = Timeouts(**{name: args.timeout for name in (
        "connect", "greeting", "lhlo", "mail", "rcpt", "data", "content", "final", "rset",
        "quit", "command")})
    pool = PoolSettings(max_connections=args.connections, connect_backoff=0.05,
                        close_timeout=10.0, probe=args.probe)
    transports = {f"lmtp{k}": Transport(destination=f"unix:{tmp}/s{k}.sock", timeouts=timeouts,
                                        pool=pool)
                  for k in range(backends)}
    tmap = {f"d{k}.example": f"lmtp{k}:" for k in range(backends)}
    rng = random.Random(args.seed)
    bodies = [message(i, args.size) for i in range(64)]
    # A bounded population of mailboxes, as on a real system (and the agent's
    # route cache then reaches its steady state instead of churning).
    mailboxes = [f"user{n}@d{n % backends}.example" for n in range(args.mailboxes)]

    report.fds_before = fd_count()
    report.rss_start_mib = rss_mib()
    agent = Agent(transports=transports, transport_map=tmap)
    delivered: Counter[str] = Counter()
    possibly: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    # Undecided recipients waiting for their retry: (due time, address, body, attempts so far).
    retry_queue: collections.deque[tuple[float, str, int, int]] = collections.deque()
    next_i = 0
    samples = report.rss_samples
    sample_every = max(1, args.messages // 200)
    warmup = args.messages // 10
    t0 = time.monotonic()

    def account(rcpts: list[str], results: list[Any], body: int, attempt: int = 0) -> None:
        if len(results) != len(rcpts) or [r.address for r in results] != rcpts:
            report.results_missing += abs(len(rcpts) - len(results)) or len(rcpts)
            return
        for r in results:
            dest = r.destination or "?"
            if r.delivered:
                report.delivered += 1
                delivered[dest] += 1
                if attempt:
                    report.converged += 1
            elif r.permanent:
                report.failed += 1
            elif attempt < args.retries:
                # What a queue does: try again after a back-off (short here).
                retry_queue.append((time.monotonic() + args.retry_delay, r.address, body,
                                    attempt + 1))
            else:
                report.undecided += 1
            if r.possibly_delivered:
                report.possibly_delivered += 1
                possibly[dest] += 1
            if not r.delivered:
                stages[f"{r.status}/{r.stage}"] += 1

    async def worker() -> None:
        nonlocal next_i
        while next_i < args.messages or retry_queue:
            if (retry_queue and retry_queue[0][0] <= time.monotonic()) or (
                    retry_queue and next_i >= args.messages):
                due, address, body, attempt = retry_queue.popleft()
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
                report.retried += 1
                results = await agent.deliver(bodies[body], sender="soak@example.net",
                                              recipients=[address])
                account([address], results, body, attempt)
                continue
            i = next_i
            next_i += 1
            n = rng.choice((1, 1, 2, 3))
            rcpts = list(dict.fromkeys(rng.choice(mailboxes) for _ in range(n)))
            n = len(rcpts)
            body = i % len(bodies)
            results = await agent.deliver(bodies[body], sender="soak@example.net",
                                          recipients=rcpts)
            report.messages += 1
            report.recipients_sent += n
            account(rcpts, results, body)
            if i % sample_every == 0:
                rss = rss_mib()
                samples.append((i, round(rss, 2)))
                if i >= warmup and not report.rss_after_warmup_mib:
                    report.rss_after_warmup_mib = rss
                report.rss_peak_mib = max(report.rss_peak_mib, rss)
            if args.progress and i and i % args.progress == 0:
                el = time.monotonic() - t0
                print(f"  {i} messages, {i / el:.0f} msg/s, rss {rss_mib():.1f} MiB",
                      file=sys.stderr)

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    report.wall_s = time.monotonic() - t0
    report.rate_msg_s = report.messages / report.wall_s if report.wall_s else 0.0
    after = [(i, r) for i, r in samples if i >= max(warmup, args.messages // 2)]
    if len(after) >= 2:
        # Least-squares slope of RSS over the second half of the run (caches and
        # pools have filled by then): MiB per 100k messages.
        n = len(after)
        mx = sum(i for i, _ in after) / n
        my = sum(r for _, r in after) / n
        var = sum((i - mx) ** 2 for i, _ in after)
        if var:
            report.rss_slope_mib_per_100k = round(
                sum((i - mx) * (r - my) for i, r in after) / var * 100_000, 3)

    stats = agent.stats
    report.agent_stats = asdict(stats)
    await agent.close(30)
    await asyncio.sleep(0.2)  # let closed transports release their sockets
    report.rss_end_mib = rss_mib()
    report.fds_after = fd_count()
    report.agent_delivered = dict(delivered)
    report.agent_possibly = dict(possibly)
    report.stages = dict(stages.most_common())


def check(report: Report, sink_stats: list[dict[str, Any]], tmp: Path,
          args: argparse.Namespace) -> None:
    p = report.problems
    if report.delivered + report.failed + report.undecided != report.recipients_sent:
        p.append(f"not accounted: {report.delivered}+{report.failed}+{report.undecided} "
                 f"!= {report.recipients_sent}")
    if report.results_missing:
        p.append(f"{report.results_missing} recipients without their own result")
    if report.messages != args.messages:
        p.append(f"only {report.messages} of {args.messages} deliveries returned")
    for k, st in enumerate(sink_stats):
        dest = f"unix:{tmp}/s{k}.sock"
        sent_2xx = sum(v for code, v in st.get("final_replies", {}).items() if str(code)[0] == "2")
        report.sink_2xx[dest] = sent_2xx
        report.faults_fired += st.get("faults_fired", 0)
        got = report.agent_delivered.get(dest, 0)
        maybe = report.agent_possibly.get(dest, 0)
        if got > sent_2xx:
            p.append(f"LOST: back end {k}: {got} recipients reported delivered, but the sink "
                     f"sent only {sent_2xx} 2xx final replies")
        if sent_2xx - got > maybe:
            p.append(f"back end {k}: {sent_2xx - got} 2xx final replies unseen by the agent, "
                     f"only {maybe} recipients flagged possibly delivered")
    if report.rss_after_warmup_mib and (
            report.rss_end_mib - report.rss_after_warmup_mib > args.rss_slack):
        p.append(f"memory grew {report.rss_end_mib - report.rss_after_warmup_mib:.1f} MiB after "
                 f"warm-up (slack {args.rss_slack} MiB)")
    if report.messages >= 500_000 and report.rss_slope_mib_per_100k > 1.0:
        p.append(f"memory keeps growing: {report.rss_slope_mib_per_100k} MiB per 100k messages")
    if report.fds_after > report.fds_before:
        p.append(f"fd leak: {report.fds_before} open before, {report.fds_after} after")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--backends", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--connections", type=int, default=4, help="per back end")
    ap.add_argument("--fault-rate", type=float, default=0.01)
    ap.add_argument("--size", type=int, default=1024, help="message size in bytes")
    ap.add_argument("--timeout", type=float, default=1.0, help="every stage timeout (s)")
    ap.add_argument("--probe", choices=("none", "rset", "noop"), default="none")
    ap.add_argument("--retries", type=int, default=3)
    ap.add_argument("--retry-delay", type=float, default=0.5, help="seconds before a retry")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mailboxes", type=int, default=20000,
                    help="distinct recipient addresses (spread over the back ends)")
    ap.add_argument("--rss-slack", type=float, default=32.0, help="MiB")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--progress", type=int, default=0, help="print every N messages")
    ap.add_argument("--data", action="store_true",
                    help="sinks without CHUNKING, so the client uses DATA (default: BDAT)")
    ap.add_argument("--exclude", action="append", default=[], metavar="CMD:EFFECT",
                    help="leave out a fault kind, e.g. rcpt:extra (repeatable)")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="lmtpsoak-", dir="/tmp"))
    report = Report()
    sinks = start_sinks(args.backends, tmp, args.fault_rate, args.seed, tuple(args.exclude),
                        args.data)
    try:
        if args.loop == "uvloop":
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        else:
            runner = asyncio.Runner()
        with runner:
            runner.run(soak(args, tmp, report))
    finally:
        sink_stats = stop_sinks(sinks)
    report.max_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    check(report, sink_stats, tmp, args)
    shutil.rmtree(tmp, ignore_errors=True)

    out = asdict(report)
    text = json.dumps(out, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(f"messages {report.messages}  recipients {report.recipients_sent}  "
          f"delivered {report.delivered}  failed {report.failed}  undecided {report.undecided}  "
          f"(possibly delivered {report.possibly_delivered}; retried {report.retried}, "
          f"converged {report.converged})")
    print(f"wall {report.wall_s:.1f}s  rate {report.rate_msg_s:.0f} msg/s  faults fired "
          f"{report.faults_fired}  rss start/warm/peak/end {report.rss_start_mib:.1f}/"
          f"{report.rss_after_warmup_mib:.1f}/{report.rss_peak_mib:.1f}/"
          f"{report.rss_end_mib:.1f} MiB"
          f" (slope {report.rss_slope_mib_per_100k} MiB/100k msgs)"
          f"  fds {report.fds_before}->{report.fds_after}")
    print("content sent with", "DATA" if args.data else "BDAT (CHUNKING offered)")
    if args.exclude:
        print("fault kinds left out:", ", ".join(args.exclude))
    for problem in report.problems:
        print("PROBLEM:", problem)
    print("OK" if not report.problems else "FAILED")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
