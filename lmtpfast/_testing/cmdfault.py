"""Run an LMTP program behind a relay that kills it at a chosen point (a test fault).

For the ``command:`` destination's tests: the relay sits on the program's
stdin/stdout, passes bytes both ways, and when a marker passes it SIGKILLs the
real program and then itself, so the client sees a program that died in the
middle of a transaction at a point chosen in the stream, not in time::

    command:python3 cmdfault.py --kill-before 'MARK' -- /usr/lib/dovecot/lmtp -c CONF

* ``--kill-before BYTES``: when BYTES is about to go from the client to the
  program, nothing from BYTES on reaches it (put it in the message content:
  the program never sees the final dot);
* ``--kill-after-reply PREFIX``: the first reply line from the program that
  starts with PREFIX reaches the client, nothing after it does (``250 2.0.0``:
  the first recipient's final reply is given, the others' are not).

Self-contained (the program runs with a small environment: no PYTHONPATH).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys


def _die(child: subprocess.Popen[bytes]) -> None:
    child.kill()
    child.wait()
    os.kill(os.getpid(), signal.SIGKILL)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--kill-before", default=None)
    p.add_argument("--kill-after-reply", default=None)
    p.add_argument("argv", nargs="+")
    args = p.parse_args()
    before = args.kill_before.encode() if args.kill_before else None
    after = args.kill_after_reply.encode() if args.kill_after_reply else None
    child = subprocess.Popen(args.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    to_child, from_child = child.stdin.fileno(), child.stdout.fileno()
    tail = b""  # the end of the client's last read, for a marker split across reads
    partial = b""  # the program's unfinished reply line
    inputs = [0, from_child]
    while from_child in inputs:
        ready, _, _ = select.select(inputs, [], [])
        if 0 in ready:
            data = os.read(0, 65536)
            if not data:
                inputs.remove(0)
                child.stdin.close()
            elif before is not None and (at := (tail + data).find(before)) >= 0:
                # Only what came before the marker reaches the program.
                keep = at - len(tail)
                if keep > 0:
                    _write_all(to_child, data[:keep])
                _die(child)
            else:
                if before is not None:
                    tail = (tail + data)[-(len(before) - 1):] if len(before) > 1 else b""
                _write_all(to_child, data)
        if from_child in ready:
            data = os.read(from_child, 65536)
            if not data:
                break
            if after is None:
                _write_all(1, data)
                continue
            *lines, partial = (partial + data).split(b"\n")
            for line in lines:
                _write_all(1, line + b"\n")
                if line.startswith(after):
                    _die(child)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
