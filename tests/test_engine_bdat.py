"""CHUNKING (RFC 3030) transcripts: BDAT in one piece and streamed, on every engine.

With PIPELINING, MAIL + RCPT* + ``BDAT n LAST`` + content leave in one write
and nothing waits for a 354; after the last chunk the server owes one reply
per accepted recipient (RFC 2033 4.2), which the engine learns only when the
RCPT replies have been read.
"""

from __future__ import annotations

from types import ModuleType

import pytest

from lmtpfast import LocalProtocolError, ServerDisconnected

from .test_engine import FROM, R, Script, broken, impl, run_every_way, session  # noqa: F401

CAPS_CHUNKING = (
    b"250-lmtp.example\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 CHUNKING\r\n"
)


def head(*rcpts: str) -> bytes:
    return f"MAIL FROM:<{FROM}>\r\n".encode() + b"".join(
        f"RCPT TO:<{r}>\r\n".encode() for r in rcpts
    )


def t_bdat_one_piece(s: Script) -> None:
    c = session(s, caps=CAPS_CHUNKING)
    assert c.capabilities.chunking
    body = b"Subject: x\r\n\r\n.not stuffed\r\n"
    t1 = c.start_transaction(FROM, ["a@x", "b@x", "a@x"], body=body)
    t2 = c.start_transaction(FROM, ["c@x"], body=b"")
    # Both whole transactions in one write: nothing waits for a reply. The
    # second starts with RSET: if the first fails, the server is still in it.
    assert s.sent() == (
        head("a@x", "b@x", "a@x") + b"BDAT %d LAST\r\n" % len(body) + body
        + b"RSET\r\n" + head("c@x") + b"BDAT 0 LAST\r\n"
    )
    assert t1.dot_sent and t2.dot_sent
    assert c.waiting_for == "mail"
    evs = s.server(
        b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no\r\n250 2.1.5 ok\r\n"
        b"250 2.0.0 a saved\r\n452 4.2.2 full\r\n250 2.0.0 reset\r\n"
        b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.0.0 c saved\r\n"
    )
    assert evs == [("done", t1.id), ("done", t2.id)]
    assert t1.results == [
        R("a@x", 250, "2.0.0", "a saved", "final"),
        R("b@x", 550, "5.1.1", "no", "rcpt"),
        R("a@x", 452, "4.2.2", "full", "final"),
    ]
    assert t2.results == [R("c@x", 250, "2.0.0", "c saved", "final")]
    assert c.idle and s.sent() == b""


def t_bdat_nothing_accepted(s: Script) -> None:
    c = session(s, caps=CAPS_CHUNKING)
    txn = c.start_transaction(FROM, ["a@x"], body=b"x\r\n")
    s.sent()
    # One reply to BDAT LAST when no recipient was accepted; then RSET.
    evs = s.server(b"250 2.1.0 ok\r\n550 5.1.1 no\r\n554 5.5.1 no valid recipients\r\n")
    assert evs == [("done", txn.id)]
    assert txn.results == [R("a@x", 550, "5.1.1", "no", "rcpt")]
    assert s.sent() == b"RSET\r\n"
    assert s.server(b"250 2.0.0 ok\r\n") == []
    assert c.idle


def t_bdat_streamed(s: Script) -> None:
    c = session(s, caps=CAPS_CHUNKING)
    txn = c.start_transaction(FROM, ["a@x", "b@x"], chunking=True)
    assert s.drain() == [("ready", txn.id)]
    assert s.sent() == head("a@x", "b@x")
    with pytest.raises(LocalProtocolError):
        c.send_chunk(object(), b"x")  # type: ignore[arg-type]
    c.send_chunk(txn, b"part1\r\n")
    c.send_chunk(txn, b"")  # an empty middle chunk is not sent
    c.send_chunk(txn, b"end\r\n", last=True)
    later = c.start_transaction(FROM, ["c@x"], body=b"y\r\n")
    assert s.sent() == (
        b"BDAT 7\r\npart1\r\nBDAT 5 LAST\r\nend\r\n"
        + b"RSET\r\n" + head("c@x") + b"BDAT 3 LAST\r\ny\r\n"
    )
    evs = s.server(
        b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n250 2.0.0 7 octets\r\n"
        b"250 2.0.0 a\r\n250 2.0.0 b\r\n250 2.0.0 reset\r\n"
        b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.0.0 c\r\n"
    )
    assert evs == [("done", txn.id), ("done", later.id)]
    assert [r.text for r in txn.results] == ["a", "b"]


def t_bdat_chunk_refused(s: Script) -> None:
    c = session(s, caps=CAPS_CHUNKING)
    txn = c.start_transaction(FROM, ["a@x"], chunking=True)
    s.drain()
    c.send_chunk(txn, b"p\r\n")
    c.send_chunk(txn, b"q\r\n", last=True)
    s.sent()
    evs = s.server(
        b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n552 5.3.4 too big\r\n503 5.5.1 no transaction\r\n"
    )
    assert evs == [("done", txn.id)]
    assert txn.results == [R("a@x", 552, "5.3.4", "too big", "data")]
    assert s.sent() == b"RSET\r\n"


