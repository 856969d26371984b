"""Tests of the sink: its DATA decoder, sans-IO session, fault injection,
asyncio server (on both the default loop and uvloop) and CLI.

The lmtpfast client is not used: the tests speak LMTP over raw asyncio
streams, and Python's smtplib.LMTP and Postfix's smtp-source serve as
independent clients.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtpfast import ConfigurationError
from lmtpfast._testing.postfix import postfix_env, smtp_tool
from lmtpfast.cli import sink as sink_cli
from lmtpfast.server import (
    CLOSE,
    IMPLEMENTATIONS,
    STALL,
    Delay,
    DotDecoder,
    FaultPlan,
    FaultRule,
    SessionConfig,
    SinkHandler,
    SinkStats,
)
from lmtpfast.server import Sink as _Sink
from lmtpfast.server._faults import FaultEngine, parse_fault
from lmtpfast.server._sink import Deliver, _mailbox_name, _parse_listen

T = TypeVar("T")
Run = Callable[[Awaitable[T]], T]

LOOPS = [pytest.param(None, id="asyncio")]
try:
    import uvloop

    LOOPS.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    pass

TIMEOUT = 10.0
SMTP_SOURCE = str(smtp_tool("smtp-source") or "/usr/sbin/smtp-source")


ENGINES = ["python", "c"]
_ENGINE = ["python"]  # the engine of the test running now (set by the impl fixture)


@pytest.fixture(params=ENGINES)
def impl(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every server test runs on both engines: the pure-Python reference and the compiled one.

    A missing compiled engine skips locally but fails under CI.
    """
    name: str = request.param
    if name not in IMPLEMENTATIONS:
        msg = f"the {name} server engine is not built (python setup.py build_ext --inplace)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    _ENGINE[0] = name
    yield name
    _ENGINE[0] = "python"


def Sink(*args: Any, **kwargs: Any) -> _Sink:
    """The sink on the engine under test."""
    kwargs.setdefault("engine", _ENGINE[0])
    return _Sink(*args, **kwargs)


def new_session(
    impl: str,
    *,
    deliver: Deliver | None = None,
    faults: FaultEngine | None = None,
    stats: SinkStats | None = None,
    **cfg: Any,
) -> Any:
    """A sans-IO session of engine ``impl`` with the sink's handler."""
    stats = stats if stats is not None else SinkStats()
    if faults is not None:
        cfg.setdefault("hide", faults.plan.hide)
        cfg.setdefault("advertise", faults.plan.advertise)
    if deliver is not None:
        cfg.setdefault("delivered_text", "Saved")
    handler = SinkHandler(stats, deliver=deliver, faults=faults)
    return IMPLEMENTATIONS[impl].ServerSession(SessionConfig(**cfg), handler, stats)


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest, impl: str) -> Iterator[Run[Any]]:
    """Run a coroutine to completion on the loop under test, bounded in time."""
    with asyncio.Runner(loop_factory=request.param) as runner:

        def _run(coro: Awaitable[T]) -> T:
            return runner.run(asyncio.wait_for(coro, 60))

        yield _run


@pytest.fixture
def sockdir() -> Iterator[str]:
    # Short path: AF_UNIX paths are limited to ~107 bytes, pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="lmtps-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --- a tiny raw LMTP client ---------------------------------------------------


class Peer:
    """A raw client: send bytes, read whole replies (code, lines)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, dest: str) -> Peer:
        if dest.startswith("unix:"):
            r, w = await asyncio.wait_for(asyncio.open_unix_connection(dest[5:]), TIMEOUT)
        else:
            host, _, port = dest.rpartition(":")
            r, w = await asyncio.wait_for(
                asyncio.open_connection(host.strip("[]"), int(port)), TIMEOUT
            )
        return cls(r, w)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def line(self, timeout: float = TIMEOUT) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n"), timeout)

    async def reply(self, timeout: float = TIMEOUT) -> tuple[int, list[str]]:
        lines = []
        while True:
            raw = await self.line(timeout)
            text = raw[:-2].decode()
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), lines

    async def codes(self, n: int) -> list[int]:
        return [(await self.reply())[0] for _ in range(n)]

    async def expect_eof(self, timeout: float = TIMEOUT) -> bytes:
        """Everything until the server closes; fails if it does not within timeout."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    async def expect_silence(self, seconds: float) -> None:
        """Nothing arrives and the connection stays open for ``seconds``."""
        with pytest.raises(asyncio.TimeoutError):
            data = await asyncio.wait_for(self.reader.read(1), seconds)
            pytest.fail(f"expected silence, got {data!r}")

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), TIMEOUT)
        except (TimeoutError, ConnectionError):
            pass

    async def hello(self) -> list[str]:
        code, _ = await self.reply()
        assert code == 220
        self.send(b"LHLO client.example\r\n")
        code, lines = await self.reply()
        assert code == 250
        return lines


@asynccontextmanager
async def serving(
    sockdir: str, *, unix: bool = True, **kwargs: Any
) -> AsyncIterator[tuple[Sink, Peer]]:
    """A started sink and one connected client that has done LHLO."""
    listen = f"unix:{sockdir}/s" if unix else "127.0.0.1:0"
    async with Sink(listen, **kwargs) as sink:
        peer = await Peer.connect(sink.destinations[0])
        try:
            await peer.hello()
            yield sink, peer
        finally:
            await peer.close()


def envelope(*rcpts: str, sender: str = "sender@example.com") -> bytes:
    return (
        b"MAIL FROM:<%s>\r\n" % sender.encode()
        + b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts)
        + b"DATA\r\n"
    )


# --- DATA decoder -----------------------------------------------------------


def stuff(lines: list[bytes]) -> bytes:
    """Independent encoder: CRLF lines, a dot added to lines that start with one, end marker."""
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) + b".\r\n"


def decode_in_pieces(wire: bytes, cuts: list[int], keep: bool = True) -> tuple[bytes, int, int]:
    """Feed ``wire`` split at ``cuts``; return (content, size, offset of what follows)."""
    dec = DotDecoder(keep=keep)
    bounds = [0, *cuts, len(wire)]
    consumed = 0
    for a, b in itertools.pairwise(bounds):
        end = dec.feed(wire[a:b])
        if end >= 0:
            assert dec.done
            return dec.content(), dec.size, a + end
        consumed = b
    raise AssertionError(f"end of data not found in {wire!r} (consumed {consumed})")


