"""Replay streams large spool messages instead of holding them (issue 10 item 22).

Three 64 MiB messages delivered at once (``--concurrency 3``) into Postfix's
``smtp-sink``: held whole they would need 192 MiB; streamed from their files
a piece at a time (a store's data files, a directory spool's locked message
files), the replay stays near its size with small messages. The peak is
``ru_maxrss`` of the replay process, which counts file pages mapped into it
as well as its own memory. The store case starts from a directory spool, so
its conversion (a streamed copy) is inside the measured peak too.
(``bench/bench_replay.py --only big`` is the full-size run: three of 200 MiB.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from lmtpfast._testing.postfix import SmtpSink
from lmtpfast._testing.spool import queued_count

ROOT = Path(__file__).resolve().parent.parent


# Run from a small process of its own: ru_maxrss also counts what the process
# was before exec, i.e. this test process when forked.
_MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""

_FILL = """
import sys
from lmtpfast.spool import Spool
where, count, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
spool = Spool(where, create=True)
line = b"y" * 998 + b"\\r\\n"
body = line * (mib * 1024 * 1024 // len(line)) if mib else b"hello\\r\\n"
for i in range(count):
    spool.enqueue(b"Subject: %d\\r\\n\\r\\n" % i + body, "s@example.org", ["u@example.com"],
                  fsync=False)
"""


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _replay_peak_kib(location: str, server: str, concurrency: int) -> int:
    cmd = [sys.executable, "-c", _MEASURE, sys.executable, "-m", "lmtpfast", "replay",
           location, "--server", server, "--once", "-q", "--concurrency", str(concurrency)]
    out = subprocess.run(cmd, env=_env(), capture_output=True, check=True, timeout=300)
    status, peak = map(int, out.stdout.split())
    assert status == 0, out.stderr
    return peak


@pytest.mark.parametrize("layout", ["store", "dir"])
def test_three_large_messages_at_once_are_streamed_not_held(smtp_sink: Any,
                                                            layout: str) -> None:
    sink: SmtpSink = smtp_sink()
    # On disk, not tmpfs: tmpfs pages would be shared memory counted in RSS.
    base = Path(tempfile.mkdtemp(prefix="lmtpfast-bigreplay-", dir="/var/tmp"))
    try:
        for name, mib in (("small", 0), ("large", 64)):
            subprocess.run([sys.executable, "-c", _FILL, str(base / name), "3", str(mib)],
                           env=_env(), check=True, timeout=300)
        prefix = "" if layout == "store" else "dir:"
        baseline = _replay_peak_kib(f"{prefix}{base / 'small'}", sink.destination, 3)
        peak = _replay_peak_kib(f"{prefix}{base / 'large'}", sink.destination, 3)
        assert queued_count(base / "small") == 0 and queued_count(base / "large") == 0
        if layout == "store":
            assert os.listdir(base / "large" / "data") == []  # converted, then delivered
        # Held whole: baseline + 192 MiB. Streamed: well under one message more.
        assert peak < baseline + 48 * 1024, (baseline // 1024, peak // 1024)
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


# -- the file-backed message itself ---------------------------------------------------------

# Bare LF, a bare CR, lines starting with a dot, a long line: everything the
# encoder changes, across the 256 KiB piece boundaries.
_ODD = (b"Subject: odd\n\n" + b"".join(b".line %d\n..two dots\r\nbare\rcr\r\n" % i
                                       for i in range(60_000)) + b"z" * 300_000 + b"\n.")


def _file(tmp: Path, data: bytes) -> int:
    path = tmp / "m.eml"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


async def test_a_message_file_is_sent_exactly_as_its_bytes_would_be(tmp_path: Path,
                                                                    engine: str) -> None:
    """DATA and BDAT, into the sink: what arrives from a MessageFile equals what bytes give."""
    from lmtpfast import Agent, Delivery, MessageFile
    from lmtpfast.server import DEFAULT_EXTENSIONS, Sink

    assert len(_ODD) > 2 * 1024 * 1024
    fd = _file(tmp_path, _ODD)
    try:
        for chunking in (False, True):
            exts = [e for e in DEFAULT_EXTENSIONS if chunking or e != "CHUNKING"]
            async with Sink(f"unix:{tmp_path}/s{int(chunking)}", collect=True, extensions=exts,
                            max_size=0) as sink:
                async with Agent.for_server(sink.destinations[0], engine=engine) as agent:
                    for message in (_ODD, MessageFile(fd)):
                        d = Delivery.build(message, sender="a@x.org", recipients=["b@x.org"])
                        (r,) = await agent.deliver(d)
                        assert r.delivered, r
                a, b = sink.messages
                assert a.content == b.content and len(a.content) > len(_ODD)
    finally:
        os.close(fd)


async def test_a_message_file_that_shrinks_midway_defers_never_refuses(tmp_path: Path,
                                                                       engine: str) -> None:
    from lmtpfast import Agent, Delivery, MessageFile
    from lmtpfast.server import Sink

    fd = _file(tmp_path, _ODD)
    try:
        async with Sink(f"unix:{tmp_path}/s", collect=True, max_size=0) as sink:
            async with Agent.for_server(sink.destinations[0], engine=engine) as agent:
                d = Delivery.build(MessageFile(fd), sender="a@x.org", recipients=["b@x.org"])
                os.truncate(tmp_path / "m.eml", 1024 * 1024)  # read back as sent: cut short
                (r,) = await agent.deliver(d)
            assert sink.messages == []
        assert r.transient and not r.possibly_delivered, r
    finally:
        os.close(fd)
