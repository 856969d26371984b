"""The enqueue path of the embedded store, as `lmtpfast enqueue` drives it (issue 12).

Group commit that streams: content is appended to segments as it is read and
a group is committed at tens of thousands of messages, so these tests check
what that must not change -- every message queued once and readable, nothing
of an uncommitted group visible (also after ``kill -9``), the input's errors
raised only after what came before them is queued, a failed write queuing
nothing of its group -- and what makes it fast without a timed assert: one
commit and one flush per segment for a group, the envelope encoded once, the
mbox split exactly as a line-by-line reader splits it, and ``lmtpfast
enqueue`` importing neither the event loop, nor the email package, nor the
PostgreSQL queue.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmtpfast.spool import (
    ImportStats,
    Source,
    _importers,
    _sqlite,
    import_messages,
    iter_mbox,
    new_envelope,
)
from lmtpfast.spool._format import encode_envelope
from lmtpfast.spool._importers import split_mbox
from lmtpfast.spool._queue import NewMessage, QueueWriteError, Update
from lmtpfast.spool._sqlite import SQLiteStore

from .test_startup import _imported

ROOT = Path(__file__).resolve().parent.parent


def body(i: int, size: int = 200) -> bytes:
    return f"Subject: m{i}\r\nMessage-ID: <m{i}@enqueue.test>\r\n\r\n".encode() + b"x" * size


def news(n: int, start: int = 0, size: int = 200) -> Iterator[NewMessage]:
    env = new_envelope("s@example.org", ["r@example.com"])
    for i in range(start, start + n):
        yield NewMessage(env, body(i, size), origin=f"m{i}")


def drain(s: SQLiteStore) -> dict[str, bytes]:
    """Every entry claimed and recorded done: id -> content (quarantines fail the test)."""
    due = time.time() + 1
    s.begin_pass(due=due)
    got: dict[str, bytes] = {}
    while True:
        b = s.claim(500, due=due)
        assert not b.quarantined, b.quarantined
        got.update((e.id, bytes(e.content)) for e in b.entries)
        s.record([Update(e, "done") for e in b.entries])
        if b.exhausted:
            return got


# -- the mbox splitter ----------------------------------------------------------------


def _reference_mbox(data: bytes) -> list[tuple[bytes, str | None]]:
    """The line-by-line reader the splitter replaced (what it must match exactly)."""
    out: list[tuple[bytes, str | None]] = []
    lines: list[bytes] = []
    sender: str | None = None
    count = 0

    def done() -> None:
        keep = lines[:-1] if lines and lines[-1] in (b"\n", b"\r\n") else lines
        out.append((b"".join(keep), sender))

    for line in io.BytesIO(data):
        if line.startswith(b"From "):
            if count:
                done()
            count += 1
            parts = line[5:].split()
            sender = parts[0].decode("utf-8", "replace") if parts else None
            sender = "" if sender == "MAILER-DAEMON" else sender
            lines = []
            continue
        if not count:
            if line.strip():
                raise ValueError("not an mbox")
            continue
        if line.startswith(b">") and line.lstrip(b">").startswith(b"From "):
            line = line[1:]
        lines.append(line)
    if count:
        done()
    return out


_PIECES = [b"From a@b Mon\n", b"From MAILER-DAEMON x\n", b"From \n", b"From\n", b">From x\n",
           b">>From y\n", b">Fro\n", b"\n", b"\r\n", b"x" * 50 + b"\n", b"abc", b"From",
           b" From x\n", b"\r", b"\n\n", b"F", b"rom ", b"x\r\n", b">", b">>>From z\r\n",
           b"a >From b\n", b"From x >From y\n"]


@pytest.mark.parametrize("chunk", [1, 2, 5, 7, 64, 1 << 20])
def test_split_mbox_matches_a_line_by_line_reader(tmp_path: Path, chunk: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Random mboxes, read in chunks down to one byte (every boundary straddles one)."""
    monkeypatch.setattr(_importers, "_MBOX_CHUNK", chunk)
    rnd = random.Random(chunk)
    path = tmp_path / "box"
    for _ in range(400):
        data = b"".join(rnd.choice(_PIECES) for _ in range(rnd.randint(0, 30)))
        if rnd.random() < 0.7:
            data = b"From s@x y\n" + data
        if rnd.random() < 0.2:
            data = b"\n\r\n  \n" + data
        path.write_bytes(data)
        try:
            want: list[tuple[bytes, str | None]] | str = _reference_mbox(data)
        except ValueError:
            want = "error"
        try:
            got: list[tuple[bytes, str | None]] | str = [
                (s.data, s.from_line_sender) for s in iter_mbox(path)]
        except ValueError:
            got = "error"
        assert got == want, data


