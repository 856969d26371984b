"""A spool whose writes fail: no duplicate storm, nothing delivered twice (issue 10 item 17).

Real file systems, really full or really read-only: a tmpfs with a size limit
mounted in a temp folder (this needs root; CI runs as root, elsewhere the
tests skip), filled to the last page, or remounted read-only between a
delivery and the envelope's rewrite. Replay delivers into the project's
sink, which keeps every message it stores, and the tests count copies.

The rule (docs/spool.md, "When the spool cannot be written"): the write that
records a partial delivery is reserved on disk before the delivery starts;
a record that fails anyway keeps its claim and is never delivered again by
this replay; and any spool write error backs off the whole spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmtpfast import Agent, RecipientResult
from lmtpfast._testing.fixtures import in_ci
from lmtpfast.server import FaultPlan, Sink
from lmtpfast.spool import Observer, Outcome, Replayer, RetryPolicy, Spool, decode_envelope

ROOT = Path(__file__).resolve().parent.parent
SUBJECT = re.compile(rb"^Subject: (\S+)", re.M)
FAULTS = ["rcpt:nobody@*=550 5.1.1 User unknown", "dot:carol@*=452 4.2.2 Mailbox full"]


def message(tag: str) -> bytes:
    return (f"From: s@example.org\r\nSubject: {tag}\r\nMessage-ID: <{tag}@full.test>\r\n\r\n"
            ).encode() + b"body\r\n" * 40


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def small_fs() -> Iterator[Path]:
    """A 2 MiB tmpfs of its own, unmounted at teardown."""
    if os.geteuid() != 0:
        reason = "mounting a tmpfs needs root"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    where = Path(tempfile.mkdtemp(prefix="lmtpfull-", dir="/tmp"))
    _mount("-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(where))
    try:
        yield where
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _mount("-o", "remount,rw", str(where))
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)
        where.rmdir()


def fill(fs: Path) -> Path:
    """Write a filler file until the file system is full (ENOSPC); returns it."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    with pytest.raises(OSError):  # really full: not even one more page
        (fs / "probe").write_bytes(b"x" * 4096)
    (fs / "probe").unlink()
    return filler


def stored_copies(sink: Sink) -> Counter[tuple[str, str]]:
    """(message tag, recipient) -> copies the sink stored."""
    got: Counter[tuple[str, str]] = Counter()
    for m in sink.messages:
        tag = SUBJECT.search(m.content)
        assert tag is not None
        for r in m.recipients:
            got[(tag.group(1).decode(), r.split("@")[0])] += 1
    return got


async def _read_until(stream: asyncio.StreamReader, pattern: str, seen: list[str],
                      timeout: float) -> str:
    """Lines of *stream* (kept in *seen*) until one matches *pattern*; bounded by *timeout*."""
    async def loop() -> str:
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError(f"stream ended before {pattern!r}: {seen[-20:]}")
            seen.append(line)
            if re.search(pattern, line):
                return line
    return await asyncio.wait_for(loop(), timeout)


