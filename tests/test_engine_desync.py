"""Reply streams out of step: too few, too many and shifted replies (issue 10 item 1).

A recipient is reported delivered only on a reply that is provably its own.
With transactions pipelined behind a final dot, a server that sends too few
(or too many) replies after the dot shifts every later reply by one: the
next MAIL's ``250 Sender OK`` would read as the last recipient's final
reply. So a transaction whose replies are all in is *held* (no
``TransactionDone``) until the stream is proven in step: the next DATA's 354
arrives exactly where expected, or every reply expected so far has come and
nothing more is waiting to be read. A shift shows as a 354 (or any 3xx)
where no DATA reply is due, a success that is not 354 to DATA, or a reply
nobody waits for: then every held or open transaction gets transient +
possibly delivered for each recipient whose reply could be affected. The RCPT
replies of a DATA transaction whose 354 came in place are proven; with BDAT
nothing before the queue drains is.

Every transcript runs on both engines, with the server's bytes whole, byte by
byte and cut at every offset (the harness of ``test_engine``), except the
few marked "whole": those are about bytes that arrive in the same read.
"""

from __future__ import annotations

from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtpfast import ReadTimeout, RemoteProtocolError, ServerDisconnected
from lmtpfast.proto import NEED_DATA, Reply

from .test_engine import (  # noqa: F401
    FROM,
    GREETING,
    Cut,
    R,
    Script,
    both,
    broken,
    impl,
    mail_burst,
    norm,
    play_replies,
    run_every_way,
    session,
)
from .test_engine_bdat import CAPS_CHUNKING, head

A, B, C, D = "alice@example.org", "bob@example.org", "carol@example.org", "dave@example.org"
ENVELOPE_OK = b"250 2.1.0 Sender OK\r\n" + b"250 2.1.5 Recipient OK\r\n" * 3 + b"354 go ahead\r\n"
OUT_OF_STEP = "replies out of step"


def T(address: str, why: str, stage: str, *, possibly: bool) -> object:
    """A made-up transient result (451 4.5.0: the protocol broke)."""
    return R(address, 451, "4.5.0", why, stage, local=True, possibly_delivered=possibly)


def two_pipelined(s: Script, first: list[str], second: list[str]) -> tuple[object, object]:
    """Session, t1 with ``first`` (354 in place, content sent), t2 queued behind it."""
    c = session(s)
    t1 = c.start_transaction(FROM, first)
    t2 = c.start_transaction(FROM, second)
    assert s.sent() == mail_burst(FROM, *first)
    envelope = b"250 2.1.0 Sender OK\r\n" + b"250 2.1.5 Recipient OK\r\n" * len(first)
    assert s.server(envelope + b"354 go ahead\r\n") == [("ready", 1)]
    c.end_data(t1)
    assert s.sent() == b".\r\n" + mail_burst(FROM, *second)
    return t1, t2


# --- DATA ------------------------------------------------------------------------------


def shifted_behind(s: Script, first: list[str], replies: bytes, why: str, t2_stage: str) -> None:
    """t1 with ``first``, t2 (dave) pipelined behind; ``replies`` after t1's dot shift."""
    t1, t2 = two_pipelined(s, first, [D])
    assert s.server(replies) == [broken(RemoteProtocolError, why, 1, 2)]
    # Nothing after t1's 354 is proven: every final is in doubt, none
    # delivered, none permanent.
    assert t1.results == [T(r, why, "final", possibly=True) for r in first]
    # t2's content never left: it reached nobody.
    assert t2.results == [T(D, why, t2_stage, possibly=False)]


def t_too_few_finals_next_pipelined(s: Script) -> None:
    """Carol's reply is missing: the next MAIL's 250 must not deliver her."""
    shifted_behind(s, [A, B, C],
                   b"250 2.0.0 alice saved\r\n250 2.0.0 bob saved\r\n"
                   b"250 2.1.0 Sender OK\r\n250 2.1.5 dave OK\r\n354 go ahead\r\n",
                   "354 reply while waiting for the RCPT reply: " + OUT_OF_STEP, "rcpt")


