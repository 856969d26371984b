"""The queue against Postfix's own, in one run: enqueue and drain, on a spool already on disk.

    python bench/bench_queue.py                        # 20,000 messages (root; Postfix installed)
    python bench/bench_queue.py --messages 100000 --repeat 3

Every figure is wall-clock time of the whole command, start-up included, for
N messages of ``--size`` bytes with one recipient each, in the same run:

enqueue
    ``lmtpfast enqueue SPOOL --mbox FILE`` (the embedded store, group commit:
    durable when the command exits) beside Postfix's ``smtpd -> cleanup``:
    ``smtp-source -s 8`` into a private Postfix whose cleanup puts every
    message on hold (``header_checks`` HOLD), so each 250 after DATA means
    the queue file is on disk, and nothing is delivered yet.

drain (after ``sync``; nothing is dropped from the page cache: the spool is
*on disk*, as it is after an enqueue minutes before -- unlinking a file on
disk is what costs on this machine's ext4)
    ``lmtpfast replay SPOOL --server unix:SINK --once`` into ``smtp-sink -L``,
    beside Postfix's queue manager + lmtp(8) draining the same N messages
    into the same smtp-sink (``postsuper -H ALL``, ``postqueue -f``, timed
    until the queue is empty), and ``smtp-source -L -s 8`` sending N messages
    straight to the sink (no queue: the raw client rate).

Ratios printed: replay / Postfix drain (target >= 10x), replay / smtp-source
(target >= 0.75x), enqueue rate (target >= 10,000 msg/s) and enqueue /
Postfix smtpd->cleanup (target > 1x). ``--profile`` also runs the replay
under py-spy and prints where its time goes.

The lmtpfast commands run as an installed lmtpfast does, from byte-compiled
modules: the checkout's modules are compiled first (``compileall``, into
their ``__pycache__`` folders, which git ignores). With ``--from-source`` a
checkout under PYTHONDONTWRITEBYTECODE=1 (as on this machine) compiles every
one of its modules at every start: about 300 million instructions, 60-80 ms,
more per command here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmtpfast._testing._procs import guarded
from lmtpfast._testing.postfix import SmtpSink, _require_tool, postfix_env, run_smtp_source
from lmtpfast._testing.postfix_mta import TempPostfix

DOMAIN = "example.com"
RCPT = f"alice@{DOMAIN}"
SENDER = "bench@example.org"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmtpfast", *args]


def byte_compiled() -> str:
    """Byte-compile the lmtpfast being measured (its __pycache__ folders, ignored by git),
    as installing it does: the commands then start as an installed lmtpfast. Returns the
    condition, for the report."""
    import lmtpfast

    # compileall writes .pyc whatever PYTHONDONTWRITEBYTECODE says; Python reads them.
    # Not into a PYTHONPYCACHEPREFIX: with one set, Python looks there for every module's
    # .pyc, the standard library's too, and compiles all of those from source at each
    # start (import argparse, sqlite3, secrets: 1,360 million instructions instead of 174).
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.dirname(lmtpfast.__file__)],
                   check=True, stdout=subprocess.DEVNULL)
    return "byte-compiled (as installed)"


#: CPU seconds (user + system) of the last command _timed() ran.
LAST_CPU = [0.0]


def _timed(cmd: list[str], *, timeout: float = 1800) -> tuple[float, int]:
    """Wall seconds and exit status of *cmd*; its CPU time goes to LAST_CPU."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait(timeout=timeout)
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    LAST_CPU[0] = usage.ru_utime + usage.ru_stime
    return time.perf_counter() - start, proc.returncode


def session_cpu(sid: int) -> dict[int, float]:
    """CPU seconds so far of every process in session *sid* (a private Postfix's daemons)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # After "pid (comm)": state ppid pgrp session ... utime(12) stime(13).
        if int(fields[3]) == sid:
            out[int(name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_since(sid: int, before: dict[int, float]) -> float:
    """CPU the session's processes used since *before* (processes that exited meanwhile are
    not counted: Postfix's daemons here live through a round)."""
    now = session_cpu(sid)
    return sum(v - before.get(pid, 0.0) for pid, v in now.items())


def write_mbox(path: Path, n: int, size: int) -> None:
    body = b"x" * max(0, size - 160) + b"\n"
    with open(path, "wb") as f:
        for i in range(n):
            f.write(b"From bench@example.org Thu Jan  1 00:00:00 2026\n"
                    b"From: bench@example.org\nTo: alice@example.com\nSubject: bench %d\n"
                    b"Message-ID: <%d@bench.lmtpfast>\n\n" % (i, i) + body + b"\n")