async def _settled(directory: Path, timeout: float = 5.0) -> list[str]:
    """The names in *directory* once it is empty, or what is left after *timeout* s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (names := os.listdir(directory)) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return names


async def test_full_disk_under_replay_watch_delivers_each_recipient_once(
        small_fs: Path) -> None:
    spool = Spool(small_fs / "spool", create=True)
    bounces = small_fs / "bounces"
    for i in range(10):  # alice is delivered, carol's mailbox is full: a partial delivery
        spool.enqueue(message(f"p{i}"), "s@example.org", ["alice@example.com",
                                                          "carol@example.com"])
    for i in range(5):  # bob delivered, nobody refused: failed/ and a bounce
        spool.enqueue(message(f"b{i}"), "s@example.org", ["bob@example.com",
                                                          "nobody@example.com"])
    for i in range(5):  # one recipient, deferred: the rewrite is the only write
        spool.enqueue(message(f"c{i}"), "s@example.org", ["carol@example.com"])
    filler = fill(small_fs)

    async with Sink(f"unix:{small_fs.parent}/{small_fs.name}.sock", collect=True,
                    faults=FaultPlan.parse(FAULTS)) as sink:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lmtpfast", "replay", str(spool.path), "--server",
            sink.destinations[0], "--watch", "--interval", "0.05", "--min-backoff", "1h",
            "--bounce-dir", str(bounces), "-v", "--no-progress", "--concurrency", "4",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        err: list[str] = []
        out: list[str] = []
        try:
            try:
                await _read_until(proc.stderr, r"spool write failed.*backing off", err, 20)
            except TimeoutError:
                raise AssertionError(
                    f"no back-off; copies stored meanwhile: {sum(stored_copies(sink).values())}"
                    f", most of one: {stored_copies(sink).most_common(1)}; {err[-5:]}") from None
            # While the disk is full: nothing stored twice, no temporary files anywhere.
            assert max(stored_copies(sink).values(), default=0) <= 1
            # A write the back-off interrupted removes its temporary file as it
            # unwinds: wait (bounded) for that, then nothing may be left.
            assert await _settled(spool.path / "tmp") == []
            assert not bounces.exists() or [n for n in os.listdir(bounces)
                                            if not n.endswith(".eml")] == []
            filler.unlink()
            # Every recipient gets exactly one outcome line once the disk has room.
            while len([o for o in out if re.search(r": (delivered|deferred|failed):", o)]) < 35:
                await _read_until(proc.stdout, r": (delivered|deferred|failed):", out, 60)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            rest, more_err = await asyncio.wait_for(proc.communicate(), 60)
        out += rest.decode().splitlines()
        err += more_err.decode().splitlines()
        assert proc.returncode == 75, err  # carol is still queued
        copies = stored_copies(sink)

    assert "Traceback" not in "".join(err)
    expected = {**{(f"p{i}", "alice"): 1 for i in range(10)},
                **{(f"b{i}", "bob"): 1 for i in range(5)}}
    assert dict(copies) == expected
    lines = [o for o in out if re.search(r": (delivered|deferred|failed):", o)]
    assert len(lines) == 35, "\n".join(out)  # one outcome per recipient: nothing tried twice
    # The queue recorded all of it: carol deferred (alone), the failures moved, bounces written.
    deferred = sorted(os.listdir(spool.path / "deferred"))
    assert len(deferred) == 15
    for id in deferred:
        env_ = decode_envelope((spool.path / "deferred" / id).read_bytes())
        assert [(r.address, r.state, r.attempts) for r in env_.recipients] == [
            ("carol@example.com", "queued", 1)]
    assert len(os.listdir(spool.path / "failed")) == 15
    assert sorted(os.listdir(bounces)) == sorted(n.replace(".txt", ".eml") for n in
                                                 os.listdir(spool.path / "failed")
                                                 if n.endswith(".txt"))
    assert os.listdir(spool.path / "tmp") == [] and os.listdir(spool.path / "incoming") == []


class _Events(Observer):
    def __init__(self) -> None:
        self.trouble = asyncio.Event()
        self.done = 0
        self.all_done = asyncio.Event()
        self.outcomes: list[Outcome] = []
        self.problems: list[str] = []
        self.errors: list[tuple[str, str]] = []

    def error(self, id: str, problem: str) -> None:
        self.errors.append((id, problem))

    def outcome(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def backing_off(self, problem: str, delay: float) -> None:
        self.problems.append(problem)
        self.trouble.set()

    def message_done(self, totals: object) -> None:
        self.done += 1
        if self.done == 5:
            self.all_done.set()


class _RemountAfterFirst:
    """The agent, but the spool's file system turns read-only after the first delivery."""

    def __init__(self, agent: Agent, fs: Path) -> None:
        self.agent = agent
        self.fs = fs
        self.calls = 0

    async def deliver(self, *args: Any, **kwargs: Any) -> list[RecipientResult]:
        results = await self.agent.deliver(*args, **kwargs)
        self.calls += 1
        if self.calls == 1:
            _mount("-o", "remount,ro", str(self.fs))
        return results

    async def close(self) -> None:
        await self.agent.close()