def t_per_distinct_address_next_pipelined(s: Script) -> None:
    """alice, alice, bob answered once per distinct address (RFC 2033 4.2 says per RCPT)."""
    shifted_behind(s, [A, A, B],
                   b"250 2.0.0 alice saved\r\n452 4.2.2 bob over quota\r\n"
                   b"250 2.1.0 Sender OK\r\n250 2.1.5 dave OK\r\n354 go ahead\r\n",
                   "354 reply while waiting for the RCPT reply: " + OUT_OF_STEP, "rcpt")


def t_surplus_final_next_pipelined(s: Script) -> None:
    """An unsolicited 250 after alice's reply: bob would be "delivered" on it."""
    shifted_behind(s, [A, B, C],
                   b"250 2.0.0 alice saved\r\n250 2.0.0 unsolicited\r\n"
                   b"452 4.2.2 bob over quota\r\n250 2.0.0 carol saved\r\n"
                   b"250 2.1.0 Sender OK\r\n250 2.1.5 dave OK\r\n354 go ahead\r\n",
                   "250 reply to DATA, 354 expected: " + OUT_OF_STEP, "data")


def dot_sent(s: Script) -> tuple[object, object]:
    """Session, one transaction to alice, bob, carol, all accepted, content and dot sent."""
    c = session(s)
    txn = c.start_transaction(FROM, [A, B, C])
    s.sent()
    assert s.server(ENVELOPE_OK) == [("ready", 1)]
    c.end_data(txn)
    s.sent()
    return c, txn


def t_354_instead_of_final(s: Script) -> None:
    _, txn = dot_sent(s)
    why = "354 reply while waiting for the FINAL reply: " + OUT_OF_STEP
    assert s.server(b"250 2.0.0 alice saved\r\n354 go ahead\r\n") == [broken(
        RemoteProtocolError, why, 1)]
    assert txn.results == [T(r, why, "final", possibly=True) for r in (A, B, C)]


def t_3xx_to_mail_or_rcpt(s: Script) -> None:
    c = session(s)
    txn = c.start_transaction(FROM, [A, B])
    s.sent()
    why = "354 reply while waiting for the MAIL reply: " + OUT_OF_STEP
    assert s.server(b"354 go ahead\r\n") == [broken(RemoteProtocolError, why, 1)]
    assert txn.results == [T(r, why, "mail", possibly=False) for r in (A, B)]


def t_refusals_before_a_shift_are_not_trusted(s: Script) -> None:
    """Shifted replies decide nothing, refusals included (no bounce for a good address)."""
    c = session(s)
    t1 = c.start_transaction(FROM, [A])
    t2 = c.start_transaction(FROM, [B, C])
    s.sent()
    assert s.server(b"250 ok\r\n250 ok\r\n354 go\r\n") == [("ready", 1)]
    c.end_data(t1)
    assert s.sent() == b".\r\n" + mail_burst(FROM, B, C)
    # t1's final is missing: t2's MAIL reply is read as it, the RCPT replies
    # move up one, and the 354 lands on carol's RCPT.
    why = "354 reply while waiting for the RCPT reply: " + OUT_OF_STEP
    evs = s.server(b"250 2.1.0 Sender OK\r\n550 5.1.1 bob unknown\r\n250 2.1.5 carol OK\r\n"
                   b"354 go ahead\r\n")
    assert evs == [broken(RemoteProtocolError, why, 1, 2)]
    assert t1.results == [T(A, why, "final", possibly=True)]
    assert t2.results == [T(B, why, "data", possibly=False), T(C, why, "rcpt", possibly=False)]


def t_held_until_next_354(s: Script) -> None:
    """t1's results are kept back until t2's 354 proves the replies were in step."""
    t1, t2 = two_pipelined(s, [A, B], [D])
    assert s.server(b"250 2.0.0 alice saved\r\n250 2.0.0 bob saved\r\n") == []
    assert not t1.done and c_open(s) == 2
    assert s.server(b"250 2.1.0 Sender OK\r\n250 2.1.5 dave OK\r\n") == []
    assert not t1.done
    assert s.server(b"354 go ahead\r\n") == [("done", 1), ("ready", 2)]
    assert [r.text for r in t1.results] == ["alice saved", "bob saved"]
    assert all(r.delivered for r in t1.results)
    s.conn.end_data(t2)
    assert s.sent() == b".\r\n"
    assert s.server(b"250 2.0.0 dave saved\r\n") == [("done", 2)]
    assert s.conn.idle


def c_open(s: Script) -> int:
    return int(s.conn.open_transactions)