DECODER_CASES = [
    # (wire, content)
    (b".\r\n", b""),
    (b"a\r\n.\r\n", b"a\r\n"),
    (b"..\r\n.\r\n", b".\r\n"),
    (b"..a\r\n..\r\n...\r\n.\r\n", b".a\r\n.\r\n..\r\n"),
    (b".a\r\n.\r\n", b"a\r\n"),  # an unstuffed dot line still loses its dot
    (b"a\nb\r\n.\r\n", b"a\nb\r\n"),
    # Bare LF is no line end: none of these dots ends the content.
    (b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n"),
    (b"a\r\n.\nb\r\n.\r\n", b"a\r\n\nb\r\n"),  # "CR LF ." starts a line: its dot is stuffing
    (b"a\n.\r\nb\r\n.\r\n", b"a\n.\r\nb\r\n"),
    (b"a\r.\r\nb\r\n.\r\n", b"a\r.\r\nb\r\n"),
    (b"\r\n\r\n.\r\n", b"\r\n\r\n"),
    (b"\r\r\n.\r\n", b"\r\r\n"),
    (b"x\r\n.\r\r\n.\r\n", b"x\r\n\r\r\n"),
    (b"x\r\n..\r\n.\r\n", b"x\r\n.\r\n"),
    (b"\r\n.\r\n", b"\r\n"),
]


@pytest.mark.parametrize(("wire", "content"), DECODER_CASES)
@pytest.mark.parametrize("keep", [True, False])
def test_decoder_every_split(wire: bytes, content: bytes, keep: bool) -> None:
    after = b"MAIL FROM:<a@b>\r\n"
    full = wire + after
    for i in range(len(full) + 1):
        got, size, rest = decode_in_pieces(full, [i], keep)
        assert full[rest:] == after, (i, full)
        assert size == len(content)
        if keep:
            assert got == content, (i, full)
    # Byte by byte, and in three pieces at every pair of offsets.
    got, size, rest = decode_in_pieces(full, list(range(1, len(full))), keep)
    assert full[rest:] == after and size == len(content)
    for i in range(len(full)):
        for j in range(i, len(full)):
            got, size, rest = decode_in_pieces(full, [i, j], keep)
            assert full[rest:] == after and size == len(content)
            if keep:
                assert got == content


def test_decoder_offset_in_buffer() -> None:
    data = b"DATA\r\n..x\r\n.\r\nQUIT\r\n"
    dec = DotDecoder()
    end = dec.feed(data, 6)
    assert data[end:] == b"QUIT\r\n"
    assert dec.content() == b".x\r\n"


def test_decoder_limit_drops_content() -> None:
    dec = DotDecoder(limit=10)
    assert dec.feed(b"0123456789\r\n") == -1
    assert dec.feed(b"more\r\n.\r\n") >= 0
    assert dec.overflow and dec.content() == b"" and dec.size == 18


_line = st.binary(max_size=40).filter(lambda b: b"\r\n" not in b and not b.endswith(b"\r"))


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(
        st.one_of(_line, st.sampled_from([b".", b"..", b".x", b"", b"\r", b"\n."])), max_size=30
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
    keep=st.booleans(),
)
def test_decoder_round_trip(lines: list[bytes], cuts: list[int], keep: bool) -> None:
    lines = [ln for ln in lines if not ln.endswith(b"\r")] or [b""]
    text = b"".join(ln + b"\r\n" for ln in lines)
    wire = stuff(lines) + b"RSET\r\n"
    got, size, rest = decode_in_pieces(wire, sorted(c % (len(wire) + 1) for c in cuts), keep)
    assert wire[rest:] == b"RSET\r\n"
    assert size == len(text)
    if keep:
        assert got == text


# --- sans-IO session ----------------------------------------------------------

TRANSCRIPT = (
    b"LHLO c\r\n"
    + envelope("alice@example.org", "bob@example.org", "alice@example.org")
    + b"..a\r\nline\r\n.\r\n"
    + b"MAIL FROM:<>\r\nRCPT TO:<carol@example.org>\r\nBDAT 5\r\nhelloBDAT 0 LAST\r\n"
    + b"NOOP\r\nQUIT\r\n"
)


def session_output(impl: str, chunks: list[bytes], **cfg: Any) -> tuple[bytes, list[Any]]:
    s = new_session(impl, **cfg)
    items = s.start()
    for c in chunks:
        if c:  # b"" would mean EOF
            items += s.receive_data(c)
    data = b"".join(i for i in items if isinstance(i, bytes))
    return data, [i for i in items if not isinstance(i, bytes)]


def test_session_one_write_per_read(impl: str) -> None:
    s = new_session(impl)
    s.start()
    s.receive_data(b"LHLO c\r\n")
    out = s.receive_data(envelope("a@x", "b@x"))
    assert len(out) == 1 and isinstance(out[0], bytes)
    assert out[0].count(b"\r\n") == 4
    out = s.receive_data(b"body\r\n.\r\n" + envelope("c@x"))
    assert len(out) == 1 and isinstance(out[0], bytes)
    assert out[0].split(b"\r\n")[:2] == [
        b"250 2.0.0 <a@x> Accepted, not stored",
        b"250 2.0.0 <b@x> Accepted, not stored",
    ]


def test_session_any_split_gives_same_replies(impl: str) -> None:
    whole, instr = session_output(impl, [TRANSCRIPT])
    assert instr == [CLOSE]
    assert whole.count(b"\r\n") > 10
    for i in range(len(TRANSCRIPT) + 1):
        got, _ = session_output(impl, [TRANSCRIPT[:i], TRANSCRIPT[i:]])
        assert got == whole, i
    drip, _ = session_output(impl, [TRANSCRIPT[i : i + 1] for i in range(len(TRANSCRIPT))])
    assert drip == whole


def test_session_keeps_content(impl: str) -> None:
    got: list[tuple[bytes, list[bytes], bytes]] = []

    def deliver(sender: bytes, rcpts: Any, content: bytes) -> list[bool]:
        got.append((sender, list(rcpts), content))
        return [True] * len(rcpts)

    for i in range(0, len(TRANSCRIPT) + 1, 7):
        got.clear()
        session_output(impl, [TRANSCRIPT[:i], TRANSCRIPT[i:]], deliver=deliver)
        assert got == [
            (
                b"sender@example.com",
                [b"alice@example.org", b"bob@example.org", b"alice@example.org"],
                b".a\r\nline\r\n",
            ),
            (b"", [b"carol@example.org"], b"hello"),
        ]


def test_session_store_failure_is_451(impl: str) -> None:
    data, _ = session_output(
        impl,
        [b"LHLO c\r\n" + envelope("a@x", "b@x") + b"hi\r\n.\r\n"],
        deliver=lambda s, r, c: [True, False],
    )
    assert b"250 2.0.0 <a@x> Saved\r\n451 4.3.0 <b@x> Could not store" in data


def test_session_slow_drip_does_not_rescan(impl: str) -> None:
    # A long line dripped byte by byte must be refused, not buffered forever.
    s = new_session(impl, max_line_length=100)
    s.start()
    out: list[Any] = []
    for _ in range(300):
        out += s.receive_data(b"x")
    out += s.receive_data(b"\r\nNOOP\r\n")
    assert b"".join(out) == b"500 5.5.6 Line too long\r\n250 2.0.0 OK\r\n"


# --- faults: parsing and engine ---------------------------------------------


def test_parse_fault_examples() -> None:
    r = parse_fault("rcpt:bob@*=550 5.1.1 No such user")
    assert (r.command, r.pattern, r.action, r.code, r.enhanced, r.text) == (
        "rcpt",
        "bob@*",
        "reply",
        550,
        "5.1.1",
        "No such user",
    )
    r = parse_fault("mail@rate=0.01:seed=1=421 4.3.2 Going away")
    assert (r.rate, r.seed, r.code) == (0.01, 1, 421)
    r = parse_fault("rcpt@nth=2:*@example.org=450")
    assert (r.nth, r.pattern, r.code, r.enhanced) == (2, "*@example.org", 450, None)
    assert parse_fault("data=disconnect").action == "disconnect"
    assert parse_fault("lhlo=stall").action == "stall"
    r = parse_fault("greeting=delay:1.5")
    assert (r.action, r.delay) == ("proceed", 1.5)
    r = parse_fault("dot:*@example.org=delay:0.2,452 4.2.2 Over quota")
    assert (r.delay, r.code, r.text) == (0.2, 452, "Over quota")
    r = parse_fault("dot@nth=2=short:1:stall")
    assert (r.action, r.count, r.then) == ("short", 1, "stall")
    assert parse_fault("dot=short:0:continue").then == "continue"
    assert parse_fault("noop=oversize:100").size == 100
    assert parse_fault("rset=extra:250 2.0.0 hi").reply_line() == b"250 2.0.0 hi\r\n"
    assert parse_fault("quit=garbage:*** nope").text == "*** nope"


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "rcpt",
        "rcpt=",
        "helo=stall",
        "rcpt=bogus",
        "rcpt=55 5.1.1 x",
        "rcpt=650 x",
        "rcpt=550 4.1.1 wrong class",
        "rset:bob=stall",
        "rcpt@nth=0=stall",
        "rcpt@nth=x=stall",
        "rcpt@color=red=stall",
        "rcpt@rate=2=stall",
        "rcpt=short:1",
        "dot=short:x",
        "dot=short:1:explode",
        "rcpt=delay:soon",
        "rcpt=delay:-1",
        "rcpt=delay:inf",
        "noop=oversize:0",
    ],
)
def test_bad_fault_spec(spec: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_fault(spec)
    assert "--fault" in str(info.value)


def test_fault_rule_validated_in_python_api() -> None:
    with pytest.raises(ConfigurationError):
        FaultRule(command="rcpt", code=250, enhanced="5.0.0")
    with pytest.raises(ConfigurationError):
        FaultRule(command="rcpt", text="two\r\nlines", code=550)
    with pytest.raises(ConfigurationError):
        FaultPlan(advertise=("BAD\r\nLINE",))


def test_fault_engine_nth_times_rate() -> None:
    eng = FaultEngine(FaultPlan.parse(["rcpt@nth=3=450"]))
    rules = eng.rules_for("rcpt")
    fired = [eng.check(rules, b"a@y") for _ in range(5)]
    assert [r.code if r else None for r in fired] == [None, None, 450, None, None]

    eng = FaultEngine(FaultPlan.parse(["rcpt@times=2:*@x=451"]))
    rules = eng.rules_for("rcpt")
    out = [eng.check(rules, a) for a in (b"a@y", b"a@x", b"B@X", b"c@x")]
    assert [r.code if r else None for r in out] == [None, 451, 451, None]

    def draws(seed: int) -> list[bool]:
        e = FaultEngine(FaultPlan.parse([f"mail@rate=0.3:seed={seed}=421"]))
        return [e.check(e.rules_for("mail"), b"x") is not None for _ in range(2000)]

    a, b = draws(7), draws(7)
    assert a == b  # seeded: a soak test can be replayed
    assert 450 < sum(a) < 750
    assert draws(8) != a


# --- the server: transactions -------------------------------------------------


def test_pipelined_transaction_one_refused(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        plan = FaultPlan.parse(["rcpt:bob@*=550 5.1.1 No such user"])
        async with serving(sockdir, faults=plan, collect=True) as (sink, peer):
            peer.send(envelope("alice@example.org", "bob@example.org", "carol@example.org"))
            replies = [await peer.reply() for _ in range(5)]
            assert [c for c, _ in replies] == [250, 250, 550, 250, 354]
            assert replies[2][1] == ["5.1.1 No such user"]
            peer.send(b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n")
            finals = [await peer.reply() for _ in range(2)]
            assert [c for c, _ in finals] == [250, 250]
            assert "<alice@example.org>" in finals[0][1][0]
            assert finals[0][1][0].startswith("2.0.0 ")
            assert "<carol@example.org>" in finals[1][1][0]
            assert (await peer.reply())[0] == 221
            assert await peer.expect_eof() == b""
            assert [m.recipients for m in sink.messages] == [
                ["alice@example.org", "carol@example.org"]
            ]
            st = sink.stats
            assert (st.transactions, st.recipients_accepted, st.recipients_refused) == (1, 2, 1)
            assert st.final_replies == {250: 2}
            assert st.faults_fired == 1

    run(main())


def test_duplicate_recipients_get_one_reply_each(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        async with serving(sockdir, unix=False, collect=True) as (sink, peer):
            peer.send(envelope("a@x", "a@x", "b@x", "a@x"))
            assert await peer.codes(6) == [250] * 5 + [354]
            peer.send(b"hi\r\n.\r\n")
            finals = [await peer.reply() for _ in range(4)]
            assert [ln[0].split()[1] for _, ln in finals] == ["<a@x>", "<a@x>", "<b@x>", "<a@x>"]
            peer.send(b"NOOP\r\n")
            assert (await peer.reply())[0] == 250  # nothing extra was sent
            assert sink.messages[0].recipients == ["a@x", "a@x", "b@x", "a@x"]
            assert sink.stats.final_replies == {250: 4}

    run(main())


def test_maildir_content_byte_exact(run: Run[Any], sockdir: str, tmp_path: Path) -> None:
    body = b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\nbare\nlf\r\n\xff\x00binary\r\n"
    stuffed = stuff(body.split(b"\r\n")[:-1])

    async def main() -> None:
        async with serving(sockdir, maildir=str(tmp_path / "md")) as (sink, peer):
            peer.send(envelope("Alice@example.org", "bob@example.org", "Alice@example.org"))
            assert await peer.codes(5) == [250, 250, 250, 250, 354]
            # Content and final dot split awkwardly across writes.
            for i in range(0, len(stuffed), 7):
                peer.send(stuffed[i : i + 7])
                await asyncio.sleep(0)
            assert await peer.codes(3) == [250, 250, 250]
            assert sink.stats.messages_stored == 3

    run(main())
    alice = sorted((tmp_path / "md" / "Alice" / "new").iterdir())
    bob = sorted((tmp_path / "md" / "bob" / "new").iterdir())
    assert len(alice) == 2 and len(bob) == 1
    for f in [*alice, *bob]:
        assert f.read_bytes() == body
    assert list((tmp_path / "md" / "bob" / "tmp").iterdir()) == []


def test_maildir_received_headers(run: Run[Any], sockdir: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(sockdir, maildir=str(tmp_path), received_headers=True) as (_, peer):
            peer.send(envelope("u@x", sender="s@y") + b"hi\r\n.\r\n")
            assert await peer.codes(4) == [250, 250, 354, 250]

    run(main())
    (f,) = (tmp_path / "u" / "new").iterdir()
    assert f.read_bytes() == b"Return-Path: <s@y>\r\nDelivered-To: u@x\r\nhi\r\n"


def test_mailbox_names_are_safe() -> None:
    assert _mailbox_name(b"bob@x") == "bob"
    assert _mailbox_name(b"postmaster") == "postmaster"
    assert _mailbox_name(b"../../etc@x") == "_.._.._etc"
    assert _mailbox_name(b"a/b@x") == "a_b"
    assert _mailbox_name(b'"q"@x') == "q"
    assert _mailbox_name(b"@x") == "_"


def test_bdat_chunks(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        async with serving(sockdir, collect=True) as (sink, peer):
            peer.send(b"MAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\n")
            assert await peer.codes(3) == [250, 250, 250]
            peer.send(b"BDAT 7\r\nHello\r\n")
            code, lines = await peer.reply()
            assert (code, lines) == (250, ["2.0.0 7 octets received"])
            # Two chunks in one write, the second split across writes, then LAST.
            peer.send(b"BDAT 8\r\n.\r\n\r\n.\r\nBDAT 11\r\n\x00binary")
            peer.send(b"\r\n\r\nBDAT 0 LAST\r\n")
            assert await peer.codes(2) == [250, 250]
            finals = [await peer.reply() for _ in range(2)]
            assert [(c, ln[0].split()[1]) for c, ln in finals] == [(250, "<a@x>"), (250, "<b@x>")]
            # BDAT LAST carrying data, pipelined with the envelope.
            peer.send(b"MAIL FROM:<s@x>\r\nRCPT TO:<c@x>\r\nBDAT 3 LAST\r\nabcNOOP\r\n")
            assert await peer.codes(4) == [250, 250, 250, 250]
            assert [m.content for m in sink.messages] == [
                b"Hello\r\n.\r\n\r\n.\r\n\x00binary\r\n\r\n",
                b"abc",
            ]
            assert sink.stats.transactions == 2

    run(main())


def test_bdat_errors_consume_the_chunk(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        async with serving(sockdir, collect=True) as (sink, peer):
            # No transaction: 503, and the chunk (which looks like commands) is skipped.
            peer.send(b"BDAT 6\r\nQUIT\r\nNOOP\r\n")
            assert await peer.codes(2) == [503, 250]
            # No accepted recipient: 503 as for DATA (RFC 2033 4.2).
            peer.send(b"MAIL FROM:<s@x>\r\nBDAT 2 LAST\r\nxxRSET\r\n")
            assert await peer.codes(3) == [250, 503, 250]
            # DATA after BDAT in one transaction: 503.
            peer.send(b"MAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nBDAT 1\r\nxDATA\r\nRSET\r\n")
            assert await peer.codes(5) == [250, 250, 250, 503, 250]
            peer.send(b"BDAT x\r\nBDAT 1 FIRST\r\n")
            assert await peer.codes(2) == [501, 501]
            assert sink.messages == []

    run(main())


def test_bdat_not_offered_when_hidden(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        exts = ["PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME"]
        async with Sink(f"unix:{sockdir}/s", extensions=exts) as sink:
            peer = await Peer.connect(sink.destinations[0])
            lines = await peer.hello()
            assert lines[1:] == exts
            peer.send(b"MAIL FROM:<s@x> SIZE=10\r\nMAIL FROM:<s@x> SMTPUTF8\r\n")
            assert await peer.codes(2) == [555, 555]
            peer.send(b"MAIL FROM:<s@x>\r\nRCPT TO:<a@x> NOTIFY=NEVER\r\nBDAT 0 LAST\r\n")
            assert await peer.codes(3) == [250, 555, 502]
            await peer.close()

    run(main())


def test_lhlo_advertises_everything(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        async with Sink(f"unix:{sockdir}/s", hostname="mx.test", max_size=1000) as sink:
            peer = await Peer.connect(sink.destinations[0])
            code, lines = await peer.reply()
            assert (code, lines) == (220, ["mx.test LMTP lmtpfast sink ready"])
            peer.send(b"LHLO c\r\n")
            code, lines = await peer.reply()
            assert code == 250
            assert lines == [
                "mx.test",
                "PIPELINING",
                "CHUNKING",
                "ENHANCEDSTATUSCODES",
                "8BITMIME",
                "SMTPUTF8",
                "SIZE 1000",
                "DSN",
            ]
            await peer.close()

    run(main())


def test_error_replies(run: Run[Any], sockdir: str) -> None:
    cases = [
        (b"MAIL FROM:<a@x>\r\n", "503 5.5.1"),  # before LHLO
        (b"EHLO c\r\n", "500 5.5.1"),
        (b"HELO c\r\n", "500 5.5.1"),
        (b"LHLO\r\n", "501 5.5.4"),
        (b"LHLO c\r\n", "250"),
        (b"RCPT TO:<a@x>\r\n", "503 5.5.1"),
        (b"DATA\r\n", "503 5.5.1"),
        (b"XYZZY\r\n", "500 5.5.2"),
        (b"\r\n", "500 5.5.2"),
        (b"MAIL FROM:a@x\r\n", "501 5.1.7"),
        (b"MAIL TO:<a@x>\r\n", "501 5.5.4"),
        (b"MAIL FROM:<a@x>junk\r\n", "501 5.1.7"),
        (b"MAIL FROM:<a@x> SIZE=99999\r\n", "552 5.3.4"),
        (b"MAIL FROM:<a@x> SIZE=big\r\n", "501 5.5.4"),
        (b"MAIL FROM:<a@x> FOO=1\r\n", "555 5.5.4"),
        (b"MAIL FROM:<a@x> BODY=BINARYMIME\r\n", "555 5.5.4"),
        ("MAIL FROM:<jörg@x>\r\n".encode(), "553 5.6.7"),
        (b"MAIL FROM:<a@x> BODY=8BITMIME RET=HDRS ENVID=x SIZE=10\r\n", "250 2.1.0"),
        (b"MAIL FROM:<b@x>\r\n", "503 5.5.1"),  # nested
        (b"DATA\r\n", "503 5.5.1"),  # no accepted recipient
        (b"RCPT TO:<>\r\n", "501 5.1.3"),
        (b"RCPT TO:<a b@x>\r\n", "501 5.1.3"),
        ("RCPT TO:<jörg@x>\r\n".encode(), "553 5.6.7"),
        (b"RCPT TO:<a@x> NOTIFY=SOMETIMES\r\n", "501 5.5.4"),
        (b"RCPT TO:<a@x> XFOO\r\n", "555 5.5.4"),
        (b"RCPT TO:<a@x> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@x\r\n", "250 2.1.5"),
        (b"RCPT TO:<@relay.example:b@x>\r\n", "250 2.1.5 Recipient <b@x>"),
        (b'RCPT TO:<"odd > local"@x>\r\n', "250 2.1.5"),
        (b"RCPT TO: <Postmaster>\r\n", "250 2.1.5"),
        (b"DATA extra\r\n", "501 5.5.4"),
        (b"RSET\r\n", "250 2.0.0"),
        (b"VRFY bob\r\n", "252 2.0.0"),
        (b"STARTTLS\r\n", "502 5.5.1"),
        (b"AUTH PLAIN\r\n", "502 5.5.1"),
        (b"NOOP whatever\r\n", "250 2.0.0"),
        (b"NOOP\nRSET\r\n", "500 5.5.2"),  # bare LF inside a command line
        (b"X" * 3000 + b"\r\n", "500 5.5.6"),
        ("MAIL FROM:<jörg@x> SMTPUTF8\r\n".encode(), "250 2.1.0"),
        ("RCPT TO:<jörg@x>\r\n".encode(), "250 2.1.5"),
        (b"QUIT\r\n", "221 2.0.0"),
    ]

    async def main() -> None:
        async with Sink(f"unix:{sockdir}/s", max_size=1000) as sink:
            peer = await Peer.connect(sink.destinations[0])
            assert (await peer.reply())[0] == 220
            # All at once (pipelined), then compare in order.
            peer.send(b"".join(c for c, _ in cases))
            for command, expected in cases:
                raw = (await peer.line()).decode()
                while raw[3] == "-":
                    raw = (await peer.line()).decode()
                assert raw.startswith(expected), (command[:40], raw)
            assert await peer.expect_eof() == b""
            await peer.close()

    run(main())


def test_too_much_data_for_size(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        async with serving(sockdir, max_size=100, collect=True) as (sink, peer):
            peer.send(envelope("a@x", "b@x") + b"x" * 200 + b"\r\n.\r\n")
            assert await peer.codes(5) == [250, 250, 250, 354, 552]
            code, lines = await peer.reply()
            assert code == 552 and lines[0].startswith("5.3.4 <b@x>")
            peer.send(b"MAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nBDAT 60\r\n" + b"y" * 60)
            peer.send(b"BDAT 60 LAST\r\n" + b"z" * 60)
            assert await peer.codes(4) == [250, 250, 250, 552]
            peer.send(envelope("a@x") + b"x" * 98 + b"\r\n.\r\n")  # exactly the limit
            assert await peer.codes(4) == [250, 250, 354, 250]
            assert len(sink.messages) == 1
            assert sink.stats.final_replies == {552: 3, 250: 1}

    run(main())


def test_smtplib_lmtp_delivers(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        async with Sink(f"unix:{sockdir}/s", collect=True) as sink:
            path = sink.destinations[0][5:]

            def deliver() -> dict[str, Any]:
                with smtplib.LMTP(path, timeout=TIMEOUT) as client:
                    return client.sendmail(
                        "from@example.com",
                        ["to@example.com"],
                        b"Subject: smtplib\r\n\r\n.leading dot\r\nend\r\n",
                    )

            refused = await asyncio.wait_for(asyncio.to_thread(deliver), TIMEOUT)
            assert refused == {}
            (msg,) = sink.messages
            assert msg.sender == "from@example.com"
            assert msg.recipients == ["to@example.com"]
            assert msg.content == b"Subject: smtplib\r\n\r\n.leading dot\r\nend\r\n"

    run(main())


def test_peak_connections_and_max_connections(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        async with Sink(["127.0.0.1:0", f"unix:{sockdir}/s"], max_connections=5) as sink:
            peers = [await Peer.connect(sink.destinations[i % 2]) for i in range(5)]
            for p in peers:
                assert (await p.reply())[0] == 220
            extra = await Peer.connect(sink.destinations[0])
            code, lines = await extra.reply()
            assert code == 421 and lines[0].startswith("4.3.2")
            assert await extra.expect_eof() == b""
            await extra.close()
            st = sink.stats
            assert (st.connections_current, st.connections_peak, st.connections_refused) == (
                5,
                5,
                1,
            )
            for p in peers:
                await p.close()
            for _ in range(200):  # bounded wait for the server to see the closes
                if sink.stats.connections_current == 0:
                    break
                await asyncio.sleep(0.01)
            assert sink.stats.connections_current == 0
            assert sink.stats.connections_peak == 5
            assert sink.stats.connections_total == 5

    run(main())


def test_listen_destinations(run: Run[Any], sockdir: str) -> None:
    assert _parse_listen("unix:/tmp/x") == ("unix", "/tmp/x", 0)
    assert _parse_listen("/tmp/x") == ("unix", "/tmp/x", 0)
    assert _parse_listen("127.0.0.1:24") == ("inet", "127.0.0.1", 24)
    assert _parse_listen("inet:localhost:0") == ("inet", "localhost", 0)
    assert _parse_listen("[::1]:2400") == ("inet", "::1", 2400)
    for bad in ["", "unix:", "127.0.0.1", "127.0.0.1:x", ":24", "::1:24", "[::1]", "h:70000"]:
        with pytest.raises(ConfigurationError):
            _parse_listen(bad)

    async def main() -> None:
        sink = Sink(["127.0.0.1:0", "[::1]:0", f"unix:{sockdir}/s"])
        try:
            await sink.start()
        except OSError:  # no IPv6 here
            sink = Sink(["127.0.0.1:0", f"unix:{sockdir}/s"])
            await sink.start()
        try:
            assert sink.destinations[0].startswith("127.0.0.1:")
            assert not sink.destinations[0].endswith(":0")
            assert sink.destinations[-1] == f"unix:{sockdir}/s"
            for dest in sink.destinations:
                peer = await Peer.connect(dest)
                assert (await peer.reply())[0] == 220
                await peer.close()
        finally:
            await sink.stop()
        assert not os.path.exists(f"{sockdir}/s")
        assert sink.destinations == []

    run(main())


# --- the server: every fault action -----------------------------------------


def faulty(sockdir: str, *specs: str, **kwargs: Any) -> Any:
    return serving(sockdir, faults=FaultPlan.parse(specs), **kwargs)


def test_fault_dot_reply_for_one_recipient(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        async with faulty(sockdir, "dot:*@example.org=452 4.2.2 Over quota", collect=True) as (
            sink,
            peer,
        ):
            peer.send(envelope("a@example.com", "b@example.org", "c@example.com") + b"x\r\n.\r\n")
            assert await peer.codes(5) == [250, 250, 250, 250, 354]
            finals = [await peer.reply() for _ in range(3)]
            assert [c for c, _ in finals] == [250, 452, 250]
            assert finals[1][1] == ["4.2.2 Over quota"]
            assert sink.messages[0].recipients == ["a@example.com", "c@example.com"]
            assert sink.stats.final_replies == {250: 2, 452: 1}

    run(main())


def test_fault_delay_keeps_order(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        # No clock asserts: a window of silence much shorter than the delay
        # can only see nothing (the delay is a lower bound), whatever the load.
        async with faulty(sockdir, "rcpt:slow@*=delay:1.0") as (_, peer):
            peer.send(envelope("a@x", "slow@x", "c@x") + b"x\r\n.\r\nNOOP\r\n")
            assert await peer.codes(2) == [250, 250]
            await peer.expect_silence(0.1)  # the rest waits behind the delay, in order
            assert await peer.codes(7) == [250, 250, 354, 250, 250, 250, 250]

    run(main())


def test_fault_greeting_delay_and_refusal(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        plan = FaultPlan.parse(["greeting@nth=1=delay:1.0", "greeting=554 5.3.2 Not today"])
        async with Sink(f"unix:{sockdir}/s", faults=plan) as sink:
            p = await Peer.connect(sink.destinations[0])
            await p.expect_silence(0.1)  # shorter than the delay: see the note above
            assert (await p.reply())[0] == 220
            await p.close()
            p = await Peer.connect(sink.destinations[0])
            assert await p.reply() == (554, ["5.3.2 Not today"])
            p.send(b"LHLO c\r\nMAIL FROM:<a@x>\r\nQUIT\r\n")
            assert await p.codes(3) == [503, 503, 221]
            await p.close()

    run(main())


def test_fault_421_closes(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        async with faulty(sockdir, "mail=421 4.3.2 Going away") as (_, peer):
            peer.send(envelope("a@x"))
            assert await peer.reply() == (421, ["4.3.2 Going away"])
            assert await peer.expect_eof() == b""

    run(main())


def test_fault_stall(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        async with Sink(f"unix:{sockdir}/s", faults=FaultPlan.parse(["lhlo=stall"])) as sink:
            peer = await Peer.connect(sink.destinations[0])
            assert (await peer.reply())[0] == 220
            peer.send(b"LHLO c\r\nNOOP\r\n")
            await peer.expect_silence(0.3)
            peer.send(b"NOOP\r\n")  # input is still read (and dropped)
            await peer.expect_silence(0.2)
            assert sink.stats.connections_current == 1
        # Stopping the sink ends the stalled connection.
        assert await peer.expect_eof() == b""
        await peer.close()

    run(main())


def test_fault_disconnect_before_reply(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        async with faulty(sockdir, "data=disconnect") as (_, peer):
            peer.send(envelope("a@x", "b@x"))
            assert await peer.codes(3) == [250, 250, 250]
            assert await peer.expect_eof() == b""  # no 354

    run(main())


def test_fault_reset(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        async with faulty(sockdir, "rcpt=reset", unix=False) as (_, peer):
            peer.send(envelope("a@x"))
            assert (await peer.reply())[0] == 250
            try:
                rest = await peer.expect_eof()
            except ConnectionResetError:
                rest = b""
            assert rest == b""

    run(main())


def test_fault_garbage_oversize_extra(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        async with faulty(
            sockdir,
            "noop@nth=1=garbage",
            "noop@nth=2=oversize:10000",
            "rset=extra:250 2.0.0 Surprise",
        ) as (_, peer):
            peer.send(b"NOOP\r\n")
            line = await peer.line()
            assert not line[:3].isdigit() and line.endswith(b"\r\n")
            peer.send(b"NOOP\r\n")
            line = await peer.line()
            assert line.startswith(b"250 ") and len(line) == 3 + 1 + 10000 + 2
            peer.send(b"RSET\r\nNOOP\r\n")
            assert await peer.reply() == (250, ["2.0.0 Reset OK"])
            assert await peer.reply() == (250, ["2.0.0 Surprise"])
            assert await peer.reply() == (250, ["2.0.0 OK"])

    run(main())


def test_fault_short_then_disconnect_or_stall(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        async with faulty(
            sockdir, "dot@nth=1=short:1", "dot@nth=2=short:2:stall", collect=True
        ) as (sink, peer):
            peer.send(envelope("a@x", "b@x", "c@x") + b"x\r\n.\r\n")
            assert await peer.codes(6) == [250] * 4 + [354, 250]
            assert await peer.expect_eof() == b""
            assert sink.messages[0].recipients == ["a@x"]
            p2 = await Peer.connect(sink.destinations[0])
            await p2.hello()
            p2.send(envelope("a@x", "b@x", "c@x") + b"x\r\n.\r\n")
            assert await p2.codes(7) == [250] * 4 + [354, 250, 250]
            await p2.expect_silence(0.3)
            await p2.close()

    run(main())


def test_fault_short_then_continue(run: Run[Any], sockdir: str) -> None:
    """A server that loses final replies and carries on (what shifts a pipelining client)."""
    async def main() -> None:
        async with faulty(sockdir, "dot@nth=1=short:2:continue", collect=True) as (sink, peer):
            peer.send(envelope("a@x", "b@x", "c@x") + b"x\r\n.\r\n" + b"NOOP\r\n")
            # Two of three final replies, then NOOP's: a client reads it as c's.
            assert await peer.codes(7) == [250] * 4 + [354, 250, 250]
            assert await peer.reply() == (250, ["2.0.0 OK"])
            assert sink.messages[0].recipients == ["a@x", "b@x"]
            assert sink.stats.final_replies == {250: 2}
            peer.send(envelope("d@x") + b"y\r\n.\r\n")  # the next message is whole
            assert await peer.codes(4) == [250, 250, 354, 250]
            assert sink.messages[1].recipients == ["d@x"]

    run(main())


def test_fault_dot_disconnect_mid_replies(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        async with faulty(sockdir, "dot:b@*=disconnect", collect=True) as (sink, peer):
            peer.send(envelope("a@x", "b@x", "c@x") + b"x\r\n.\r\n")
            assert await peer.codes(6) == [250] * 4 + [354, 250]
            assert await peer.expect_eof() == b""
            assert sink.messages[0].recipients == ["a@x"]  # only what was acknowledged
            assert sink.stats.final_replies == {250: 1}

    run(main())


def test_fault_nth_and_data_refusal(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        async with faulty(
            sockdir, "rcpt@nth=2=450 4.2.1 Try later", "data=554 5.6.0 No thanks"
        ) as (sink, peer):
            peer.send(envelope("a@x", "b@x", "c@x"))
            assert await peer.codes(5) == [250, 250, 450, 250, 554]
            peer.send(b"RSET\r\n" + envelope("a@x"))
            assert await peer.codes(4) == [250, 250, 250, 554]
            assert sink.stats.transactions == 0

    run(main())


def test_fault_bdat(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        async with faulty(sockdir, "bdat@nth=1=452 4.3.1 Full") as (sink, peer):
            peer.send(b"MAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nBDAT 3\r\nabcBDAT 3 LAST\r\ndef")
            # The failed chunk fails the transaction; the pipelined one is refused.
            assert await peer.codes(4) == [250, 250, 452, 503]
            peer.send(b"MAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nBDAT 3 LAST\r\nabc")
            assert await peer.codes(3) == [250, 250, 250]
            assert sink.stats.transactions == 1

    run(main())


def test_fault_hide_and_advertise(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        plan = FaultPlan(hide=("PIPELINING", "SIZE"), advertise=("STARTTLS", "XFOO bar"))
        async with serving(sockdir, faults=plan) as (_, peer):
            peer.send(b"LHLO c\r\n")
            _, lines = await peer.reply()
            assert lines[1:] == [
                "CHUNKING",
                "ENHANCEDSTATUSCODES",
                "8BITMIME",
                "SMTPUTF8",
                "DSN",
                "STARTTLS",
                "XFOO bar",
            ]
            # Hidden but honoured; advertised but not.
            peer.send(b"MAIL FROM:<a@x> SIZE=10\r\nSTARTTLS\r\n")
            assert await peer.codes(2) == [250, 502]

    run(main())


def test_fault_rate_over_many_messages(run: Run[Any], sockdir: str) -> None:
    async def main() -> None:
        async with faulty(sockdir, "rcpt@rate=0.25:seed=3=450 4.2.1 Busy") as (sink, peer):
            n = 400
            peer.send((b"MAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nRSET\r\n") * n)
            codes = await peer.codes(3 * n)
            refused = codes[1::3].count(450)
            assert 60 < refused < 140
            assert sink.stats.recipients_refused == refused

    run(main())


# --- CLI --------------------------------------------------------------------


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lmtpfast")
    sink_cli.register(parser.add_subparsers())
    return parser.parse_args(["sink", *argv])


@pytest.mark.parametrize(
    "argv",
    [
        ["--fault", "rcpt=bogus"],
        ["--fault", "nonsense"],
        ["--listen", "nowhere"],
        ["--hide", "NOTANEXT"],
        ["--duration", "0"],
        ["--max-size", "-1"],
    ],
)
def test_cli_usage_errors_exit_64(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from lmtpfast.cli import main

    # Some are refused by the option's type (argparse: usage, then the error), the
    # others when the sink starts; both exit 64 without a traceback.
    try:
        status = main(["sink", *argv])
    except SystemExit as exc:
        status = exc.code  # type: ignore[assignment]
    assert status == 64
    err = capsys.readouterr().err
    assert err.startswith(("lmtpfast sink: ", "usage: lmtpfast sink")), err
    assert "Traceback" not in err


def test_cli_cannot_listen_exits_71(sockdir: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = cli_args("--listen", f"unix:{sockdir}/no/such/dir/s", "--duration", "1", "--quiet")
    assert sink_cli.run(args) == 71
    assert "cannot listen" in capsys.readouterr().err


CLI_SCRIPT = textwrap.dedent(
    """
    import argparse, sys
    from lmtpfast.cli import sink
    parser = argparse.ArgumentParser(prog="lmtpfast")
    sink.register(parser.add_subparsers())
    args = parser.parse_args(sys.argv[1:])
    sys.exit(args.func(args))
    """
)


@pytest.fixture
def cli_sink(sockdir: str) -> Iterator[Callable[..., tuple[subprocess.Popen[str], list[str]]]]:
    """Start ``lmtpfast sink`` in a subprocess; returns (process, destinations)."""
    procs: list[subprocess.Popen[str]] = []

    def start(*argv: str) -> tuple[subprocess.Popen[str], list[str]]:
        ready = Path(sockdir) / "ready"
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        proc = subprocess.Popen(
            [sys.executable, "-c", CLI_SCRIPT, "sink", "--ready-file", str(ready), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        procs.append(proc)
        deadline = time.monotonic() + 20
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                _, err = proc.communicate(timeout=5)
                pytest.fail(f"sink did not start: {proc.returncode} {err}")
            time.sleep(0.02)
        return proc, ready.read_text().split()

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def lmtp_send(dest: str, rcpts: list[str], body: bytes) -> dict[str, Any]:
    with smtplib.LMTP(dest[5:], timeout=TIMEOUT) as client:
        return client.sendmail("s@example.com", rcpts, body)


def test_cli_runs_until_sigterm(cli_sink: Any, sockdir: str, tmp_path: Path) -> None:
    stats_file = tmp_path / "stats.json"
    proc, dests = cli_sink(
        "--listen",
        f"unix:{sockdir}/s",
        "--listen",
        "127.0.0.1:0",
        "--maildir",
        str(tmp_path / "md"),
        "--stats-json",
        str(stats_file),
        "--fault",
        "rcpt:nobody@*=550 5.1.1 No such user",
    )
    assert dests[0] == f"unix:{sockdir}/s" and dests[1].startswith("127.0.0.1:")
    refused = lmtp_send(dests[0], ["u@example.com", "nobody@example.com"], b"hi\r\n")
    assert refused == {"nobody@example.com": (550, b"5.1.1 No such user")}
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "transactions: 1" in out and "connections_peak: 1" in out
    stats = json.loads(stats_file.read_text())
    assert stats["transactions"] == 1 and stats["recipients_refused"] == 1
    assert stats["final_replies"] == {"250": 1}
    assert [f.read_bytes() for f in (tmp_path / "md" / "u" / "new").iterdir()] == [b"hi\r\n"]


def test_cli_duration(cli_sink: Any, sockdir: str) -> None:
    proc, _ = cli_sink("--listen", f"unix:{sockdir}/s", "--duration", "0.5", "--quiet")
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out == ""


# --- Postfix smtp-source as an independent client -------------------------------


@pytest.mark.postfix
def test_smtp_source_drives_the_sink(cli_sink: Any, sockdir: str, tmp_path: Path) -> None:
    if not os.access(SMTP_SOURCE, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail(f"{SMTP_SOURCE} is missing (CI is set)")
        pytest.skip(f"{SMTP_SOURCE} is not installed")
    stats_file = tmp_path / "stats.json"
    proc, dests = cli_sink("--listen", f"unix:{sockdir}/s", "--stats-json", str(stats_file))
    env = postfix_env()
    src = subprocess.run(
        [SMTP_SOURCE, "-L", "-d", "-s", "4", "-m", "2000", "-r", "5", dests[0]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert src.returncode == 0, src.stderr
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    stats = json.loads(stats_file.read_text())
    assert stats["transactions"] == 2000
    assert stats["recipients_accepted"] == 10000
    assert stats["final_replies"] == {"250": 10000}
    assert stats["connections_peak"] <= 4


# --- a randomised soak of the session against a model --------------------------


def test_session_random_pipelines_match_model(impl: str) -> None:
    """Random pipelined transactions, random splits: replies as RFC 2033 says."""
    rng = random.Random(1)
    for _ in range(300):
        rcpts = [f"u{rng.randrange(4)}@x" for _ in range(rng.randrange(1, 6))] + ["u0@x"]
        body = rng.choice([b"", b".\r\n", b"a\r\n..b\r\n", b"\r\n.\r\r\n"])
        wire = b"LHLO c\r\n" + envelope(*rcpts) + stuff(body.split(b"\r\n")[:-1]) + b"QUIT\r\n"
        s = new_session(impl, faults=FaultEngine(FaultPlan.parse(["rcpt:u3@*=550"])))
        out = s.start()
        cuts = sorted(rng.randrange(len(wire) + 1) for _ in range(3))
        for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            if a < b:
                out += s.receive_data(wire[a:b])
        assert out[-1] is CLOSE and not any(isinstance(i, Delay) or i is STALL for i in out)
        lines = b"".join(i for i in out if isinstance(i, bytes)).split(b"\r\n")
        codes = [int(ln[:3]) for ln in lines if ln[:3].isdigit() and ln[3:4] == b" "]
        accepted = [r for r in rcpts if r != "u3@x"]
        expect = [220, 250, 250] + [550 if r == "u3@x" else 250 for r in rcpts]
        expect += [354] + [250] * len(accepted) + [221]
        assert codes == expect


_TOKENS = [
    b"LHLO x\r\n",
    b"MAIL FROM:<a@b>\r\n",
    b"MAIL FROM:<> SIZE=5\r\n",
    b"RCPT TO:<c@d>\r\n",
    b"RCPT TO:<bob@d>\r\n",
    b"DATA\r\n",
    b"BDAT 3\r\n",
    b"BDAT 0 LAST\r\n",
    b"BDAT 2 LAST\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b".\r\n",
    b"..\r\n",
    b"\r\n",
    b"\r",
    b"\n",
    b".",
    b"x",
    b"QUIT\r\n",
    b"\xff",
    b"<",
    b" ",
    b'MAIL FROM:<"a>b"@c>\r\n',
    b"RCPT TO:<@a:b@c> NOTIFY=NEVER\r\n",
    b"BDAT 99999999999999999999\r\n",
    b"X" * 300,
]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    tokens=st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=8),
    faults=st.booleans(),
    keep=st.booleans(),
)
def test_session_never_raises(
    impl: str, tokens: list[bytes], cuts: list[int], faults: bool, keep: bool
) -> None:
    """Any input, split anywhere, with or without faults: items out, no exception."""
    plan = (
        FaultPlan.parse(
            [
                "rcpt:bob@*=550",
                "dot@nth=2=short:0",
                "data@rate=0.5:seed=2=extra",
                "noop=oversize:50",
                "bdat@rate=0.3=452",
                "dot:c@*=garbage",
            ]
        )
        if faults
        else None
    )
    session = new_session(
        impl,
        max_size=100,
        max_line_length=200,
        deliver=(lambda s, r, c: [True] * len(r)) if keep else None,
        faults=FaultEngine(plan) if plan else None,
    )
    session.start()
    data = b"".join(tokens)
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for a, b in itertools.pairwise(bounds):
        for item in session.receive_data(data[a:b]):
            assert isinstance(item, bytes | Delay) or item in (STALL, CLOSE)
    assert session.receive_data(b"") in ([CLOSE], [])
    assert session.closed
