"""CPU per `lmtpfast send` process, as an MTA pays it (one message per process).

Postfix's pipe(8), procmail and Exim's pipe transport start ``lmtpfast send``
once per message, so its cost is start-up plus one session. This starts
Postfix's ``smtp-sink -L`` on a unix socket and measures, in the same run and
interleaved (so load drifts hit every row alike), the CPU time (user + sys,
from ``os.wait4``) of one process per row:

- ``python -c pass``: the interpreter's own start-up, the floor for any
  Python delivery program;
- ``lmtpfast send`` of a 1 KiB message (its exit status must be 0);
- ``smtp-source -L -m 1``: Postfix's C client, one process, one message (a C
  baseline for one delivery per process; Postfix's own lmtp(8) is a resident
  process and costs less per message).

Prints the median per row over ``--runs`` and the ratios; with
``--instructions`` also each row's instruction count under
``valgrind --tool=callgrind`` (one run, ``PYTHONHASHSEED=0``: it does not
depend on the machine's load). ``--python`` picks
the interpreter; with ``--installed`` the lmtpfast it imports is its own (a
normal ``pip install``, no PYTHONPATH and no editable-install .pth files),
else this checkout's::

    python bench/bench_send.py --runs 40
    python3 -m venv /tmp/v && /tmp/v/bin/pip install . &&
        python bench/bench_send.py --python /tmp/v/bin/python --installed
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmtpfast._testing.postfix import SmtpSink  # noqa: E402


def cpu_ms(argv: list[str], env: dict[str, str], cwd: str) -> float:
    """User + system CPU of one run of ``argv``, in milliseconds; it must exit 0.

    ``cwd`` is not this checkout: ``python -m`` puts the working directory
    first on sys.path, and would import this lmtpfast instead of the installed one.
    """
    with open(os.devnull, "rb") as stdin:
        proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=env, cwd=cwd)
        assert proc.stderr is not None
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:4]}... exited {proc.returncode}: {err.decode()[-500:]}")
    return (usage.ru_utime + usage.ru_stime) * 1000


def instructions(argv: list[str], env: dict[str, str], cwd: str) -> int:
    """User-space instructions of one run of ``argv`` (callgrind's total)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg",
                              *argv], stdin=subprocess.DEVNULL, capture_output=True,
                             env=dict(env, PYTHONHASHSEED="0"), cwd=cwd, timeout=600,
                             check=False)
    found = re.search(rb"Collected : (\d+)", out.stderr)
    if out.returncode != 0 or found is None:
        raise SystemExit(f"{argv[:4]}... under callgrind: {out.stderr.decode()[-500:]}")
    return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30, help="runs per row (median reported)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for lmtpfast send")
    ap.add_argument("--installed", action="store_true",
                    help="use the interpreter's installed lmtpfast (no PYTHONPATH)")
    ap.add_argument("--size", type=int, default=1024, help="message size in bytes")
    ap.add_argument("--instructions", action="store_true",
                    help="also count each row's instructions under callgrind (one run each)")
    args = ap.parse_args()

    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # compiled modules cached, as installed
    if args.installed:
        env.pop("PYTHONPATH", None)
    else:
        env["PYTHONPATH"] = str(ROOT)
    sink = SmtpSink().start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            msg = Path(tmp) / "msg"
            body = b"x" * 70 + b"\r\n"
            msg.write_bytes(b"Subject: bench\r\n\r\n" + body * max(1, args.size // len(body)))
            rows = {
                "python -c pass": [args.python, "-c", "pass"],
                "lmtpfast send": [args.python, "-m", "lmtpfast", "send", "--server",
                                  sink.destination, "--from", "a@example.org", "--rcpt",
                                  "b@example.org", str(msg)],
                "smtp-source -L -m 1 (C)": ["smtp-source", "-L", "-m", "1", "-s", "1", "-l",
                                            str(args.size), "-f", "a@example.org", "-t",
                                            "b@example.org", sink.destination],
            }
            for argv in rows.values():  # warm-up: caches, bytecode written once
                cpu_ms(argv, env, tmp)
            times: dict[str, list[float]] = {name: [] for name in rows}
            for _ in range(args.runs):
                for name, argv in rows.items():
                    times[name].append(cpu_ms(argv, env, tmp))
            ir = ({name: instructions(argv, env, tmp) for name, argv in rows.items()}
                  if args.instructions else {})
    finally:
        sink.close()

    med = {name: statistics.median(ts) for name, ts in times.items()}
    load = os.getloadavg()[0]
    print(f"CPU per process (user+sys, median of {args.runs}), {args.size}-byte message, "
          f"unix socket into smtp-sink -L; load {load:.1f}; {args.python}"
          f"{' (installed)' if args.installed else ' (PYTHONPATH checkout)'}")
    for name, value in med.items():
        q = statistics.quantiles(times[name], n=4)
        extra = f"   {ir[name] / 1e6:6.1f}M instructions" if ir else ""
        print(f"  {name:28s} {value:7.2f} ms   (quartiles {q[0]:.2f}..{q[2]:.2f}){extra}")
    send, floor, c = med["lmtpfast send"], med["python -c pass"], med["smtp-source -L -m 1 (C)"]
    print(f"  lmtpfast send above python's own start-up: {send - floor:.2f} ms; "
          f"send / python -c pass = {send / floor:.2f}x; send / smtp-source = {send / c:.1f}x")
    if ir:
        print(f"  instructions: send / python -c pass = "
              f"{ir['lmtpfast send'] / ir['python -c pass']:.2f}x")


if __name__ == "__main__":
    main()
