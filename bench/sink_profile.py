"""Where the sink's time goes per message: instruction counts that machine noise cannot move.

    python bench/sink_profile.py [--messages N] [--what engine,process]

* ``engine``: the sans-IO server engine alone, in this process, fed what a
  client sends read by read: ``smtp-source -L`` style (one command per read,
  the content and its dot in one), and lmtpfast-client style (MAIL+RCPT*+BDAT
  LAST with the content in one read). Wall time per message, and, under
  valgrind, instructions per message (callgrind, two runs of N and 3N
  messages, the difference divided by 2N: start-up cancels out).
* ``process``: the whole ``lmtpfast sink`` process (event loop, protocol,
  engine) under ``valgrind --tool=callgrind``, driven by ``smtp-source -L``
  over a unix socket; the same N / 3N difference.

Both engines (compiled and pure Python), 1 and 10 recipients, 1 KiB.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if "--root" in sys.argv:  # measure another checkout (e.g. before a change)
    ROOT = Path(sys.argv[sys.argv.index("--root") + 1]).resolve()
sys.path.insert(0, str(ROOT))

from lmtpfast._testing.postfix import postfix_env, smtp_tool  # noqa: E402

SMTP_SOURCE = smtp_tool("smtp-source") or Path("/usr/sbin/smtp-source")
VALGRIND = shutil.which("valgrind")


def body(size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    return (b"Subject: profile\r\n\r\n" + line * (size // len(line) + 1))[:size - 2] + b"\r\n"


def reads(style: str, rcpts: int, size: int) -> list[bytes]:
    """One message as a client's writes, which arrive as the server's reads."""
    content = body(size)
    rc = [b"RCPT TO:<user%d@example.com>\r\n" % i for i in range(rcpts)]
    if style == "source":  # smtp-source -L: one command per round trip
        return [b"MAIL FROM:<bench@example.org>\r\n", *rc, b"DATA\r\n", content + b".\r\n"]
    # the lmtpfast client with CHUNKING: the whole message in one write
    return [
        b"MAIL FROM:<bench@example.org> SIZE=%d\r\n" % len(content)
        + b"".join(rc)
        + b"BDAT %d LAST\r\n" % len(content)
        + content
    ]


def run_engine(engine: str, style: str, rcpts: int, size: int, n: int) -> float:
    if engine == "python":
        os.environ["LMTPFAST_NO_EXTENSIONS"] = "1"
    import lmtpfast.server as srv

    stats = srv.SinkStats()
    if hasattr(srv, "SinkHandler"):
        s = srv.IMPLEMENTATIONS[engine].ServerSession(
            srv.SessionConfig(), srv.SinkHandler(stats), stats
        )
    else:  # a checkout from before the engine/handler split (--root)
        s = srv.ServerSession(srv.SessionConfig(), stats)
    s.start()
    s.receive_data(b"LHLO profile\r\n")
    msg = reads(style, rcpts, size)
    feed = s.receive_data
    t0 = time.perf_counter()
    for _ in range(n):
        for r in msg:
            feed(r)
    dt = time.perf_counter() - t0
    assert stats.transactions == n, stats
    return dt / n * 1e6


def callgrind(argv: list[str], env: dict[str, str] | None = None) -> int:
    """Instructions executed by ``argv`` under callgrind."""
    assert VALGRIND is not None
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "cg.out"
        subprocess.run(
            [VALGRIND, "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
            env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        m = re.search(rb"^summary: (\d+)", out.read_bytes(), re.M) or re.search(
            rb"^totals: (\d+)", out.read_bytes(), re.M
        )
        assert m is not None
        return int(m.group(1))


def engine_ir(engine: str, style: str, rcpts: int, size: int, n: int) -> float:
    argv = [sys.executable, __file__, "--inner", engine, style, str(rcpts), str(size), "X",
            "--root", str(ROOT)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    small = callgrind([*(str(n) if a == "X" else a for a in argv)], env)
    big = callgrind([*(str(3 * n) if a == "X" else a for a in argv)], env)
    return (big - small) / (2 * n)


def process_ir(engine: str, rcpts: int, size: int, n: int) -> float:
    """The whole sink process under callgrind, driven by smtp-source."""
    assert VALGRIND is not None
    totals = []
    for count in (n, 3 * n):
        work = Path(tempfile.mkdtemp(prefix="sinkprof-", dir="/tmp"))
        try:
            sock, ready, out = work / "s", work / "ready", work / "cg.out"
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            env.pop("LMTPFAST_NO_EXTENSIONS", None)
            if engine == "python":
                env["LMTPFAST_NO_EXTENSIONS"] = "1"
            proc = subprocess.Popen(
                [VALGRIND, "--tool=callgrind", f"--callgrind-out-file={out}",
                 sys.executable, "-m", "lmtpfast", "sink", "--listen", f"unix:{sock}",
                 "--quiet", "--ready-file", str(ready), "--duration", "900"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 120
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the sink did not start under valgrind")
                time.sleep(0.1)
            subprocess.run(
                [str(SMTP_SOURCE), "-L", "-d", "-s", "8", "-m", str(count), "-l", str(size),
                 "-r", str(rcpts), f"unix:{sock}"],
                env=postfix_env(), check=True, timeout=1800,
            )
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
            m = re.search(rb"^summary: (\d+)", out.read_bytes(), re.M)
            assert m is not None
            totals.append(int(m.group(1)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return (totals[1] - totals[0]) / (2 * n)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--inner":
        engine, style, rcpts, size, n = sys.argv[2:7]
        run_engine(engine, style, int(rcpts), int(size), int(n))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--what", default="engine,process")
    ap.add_argument("--engines", default="c,python")
    ap.add_argument("--root", default=str(ROOT), help="the checkout to measure (default: this one)")
    args = ap.parse_args()
    what = set(args.what.split(","))
    engines = args.engines.split(",")
    n, size = args.messages, args.size
    if "engine" in what:
        print(f"server engine alone, {size}-byte messages "
              "(us/msg: wall time here; Ir/msg: callgrind)")
        for style in ("source", "bdat"):
            for rcpts in (1, 10):
                for engine in engines:
                    us = subprocess.run(
                        [sys.executable, "-c",
                         f"import sys; sys.argv[1:] = ['--root', {str(ROOT)!r}]; import runpy; "
                         f"m = runpy.run_path({__file__!r}); "
                         f"print(m['run_engine']({engine!r}, {style!r}, {rcpts}, {size}, "
                         f"{20 * n}))"],
                        capture_output=True, text=True, check=True,
                    ).stdout.strip()
                    ir = engine_ir(engine, style, rcpts, size, n) if VALGRIND else float("nan")
                    print(f"  {style:6} rcpt={rcpts:<2} {engine:6} {float(us):8.2f} us/msg "
                          f"{ir:12,.0f} Ir/msg")
    if "process" in what and VALGRIND and SMTP_SOURCE.exists():
        print(f"whole lmtpfast sink process driven by smtp-source -L -s 8, {size} bytes "
              "(callgrind)")
        for rcpts in (1, 10):
            for engine in engines:
                ir = process_ir(engine, rcpts, size, n)
                print(f"  rcpt={rcpts:<2} {engine:6} {ir:12,.0f} Ir/msg")


if __name__ == "__main__":
    main()