def t_bdat_failed_then_next(s: Script) -> None:
    c = session(s, caps=CAPS_CHUNKING)
    t1 = c.start_transaction(FROM, ["nobody@x"], body=b"1\r\n")
    t2 = c.start_transaction(FROM, ["a@x"], body=b"2\r\n")
    assert s.sent() == (head("nobody@x") + b"BDAT 3 LAST\r\n1\r\n"
                        + b"RSET\r\n" + head("a@x") + b"BDAT 3 LAST\r\n2\r\n")
    evs = s.server(b"250 2.1.0 ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n"
                   b"250 2.0.0 reset\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.0.0 a\r\n")
    assert evs == [("done", t1.id), ("done", t2.id)]
    assert [r.code for r in t1.results] == [550]
    assert [r.code for r in t2.results] == [250]
    # The RSET sent before t2 already reset the server: no second one.
    assert s.sent() == b"" and c.idle


def t_bdat_lost_after_last_chunk(s: Script) -> None:
    c = session(s, caps=CAPS_CHUNKING)
    txn = c.start_transaction(FROM, ["a@x", "b@x"], body=b"x\r\n")
    s.sent()
    # MAIL and the first RCPT answered, then the server is gone: the content
    # was sent whole, so both may have been delivered.
    evs = s.server(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n")
    assert evs == []
    evs = s.server(b"")
    assert evs == [broken(ServerDisconnected,
                          "lost connection with server while waiting for the RCPT reply", txn.id)]
    assert [r.possibly_delivered for r in txn.results] == [True, True]
    assert all(r.local and r.transient for r in txn.results)


def t_bdat_without_pipelining(s: Script) -> None:
    caps = b"250-lmtp.example\r\n250-ENHANCEDSTATUSCODES\r\n250 CHUNKING\r\n"
    c = session(s, caps=caps)
    txn = c.start_transaction(FROM, ["a@x", "b@x"], body=b"z\r\n")
    assert s.sent() == b"MAIL FROM:<sender@example.org>\r\n"
    s.server(b"250 ok\r\n")
    assert s.sent() == b"RCPT TO:<a@x>\r\n"
    s.server(b"550 no\r\n")
    assert s.sent() == b"RCPT TO:<b@x>\r\n"
    s.server(b"250 ok\r\n")
    assert s.sent() == b"BDAT 3 LAST\r\nz\r\n"
    assert s.server(b"250 2.0.0 b\r\n") == [("done", txn.id)]
    assert [r.code for r in txn.results] == [550, 250]


def t_bdat_streamed_chunk_refused_stops(s: Script) -> None:
    """RFC 3030 2: after a refused chunk the client MUST NOT send another."""
    c = session(s, caps=CAPS_CHUNKING)
    txn = c.start_transaction(FROM, ["a@x", "b@x"], chunking=True)
    later = c.start_transaction(FROM, ["c@x"], body=b"y\r\n")
    assert s.drain() == [("ready", txn.id)]
    c.send_chunk(txn, b"part1\r\n")
    assert s.sent() == head("a@x", "b@x") + b"BDAT 7\r\npart1\r\n"
    evs = s.server(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n552 5.3.4 too big\r\n")
    assert evs == [("done", txn.id)]  # every command sent so far is answered
    assert c.content_owed is None
    c.send_chunk(txn, b"part2\r\n")  # the caller's next chunk: dropped
    c.send_chunk(txn, b"end\r\n", last=True)
    # RSET (the server may still hold the transaction), then the next one.
    assert s.sent() == b"RSET\r\n" + head("c@x") + b"BDAT 3 LAST\r\ny\r\n"
    assert not txn.dot_sent
    evs = s.server(b"250 2.0.0 reset\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.0.0 c\r\n")
    assert evs == [("done", later.id)]
    assert txn.results == [R("a@x", 552, "5.3.4", "too big", "data"),
                           R("b@x", 552, "5.3.4", "too big", "data")]
    assert c.idle and s.sent() == b""


def t_bdat_streamed_refused_after_more_chunks(s: Script) -> None:
    """Chunks already in the pipeline are answered (and discarded) before the RSET."""
    c = session(s, caps=CAPS_CHUNKING)
    txn = c.start_transaction(FROM, ["a@x"], chunking=True)
    s.drain()
    c.send_chunk(txn, b"1\r\n")
    c.send_chunk(txn, b"2\r\n")
    s.sent()
    assert s.server(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n452 4.3.1 disk full\r\n") == []
    c.send_chunk(txn, b"3\r\n")
    assert s.sent() == b"RSET\r\n"  # no third chunk; RSET behind the second
    assert c.waiting_for == "data"
    assert s.server(b"503 5.5.1 no transaction\r\n") == []
    assert s.server(b"250 2.0.0 reset\r\n") == [("done", txn.id)]
    assert txn.results == [R("a@x", 452, "4.3.1", "disk full", "data")]


def t_bdat_streamed_every_recipient_refused(s: Script) -> None:
    c = session(s, caps=CAPS_CHUNKING)
    txn = c.start_transaction(FROM, ["a@x", "b@x"], chunking=True)
    s.drain()
    c.send_chunk(txn, b"1\r\n")
    s.sent()
    assert s.server(b"250 2.1.0 ok\r\n550 5.1.1 no a\r\n550 5.1.1 no b\r\n") == []
    assert c.content_owed is None
    c.send_chunk(txn, b"2\r\n", last=True)  # dropped
    assert s.sent() == b"RSET\r\n"
    assert s.server(b"503 5.5.1 no valid recipients\r\n250 2.0.0 reset\r\n") == [
        ("done", txn.id)]
    assert txn.results == [R("a@x", 550, "5.1.1", "no a", "rcpt"),
                           R("b@x", 550, "5.1.1", "no b", "rcpt")]
    assert not txn.dot_sent and c.idle


def t_bdat_streamed_mail_refused(s: Script) -> None:
    c = session(s, caps=CAPS_CHUNKING)
    txn = c.start_transaction(FROM, ["a@x"], chunking=True)
    s.drain()
    s.sent()
    # Refused before any chunk went: nothing to reset, nothing more to send.
    assert s.server(b"550 5.7.1 sender refused\r\n") == []
    assert s.server(b"503 5.5.1 need MAIL\r\n") == [("done", txn.id)]
    c.send_chunk(txn, b"1\r\n", last=True)
    assert s.sent() == b""
    assert txn.results == [R("a@x", 550, "5.7.1", "sender refused", "mail")]


def t_bdat_streamed_without_pipelining(s: Script) -> None:
    """Without PIPELINING every chunk waits for the reply to the one before."""
    caps = b"250-lmtp.example\r\n250-ENHANCEDSTATUSCODES\r\n250 CHUNKING\r\n"
    c = session(s, caps=caps)
    txn = c.start_transaction(FROM, ["a@x"], chunking=True)
    assert s.sent() == b"MAIL FROM:<sender@example.org>\r\n"
    assert s.server(b"250 ok\r\n") == []
    assert s.sent() == b"RCPT TO:<a@x>\r\n"
    assert s.server(b"250 ok\r\n") == [("ready", txn.id)]
    c.send_chunk(txn, b"1\r\n")
    assert s.sent() == b"BDAT 3\r\n1\r\n"
    with pytest.raises(LocalProtocolError, match="waits for the reply"):
        c.send_chunk(txn, b"2\r\n")
    with pytest.raises(LocalProtocolError, match="waits for the reply"):
        c.send_chunk(txn, b"", last=True)
    assert s.sent() == b""
    assert s.server(b"250 2.0.0 3 octets\r\n") == [("ready", txn.id)]  # the next may go
    c.send_chunk(txn, b"2\r\n")
    assert s.sent() == b"BDAT 3\r\n2\r\n"
    assert s.server(b"250 2.0.0 3 octets\r\n") == [("ready", txn.id)]
    c.send_chunk(txn, b"", last=True)
    assert s.sent() == b"BDAT 0 LAST\r\n"
    assert s.server(b"250 2.0.0 saved\r\n") == [("done", txn.id)]
    assert txn.results == [R("a@x", 250, "2.0.0", "saved", "final")]


def t_bdat_streamed_without_pipelining_refused(s: Script) -> None:
    caps = b"250-lmtp.example\r\n250-ENHANCEDSTATUSCODES\r\n250 CHUNKING\r\n"
    c = session(s, caps=caps)
    txn = c.start_transaction(FROM, ["a@x"], chunking=True)
    s.sent()
    s.server(b"250 ok\r\n")
    s.sent()
    assert s.server(b"250 ok\r\n") == [("ready", txn.id)]
    c.send_chunk(txn, b"1\r\n")
    s.sent()
    assert s.server(b"552 5.3.4 too big\r\n") == [("done", txn.id)]  # no ReadyForData
    assert s.sent() == b"RSET\r\n"
    c.send_chunk(txn, b"2\r\n")
    assert s.sent() == b""
    assert s.server(b"250 2.0.0 reset\r\n") == []
    assert txn.results == [R("a@x", 552, "5.3.4", "too big", "data")]


TRANSCRIPTS = [t_bdat_one_piece, t_bdat_nothing_accepted, t_bdat_streamed, t_bdat_chunk_refused,
               t_bdat_failed_then_next, t_bdat_lost_after_last_chunk, t_bdat_without_pipelining,
               t_bdat_streamed_chunk_refused_stops, t_bdat_streamed_refused_after_more_chunks,
               t_bdat_streamed_every_recipient_refused, t_bdat_streamed_mail_refused,
               t_bdat_streamed_without_pipelining, t_bdat_streamed_without_pipelining_refused]


@pytest.mark.parametrize("how", ["whole", "bytewise", "every"])
@pytest.mark.parametrize("transcript", TRANSCRIPTS, ids=[t.__name__ for t in TRANSCRIPTS])
def test_bdat_transcript(impl: ModuleType, transcript, how: str) -> None:  # noqa: F811
    run_every_way(impl, transcript, how)