def lmtpfast_enqueue(spool: Path, mbox: Path) -> tuple[float, int]:
    return _timed(_cli("enqueue", str(spool), "--mbox", str(mbox), "--from", SENDER,
                       "--rcpt", RCPT, "-q"))


def lmtpfast_replay(spool: Path, dest: str, args: argparse.Namespace, *, profile: Path | None
                    = None) -> tuple[float, int]:
    cmd = _cli("replay", str(spool), "--server", dest, "--once", "-q", "--concurrency",
               str(args.concurrency), "--connections", str(args.connections))
    if profile is not None:
        cmd = ["py-spy", "record", "-f", "raw", "-r", "200", "-o", str(profile), "--", *cmd]
    return _timed(cmd)


def smtp_source_smtp(port: int, n: int, size: int, sessions: int) -> float:
    """``smtp-source`` (SMTP, not LMTP) into Postfix's smtpd: time to get every 250."""
    binary = _require_tool("smtp-source")
    cmd, _ = guarded([str(binary), "-d", "-s", str(sessions), "-m", str(n), "-l", str(size),
                      "-f", SENDER, "-t", RCPT, f"127.0.0.1:{port}"], on_parent_death="KILL")
    start = time.perf_counter()
    subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=postfix_env(),
                   check=True, timeout=1800)
    return time.perf_counter() - start


def queued(mta: TempPostfix) -> int:
    return sum(len(v) for v in mta.queue_files().values())


