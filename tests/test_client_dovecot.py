"""The client against a real Dovecot LMTP server (started by a fixture).

Checks RFC 2033 semantics where they matter: one reply per accepted
recipient in the right position, the stored message equal to what was sent
(after normalisation), and no input able to end DATA early.
"""

from __future__ import annotations

import asyncio

import pytest

import lmtpfast
from lmtpfast import connect
from lmtpfast._testing.dovecot import body_as_sent
from lmtpfast.proto.content import encode_content

pytestmark = pytest.mark.dovecot


def _stored_as_sent(raw: bytes) -> bytes:
    """What the server must store: CRLF line ends, dots un-stuffed, a final CRLF."""
    lines = encode_content(raw).split(b"\r\n")
    return b"\r\n".join(ln[1:] if ln.startswith(b".") else ln for ln in lines)


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
@pytest.mark.parametrize("via", ["unix", "tcp"])
async def test_partial_refusal_positions(dovecot, engine: str, via: str, chunking: bool) -> None:
    dest = dovecot.destination_unix if via == "unix" else dovecot.destination_tcp
    msg = b"From: s@example.org\r\nSubject: three\r\n\r\nHello.\r\n"
    async with await connect(dest, lhlo_name="client.example", chunking=chunking,
                             engine=engine) as conn:
        assert conn.pipelining
        assert conn.chunking == chunking
        results = await conn.send(
            "s@example.org", ["alice@example.com", "nosuchuser@example.com", "bob@example.com"], msg
        )
    assert [r.code for r in results] == [250, 550, 250]
    assert [r.enhanced for r in results] == ["2.0.0", "5.1.1", "2.0.0"]
    assert [r.stage for r in results] == ["final", "rcpt", "final"]
    assert [r.status for r in results] == ["delivered", "permanent", "delivered"]
    assert "nosuchuser" in results[1].text
    for user in ("alice", "bob"):
        stored = dovecot.messages(user)
        assert len(stored) == 1
        assert body_as_sent(stored[0]) == msg


SMUGGLING = [
    b"Subject: a\n\nline\n.\nafter bare LF dot\n",
    b"Subject: b\r\n\r\nline\r\n.\r\nafter CRLF dot\r\n",
    b"Subject: c\r\rline\r.\rafter bare CR dot\r",
    b".\r\n",
    b"..\r\n.\r\n...\r\n",
    b"Subject: d\r\n\r\n.leading\r\n..two\r\n.\r\nMAIL FROM:<evil@x>\r\n"
    b"RCPT TO:<bob@example.com>\r\n",
    b"Subject: e\n\nno newline at end.",
    b"Subject: f\r\n\r\n\n.\r\n\r.\n.\r",
]


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
@pytest.mark.parametrize("raw", SMUGGLING, ids=range(len(SMUGGLING)))
async def test_nothing_ends_data_early(dovecot, engine: str, raw: bytes, chunking: bool) -> None:
    results = await lmtpfast.deliver(
        raw, sender="s@example.org", recipients=["carol@example.com"],
        server=dovecot.destination_unix, chunking=chunking,
     engine=engine)
    assert [r.code for r in results] == [250]
    stored = dovecot.messages("carol")
    assert len(stored) == 1, "the message must be stored exactly once"
    assert body_as_sent(stored[0]) == _stored_as_sent(raw)
    # The injected commands in one sample stayed message text: bob got nothing.
    assert dovecot.messages("bob") == []


async def test_many_transactions_one_connection(dovecot, engine: str) -> None:
    async with await connect(dovecot.destination_unix, engine=engine) as conn:
        batches = await asyncio.gather(*[
            conn.send("s@example.org", ["alice@example.com", "dave@example.com"],
                      b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i))
            for i in range(20)
        ])
    assert all(r.delivered for batch in batches for r in batch)
    bodies = sorted(body_as_sent(m) for m in dovecot.messages("dave"))
    assert bodies == sorted(b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(20))


async def test_without_pipelining(dovecot, engine: str) -> None:
    async with await connect(dovecot.destination_tcp, pipelining=False, engine=engine) as conn:
        assert not conn.pipelining
        results = await conn.send("", ["nobody@example.com", "alice@example.com"], b"x\r\n")
        # Every recipient refused: no DATA is sent and the connection stays usable.
        refused = await conn.send("", ["ghost@example.com"], b"y\r\n")
        again = await conn.send("s@example.org", ["bob@example.com"], b"z\r\n")
    assert [r.code for r in results] == [550, 250]
    assert [r.code for r in refused] == [550]
    assert [r.code for r in again] == [250]
    assert len(dovecot.messages("alice")) == 1


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
async def test_big_message_streams_intact(dovecot, engine: str, chunking: bool) -> None:
    line = b"0123456789" * 7 + b"\n"
    raw = b"Subject: big\n\n" + line * 60_000 + b".\n" + line * 10  # ~4.3 MB, streamed
    results = await lmtpfast.deliver(raw, sender="s@example.org",
                                     recipients=["alice@example.com", "nobody@example.com",
                                                 "bob@example.com"],
                                     server=dovecot.destination_unix, chunking=chunking,
                                     engine=engine)
    assert [r.code for r in results] == [250, 550, 250]
    for user in ("alice", "bob"):
        assert body_as_sent(dovecot.messages(user)[0]) == _stored_as_sent(raw)


# RFC 3030 sizes around the edges: empty, one byte, exactly one stream chunk, 20 MiB.
BDAT_SIZES = [0, 1, 256 * 1024, 20 * 1024 * 1024]


@pytest.mark.parametrize("size", BDAT_SIZES)
async def test_bdat_sizes_byte_identical(dovecot, engine: str, size: int) -> None:
    line = b"abcdefghij" * 7 + b"\r\n"
    raw = (line * (size // len(line) + 1))[:size]
    async with await connect(dovecot.destination_unix, chunking=True, engine=engine) as conn:
        assert conn.chunking
        results = await conn.send("s@example.org", ["dave@example.com", "ghost@example.com"], raw)
    assert [r.code for r in results] == [250, 550]
    stored = dovecot.messages("dave")
    assert len(stored) == 1
    assert body_as_sent(stored[0]) == _stored_as_sent(raw)