def test_split_mbox_reads_a_big_message_in_linear_time() -> None:
    """A message far larger than a chunk: the read size doubles (no quadratic copying)."""
    big = b"From a@b x\n" + b"Subject: big\n\n" + (b"y" * 1000 + b"\n") * 20_000
    reads: list[int] = []

    class Counting(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            reads.append(n or 0)
            return super().read(n)

    [(line, msg)] = split_mbox(Counting(big + b"\n"))
    assert line == b"From a@b x\n" and msg == big[len(line):]
    assert len(reads) <= 8, reads  # 20 MB: 1, 1, 2, 4, 8, 16 MiB ... not 20 reads of 1 MiB


def test_mbox_import_counts_and_origins(tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.write_bytes(b"".join(b"From x@y Thu Jan  1 00:00:00 2026\n" + body(i) + b"\n\n"
                             for i in range(3000)))
    with SQLiteStore(tmp_path / "q", create=True) as s:
        stats = import_messages(s, iter_mbox(box), sender="a@example.org",
                                recipients=["b@example.org"])
        assert stats.queued == 3000 and not stats.problems
        assert [o for o, _ in stats.ids][:2] == [f"{box}#1", f"{box}#2"]
        got = drain(s)
    assert sorted(got.values()) == sorted(body(i) + b"\n" for i in range(3000))


# -- group commit ---------------------------------------------------------------------


def test_one_group_is_one_commit_and_one_flush_per_segment(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    with SQLiteStore(tmp_path / "q", create=True, segment_size=256 * 1024) as s:
        flushed: list[int] = []
        real = os.fdatasync

        def fdatasync(fd: int) -> None:
            flushed.append(fd)
            real(fd)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        encoded: list[object] = []
        real_encode = encode_envelope

        def encode(env: Any) -> bytes:
            encoded.append(env)
            return real_encode(env)

        monkeypatch.setattr(_sqlite, "encode_envelope", encode)
        durable: list[str] = []
        real_write = s._write

        def write(what: str, fn: Any, **kw: Any) -> Any:
            if kw.get("durable"):
                durable.append(what)
            return real_write(what, fn, **kw)

        monkeypatch.setattr(s, "_write", write)
        groups: list[int] = []
        ids = s.enqueue_many(news(5000), committed=lambda o, i: groups.append(len(i)))
        segs = len(os.listdir(tmp_path / "q" / "seg"))
        # 5000 x ~270 B in 256 KiB segments: several segments, one group.
        assert groups == [5000] and segs > 4
        assert len(encoded) == 1  # one envelope for all: encoded once
        # One fdatasync per segment, one commit that flushes the WAL (SQLite's own flush).
        assert len(flushed) == segs, (flushed, segs)
        assert durable == ["enqueue"]
        assert len(set(ids)) == 5000
        assert len(drain(s)) == 5000


def test_groups_are_cut_by_rows_and_each_is_reported(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sqlite, "ENQUEUE_ROWS", 700)
    with SQLiteStore(tmp_path / "q", create=True) as s:
        seen: list[tuple[list[str], list[str]]] = []
        ids = s.enqueue_many(news(2000), committed=lambda o, i: seen.append((o, i)))
        assert [len(i) for _, i in seen] == [700, 700, 600]
        assert [o for origins, _ in seen for o in origins] == [f"m{i}" for i in range(2000)]
        assert [i for _, got in seen for i in got] == ids
        got = drain(s)
    assert sorted(got, key=int) == sorted(ids, key=int)
    assert sorted(got.values()) == sorted(body(i) for i in range(2000))


def test_big_messages_count_toward_a_group_s_bytes(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Data files are flushed one by one; their rows still commit every ENQUEUE_BYTES."""
    monkeypatch.setattr(_sqlite, "ENQUEUE_BYTES", 500_000)
    with SQLiteStore(tmp_path / "q", create=True) as s:
        seen: list[int] = []
        msgs = [*news(300), *news(6, 300, size=200_000), *news(300, 400)]
        ids = s.enqueue_many(iter(msgs), committed=lambda o, i: seen.append(len(i)))
        assert len(os.listdir(tmp_path / "q" / "data")) == 6
        assert len(seen) > 1 and sum(seen) == 606 == len(ids)
        got = drain(s)
    assert sorted(got.values()) == sorted(m.content for m in msgs)  # type: ignore[type-var]


def test_a_list_gets_contiguous_ids(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "q", create=True) as s:
        first = s.enqueue_many(list(news(1500)))
        second = s.enqueue_many(list(news(10, 1500)))
    assert first == [str(i) for i in range(1, 1501)]
    assert second == [str(i) for i in range(1501, 1511)]


def test_an_input_error_comes_after_what_came_before_is_queued(tmp_path: Path) -> None:
    def broken() -> Iterator[NewMessage]:
        yield from news(1200)
        raise ValueError("box is not an mbox file")

    with SQLiteStore(tmp_path / "q", create=True) as s:
        stats = ImportStats()
        with pytest.raises(ValueError, match="not an mbox"):
            s.enqueue_many(broken(), committed=lambda o, i: setattr(stats, "queued",
                                                                     stats.queued + len(i)))
        assert stats.queued == 1200
        assert len(drain(s)) == 1200


def test_a_failed_write_queues_nothing_of_its_group(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sqlite, "ENQUEUE_ROWS", 1000)
    with SQLiteStore(tmp_path / "q", create=True) as s:
        calls = [0]
        real = os.fdatasync

        def failing(fd: int) -> None:
            calls[0] += 1
            if calls[0] == 2:  # the second group (one segment flush per group)
                raise OSError(28, "No space left on device")
            real(fd)

        monkeypatch.setattr(os, "fdatasync", failing)
        seen: list[int] = []
        with pytest.raises(QueueWriteError, match="No space left"):
            s.enqueue_many(news(2500), committed=lambda o, i: seen.append(len(i)))
        monkeypatch.setattr(os, "fdatasync", real)
        assert seen == [1000]
        assert s.status().queued == 1000
        # The store goes on: later messages queue, nothing half-written is ever claimed.
        s.enqueue_many(news(300, 5000))
        got = drain(s)
    assert len(got) == 1300
    assert set(got.values()) == {body(i) for i in [*range(1000), *range(5000, 5300)]}


_SLOW_WRITER = r"""
import sys, time
from lmtpfast.spool import new_envelope
from lmtpfast.spool._queue import NewMessage
from lmtpfast.spool._sqlite import SQLiteStore
s = SQLiteStore(sys.argv[1], create=True)
env = new_envelope("s@example.org", ["r@example.com"])
def gen():
    for i in range(int(sys.argv[2])):
        yield NewMessage(env, b"Subject: %d\r\n\r\n" % i + b"x" * 500)
    print("written", flush=True)
    time.sleep(60)  # the group is written, not committed: killed here
s.enqueue_many(gen(), committed=lambda o, i: print("committed", len(i), flush=True))
"""


def test_kill_9_before_the_commit_leaves_nothing_half_enqueued(tmp_path: Path) -> None:
    """Segments written, rows not committed, process killed: nothing visible, all usable."""
    path = tmp_path / "q"
    with SQLiteStore(path, create=True) as s:
        s.enqueue_many(news(100))
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(path), "4000"],
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "written"
        assert sum(os.path.getsize(p) for p in (path / "seg").iterdir()) > 4000 * 500
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with SQLiteStore(path) as s:
        assert s.status().queued == 100
        got = drain(s)
        assert sorted(got.values()) == sorted(body(i) for i in range(100))
        s.enqueue_many(news(50, 100))  # and the store takes more
        assert len(drain(s)) == 50
    with SQLiteStore(path) as s:
        s.sweep(now=time.time() + 7200)  # the dead writer's segment is garbage: collected
    assert len(os.listdir(path / "seg")) <= 1


def test_a_shared_bad_envelope_skips_each_message(tmp_path: Path) -> None:
    sources = [Source(f"m{i}", body(i)) for i in range(5)]
    with SQLiteStore(tmp_path / "q", create=True) as s:
        stats = import_messages(s, sources, sender="a@example.org", recipients=["b c"])
        assert stats.queued == 0 and stats.skipped == 5
        assert all("bad address" in p for p in stats.problems)
        stats = import_messages(s, [*sources, Source("nul", b"a\0b")], sender="a@example.org",
                                recipients=["b@example.org"])
        assert stats.queued == 5 and stats.problems == [
            "nul: message contains a NUL byte at offset 1; it cannot be sent"]


# -- the command ----------------------------------------------------------------------

#: Never imported by `lmtpfast enqueue` into the embedded store.
_NOT_FOR_ENQUEUE = ("asyncio", "email", "uvloop", "ssl", "lmtpfast.spool._pgqueue",
                    "lmtpfast.spool._watch", "lmtpfast._shaping", "lmtpfast._agent",
                    "lmtpfast.spool._replay")


def test_enqueue_imports_only_the_store(tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.write_bytes(b"From x@y Thu Jan  1 00:00:00 2026\n" + body(1) + b"\n")
    proc, names = _imported("enqueue", str(tmp_path / "q"), "--mbox", str(box), "--from",
                            "a@example.org", "--rcpt", "b@example.org", stdin=b"")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    heavy = sorted(n for n in names if any(n == b or n.startswith(b + ".")
                                           for b in _NOT_FOR_ENQUEUE))
    assert not heavy, heavy
    assert {"lmtpfast.spool._sqlite", "lmtpfast.cli.enqueue"} <= names


def test_enqueue_of_a_file_that_is_not_an_mbox_is_a_data_error(tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.write_bytes(b"Subject: x\n\nnot an mbox\n")
    proc = subprocess.run([sys.executable, "-m", "lmtpfast", "enqueue", str(tmp_path / "q"),
                           "--mbox", str(box), "--from", "a@example.org", "--rcpt",
                           "b@example.org"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 65, proc.stderr
    assert "is not an mbox file" in proc.stderr and "nothing queued" in proc.stderr
    assert "Traceback" not in proc.stderr
