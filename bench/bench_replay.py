"""Replay benchmarks: flat memory whatever the spool size, and messages/s beside smtp-source.

    python bench/bench_replay.py                       # everything (root; Dovecot + Postfix tools)
    python bench/bench_replay.py --only memory         # peak RSS, 10,000 vs 200,000 messages
    python bench/bench_replay.py --only rate --messages 100000
    python bench/bench_replay.py --only big             # 3 messages of 200 MiB at once: peak RSS

Memory: a spool of N one-recipient messages is replayed by ``python -m
lmtpfast replay --once`` into ``smtp-sink -L``; the peak RSS of that process
(``ru_maxrss`` from ``wait4``) is printed for the small and the large spool.

Rate: N messages of ``--size`` bytes, one recipient each, replayed from a
spool into ``smtp-sink -L`` and into Dovecot (unix sockets), beside Postfix's
``smtp-source -L`` sending the same number of messages of the same size
straight to the same servers (no spool: the raw client rate). Wall-clock
time of the whole command, start-up included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmtpfast._testing.dovecot import TempDovecot
from lmtpfast._testing.postfix import SmtpSink, run_smtp_source
from lmtpfast._testing.spool import queued_count
from lmtpfast.spool import Spool


def make_spool(where: Path, count: int, size: int, rcpt: str) -> Spool:
    spool = Spool(where, create=True)
    body = b"x" * max(0, size - 120)
    for i in range(count):
        msg = (b"From: bench@example.org\r\nSubject: bench\r\nMessage-ID: <%d@bench>\r\n\r\n" % i
               + body + b"\r\n")
        spool.enqueue(msg, "bench@example.org", [rcpt], fsync=False)
    spool.sync()
    return spool


def replay(spool: Spool, dest: str, *, concurrency: int,
           connections: int) -> tuple[float, int, int]:
    """Run the CLI once; (seconds, exit status, peak RSS in KiB)."""
    cmd = [sys.executable, "-m", "lmtpfast", "replay", str(spool.path), "--server", dest,
           "--once", "-q", "--concurrency", str(concurrency), "--connections", str(connections)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return elapsed, proc.returncode, usage.ru_maxrss


def memory(args: argparse.Namespace, base: Path) -> None:
    print(f"== peak RSS of `lmtpfast replay --once` into smtp-sink -L ({args.size} B messages)")
    rows = []
    with SmtpSink() as sink:
        for count in (args.memory_small, args.memory_large):
            t0 = time.perf_counter()
            spool = make_spool(base / f"mem{count}", count, args.size, "user@example.com")
            made = time.perf_counter() - t0
            secs, rc, rss = replay(spool, sink.destination, concurrency=args.concurrency,
                                   connections=args.connections)
            left = spool.count()
            rows.append((count, rss, secs, rc))
            print(f"{count:>9,} messages: peak RSS {rss / 1024:7.1f} MiB, replay {secs:6.1f} s "
                  f"({count / secs:8,.0f} msg/s), exit {rc}, left {left['incoming']}; "
                  f"spool made in {made:.1f} s")
            shutil.rmtree(spool.path)
    (small, rs, _, _), (large, rl, _, _) = rows
    print(f"difference: {(rl - rs) / 1024:+.1f} MiB for {large // small}x the messages")


def _status_kib(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in text.splitlines())
            if k in ("VmHWM", "RssAnon", "RssFile")}


_BIG_SPOOL = """
import sys
from lmtpfast.spool import Spool
spool = Spool(sys.argv[1], create=True)
line = b"y" * 998 + b"\\r\\n"
body = line * (int(sys.argv[3]) * 1024 * 1024 // len(line))
for i in range(int(sys.argv[2])):
    spool.enqueue(b"Subject: big %d\\r\\n\\r\\n" % i + body, "bench@example.org",
                  ["user@example.com"], fsync=False)
"""


def big(args: argparse.Namespace, base: Path) -> None:
    """Peak RSS of replaying a few large messages at once (they must stream, not be held)."""
    n, mib = args.big_count, args.big_mib
    print(f"== peak RSS of `lmtpfast replay --once --concurrency {n}` of {n} messages of "
          f"{mib} MiB into `lmtpfast sink --max-size 0` (unix socket, discarding)")
    sock, ready = base / "big.sock", base / "big.ready"
    sink = subprocess.Popen([sys.executable, "-m", "lmtpfast", "sink", "--listen", f"unix:{sock}",
                             "--max-size", "0", "--ready-file", str(ready), "--quiet"])
    try:
        while not ready.exists():
            assert sink.poll() is None, "the sink did not start"
            time.sleep(0.02)
        # The store (converted from the directory spool by the replay itself,
        # a streamed copy inside the measured peak), then the directory spool as it is.
        for prefix, what in (("", "store (converted first)"), ("dir:", "directory spool")):
            where = base / f"big{prefix.rstrip(':')}"
            # Written by a child: this process stays small, and ru_maxrss of the replay
            # (which also counts what a child was when forked, before exec) means the replay.
            subprocess.run([sys.executable, "-c", _BIG_SPOOL, str(where), str(n), str(mib)],
                           check=True)
            cmd = [sys.executable, "-m", "lmtpfast", "replay", f"{prefix}{where}", "--server",
                   f"unix:{sock}", "--once", "-q", "--concurrency", str(n)]
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
            peak: dict[str, int] = {}
            # Sample anonymous and file-backed RSS while it runs (VmHWM counts both).
            while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                for k, v in _status_kib(proc.pid).items():
                    peak[k] = max(peak.get(k, 0), v)
                time.sleep(0.01)
            _, status, usage = os.wait4(proc.pid, 0)
            secs = time.perf_counter() - start
            anon, filed = peak.get("RssAnon", 0) / 1024, peak.get("RssFile", 0) / 1024
            print(f"{what}: peak RSS: ru_maxrss {usage.ru_maxrss / 1024:.0f} MiB, VmHWM "
                  f"{peak.get('VmHWM', 0) / 1024:.0f} MiB; sampled every 10 ms: anonymous "
                  f"{anon:.0f} MiB, file-backed {filed:.0f} MiB; {secs:.1f} s, "
                  f"exit {os.waitstatus_to_exitcode(status)}, left {queued_count(where)}")
            shutil.rmtree(where)
    finally:
        sink.terminate()
        sink.wait()


def rate(args: argparse.Namespace, base: Path) -> None:
    n, size = args.messages, args.size
    print(f"== {n:,} messages of {size} B, 1 recipient, unix sockets "
          f"(replay: --concurrency {args.concurrency} --connections {args.connections}; "
          f"smtp-source: -s {args.sessions})")
    template = base / "template"
    t0 = time.perf_counter()
    make_spool(template, n, size, "alice@example.com")
    print(f"spool of {n:,} made in {time.perf_counter() - t0:.1f} s (enqueue without fsync)")

    def fresh(name: str) -> Spool:
        target = base / name
        shutil.copytree(template, target)
        return Spool(target)

    results: list[tuple[str, float]] = []
    with SmtpSink() as sink:
        secs, rc, _ = replay(fresh("r1"), sink.destination, concurrency=args.concurrency,
                             connections=args.connections)
        results.append(("lmtpfast replay -> smtp-sink -L", n / secs))
        print(f"lmtpfast replay -> smtp-sink -L: {n / secs:9,.0f} msg/s ({secs:.1f} s, exit {rc})")
        src = run_smtp_source(sink.destination, messages=n, sessions=args.sessions, size=size,
                              timeout=600)
        results.append(("smtp-source -L -> smtp-sink -L", n / src.elapsed))
        print(f"smtp-source -L  -> smtp-sink -L: {n / src.elapsed:9,.0f} msg/s "
              f"({src.elapsed:.1f} s, exit {src.returncode})")
    if args.skip_dovecot:
        return
    dn = args.dovecot_messages or n
    with TempDovecot() as dv:
        spool = fresh("r2") if dn == n else make_spool(base / "r2", dn, size, "alice@example.com")
        secs, rc, _ = replay(spool, dv.destination_unix, concurrency=args.concurrency,
                             connections=args.connections)
        print(f"lmtpfast replay -> Dovecot:      {dn / secs:9,.0f} msg/s ({secs:.1f} s, exit {rc}, "
              f"stored {len(dv.message_paths('alice')):,})")
        dv.reset_mail()
        src = run_smtp_source(dv.destination_unix, messages=dn, sessions=args.sessions, size=size,
                              extra_args=("-t", "alice@example.com", "-f", "bench@example.org"),
                              timeout=900)
        print(f"smtp-source -L  -> Dovecot:      {dn / src.elapsed:9,.0f} msg/s "
              f"({src.elapsed:.1f} s, exit {src.returncode}, "
              f"stored {len(dv.message_paths('alice')):,})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", choices=("memory", "rate", "big"))
    p.add_argument("--big-count", type=int, default=3, help="--only big: messages")
    p.add_argument("--big-mib", type=int, default=200, help="--only big: MiB each")
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--dovecot-messages", type=int, default=0, help="default: --messages")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--memory-small", type=int, default=10_000)
    p.add_argument("--memory-large", type=int, default=200_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--sessions", type=int, default=8, help="smtp-source -s")
    p.add_argument("--skip-dovecot", action="store_true")
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="lmtpfast-bench-replay-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        if args.only in (None, "memory"):
            memory(args, base)
        if args.only in (None, "big"):
            big(args, base)
        if args.only in (None, "rate"):
            rate(args, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