def wait_queue(mta: TempPostfix, until: int, *, timeout: float = 1800) -> float:
    """Poll the queue folders (cheap) until at most *until* are left; returns the time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = queued(mta)
        if n <= until:
            return time.perf_counter()
        time.sleep(0.02)
    raise TimeoutError(f"Postfix queue still at {queued(mta)} after {timeout} s")


def postfix_round(sink: SmtpSink, n: int, args: argparse.Namespace
                  ) -> tuple[float, float, float, float]:
    """Seconds and Postfix's own CPU seconds (its daemons, not smtp-source) of smtpd->cleanup
    for n held messages, and of the qmgr+lmtp(8) drain: (enq, enq_cpu, drain, drain_cpu)."""
    mta = TempPostfix()  # configured first: entering starts it
    checks = mta.config_dir / "header_checks"
    checks.write_text("/^Received: / HOLD\n")  # smtpd adds one to every message
    mta.set_main("header_checks", f"regexp:{checks}")
    mta.add_lmtp_transport("tolmtp")
    mta.route(DOMAIN, f"tolmtp:{sink.destination}")
    with mta:
        sid = mta.pid
        cpu0 = session_cpu(sid)
        enqueue = smtp_source_smtp(mta.port, n, args.size, args.sessions)
        enqueue_cpu = cpu_since(sid, cpu0)
        # smtp-source returns once every 250 came: each queue file is on disk.
        hold = len(mta.queue_files(["hold"]).get("hold", []))
        if hold != n:
            raise RuntimeError(f"expected {n} held messages, found {hold}")
        subprocess.run(["sync"], check=True)
        cpu0 = session_cpu(sid)
        start = time.perf_counter()
        mta.postsuper("-H", "ALL")
        mta.flush()
        end = wait_queue(mta, 0)
        return enqueue, enqueue_cpu, end - start, cpu_since(sid, cpu0)


def hotspots(raw: Path, top: int = 18) -> list[str]:
    from collections import Counter

    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        total += int(count)
        own[stack.split(";")[-1]] += int(count)
    return [f"{c / total * 100:5.1f}%  {f}" for f, c in own.most_common(top)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=1, help="rounds; medians are printed")
    p.add_argument("--concurrency", type=int, default=256, help="replay --concurrency")
    p.add_argument("--connections", type=int, default=8, help="replay --connections")
    p.add_argument("--sessions", type=int, default=8, help="smtp-source -s")
    p.add_argument("--skip-postfix", action="store_true")
    p.add_argument("--profile", action="store_true", help="py-spy the last replay")
    p.add_argument("--from-source", action="store_true",
                   help="run lmtpfast without byte-compiling it first (a checkout under "
                   "PYTHONDONTWRITEBYTECODE compiles every module at every start)")
    args = p.parse_args()
    n = args.messages
    base = Path(tempfile.mkdtemp(prefix="lmtpfast-bench-queue-", dir="/var/tmp"))
    base.chmod(0o755)
    rows: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    try:
        mbox = base / "in.mbox"
        write_mbox(mbox, n, args.size)
        code = "from source" if args.from_source else byte_compiled()
        print(f"== {n:,} messages of {args.size} B, 1 recipient; replay --concurrency "
              f"{args.concurrency} --connections {args.connections}; smtp-source -s "
              f"{args.sessions}; lmtpfast {code}; load average at start "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        with SmtpSink() as sink:
            for r in range(args.repeat):
                spool = base / f"spool{r}"
                secs, rc = lmtpfast_enqueue(spool, mbox)
                rows.setdefault("lmtpfast enqueue (durable)", []).append(n / secs)
                cpu.setdefault("lmtpfast enqueue (durable)", []).append(LAST_CPU[0] / n * 1e6)
                print(f"[{r}] lmtpfast enqueue: {n / secs:9,.0f} msg/s ({secs:.2f} s, "
                      f"CPU {LAST_CPU[0]:.2f} s, exit {rc})", flush=True)
                subprocess.run(["sync"], check=True)
                prof = base / "replay.spy" if args.profile and r == args.repeat - 1 else None
                secs, rc = lmtpfast_replay(spool, sink.destination, args, profile=prof)
                rows.setdefault("lmtpfast replay", []).append(n / secs)
                cpu.setdefault("lmtpfast replay", []).append(LAST_CPU[0] / n * 1e6)
                print(f"[{r}] lmtpfast replay:  {n / secs:9,.0f} msg/s ({secs:.2f} s, "
                      f"CPU {LAST_CPU[0]:.2f} s, exit {rc})", flush=True)
                src = run_smtp_source(sink.destination, messages=n, sessions=args.sessions,
                                      size=args.size, timeout=1800)
                rows.setdefault("smtp-source -L (raw)", []).append(n / src.elapsed)
                print(f"[{r}] smtp-source -L:   {n / src.elapsed:9,.0f} msg/s "
                      f"({src.elapsed:.2f} s)", flush=True)
                if not args.skip_postfix:
                    enq, enq_cpu, drain, drain_cpu = postfix_round(sink, n, args)
                    rows.setdefault("Postfix smtpd->cleanup (held)", []).append(n / enq)
                    rows.setdefault("Postfix qmgr+lmtp(8) drain", []).append(n / drain)
                    cpu.setdefault("Postfix smtpd->cleanup (held)", []).append(enq_cpu / n * 1e6)
                    cpu.setdefault("Postfix qmgr+lmtp(8) drain", []).append(drain_cpu / n * 1e6)
                    print(f"[{r}] Postfix smtpd->cleanup: {n / enq:9,.0f} msg/s ({enq:.2f} s, "
                          f"daemons' CPU {enq_cpu:.2f} s); qmgr+lmtp drain: {n / drain:9,.0f} "
                          f"msg/s ({drain:.2f} s, daemons' CPU {drain_cpu:.2f} s)", flush=True)
                shutil.rmtree(spool, ignore_errors=True)
                if prof is not None and prof.exists():
                    print("where the replay's time goes (py-spy, own time per frame):")
                    for line in hotspots(prof):
                        print("   " + line)
        med = {k: statistics.median(v) for k, v in rows.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        print(f"\n== medians of {args.repeat} round(s): msg/s (wall clock); CPU us/msg "
              f"(lmtpfast: the command; Postfix: its daemons); load average now "
              f"{os.getloadavg()[0]:.1f}")
        for k, v in med.items():
            c = f"{med_cpu[k]:10,.0f}" if k in med_cpu else ""
            print(f"{k:<32} {v:10,.0f} {c}")
        print()
        rep = med["lmtpfast replay"]
        print(f"replay / smtp-source -L:            {rep / med['smtp-source -L (raw)']:6.2f}x "
              "(target >= 0.75x)")
        print(f"enqueue:                            {med['lmtpfast enqueue (durable)']:8,.0f} "
              "msg/s (target >= 10,000)")
        if not args.skip_postfix:
            print(f"replay / Postfix qmgr+lmtp drain:   "
                  f"{rep / med['Postfix qmgr+lmtp(8) drain']:6.2f}x (target >= 10x)")
            enq = med["lmtpfast enqueue (durable)"] / med["Postfix smtpd->cleanup (held)"]
            print(f"enqueue / Postfix smtpd->cleanup:   {enq:6.2f}x (target > 1x)")
            d = med_cpu["Postfix qmgr+lmtp(8) drain"] / med_cpu["lmtpfast replay"]
            e = med_cpu["Postfix smtpd->cleanup (held)"] / med_cpu["lmtpfast enqueue (durable)"]
            print(f"CPU per message, Postfix / lmtpfast: drain {d:.2f}x, enqueue {e:.2f}x")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