def t_held_until_queue_drains(s: Script) -> None:
    """With nothing pipelined behind, the last expected reply proves the stream."""
    c = session(s)
    t1 = c.start_transaction(FROM, [A])
    c.command("RSET")
    assert s.sent() == mail_burst(FROM, A)
    assert s.server(b"250 ok\r\n250 ok\r\n354 go\r\n") == [("ready", 1)]
    c.end_data(t1)
    assert s.sent() == b".\r\nRSET\r\n"
    assert s.server(b"250 2.0.0 saved\r\n") == []  # RSET's reply still to come
    assert s.server(b"250 2.0.0 reset\r\n") == [
        ("done", 1), ("reply", "RSET", Reply(250, "2.0.0", ("2.0.0 reset",)))]
    assert t1.results[0].delivered


def t_held_then_connection_lost(s: Script) -> None:
    """Lost before the proof: t1's replies are all in but not proven in step."""
    t1, t2 = two_pipelined(s, [A, B], [D])
    assert s.server(b"250 2.0.0 alice saved\r\n250 2.0.0 bob saved\r\n") == []
    why = "lost connection with server while waiting for the MAIL reply"
    assert s.server(b"") == [broken(ServerDisconnected, why, 1, 2)]
    # "bob saved" might have been the next MAIL's reply (one reply too few):
    # in doubt, possibly delivered, never delivered.
    assert t1.results == [R(r, 451, "4.4.2", why, "final", local=True, possibly_delivered=True)
                          for r in (A, B)]
    assert t2.results == [R(D, 451, "4.4.2", why, "mail", local=True)]


def t_partial_finals_trusted_up_to_first_duplicate(s: Script) -> None:
    """A server answering once per distinct address, nothing pipelined: it stalls."""
    c = session(s)
    txn = c.start_transaction(FROM, [A, B, A.upper(), C])
    s.sent()
    assert s.server(b"250 ok\r\n" + b"250 ok\r\n" * 4 + b"354 go\r\n") == [("ready", 1)]
    c.end_data(txn)
    s.sent()
    assert s.server(b"250 2.0.0 alice saved\r\n250 2.0.0 bob saved\r\n"
                    b"452 4.2.2 carol over quota\r\n") == []
    why = "timed out waiting for the final reply"
    c.fail(ReadTimeout(why, "final"))
    assert s.drain() == [broken(ReadTimeout, why, 1)]
    # The third reply may be carol's (alice answered once): from the first
    # duplicate address on, no reply is trusted.
    assert txn.results == [
        R(A, 250, "2.0.0", "alice saved", "final"),
        R(B, 250, "2.0.0", "bob saved", "final"),
        R(A.upper(), 451, "4.4.2", why, "final", local=True, possibly_delivered=True),
        R(C, 451, "4.4.2", why, "final", local=True, possibly_delivered=True),
    ]


