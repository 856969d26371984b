"""The asyncio protocol over the engine: stage timers and BDAT streaming (issue 10 items 2, 4, 5).

Every test runs on both engines and both event loops. Timing is never
asserted: a test asserts outcomes (delivered or not, what the server saw),
with delays only to give a wrong client the chance to show it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import lmtpfast
from lmtpfast import Timeouts
from lmtpfast._testing.proxy import FaultProxy
from lmtpfast.server import DEFAULT_EXTENSIONS, FaultPlan, Sink

SENDER = "sender@example.org"
RCPTS = ["alice@example.org", "bob@example.org"]
SMALL = b"Subject: small\r\n\r\nhello\r\n"


def big_message(mib: int) -> bytes:
    line = b"0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789\r\n"
    return b"Subject: big\r\n\r\n" + line * (mib * 1024 * 1024 // len(line))


def every_stage(seconds: float) -> Timeouts:
    return Timeouts(**{name: seconds for name in (
        "connect", "greeting", "lhlo", "starttls", "auth", "mail", "rcpt", "data", "content",
        "final", "rset", "quit", "command")})


# --- item 2: idle time is not charged to the next command --------------------------------


async def _idle_then_slow_mail(tmp_path: object, chunking: bool) -> list[lmtpfast.RecipientResult]:
    # The second MAIL is answered after 0.6 s; every stage allows 1 s; the
    # connection was idle 0.7 s before it. Charging the idle time to MAIL
    # would time out 0.3 s after sending it.
    faults = FaultPlan.parse(["mail@nth=2=delay:0.6"])
    exts = DEFAULT_EXTENSIONS if chunking else tuple(
        e for e in DEFAULT_EXTENSIONS if e != "CHUNKING")
    async with Sink(f"unix:{tmp_path}/sink", faults=faults, extensions=exts,
                    collect=True) as sink:
        client = await lmtpfast.connect(sink.destinations[0], timeouts=every_stage(1.0))
        try:
            assert client.chunking is chunking
            first = await client.send(SENDER, RCPTS, SMALL)
            assert all(r.delivered for r in first), first
            await asyncio.sleep(0.7)  # the idle gap (the scenario, not a synchronisation)
            second = await client.send(SENDER, RCPTS, SMALL)
        finally:
            await client.quit()
        assert sink.stats.faults_fired == 1
        assert len(sink.messages) == 2
        return second


async def test_idle_time_not_charged_to_next_mail_data(tmp_path, engine: str) -> None:
    results = await _idle_then_slow_mail(tmp_path, chunking=False)
    assert all(r.delivered for r in results), results


async def test_idle_time_not_charged_to_next_mail_bdat(tmp_path, engine: str) -> None:
    # With BDAT the whole message has gone by then: a timeout would leave
    # both recipients "possibly delivered" and a retry would duplicate it.
    results = await _idle_then_slow_mail(tmp_path, chunking=True)
    assert all(r.delivered for r in results), results


# --- items 4 and 5: streamed BDAT ---------------------------------------------------------


@asynccontextmanager
async def sink_behind_proxy(tmp_path: object, *rules: str,
                            hide: tuple[str, ...] = ()) -> AsyncIterator[tuple[Sink, FaultProxy]]:
    plan = FaultPlan.parse(list(rules), hide=hide)
    async with Sink(f"unix:{tmp_path}/sink", faults=plan, collect=True) as sink:
        proxy = FaultProxy(sink.destinations[0], listen=f"unix:{tmp_path}/proxy", record=True)
        await proxy.start()
        try:
            yield sink, proxy
        finally:
            await proxy.stop()


async def test_bdat_stops_after_refused_chunk(tmp_path, engine: str) -> None:
    """RFC 3030 2: after a refused chunk no further chunk (nor BDAT LAST) is sent; RSET."""
    message = big_message(16)
    async with sink_behind_proxy(tmp_path, "bdat@nth=1=552 5.3.4 Message too big") as (
            sink, proxy):
        client = await lmtpfast.connect(proxy.destination)
        try:
            assert client.chunking
            results = await client.send(SENDER, RCPTS, message)
            assert [(r.code, r.enhanced, r.stage) for r in results] == [
                (552, "5.3.4", "data")] * 2
            assert not any(r.possibly_delivered for r in results)
            # The connection is still good: the next message goes through.
            again = await client.send(SENDER, RCPTS, SMALL)
            assert all(r.delivered for r in again), again
        finally:
            await client.quit()
        up = proxy.transcript(1, "up")
        second = up.find(b"MAIL FROM", up.find(b"MAIL FROM") + 1)
        first = up[:second] if second > 0 else up
        chunks = first.count(b"BDAT ")
        # 16 MiB is 64 chunks of 256 KiB: only those in flight when the 552
        # came may have gone (the socket buffers hold a few), never the rest.
        assert 1 <= chunks < 32, chunks
        assert b" LAST\r\n" not in first
        assert b"RSET\r\n" in first
        assert len(sink.messages) == 1  # only the second message


async def test_bdat_stops_when_every_recipient_refused(tmp_path, engine: str) -> None:
    message = big_message(16)
    async with sink_behind_proxy(tmp_path, "rcpt=550 5.1.1 No such user") as (sink, proxy):
        client = await lmtpfast.connect(proxy.destination)
        try:
            results = await client.send(SENDER, RCPTS, message)
            assert [(r.code, r.stage) for r in results] == [(550, "rcpt")] * 2
        finally:
            await client.quit()
        up = proxy.transcript(1, "up")
        assert up.count(b"BDAT ") < 32
        assert b" LAST\r\n" not in up
        assert b"RSET\r\n" in up
        assert not sink.messages


class _StrictServer(asyncio.Protocol):
    """A minimal LMTP server without PIPELINING that checks the client waits for each reply.

    Each reply is sent a little late; any byte the client sends while a reply
    is still owed is counted as a violation (RFC 2920: without PIPELINING the
    client waits for every reply). That delay only gives a client that does
    not wait the chance to show it; a client that waits passes regardless.
    """

    DELAY = 0.02

    def __init__(self, log: dict[str, int]) -> None:
        self.log = log
        self.buf = b""
        self.need = 0  # bytes of a BDAT chunk still to read
        self.last = False
        self.owed = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(b"220 strict LMTP\r\n")

    def data_received(self, data: bytes) -> None:
        if self.owed:
            self.log["violations"] += 1
        self.buf += data
        while True:
            if self.need:
                take = min(self.need, len(self.buf))
                self.buf, self.need = self.buf[take:], self.need - take
                if self.need:
                    return
                self.log["chunks"] += 1
                self._reply(b"250 2.0.0 <alice@example.org> saved\r\n" if self.last
                            else b"250 2.0.0 chunk ok\r\n")
                continue
            if b"\r\n" not in self.buf:
                return
            line, self.buf = self.buf.split(b"\r\n", 1)
            verb = line.split(b" ", 1)[0].upper()
            if verb == b"LHLO":
                self._reply(b"250-strict\r\n250-ENHANCEDSTATUSCODES\r\n250 CHUNKING\r\n")
            elif verb == b"BDAT":
                parts = line.split()
                self.need = int(parts[1])
                self.last = len(parts) > 2
                if not self.need:
                    self.log["chunks"] += 1
                    self._reply(b"250 2.0.0 <alice@example.org> saved\r\n")
            elif verb == b"QUIT":
                self._reply(b"221 2.0.0 bye\r\n")
            else:
                self._reply(b"250 2.0.0 ok\r\n")

    def _reply(self, reply: bytes) -> None:
        self.owed += 1

        def send() -> None:
            self.owed -= 1
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(reply)

        asyncio.get_running_loop().call_later(self.DELAY, send)


async def test_bdat_without_pipelining_waits_for_each_chunk_reply(tmp_path, engine: str) -> None:
    log = {"violations": 0, "chunks": 0}
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(lambda: _StrictServer(log), f"{tmp_path}/strict")
    try:
        client = await lmtpfast.connect(f"unix:{tmp_path}/strict")
        try:
            assert client.chunking and not client.pipelining
            (result,) = await client.send(SENDER, ["alice@example.org"], big_message(3))
            assert result.delivered, result
        finally:
            await client.quit()
    finally:
        server.close()
        await server.wait_closed()
    assert log["chunks"] >= 12  # 3 MiB in 256 KiB chunks, then BDAT LAST
    assert log["violations"] == 0, log
