"""How fast the lmtpfast sink takes mail, beside Postfix's C smtp-sink, over a unix socket.

    python bench/sink_speed.py [--messages N] [--sessions S] [--size BYTES]
                               [--recipients 1,10] [--repeat 3] [--only ROWS]

Rows (``--only`` takes a comma-separated subset):

* ``source``: Postfix's ``smtp-source -L -d -s S -m N -l BYTES -r R`` (one
  command per round trip, no pipelining) into ``lmtpfast sink`` with the
  compiled server engine, with the pure-Python engine
  (``LMTPFAST_NO_EXTENSIONS=1``), and into Postfix's ``smtp-sink -L``, for
  each ``R`` of ``--recipients``. The target: lmtpfast sink >= 1.0x smtp-sink.
* ``bench``: ``lmtpfast bench`` (pipelined, ``--connections S``) into
  ``lmtpfast sink``, with BDAT (the sink offers CHUNKING) and with DATA.
  The CPU columns show which side's core saturates first.
* ``pipelined`` / ``blast``: two small Python drivers: one round trip per
  message as the lmtpfast client does it, and every message written without
  waiting for 354 (not a legal client: the sink's own ceiling).

Every lmtpfast-sink figure is checked against the sink's own transaction
counter. CPU per message is read from ``/proc/PID/stat`` for the sink and
from ``getrusage(RUSAGE_CHILDREN)`` (or the bench's own report) for the
driver. Rates are medians of ``--repeat`` rounds, the rows of one round run
one after another, so the ratios compare runs minutes apart at most.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmtpfast._testing.postfix import postfix_env, smtp_tool  # noqa: E402

SMTP_SOURCE = smtp_tool("smtp-source") or Path("/usr/sbin/smtp-source")
SMTP_SINK = smtp_tool("smtp-sink") or Path("/usr/sbin/smtp-sink")
POSTFIX_ENV = postfix_env()
TICK = os.sysconf("SC_CLK_TCK")
#: ``taskset -c CPU`` before every server and driver command (``--pin``), or nothing.
PIN: list[str] = []


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class RunningSink:
    """``lmtpfast sink`` in a subprocess, stopped with SIGTERM to read its stats."""

    def __init__(self, workdir: Path, loop: str, engine: str) -> None:
        self.sock = workdir / "sink.sock"
        self.stats_file = workdir / "stats.json"
        ready = workdir / "ready"
        for f in (ready, self.stats_file):
            f.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("LMTPFAST_NO_EXTENSIONS", None)
        if engine == "python":
            env["LMTPFAST_NO_EXTENSIONS"] = "1"
        self.proc = subprocess.Popen(
            [
                *PIN,
                sys.executable,
                "-m",
                "lmtpfast",
                "sink",
                "--listen",
                f"unix:{self.sock}",
                "--loop",
                loop,
                "--quiet",
                "--ready-file",
                str(ready),
                "--stats-json",
                str(self.stats_file),
                "--duration",
                "900",
            ],
            env=env,
        )
        deadline = time.monotonic() + 20
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the sink did not start")
            time.sleep(0.02)
        self.cpu0 = proc_cpu(self.proc.pid)

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid) - self.cpu0

    def stop(self) -> dict[str, object]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        stats: dict[str, object] = json.loads(self.stats_file.read_text())
        return stats


class PostfixSink:
    """Postfix's ``smtp-sink -L`` on a unix socket."""

    def __init__(self, workdir: Path) -> None:
        self.sock = workdir / "pf.sock"
        self.sock.unlink(missing_ok=True)  # a stale one would look ready too early
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(
            [*PIN, str(SMTP_SINK), *user, "-L", "-c", f"unix:{self.sock}", "256"],
            env=POSTFIX_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("smtp-sink did not start")
            time.sleep(0.02)
        self.cpu0 = proc_cpu(self.proc.pid)

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid) - self.cpu0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def body_of(size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    head = b"Subject: sink benchmark\r\n\r\n"
    n = max(0, size - len(head))
    return head + (line * (n // len(line) + 1))[: n - 2] + b"\r\n" if n >= 2 else head


async def drive(
    path: str, messages: int, sessions: int, size: int, rcpts: int, blast: bool
) -> None:
    """The Python drivers: pipelined (one round trip per message) or blast."""
    body = body_of(size)
    group = (
        b"MAIL FROM:<bench@example.com>\r\n"
        + b"".join(b"RCPT TO:<user%d@example.com>\r\n" % i for i in range(rcpts))
        + b"DATA\r\n"
    )
    per_session = [messages // sessions + (i < messages % sessions) for i in range(sessions)]
    head = 2 + rcpts  # MAIL, RCPTs, 354

    async def one(n: int) -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 10)
        await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
        writer.write(b"LHLO bench\r\n")
        while not (await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)).startswith(b"250 "):
            pass
        expected = (head + rcpts) * n + 1  # per message: envelope, 354, finals; QUIT
        if blast:
            writer.write((group + body + b".\r\n") * n + b"QUIT\r\n")
            seen = 0
            while seen < expected:
                chunk = await asyncio.wait_for(reader.read(1 << 20), 30)
                if not chunk:
                    raise ConnectionError("sink closed early")
                seen += chunk.count(b"\n")
        else:
            writer.write(group)
            seen, want = 0, head
            for i in range(n):
                while seen < want:  # 354 (and the previous message's final replies)
                    chunk = await asyncio.wait_for(reader.read(65536), 30)
                    if not chunk:
                        raise ConnectionError("sink closed early")
                    seen += chunk.count(b"\n")
                last = i == n - 1
                writer.write(body + b".\r\n" + (b"QUIT\r\n" if last else group))
                want += rcpts + (0 if last else head)
            while seen < expected:
                chunk = await asyncio.wait_for(reader.read(65536), 30)
                if not chunk:
                    break
                seen += chunk.count(b"\n")
        writer.close()

    await asyncio.gather(*(one(n) for n in per_session if n))


class Row:
    def __init__(self, name: str) -> None:
        self.name = name
        self.rates: list[float] = []
        self.server_us: list[float] = []
        self.driver_us: list[float] = []
        self.counted: set[object] = set()

    def add(
        self, n: int, dt: float, server_cpu: float, driver_cpu: float | None, counted: object
    ) -> None:
        self.rates.append(n / dt)
        self.server_us.append(server_cpu / n * 1e6)
        if driver_cpu is not None:
            self.driver_us.append(driver_cpu / n * 1e6)
        self.counted.add(counted)

    def rate(self) -> float:
        return statistics.median(self.rates)


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", type=int, default=50000)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--recipients", default="1,10", help="comma-separated recipient counts")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; rates are medians")
    ap.add_argument("--only", default="source,bench", help="rows: source,bench,pipelined,blast")
    ap.add_argument("--engines", default="c,python", help="lmtpfast sink engines to measure")
    ap.add_argument("--pin", metavar="CPU", help="run servers and drivers on this CPU (taskset -c)")
    args = ap.parse_args()
    if args.pin is not None:
        PIN[:] = ["taskset", "-c", args.pin]
    n, s, size = args.messages, args.sessions, args.size
    only = set(args.only.split(","))
    engines = args.engines.split(",")
    recipient_counts = [int(r) for r in args.recipients.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="sinkbench-", dir="/tmp"))
    rows: dict[str, Row] = {}

    def row(name: str) -> Row:
        return rows.setdefault(name, Row(name))

    loop_factory = None
    if args.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    have_postfix = SMTP_SOURCE.exists() and os.access(SMTP_SOURCE, os.X_OK)
    if "source" in only and not have_postfix:
        print("smtp-source not installed: skipping the source rows", file=sys.stderr)
    try:
        for _ in range(args.repeat):
            for r in recipient_counts:
                source = [
                    *PIN,
                    str(SMTP_SOURCE),
                    "-L",
                    "-d",
                    "-s",
                    str(s),
                    "-m",
                    str(n),
                    "-l",
                    str(size),
                    "-r",
                    str(r),
                ]
                if "source" in only and have_postfix:
                    for engine in engines:
                        sink = RunningSink(workdir, args.loop, engine)
                        c0 = children_cpu()
                        dt = timed(
                            lambda t=[*source, f"unix:{sink.sock}"]: subprocess.run(
                                t, env=POSTFIX_ENV, check=True, timeout=900
                            )
                        )
                        row(f"smtp-source -r {r} -> lmtpfast sink ({engine})").add(
                            n, dt, sink.cpu(), children_cpu() - c0, sink.stop()["transactions"]
                        )
                    pf = PostfixSink(workdir)
                    try:
                        c0 = children_cpu()
                        dt = timed(
                            lambda t=[*source, f"unix:{pf.sock}"]: subprocess.run(
                                t, env=POSTFIX_ENV, check=True, timeout=900
                            )
                        )
                        row(f"smtp-source -r {r} -> Postfix smtp-sink").add(
                            n, dt, pf.cpu(), children_cpu() - c0, "-"
                        )
                    finally:
                        pf.stop()
                if "bench" in only:
                    for engine in engines:
                        for chunking in ("on", "off"):
                            sink = RunningSink(workdir, args.loop, engine)
                            out = subprocess.run(
                                [
                                    sys.executable,
                                    "-m",
                                    "lmtpfast",
                                    "bench",
                                    "--server",
                                    f"unix:{sink.sock}",
                                    "--messages",
                                    str(n),
                                    "--connections",
                                    str(s),
                                    "--recipients",
                                    str(r),
                                    "--size",
                                    str(size),
                                    "--chunking",
                                    chunking,
                                    "--json",
                                ],
                                env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                capture_output=True,
                                text=True,
                                check=True,
                                timeout=900,
                            )
                            rep = json.loads(out.stdout)
                            name = "BDAT" if chunking == "on" else "DATA"
                            row(f"lmtpfast bench {name} -r {r} -> lmtpfast sink ({engine})").add(
                                rep["messages"],
                                rep["elapsed"],
                                sink.cpu(),
                                rep["cpu_seconds"],
                                sink.stop()["transactions"],
                            )
                for mode in ("pipelined", "blast"):
                    if mode not in only:
                        continue
                    for engine in engines:
                        sink = RunningSink(workdir, args.loop, engine)
                        ru0 = resource.getrusage(resource.RUSAGE_SELF)
                        with asyncio.Runner(loop_factory=loop_factory) as runner:
                            path = str(sink.sock)
                            dt = timed(
                                lambda p=path, b=mode == "blast", r=r: runner.run(
                                    drive(p, n, s, size, r, b)
                                )
                            )
                        ru1 = resource.getrusage(resource.RUSAGE_SELF)
                        drv = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
                        row(f"{mode} -r {r} -> lmtpfast sink ({engine})").add(
                            n, dt, sink.cpu(), drv, sink.stop()["transactions"]
                        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load = os.getloadavg()
    print(
        f"{n} messages of {size} bytes, {s} sessions/connections, unix socket, sink on "
        f"{args.loop}, {os.cpu_count()} CPUs{f' (all pinned to CPU {args.pin})' if PIN else ''}, "
        f"median of {args.repeat}, "
        f"load average at the end {load[0]:.2f}"
    )
    print(
        f"{'driver -> server':58} {'msg/s':>9} {'server us/msg':>13} {'driver us/msg':>13} "
        f"{'server busy':>11} {'driver busy':>11} {'counted':>8}"
    )
    for rw in rows.values():
        rate = rw.rate()
        srv = statistics.median(rw.server_us)
        drv = statistics.median(rw.driver_us) if rw.driver_us else float("nan")
        counted = ",".join(str(c) for c in sorted(rw.counted, key=str))
        print(
            f"{rw.name:58} {rate:9.0f} {srv:13.1f} {drv:13.1f} {srv * rate / 1e6:11.2f} "
            f"{drv * rate / 1e6:11.2f} {counted:>8}"
        )
    for r in recipient_counts:
        ref = rows.get(f"smtp-source -r {r} -> Postfix smtp-sink")
        for engine in engines:
            mine = rows.get(f"smtp-source -r {r} -> lmtpfast sink ({engine})")
            if ref and mine:
                print(
                    f"ratio lmtpfast sink ({engine}) / smtp-sink, -r {r}: "
                    f"{mine.rate() / ref.rate():.2f}x"
                )


if __name__ == "__main__":
    main()