async def test_read_only_spool_after_a_partial_delivery_holds_the_entry(
        small_fs: Path) -> None:
    """EROFS on the rewrite: the claim is held, nothing re-delivered, recorded once writable."""
    spool = Spool(small_fs / "spool", create=True)
    for i in range(3):
        spool.enqueue(message(f"r{i}"), "s@example.org", ["alice@example.com",
                                                          "carol@example.com"])
    for i in range(2):
        spool.enqueue(message(f"s{i}"), "s@example.org", ["bob@example.com"])
    events = _Events()
    async with Sink(f"unix:{small_fs.parent}/{small_fs.name}.sock", collect=True,
                    faults=FaultPlan.parse(FAULTS)) as sink:
        deliverer = _RemountAfterFirst(Agent.for_server(sink.destinations[0]), small_fs)
        replayer = Replayer(spool, deliverer, concurrency=1, observer=events,
                            policy=RetryPolicy(min_backoff=3600), spool_backoff=(0.05, 0.2))
        stop = asyncio.Event()
        task = asyncio.create_task(replayer.run(watch=True, interval=0.05, stop=stop))
        await asyncio.wait_for(events.trouble.wait(), 20)
        assert "Read-only file system" in events.problems[0]
        (first, problem), = events.errors
        assert "not recorded yet (held" in problem
        # Held: another replay cannot claim it, and this one delivers nothing more.
        assert spool.claim("incoming", first) is None
        assert deliverer.calls == 1 and len(sink.messages) == 1
        _mount("-o", "remount,rw", str(small_fs))
        await asyncio.wait_for(events.all_done.wait(), 20)
        stop.set()
        totals = await asyncio.wait_for(task, 20)
        await deliverer.close()
        copies = stored_copies(sink)
    assert dict(copies) == {("r0", "alice"): 1, ("r1", "alice"): 1, ("r2", "alice"): 1,
                            ("s0", "bob"): 1, ("s1", "bob"): 1}
    assert deliverer.calls == 5
    assert totals.recipients_delivered == 5 and totals.recipients_deferred == 3
    assert sorted(o.outcome for o in events.outcomes) == ["deferred"] * 3 + ["delivered"] * 5
    assert len(os.listdir(spool.path / "deferred")) == 3
    assert os.listdir(spool.path / "incoming") == [] and os.listdir(spool.path / "tmp") == []
    for id in os.listdir(spool.path / "deferred"):
        env = decode_envelope((spool.path / "deferred" / id).read_bytes())
        assert [r.address for r in env.recipients] == ["carol@example.com"]
        assert env.delivered == 1 and env.attempts == 1


async def test_outcome_that_cannot_be_recorded_before_exit_is_reported(small_fs: Path) -> None:
    """--once on a file system that stays read-only: exit 75 and the entry named, no traceback."""
    spool = Spool(small_fs / "spool", create=True)
    id = spool.enqueue(message("x0"), "s@example.org", ["alice@example.com",
                                                        "carol@example.com"])
    async with Sink(f"unix:{small_fs.parent}/{small_fs.name}.sock", collect=True,
                    faults=FaultPlan.parse(FAULTS)) as sink:
        deliverer = _RemountAfterFirst(Agent.for_server(sink.destinations[0]), small_fs)
        obs = _Events()
        totals = await Replayer(spool, deliverer, observer=obs,
                                spool_backoff=(0.05, 0.2)).run()
        await deliverer.close()
    assert totals.unrecorded == 1 and totals.recipients_delivered == 1
    from lmtpfast.spool import exit_status

    assert exit_status(totals) == 75
    (eid, problem), = [e for e in obs.errors if "not recorded (" in e[1]]
    assert eid == id and "alice@example.com" in problem and "Read-only" in problem
    assert len(sink.messages) == 1
