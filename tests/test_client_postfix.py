"""The client against Postfix's smtp-sink in LMTP mode (a real, independent C server)."""

from __future__ import annotations

import asyncio

import pytest

from lmtpfast import Timeouts, connect

pytestmark = pytest.mark.postfix

MESSAGE = b"From: s@example.org\r\nSubject: load\r\n\r\n" + b"x" * 900 + b"\r\n"


async def test_ten_thousand_messages_one_pipelined_connection(smtp_sink, engine: str) -> None:
    sink = smtp_sink()
    recipients = [f"user{i}@example.com" for i in range(10)]
    in_flight = asyncio.Semaphore(64)  # transactions queued on the one connection
    delivered = 0

    async with await connect(sink.destination, engine=engine) as conn:
        assert conn.pipelining

        async def one(n: int) -> None:
            nonlocal delivered
            async with in_flight:
                results = await conn.send(f"s{n}@example.org", recipients, MESSAGE)
            assert [r.address for r in results] == recipients
            assert all(r.code == 250 and r.enhanced == "2.2.0" and r.stage == "final"
                       for r in results), results
            delivered += len(results)

        await asyncio.gather(*(one(n) for n in range(10_000)))
        assert conn.transactions == 10_000
    assert delivered == 100_000


async def test_disconnect_after_final_dot_is_transient_and_flagged(smtp_sink, engine: str) -> None:
    sink = smtp_sink("-q", ".")
    async with await connect(sink.destination, engine=engine) as conn:
        results = await conn.send("s@example.org", ["a@example.com", "b@example.com"], MESSAGE)
        assert not conn.usable
    assert [r.status for r in results] == ["transient", "transient"]
    assert all(r.local and r.stage == "final" and r.possibly_delivered for r in results)
    # The next delivery uses a new connection and succeeds.
    async with await connect(smtp_sink().destination, engine=engine) as conn:
        ok = await conn.send("s@example.org", ["a@example.com"], MESSAGE)
    assert ok[0].delivered


@pytest.mark.parametrize("command", ["mail", "rcpt", "data"])
async def test_disconnect_before_content_is_transient_not_flagged(
    smtp_sink, engine: str, command: str
) -> None:
    sink = smtp_sink("-q", command)
    async with await connect(sink.destination, engine=engine) as conn:
        results = await conn.send("s@example.org", ["a@example.com", "b@example.com"], MESSAGE)
    assert [r.status for r in results] == ["transient", "transient"]
    assert all(r.local and not r.possibly_delivered for r in results)


async def test_soft_and_hard_rejects(smtp_sink, engine: str) -> None:
    soft = smtp_sink("-r", "rcpt")
    async with await connect(soft.destination, engine=engine) as conn:
        assert not conn.pipelining  # smtp-sink hides PIPELINING with -r
        results = await conn.send("s@example.org", ["a@example.com"], MESSAGE)
    assert results[0].status == "transient" and results[0].stage == "rcpt"
    assert not results[0].local
    hard = smtp_sink("-f", ".")
    async with await connect(hard.destination, engine=engine) as conn:
        results = await conn.send("s@example.org", ["a@example.com", "b@example.com"], MESSAGE)
    assert [r.status for r in results] == ["permanent", "permanent"]
    assert all(r.stage in ("final", "data") for r in results)


async def test_stalled_reply_times_out(smtp_sink, engine: str) -> None:
    # smtp-sink delays the DATA reply by 30 s; it holds back the whole
    # pipelined group's replies meanwhile, so the wait that times out is the
    # one at the head of the queue: MAIL's.
    sink = smtp_sink("-w", "30")
    timeouts = Timeouts(mail=0.5, rcpt=0.5, data=0.5)
    async with await connect(sink.destination, timeouts=timeouts, engine=engine) as conn:
        results = await conn.send("s@example.org", ["a@example.com"], MESSAGE)
        assert not conn.usable
    assert results[0].transient and results[0].local
    assert "timed out after 0.5s" in results[0].text
    assert results[0].stage in ("mail", "rcpt", "data")


async def test_tcp_destination(smtp_sink, engine: str) -> None:
    sink = smtp_sink(tcp=True)
    async with await connect(sink.destination, engine=engine) as conn:
        results = await conn.send("", ["a@example.com"], MESSAGE)
    assert results[0].delivered