def t_refused_duplicate_does_not_count(s: Script) -> None:
    """Only accepted recipients count: a refused duplicate is not in the final replies."""
    c = session(s)
    txn = c.start_transaction(FROM, [A, A, B])
    s.sent()
    assert s.server(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n250 ok\r\n354 go\r\n") == [("ready", 1)]
    c.end_data(txn)
    s.sent()
    assert s.server(b"250 2.0.0 alice saved\r\n") == []
    why = "lost connection with server while waiting for the FINAL reply"
    assert s.server(b"") == [broken(ServerDisconnected, why, 1)]
    assert txn.results == [
        R(A, 250, "2.0.0", "alice saved", "final"),
        R(A, 550, "5.1.1", "no", "rcpt"),
        R(B, 451, "4.4.2", why, "final", local=True, possibly_delivered=True),
    ]


def t_quit_reply_proves(s: Script) -> None:
    c = session(s)
    txn = c.start_transaction(FROM, [A])
    c.command("QUIT")
    s.sent()
    assert s.server(b"250 ok\r\n250 ok\r\n354 go\r\n") == [("ready", 1)]
    c.end_data(txn)
    assert s.sent() == b".\r\nQUIT\r\n"
    assert s.server(b"250 2.0.0 saved\r\n") == []
    # Closing instead of answering QUIT leaves the final reply unproven
    # (it might have been QUIT's), so nothing is delivered on it.
    why = "lost connection with server while waiting for the QUIT reply"
    assert s.server(b"") == [broken(ServerDisconnected, why, 1)]
    assert txn.results == [R(A, 451, "4.4.2", why, "final", local=True,
                             possibly_delivered=True)]


# --- BDAT ------------------------------------------------------------------------------


def t_bdat_too_few_finals_next_pipelined(s: Script) -> None:
    """BDAT has no 354: a shift shows only as replies that never come (a stall)."""
    c = session(s, caps=CAPS_CHUNKING)
    t1 = c.start_transaction(FROM, [A, B, C], body=b"1\r\n")
    t2 = c.start_transaction(FROM, [D], body=b"2\r\n")
    assert s.sent() == (head(A, B, C) + b"BDAT 3 LAST\r\n1\r\n"
                        + b"RSET\r\n" + head(D) + b"BDAT 3 LAST\r\n2\r\n")
    # One final reply for three recipients, then the server goes on:
    # RSET, MAIL, RCPT, and dave's final reply.
    assert s.server(b"250 2.1.0 ok\r\n" + b"250 2.1.5 ok\r\n" * 3 + b"250 2.0.0 alice saved\r\n"
                    b"250 2.0.0 reset\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n"
                    b"250 2.0.0 dave saved\r\n") == []
    assert not t1.done and not t2.done
    why = "timed out waiting for the RCPT reply"
    c.fail(ReadTimeout(why, "rcpt"))
    assert s.drain() == [broken(ReadTimeout, why, 1, 2)]
    # bob and carol would have been delivered on RSET's and MAIL's 250.
    assert t1.results == [R(r, 451, "4.4.2", why, "final", local=True, possibly_delivered=True)
                          for r in (A, B, C)]
    assert t2.results == [R(D, 451, "4.4.2", why, "final", local=True, possibly_delivered=True)]


def t_bdat_shift_detected(s: Script) -> None:
    """With BDAT nothing before the drain is proven: RCPT refusals are in doubt too."""
    c = session(s, caps=CAPS_CHUNKING)
    t1 = c.start_transaction(FROM, [A, B], body=b"1\r\n")
    s.sent()
    why = "354 reply while waiting for the FINAL reply: " + OUT_OF_STEP
    evs = s.server(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no bob\r\n354 what\r\n")
    assert evs == [broken(RemoteProtocolError, why, 1)]
    assert t1.results == [T(r, why, "final", possibly=True) for r in (A, B)]


def t_bdat_burst_bounded(s: Script) -> None:
    """At most ``bdat_burst`` unproven BDAT transactions in flight, then the queue drains."""
    c = session(s, caps=CAPS_CHUNKING, bdat_burst=2)
    txns = [c.start_transaction(FROM, [r], body=b"x\r\n") for r in (A, B, C)]
    assert s.sent() == (head(A) + b"BDAT 3 LAST\r\nx\r\n"
                        + b"RSET\r\n" + head(B) + b"BDAT 3 LAST\r\nx\r\n")
    assert s.server(b"250 ok\r\n250 ok\r\n250 2.0.0 a\r\n250 2.0.0 reset\r\n") == []
    assert s.sent() == b""  # the third waits...
    assert s.server(b"250 ok\r\n250 ok\r\n") == []
    assert s.sent() == b""
    # ...until every reply is in: both are proven, the third goes (no RSET needed).
    assert s.server(b"250 2.0.0 b\r\n") == [("done", txns[0].id), ("done", txns[1].id)]
    assert s.sent() == head(C) + b"BDAT 3 LAST\r\nx\r\n"
    assert s.server(b"250 ok\r\n250 ok\r\n250 2.0.0 c\r\n") == [("done", txns[2].id)]
    assert [t.results[0].text for t in txns] == ["a", "b", "c"]
    assert c.idle


def t_bdat_per_distinct_next_pipelined(s: Script) -> None:
    c = session(s, caps=CAPS_CHUNKING)
    t1 = c.start_transaction(FROM, [A, A, B], body=b"1\r\n")
    t2 = c.start_transaction(FROM, [D], body=b"2\r\n")
    s.sent()
    # alice answered once, bob refused: the RSET's 250 lands on bob's slot.
    assert s.server(b"250 2.1.0 ok\r\n" + b"250 2.1.5 ok\r\n" * 3
                    + b"250 2.0.0 alice saved\r\n452 4.2.2 bob over quota\r\n"
                    b"250 2.0.0 reset\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n"
                    b"250 2.0.0 dave saved\r\n") == []
    why = "lost connection with server while waiting for the FINAL reply"
    assert s.server(b"") == [broken(ServerDisconnected, why, 1, 2)]
    assert not any(r.delivered for r in t1.results + t2.results)
    assert all(r.possibly_delivered for r in t1.results + t2.results)


TRANSCRIPTS = [
    t_too_few_finals_next_pipelined,
    t_per_distinct_address_next_pipelined,
    t_surplus_final_next_pipelined,
    t_354_instead_of_final,
    t_3xx_to_mail_or_rcpt,
    t_refusals_before_a_shift_are_not_trusted,
    t_held_until_next_354,
    t_held_until_queue_drains,
    t_held_then_connection_lost,
    t_partial_finals_trusted_up_to_first_duplicate,
    t_refused_duplicate_does_not_count,
    t_quit_reply_proves,
    t_bdat_too_few_finals_next_pipelined,
    t_bdat_shift_detected,
    t_bdat_burst_bounded,
    t_bdat_per_distinct_next_pipelined,
]


@pytest.mark.parametrize("how", ["whole", "bytewise", "every"])
@pytest.mark.parametrize("transcript", TRANSCRIPTS, ids=[t.__name__ for t in TRANSCRIPTS])
def test_desync_transcript(impl: ModuleType, transcript, how: str) -> None:  # noqa: F811
    run_every_way(impl, transcript, how)


# --- bytes in the same read ------------------------------------------------------------
# Whether a surplus reply is seen depends on whether it has arrived by the
# time the last expected reply is read; these feed everything in one piece.


def events(c: object) -> list[tuple[object, ...]]:
    out = []
    for _ in range(100):
        ev = c.next_event()  # type: ignore[attr-defined]
        if ev is NEED_DATA:
            return out
        out.append(norm(ev))
    raise AssertionError("no NEED_DATA")


@pytest.mark.parametrize("surplus", [b"250 2.0.0 carol\r\n", b"250 2.0.0 car"])
def test_surplus_after_last_final_in_same_read(impl: ModuleType, surplus: bytes) -> None:  # noqa: F811
    c, txn = dot_sent(Script(impl, Cut("whole")))
    c.receive_data(b"250 2.0.0 alice\r\n250 2.0.0 unsolicited\r\n250 2.0.0 bob\r\n" + surplus)
    # alice, then the unsolicited reply on bob's slot, then bob's on carol's:
    # the stream ends with bytes nobody asked for, so none of it is trusted.
    why = "server sent more replies than there were commands: " + OUT_OF_STEP
    assert events(c) == [broken(RemoteProtocolError, why, 1)]
    assert txn.results == [T(r, why, "final", possibly=True) for r in (A, B, C)]


def test_reply_before_the_dot_is_not_a_final_reply(impl: ModuleType) -> None:  # noqa: F811
    """A reply already received when the content ends cannot answer the final dot."""
    s = Script(impl, Cut("whole"))
    c = session(s)
    txn = c.start_transaction(FROM, [A])
    s.sent()
    c.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 early\r\n")
    assert norm(c.next_event()) == ("ready", 1)  # events come one reply at a time
    c.end_data(txn)
    assert c.data_to_send() == b""  # the dot is never sent
    why = "reply received before the end of the message content: " + OUT_OF_STEP
    assert events(c) == [broken(RemoteProtocolError, why, 1)]
    assert txn.results == [T(A, why, "content", possibly=False)]


# --- parity: the compiled engine against the spec, with BDAT in the mix ---------------

CAPS_BDAT_NO_PIPELINING = b"250-lmtp.example\r\n250-ENHANCEDSTATUSCODES\r\n250 CHUNKING\r\n"


def run_bdat_session(
    mod: ModuleType,
    caps: bytes,
    burst: int,
    txns: list[tuple[str, list[str]]],
    stream: bytes,
    cuts: list[int],
    eof: bool,
) -> list[object]:
    """A random session mixing DATA, one-piece BDAT and streamed BDAT; the full trace."""
    c = mod.Connection("client.example", bdat_burst=burst)
    trace: list[object] = []
    chunks: dict[int, int] = {}

    def next_chunk(txn: object, evs: list[object]) -> None:
        n = chunks[txn.id] = chunks[txn.id] + 1  # type: ignore[attr-defined]
        try:  # three chunks, the third LAST
            c.send_chunk(txn, b"part %d\r\n" % n, last=n == 3)
        except Exception as exc:  # part of the trace
            evs.append(("refused", type(exc).__name__, str(exc)))

    def observe(label: str) -> None:
        evs: list[object] = []
        for _ in range(1000):
            ev = c.next_event()
            if ev is NEED_DATA:
                break
            evs.append(norm(ev))
            if type(ev).__name__ != "ReadyForData":
                continue
            txn = ev.transaction  # type: ignore[attr-defined]
            if txn.id not in chunks:
                try:
                    c.end_data(txn)
                except Exception as exc:  # part of the trace
                    evs.append(("refused", type(exc).__name__, str(exc)))
            elif chunks[txn.id] < 3:
                next_chunk(txn, evs)
        # With pipelining a streamed transaction gets one more chunk per read,
        # so replies (a refusal) can arrive while it is still streaming.
        owed = c.content_owed
        if (label == "piece" and owed is not None and owed.id in chunks and c.pipelining
                and 0 < chunks[owed.id] < 3):
            next_chunk(owed, evs)
        trace.append((label, c.data_to_send(), evs, c.waiting_for, c.idle, c.usable,
                      c.open_transactions, c.content_owed is not None))

    c.lhlo()
    c.receive_data(GREETING + caps)
    observe("greeting")
    opened = []
    for i, (kind, rcpts) in enumerate(txns):
        try:
            if kind == "stream":
                t = c.start_transaction(FROM, rcpts, chunking=True)
                chunks[t.id] = 0
            elif kind == "body":
                t = c.start_transaction(FROM, rcpts, body=b"body\r\n")
            else:
                t = c.start_transaction(FROM, rcpts)
            opened.append(t)
        except Exception as exc:  # part of the trace
            trace.append(("refused", type(exc).__name__, str(exc)))
        observe(f"txn {i}")
    return play_replies(c, stream, cuts, eof, observe, opened, trace)


BDAT_REPLIES = [b"250 2.0.0 ok\r\n"] * 6 + [
    b"354 go\r\n", b"550 5.1.1 no\r\n", b"452 4.2.2 full\r\n", b"503 5.5.1 no\r\n",
    b"552 5.3.4 too big\r\n", b"421 4.3.2 bye\r\n", b"250-2.0.0 a\r\n250 2.0.0 b\r\n",
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([CAPS_CHUNKING, CAPS_BDAT_NO_PIPELINING]),
    st.integers(1, 3),
    st.lists(st.tuples(st.sampled_from(["data", "body", "stream"]),
                       st.lists(st.sampled_from([A, B, C]), min_size=1, max_size=3)),
             min_size=1, max_size=4),
    st.lists(st.sampled_from(BDAT_REPLIES), max_size=30).map(b"".join),
    st.lists(st.integers(0, 10_000), max_size=6),
    st.booleans(),
)
def test_parity_bdat_sessions(
    both: tuple[ModuleType, ModuleType],  # noqa: F811
    caps: bytes,
    burst: int,
    txns: list[tuple[str, list[str]]],
    stream: bytes,
    cuts: list[int],
    eof: bool,
) -> None:
    py, c = (run_bdat_session(m, caps, burst, txns, stream, cuts, eof) for m in both)
    assert c == py


def test_parity_bdat_sessions_reach_the_interesting_paths(
        both: tuple[ModuleType, ModuleType]) -> None:  # noqa: F811
    """The harness itself: a stopped stream, a held transaction and a desync all show."""
    ok = b"250 2.0.0 ok\r\n"
    refused = ok * 2 + b"552 5.3.4 too big\r\n"
    stream = refused + ok + ok * 3
    cuts = [len(refused), len(refused) + len(ok)]
    txns = [("stream", [A]), ("body", [B])]
    trace = run_bdat_session(both[0], CAPS_CHUNKING, 1, txns, stream, cuts, False)
    flat = repr(trace)
    # The refused first chunk stops the stream (no chunk 2), an RSET goes, the
    # next transaction waits for the drain (burst 1), then both come out.
    assert "part 1" in flat and "part 2" not in flat and "RSET" in flat
    assert "('done', 1)" in flat and "('done', 2)" in flat and "broken" not in flat
    assert trace == run_bdat_session(both[1], CAPS_CHUNKING, 1, txns, stream, cuts, False)
