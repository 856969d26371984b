"""Transcript tests of the sans-IO engine, run against every implementation.

Each transcript scripts a server and checks the exact bytes the client writes
and the events and per-recipient results it produces. Every transcript runs
three ways: the server's bytes fed whole, one byte at a time, and split in two
at every offset of the whole stream; the assertions are the same each time, so
the outcome cannot depend on how the network cut the bytes.

Hypothesis tests use the pure-Python engine (the spec) as the oracle for the
compiled one: same replies for any valid stream, same errors for any stream,
same trace for random sessions.

A bug found in the spec (``_pyproto.py``/``_common.py``) is pinned here as a
strict xfail until its owner fixes it; then the marker goes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtpfast import (
    LocalProtocolError,
    ReadTimeout,
    RecipientResult,
    RemoteProtocolError,
    ServerDisconnected,
    proto,
)
from lmtpfast.proto import (
    NEED_DATA,
    CommandReply,
    ConnectionBroken,
    ReadyForData,
    Reply,
    Transaction,
    TransactionDone,
)
from lmtpfast.proto._common import parse_enhanced

ENGINES = ["python", "c"]


def _engine(name: str) -> ModuleType:
    mod = proto.IMPLEMENTATIONS.get(name)
    if mod is None:
        msg = f"the {name} engine is not built (python setup.py build_ext --inplace)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return mod


@pytest.fixture(params=ENGINES)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """One engine module (``_pyproto`` or ``_cproto``); missing C skips, or fails under CI."""
    return _engine(request.param)


@pytest.fixture(scope="module")
def both() -> tuple[ModuleType, ModuleType]:
    """The spec and the compiled engine, for parity tests."""
    return _engine("python"), _engine("c")


# --- harness ---------------------------------------------------------------------


class Cut:
    """How the server's byte stream reaches the engine.

    ``whole``: each server() call in one piece (as ``bytes``); ``bytewise``: one
    byte at a time (as ``memoryview``); ``at``: the whole stream cut once at
    stream offset ``at`` (as ``bytearray``), so the engine sees every buffer type.
    """

    def __init__(self, mode: str, at: int = 0) -> None:
        self.mode = mode
        self.at = at

    def pieces(self, base: int, data: bytes) -> list[Any]:
        if self.mode == "whole":
            return [data]
        if self.mode == "bytewise":
            view = memoryview(data)
            return [view[i : i + 1] for i in range(len(data))]
        k = self.at - base
        if 0 < k < len(data):
            return [bytearray(data[:k]), bytearray(data[k:])]
        return [bytearray(data)]

    def __repr__(self) -> str:
        return f"Cut({self.mode!r}, at={self.at})"


class Script:
    """Drives one engine Connection through a transcript."""

    def __init__(self, impl: ModuleType, cut: Cut) -> None:
        self.impl = impl
        self.cut = cut
        self.fed = 0  # server bytes so far (the stream offset)
        self.conn: Any = None

    def connect(self, local_name: str = "client.example", **kwargs: Any) -> Any:
        self.conn = self.impl.Connection(local_name, **kwargs)
        return self.conn

    def server(self, data: bytes) -> list[tuple[Any, ...]]:
        """Feed what the server sends (``b""``: it closes); return the events, normalised."""
        events: list[tuple[Any, ...]] = []
        if not data:
            self.conn.receive_data(b"")
            return self.drain()
        for piece in self.cut.pieces(self.fed, data):
            self.conn.receive_data(piece)
            events += self.drain()
        self.fed += len(data)
        return events

    def drain(self) -> list[tuple[Any, ...]]:
        out = []
        for _ in range(10_000):
            ev = self.conn.next_event()
            if ev is NEED_DATA:
                return out
            out.append(norm(ev))
        raise AssertionError("next_event() never returned NEED_DATA")

    def sent(self) -> bytes:
        out = self.conn.data_to_send()
        assert isinstance(out, bytes)
        return bytes(out)


def norm(ev: object) -> tuple[Any, ...]:
    """An event as a comparable tuple; also checks it is one of the shared event types."""
    if isinstance(ev, CommandReply):
        assert isinstance(ev.reply, Reply)
        return ("reply", ev.command, ev.reply)
    if isinstance(ev, ReadyForData):
        return ("ready", ev.transaction.id)
    if isinstance(ev, TransactionDone):
        assert ev.transaction.done
        return ("done", ev.transaction.id)
    if isinstance(ev, ConnectionBroken):
        for txn in ev.transactions:
            assert txn.done and len(txn.results) == len(txn.recipients)
        return ("broken", type(ev.error), str(ev.error), [t.id for t in ev.transactions])
    raise AssertionError(f"not an engine event: {ev!r}")


def R(
    address: str,
    code: int,
    enhanced: str | None,
    text: str,
    stage: str,
    *,
    local: bool = False,
    possibly_delivered: bool = False,
) -> RecipientResult:
    status = "delivered" if 200 <= code < 300 else "permanent" if code >= 500 else "transient"
    return RecipientResult(
        address=address,
        status=status,  # type: ignore[arg-type]
        code=code,
        enhanced=enhanced,
        text=text,
        stage=stage,
        local=local,
        possibly_delivered=possibly_delivered,
    )


def broken(error: type[Exception], message: str, *txn_ids: int) -> tuple[Any, ...]:
    return ("broken", error, message, list(txn_ids))


GREETING = b"220 lmtp.example LMTP ready\r\n"
CAPS = (
    b"250-lmtp.example\r\n"
    b"250-PIPELINING\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-SIZE 10240000\r\n"
    b"250-8BITMIME\r\n"
    b"250-auth PLAIN LOGIN\r\n"
    b"250 SMTPUTF8\r\n"
)
CAPS_TLS = CAPS.replace(b"250 SMTPUTF8", b"250-SMTPUTF8\r\n250 STARTTLS")
CAPS_NO_PIPELINING = b"250-lmtp.example\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n"
FROM = "sender@example.org"


def session(s: Script, caps: bytes = CAPS, **kwargs: Any) -> Any:
    """Connect, greet, LHLO; return the ready connection."""
    c = s.connect(**kwargs)
    c.lhlo()
    assert s.sent() == b""  # nothing before the greeting
    assert s.server(GREETING) == [
        ("reply", "greeting", Reply(220, None, ("lmtp.example LMTP ready",)))
    ]
    assert s.sent() == b"LHLO client.example\r\n"
    evs = s.server(caps)
    assert [e[:2] for e in evs] == [("reply", "LHLO")]
    assert s.sent() == b""
    return c


def mail_burst(sender: str, *rcpts: str) -> bytes:
    return (
        f"MAIL FROM:<{sender}>\r\n".encode()
        + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts)
        + b"DATA\r\n"
    )


# --- transcripts ---------------------------------------------------------------------
# Each takes a Script and asserts as it goes; see test_transcript for how it runs.


def t_greeting_lhlo_capabilities(s: Script) -> None:
    c = s.connect()
    assert c.waiting_for == "greeting"
    assert not c.idle and c.usable and c.capabilities is None and not c.pipelining
    c.lhlo()
    assert s.sent() == b""
    assert s.server(b"220-lmtp.example first\r\n220 second\r\n") == [
        ("reply", "greeting", Reply(220, None, ("lmtp.example first", "second")))
    ]
    assert s.sent() == b"LHLO client.example\r\n"
    assert c.waiting_for == "lhlo"
    evs = s.server(CAPS)
    assert evs == [
        (
            "reply",
            "LHLO",
            Reply(
                250,
                None,
                (
                    "lmtp.example",
                    "PIPELINING",
                    "ENHANCEDSTATUSCODES",
                    "SIZE 10240000",
                    "8BITMIME",
                    "auth PLAIN LOGIN",
                    "SMTPUTF8",
                ),
            ),
        )
    ]
    caps = c.capabilities
    assert caps.pipelining and caps.enhancedstatuscodes and caps.eightbitmime and caps.smtputf8
    assert caps.size == 10240000
    assert caps.auth == frozenset({"PLAIN", "LOGIN"})
    assert not caps.chunking and not caps.starttls and not caps.dsn
    assert caps.has("size") and caps.has("Auth")
    assert c.pipelining
    assert c.idle and c.usable and c.waiting_for is None and c.open_transactions == 0
    assert s.sent() == b""


def t_ignore_pipelining_keyword(s: Script) -> None:
    c = session(s, ignore_keywords=["pipelining"])
    assert not c.capabilities.pipelining and not c.capabilities.has("PIPELINING")
    assert c.capabilities.eightbitmime
    assert not c.pipelining
    # ...so a transaction goes out one command per reply.
    txn = c.start_transaction(FROM, ["a@example.net"])
    assert s.sent() == b"MAIL FROM:<sender@example.org>\r\n"
    assert s.server(b"250 2.1.0 ok\r\n") == []
    assert s.sent() == b"RCPT TO:<a@example.net>\r\n"
    assert s.server(b"250 2.1.5 ok\r\n") == []
    assert s.sent() == b"DATA\r\n"
    assert s.server(b"354 go\r\n") == [("ready", txn.id)]


def t_pipelining_disabled_by_caller(s: Script) -> None:
    c = session(s, pipelining=False)
    assert c.capabilities.pipelining
    assert not c.pipelining
    c.start_transaction(FROM, ["a@example.net", "b@example.net"])
    assert s.sent() == b"MAIL FROM:<sender@example.org>\r\n"


def t_lhlo_refused(s: Script) -> None:
    c = s.connect()
    c.lhlo()
    s.server(GREETING)
    assert s.sent() == b"LHLO client.example\r\n"
    assert s.server(b"501 5.5.4 bad LHLO\r\n") == [
        ("reply", "LHLO", Reply(501, "5.5.4", ("5.5.4 bad LHLO",)))
    ]
    assert c.capabilities is None and not c.pipelining
    with pytest.raises(LocalProtocolError, match="LHLO must succeed"):
        c.start_transaction(FROM, ["a@example.net"])
    assert s.sent() == b""
    assert c.usable


def t_greeting_refused(s: Script) -> None:
    c = s.connect()
    assert s.server(b"554 5.3.2 no service\r\n") == [
        ("reply", "greeting", Reply(554, "5.3.2", ("5.3.2 no service",)))
    ]
    assert c.usable and c.idle  # the caller decides what a refused greeting means
    c.command("QUIT")
    assert s.sent() == b"QUIT\r\n"


def t_pipelined_transaction(s: Script) -> None:
    c = session(s)
    txn = c.start_transaction(FROM, ["rcpt@example.net"])
    assert isinstance(txn, Transaction) and txn.id == 1
    assert s.sent() == b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<rcpt@example.net>\r\nDATA\r\n"
    assert txn.mail_sent and not txn.dot_sent and not txn.done
    assert c.waiting_for == "mail" and c.content_owed is txn and c.open_transactions == 1
    assert not c.idle
    evs = s.server(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
    assert evs == [("ready", 1)]
    assert txn.mail_reply == Reply(250, "2.1.0", ("2.1.0 Ok",))
    assert txn.rcpt_replies == [Reply(250, "2.1.5", ("2.1.5 Ok",))]
    assert txn.data_reply == Reply(354, None, ("End data with <CR><LF>.<CR><LF>",))
    assert txn.accepted == [0]
    assert c.waiting_for is None and c.content_owed is txn
    assert s.sent() == b""
    c.end_data(txn)
    assert txn.dot_sent and c.content_owed is None
    assert s.sent() == b".\r\n"
    assert c.waiting_for == "final"
    assert s.server(b"250 2.0.0 <rcpt@example.net> Saved\r\n") == [("done", 1)]
    assert txn.done
    assert txn.results == [R("rcpt@example.net", 250, "2.0.0", "<rcpt@example.net> Saved", "final")]
    assert txn.final_replies == [Reply(250, "2.0.0", ("2.0.0 <rcpt@example.net> Saved",))]
    assert c.idle and c.open_transactions == 0 and c.waiting_for is None
    assert s.sent() == b""


def t_pipelined_back_to_back(s: Script) -> None:
    """Content + dot + the next transaction's MAIL/RCPT*/DATA leave in one write."""
    c = session(s)
    t1 = c.start_transaction(FROM, ["a@example.net"])
    t2 = c.start_transaction(
        "",
        ["b@example.net", "c@example.net"],
        mail_params=["SIZE=100", "BODY=8BITMIME"],
        rcpt_params=[["NOTIFY=NEVER"], []],
    )
    assert (t1.id, t2.id) == (1, 2)
    assert s.sent() == mail_burst(FROM, "a@example.net")  # t2 waits for t1's content
    assert not t2.mail_sent and c.open_transactions == 2
    assert s.server(b"250 ok\r\n250 ok\r\n354 go\r\n") == [("ready", 1)]
    c.end_data(t1)
    assert s.sent() == (
        b".\r\n"
        b"MAIL FROM:<> SIZE=100 BODY=8BITMIME\r\n"
        b"RCPT TO:<b@example.net> NOTIFY=NEVER\r\n"
        b"RCPT TO:<c@example.net>\r\n"
        b"DATA\r\n"
    )
    assert t2.mail_sent and c.content_owed is t2
    evs = s.server(b"250 2.0.0 a ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert evs == [("done", 1), ("ready", 2)]
    assert t1.results == [R("a@example.net", 250, "2.0.0", "a ok", "final")]
    c.end_data(t2)
    assert s.sent() == b".\r\n"
    assert s.server(b"250 2.0.0 b ok\r\n") == []
    assert s.server(b"452 4.2.2 Mailbox full\r\n") == [("done", 2)]
    assert t2.results == [
        R("b@example.net", 250, "2.0.0", "b ok", "final"),
        R("c@example.net", 452, "4.2.2", "Mailbox full", "final"),
    ]
    assert c.idle


def t_nonpipelined_one_command_per_reply(s: Script) -> None:
    c = session(s, caps=CAPS_NO_PIPELINING)
    assert not c.pipelining
    txn = c.start_transaction(FROM, ["a@example.net", "b@example.net", "c@example.net"])
    assert s.sent() == b"MAIL FROM:<sender@example.org>\r\n"
    assert c.waiting_for == "mail"
    assert s.server(b"250 2.1.0 ok\r\n") == []
    assert s.sent() == b"RCPT TO:<a@example.net>\r\n"
    assert c.waiting_for == "rcpt"
    assert s.server(b"250 2.1.5 ok\r\n") == []
    assert s.sent() == b"RCPT TO:<b@example.net>\r\n"
    assert s.server(b"550 5.1.1 <b@example.net> unknown\r\n") == []
    assert s.sent() == b"RCPT TO:<c@example.net>\r\n"
    assert s.server(b"250 2.1.5 ok\r\n") == []
    assert s.sent() == b"DATA\r\n"
    assert c.waiting_for == "data"
    assert s.server(b"354 go ahead\r\n") == [("ready", 1)]
    assert txn.accepted == [0, 2]
    c.end_data(txn)
    assert s.sent() == b".\r\n"
    assert s.server(b"250 2.0.0 a saved\r\n") == []
    assert s.server(b"250 2.0.0 c saved\r\n") == [("done", 1)]
    assert txn.results == [
        R("a@example.net", 250, "2.0.0", "a saved", "final"),
        R("b@example.net", 550, "5.1.1", "<b@example.net> unknown", "rcpt"),
        R("c@example.net", 250, "2.0.0", "c saved", "final"),
    ]
    assert c.idle


def t_nonpipelined_mail_refused(s: Script) -> None:
    c = session(s, caps=CAPS_NO_PIPELINING)
    t1 = c.start_transaction(FROM, ["a@example.net", "b@example.net"])
    t2 = c.start_transaction(FROM, ["c@example.net"])
    assert s.sent() == b"MAIL FROM:<sender@example.org>\r\n"
    # MAIL refused: no RCPT for t1 is ever sent; t2's MAIL goes next.
    assert s.server(b"452 4.3.1 Insufficient system storage\r\n") == [("done", 1)]
    assert t1.results == [
        R("a@example.net", 452, "4.3.1", "Insufficient system storage", "mail"),
        R("b@example.net", 452, "4.3.1", "Insufficient system storage", "mail"),
    ]
    assert t1.rcpt_replies == [None, None]
    assert s.sent() == b"MAIL FROM:<sender@example.org>\r\n"
    assert s.server(b"250 ok\r\n") == []
    assert s.sent() == b"RCPT TO:<c@example.net>\r\n"
    assert s.server(b"250 ok\r\n") == []
    assert s.sent() == b"DATA\r\n"
    assert s.server(b"354 go\r\n") == [("ready", 2)]
    c.end_data(t2)
    assert s.sent() == b".\r\n"
    assert s.server(b"250 ok\r\n") == [("done", 2)]
    assert t2.results == [R("c@example.net", 250, None, "ok", "final")]


def t_nonpipelined_all_rcpt_refused(s: Script) -> None:
    c = session(s, caps=CAPS_NO_PIPELINING)
    t1 = c.start_transaction(FROM, ["a@example.net", "b@example.net"])
    t2 = c.start_transaction(FROM, ["c@example.net"])
    assert s.sent() == b"MAIL FROM:<sender@example.org>\r\n"
    assert s.server(b"250 ok\r\n") == []
    assert s.sent() == b"RCPT TO:<a@example.net>\r\n"
    assert s.server(b"550 5.1.1 no a\r\n") == []
    assert s.sent() == b"RCPT TO:<b@example.net>\r\n"
    # Every recipient refused: RSET instead of DATA.
    assert s.server(b"450 4.2.1 b busy\r\n") == [("done", 1)]
    assert t1.results == [
        R("a@example.net", 550, "5.1.1", "no a", "rcpt"),
        R("b@example.net", 450, "4.2.1", "b busy", "rcpt"),
    ]
    assert s.sent() == b"RSET\r\n"
    assert c.waiting_for == "rset"
    assert s.server(b"250 2.0.0 reset\r\n") == []  # the internal RSET makes no event
    assert s.sent() == b"MAIL FROM:<sender@example.org>\r\n"
    assert not t2.done and c.open_transactions == 1


def t_multiline_replies(s: Script) -> None:
    c = session(s)
    txn = c.start_transaction(FROM, ["a@example.net", "b@example.net"])
    s.sent()
    evs = s.server(
        b"250-2.1.0 sender\r\n250 2.1.0 ok\r\n"
        b"250 2.1.5 ok\r\n"
        b"250 2.1.5 ok\r\n"
        b"354-please\r\n354 go ahead\r\n"
    )
    assert evs == [("ready", 1)]
    assert txn.mail_reply == Reply(250, "2.1.0", ("2.1.0 sender", "2.1.0 ok"))
    assert txn.data_reply == Reply(354, None, ("please", "go ahead"))
    c.end_data(txn)
    s.sent()
    evs = s.server(
        b"452-4.2.2 Mailbox full\r\n452-4.2.2 try again\r\n452 4.2.2 later\r\n"
        b"250-2.0.0 stored\n250 in INBOX\n"  # bare LF line ends are accepted too
    )
    assert evs == [("done", 1)]
    assert txn.final_replies[0] == Reply(
        452, "4.2.2", ("4.2.2 Mailbox full", "4.2.2 try again", "4.2.2 later")
    )
    assert txn.results == [
        R("a@example.net", 452, "4.2.2", "Mailbox full\ntry again\nlater", "final"),
        R("b@example.net", 250, "2.0.0", "stored\nin INBOX", "final"),
    ]


def t_results_in_rcpt_order_with_duplicates(s: Script) -> None:
    c = session(s)
    rcpts = ["a@example.net", "b@example.net", "a@example.net", "c@example.net"]
    txn = c.start_transaction(FROM, rcpts)
    assert s.sent() == mail_burst(FROM, *rcpts)
    evs = s.server(
        b"250 2.1.0 ok\r\n250 2.1.5 a\r\n550 5.1.1 b unknown\r\n250 2.1.5 a again\r\n"
        b"250 2.1.5 c\r\n354 go\r\n"
    )
    assert evs == [("ready", 1)]
    assert txn.accepted == [0, 2, 3]
    c.end_data(txn)
    assert s.sent() == b".\r\n"
    # One reply per accepted RCPT, duplicates included, in RCPT order.
    assert s.server(b"250 2.0.0 first a\r\n") == []
    assert s.server(b"452 4.2.2 second a over quota\r\n") == []
    assert c.waiting_for == "final"
    assert s.server(b"250 2.0.0 c\r\n") == [("done", 1)]
    assert txn.results == [
        R("a@example.net", 250, "2.0.0", "first a", "final"),
        R("b@example.net", 550, "5.1.1", "b unknown", "rcpt"),
        R("a@example.net", 452, "4.2.2", "second a over quota", "final"),
        R("c@example.net", 250, "2.0.0", "c", "final"),
    ]
    assert [r.delivered for r in txn.results] == [True, False, False, True]


def t_pipelined_data_refused(s: Script) -> None:
    c = session(s)
    t1 = c.start_transaction(FROM, ["a@example.net", "b@example.net"])
    t2 = c.start_transaction(FROM, ["c@example.net"])
    assert s.sent() == mail_burst(FROM, "a@example.net", "b@example.net")
    evs = s.server(b"250 ok\r\n250 ok\r\n550 5.1.1 no b\r\n451 4.3.0 try later\r\n")
    assert evs == [("done", 1)]
    assert t1.results == [
        R("a@example.net", 451, "4.3.0", "try later", "data"),
        R("b@example.net", 550, "5.1.1", "no b", "rcpt"),
    ]
    assert c.content_owed is t2  # t2 is already queued behind the RSET
    # The server still holds the MAIL transaction: RSET first, then the next one.
    assert s.sent() == b"RSET\r\n" + mail_burst(FROM, "c@example.net")
    assert c.waiting_for == "rset"
    assert s.server(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n") == [("ready", 2)]
    assert not t2.done


def t_pipelined_all_rcpt_refused(s: Script) -> None:
    c = session(s)
    t1 = c.start_transaction(FROM, ["a@example.net", "b@example.net"])
    s.sent()
    evs = s.server(b"250 ok\r\n550 no a\r\n550 no b\r\n554 5.5.1 no valid recipients\r\n")
    assert evs == [("done", 1)]
    assert t1.results == [
        R("a@example.net", 550, None, "no a", "rcpt"),
        R("b@example.net", 550, None, "no b", "rcpt"),
    ]
    assert s.sent() == b"RSET\r\n"
    assert s.server(b"250 ok\r\n") == []
    assert c.idle


def t_pipelined_mail_refused(s: Script) -> None:
    c = session(s)
    t1 = c.start_transaction(FROM, ["a@example.net", "b@example.net"])
    s.sent()
    evs = s.server(
        b"550 5.7.1 sender refused\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n"
        b"503 5.5.1 need RCPT\r\n"
    )
    assert evs == [("done", 1)]
    assert t1.results == [
        R("a@example.net", 550, "5.7.1", "sender refused", "mail"),
        R("b@example.net", 550, "5.7.1", "sender refused", "mail"),
    ]
    assert s.sent() == b""  # no MAIL transaction on the server: nothing to reset
    assert c.idle


def t_354_without_accepted_recipient(s: Script) -> None:
    c = session(s)
    t1 = c.start_transaction(FROM, ["a@example.net"])
    t2 = c.start_transaction(FROM, ["b@example.net"])
    s.sent()
    # A server that says 354 although no recipient was accepted gets a lone dot.
    evs = s.server(b"250 ok\r\n550 5.1.1 no a\r\n354 go\r\n")
    assert evs == []
    assert not t1.dot_sent
    assert s.sent() == b".\r\n" + mail_burst(FROM, "b@example.net")
    assert c.content_owed is t2
    assert c.waiting_for == "data"
    # t1 is decided, but held until t2's 354 shows the replies were in step.
    assert s.server(b"554 5.5.1 no recipients\r\n") == []
    assert s.server(b"250 ok\r\n250 ok\r\n354 go\r\n") == [("done", 1), ("ready", 2)]
    assert t1.results == [R("a@example.net", 550, "5.1.1", "no a", "rcpt")]


def t_unexpected_reply(s: Script) -> None:
    c = session(s)
    err = "unexpected reply nobody waited for: 250"
    assert s.server(b"250 hello?\r\n") == [broken(RemoteProtocolError, err)]
    assert not c.usable and isinstance(c.error, RemoteProtocolError)
    assert not c.idle
    assert s.server(b"250 more\r\n") == []  # ignored from now on
    assert s.server(b"") == []
    with pytest.raises(LocalProtocolError, match="connection is broken: unexpected reply"):
        c.start_transaction(FROM, ["a@example.net"])
    with pytest.raises(LocalProtocolError, match="connection is broken"):
        c.command("NOOP")
    assert s.sent() == b""


def t_unexpected_reply_mid_transaction(s: Script) -> None:
    c = session(s)
    txn = c.start_transaction(FROM, ["a@example.net"])
    s.sent()
    assert s.server(b"250 ok\r\n250 ok\r\n354 go\r\n") == [("ready", 1)]
    # Nothing is expected until the dot is sent.
    err = "unexpected reply nobody waited for: 451"
    assert s.server(b"451 4.3.2 shutting down\r\n") == [broken(RemoteProtocolError, err, 1)]
    assert txn.results == [R("a@example.net", 451, "4.5.0", err, "content", local=True)]
    assert c.content_owed is None


def t_malformed_line(line: bytes, s: Script) -> None:
    c = session(s)
    txn = c.start_transaction(FROM, ["a@example.net"])
    s.sent()
    content = line.rstrip(b"\n").removesuffix(b"\r")
    err = f"malformed reply line {content!r}"
    assert s.server(line) == [broken(RemoteProtocolError, err, 1)]
    assert txn.results == [R("a@example.net", 451, "4.5.0", err, "mail", local=True)]
    assert not c.usable and s.sent() == b""


MALFORMED = [
    b"\r\n",
    b"\n",
    b"2\r\n",
    b"25\r\n",
    b"\r\r\n",
    b"250x\r\n",
    b"2500 ok\r\n",
    b"250_ok\r\n",
    b"250\tok\r\n",
    b"25a ok\r\n",
    b"2x0 ok\r\n",
    b"199 too low\r\n",
    b"100 x\r\n",
    b"600 too high\r\n",
    b"260 second digit 6\r\n",
    b"290 second digit 9\r\n",
    b" 250 leading space\r\n",
    b"ok\r\n",
    b"\x00\x00\x00\r\n",
    b"\xff50 ok\r\n",
]


def t_line_too_long(s: Script) -> None:
    c = session(s, max_line_length=32)
    assert c.waiting_for is None
    c.command("NOOP")
    s.sent()
    ok = b"250 " + b"x" * 27  # 31 bytes: within the limit
    assert s.server(ok + b"\r\n") == [("reply", "NOOP", Reply(250, None, ("x" * 27,)))]
    c.command("NOOP")
    s.sent()
    exact = b"250 " + b"y" * 28  # exactly 32 bytes, LF only (see the xfail for CRLF)
    assert s.server(exact + b"\n") == [("reply", "NOOP", Reply(250, None, ("y" * 28,)))]
    c.command("NOOP")
    s.sent()
    assert s.server(b"250 " + b"z" * 29 + b"\r\n") == [
        broken(RemoteProtocolError, "reply line longer than 32 bytes")
    ]


def t_line_too_long_without_lf(s: Script) -> None:
    c = session(s, max_line_length=32)
    txn = c.start_transaction(FROM, ["a@example.net"])
    s.sent()
    # 33 bytes and no line end yet: no need to wait for the rest.
    assert s.server(b"250 " + b"z" * 29) == [
        broken(RemoteProtocolError, "reply line longer than 32 bytes", 1)
    ]
    assert txn.results[0].code == 451 and txn.results[0].enhanced == "4.5.0"


def t_too_many_lines(s: Script) -> None:
    c = session(s, caps=b"250-lmtp.example\r\n250 PIPELINING\r\n", max_reply_lines=3)
    c.command("NOOP")
    s.sent()
    assert s.server(b"250-a\r\n250-b\r\n250 c\r\n") == [
        ("reply", "NOOP", Reply(250, None, ("a", "b", "c")))
    ]
    c.command("NOOP")
    s.sent()
    assert s.server(b"250-a\r\n250-b\r\n250-c\r\n250 d\r\n") == [
        broken(RemoteProtocolError, "reply longer than 3 lines")
    ]


def t_code_changes_inside_reply(s: Script) -> None:
    c = session(s)
    txn = c.start_transaction(FROM, ["a@example.net"])
    s.sent()
    err = "reply code changed from 250 to 251 inside a multi-line reply"
    assert s.server(b"250-2.1.0 a\r\n251 2.1.0 b\r\n") == [broken(RemoteProtocolError, err, 1)]
    assert txn.results == [R("a@example.net", 451, "4.5.0", err, "mail", local=True)]


def t_eof_before_greeting(s: Script) -> None:
    c = s.connect()
    c.lhlo()
    assert s.server(b"") == [
        broken(
            ServerDisconnected, "lost connection with server while waiting for the GREETING reply"
        )
    ]
    assert not c.usable and isinstance(c.error, ServerDisconnected)
    assert s.sent() == b""


def t_eof_inside_greeting(s: Script) -> None:
    s.connect()
    assert s.server(b"220-lmtp.example\r\n220 read") == []
    assert s.server(b"") == [
        broken(ServerDisconnected, "server closed the connection in the middle of a reply")
    ]


def t_eof_after_mail(s: Script) -> None:
    c = session(s)
    txn = c.start_transaction(FROM, ["a@example.net", "b@example.net"])
    s.sent()
    assert s.server(b"250 2.1.0 ok\r\n") == []
    why = "lost connection with server while waiting for the RCPT reply"
    assert s.server(b"") == [broken(ServerDisconnected, why, 1)]
    assert txn.results == [
        R("a@example.net", 451, "4.4.2", why, "rcpt", local=True),
        R("b@example.net", 451, "4.4.2", why, "rcpt", local=True),
    ]
    assert not any(r.possibly_delivered for r in txn.results)


def t_eof_after_mail_nonpipelined(s: Script) -> None:
    c = session(s, caps=CAPS_NO_PIPELINING)
    t1 = c.start_transaction(FROM, ["a@example.net", "b@example.net"])
    t2 = c.start_transaction(FROM, ["c@example.net"])
    s.sent()
    assert s.server(b"250 ok\r\n") == []
    assert s.sent() == b"RCPT TO:<a@example.net>\r\n"
    assert s.server(b"250 ok\r\n") == []
    assert s.sent() == b"RCPT TO:<b@example.net>\r\n"
    why = "lost connection with server while waiting for the RCPT reply"
    assert s.server(b"") == [broken(ServerDisconnected, why, 1, 2)]
    assert t1.results == [
        R("a@example.net", 451, "4.4.2", why, "data", local=True),
        R("b@example.net", 451, "4.4.2", why, "rcpt", local=True),
    ]
    # t2 was never sent.
    assert t2.results == [R("c@example.net", 451, "4.4.2", why, "mail", local=True)]


def t_eof_between_final_replies(s: Script) -> None:
    c = session(s)
    rcpts = ["a@example.net", "b@example.net", "c@example.net", "d@example.net"]
    txn = c.start_transaction(FROM, rcpts)
    s.sent()
    evs = s.server(b"250 ok\r\n250 ok\r\n550 no b\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert evs == [("ready", 1)]
    c.end_data(txn)
    assert s.sent() == b".\r\n"
    assert s.server(b"250 2.0.0 a saved\r\n") == []
    why = "lost connection with server while waiting for the FINAL reply"
    assert s.server(b"") == [broken(ServerDisconnected, why, 1)]
    # The server may have stored the message for c and d: exactly those are flagged.
    assert txn.results == [
        R("a@example.net", 250, "2.0.0", "a saved", "final"),
        R("b@example.net", 550, None, "no b", "rcpt"),
        R("c@example.net", 451, "4.4.2", why, "final", local=True, possibly_delivered=True),
        R("d@example.net", 451, "4.4.2", why, "final", local=True, possibly_delivered=True),
    ]


def t_eof_while_sending_content(s: Script) -> None:
    c = session(s)
    txn = c.start_transaction(FROM, ["a@example.net"])
    s.sent()
    assert s.server(b"250 ok\r\n250 ok\r\n354 go\r\n") == [("ready", 1)]
    why = "lost connection with server while sending message content"
    assert s.server(b"") == [broken(ServerDisconnected, why, 1)]
    assert txn.results == [R("a@example.net", 451, "4.4.2", why, "content", local=True)]
    assert c.content_owed is None


def t_eof_idle(s: Script) -> None:
    session(s)
    assert s.server(b"") == [broken(ServerDisconnected, "server closed an idle connection")]


def t_eof_after_replies_in_same_feed(s: Script) -> None:
    """Replies already received count before the end of the stream does."""
    c = session(s)
    txn = c.start_transaction(FROM, ["a@example.net"])
    s.sent()
    assert s.server(b"250 ok\r\n250 ok\r\n354 go\r\n") == [("ready", 1)]
    c.end_data(txn)
    s.sent()
    c.receive_data(b"250 saved\r\n")
    c.receive_data(b"")
    assert s.drain() == [
        ("done", 1),
        broken(ServerDisconnected, "server closed an idle connection"),
    ]
    assert txn.results == [R("a@example.net", 250, None, "saved", "final")]


def t_eof_after_quit(s: Script) -> None:
    c = session(s)
    c.command("QUIT")
    assert s.sent() == b"QUIT\r\n"
    assert c.waiting_for == "quit"
    assert s.server(b"") == []  # closing instead of answering QUIT is fine
    assert c.closed and not c.usable and c.error is None


def t_quit(s: Script) -> None:
    c = session(s)
    c.command("quit")
    assert s.sent() == b"QUIT\r\n"
    assert s.server(b"221 2.0.0 bye\r\n") == [
        ("reply", "QUIT", Reply(221, "2.0.0", ("2.0.0 bye",)))
    ]
    assert c.closed and not c.usable
    assert s.server(b"250 late\r\n") == []
    assert s.server(b"") == []
    with pytest.raises(LocalProtocolError, match="connection is closed"):
        c.lhlo()


def t_fail_from_outside(s: Script) -> None:
    c = session(s)
    t1 = c.start_transaction(FROM, ["a@example.net", "b@example.net", "c@example.net"])
    t2 = c.start_transaction(FROM, ["d@example.net"])
    s.sent()
    evs = s.server(b"250 ok\r\n250 ok\r\n250 ok\r\n550 no c\r\n354 go\r\n")
    assert evs == [("ready", 1)]
    c.end_data(t1)
    assert s.sent() == b".\r\n" + mail_burst(FROM, "d@example.net")
    assert s.server(b"250 2.0.0 a saved\r\n") == []
    c.command("NOOP")  # queued, never sent: dropped by the failure
    err = ReadTimeout("timed out waiting for the final reply", "final")
    c.fail(err)
    assert s.drain() == [broken(ReadTimeout, "timed out waiting for the final reply", 1, 2)]
    why = "timed out waiting for the final reply"
    assert t1.results == [
        R("a@example.net", 250, "2.0.0", "a saved", "final"),
        R("b@example.net", 451, "4.4.2", why, "final", local=True, possibly_delivered=True),
        R("c@example.net", 550, None, "no c", "rcpt"),
    ]
    assert t2.results == [R("d@example.net", 451, "4.4.2", why, "mail", local=True)]
    assert c.error is err and not c.usable and c.open_transactions == 0
    assert s.sent() == b""
    c.fail(RuntimeError("again"))  # a second failure changes nothing
    assert s.drain() == [] and c.error is err
    assert s.server(b"250 b saved\r\n") == []


def t_fail_with_code(s: Script) -> None:
    c = session(s)
    txn = c.start_transaction(FROM, ["a@example.net"])
    assert s.sent() != b""
    c.fail(ConnectionResetError("reset by peer"), 421, "4.4.1")
    assert s.sent() == b""  # unsent bytes are dropped
    assert s.drain() == [broken(ConnectionResetError, "reset by peer", 1)]
    assert txn.results == [R("a@example.net", 421, "4.4.1", "reset by peer", "mail", local=True)]


def t_fail_before_greeting(s: Script) -> None:
    c = s.connect()
    c.fail(TimeoutError("no greeting"))
    assert s.drain() == [broken(TimeoutError, "no greeting")]
    assert not c.usable


def t_starttls(s: Script) -> None:
    c = session(s, caps=CAPS_TLS)
    assert c.capabilities.starttls
    c.command("STARTTLS")
    assert s.sent() == b"STARTTLS\r\n"
    assert c.waiting_for == "starttls"
    assert s.server(b"220 2.0.0 Ready to start TLS\r\n") == [
        ("reply", "STARTTLS", Reply(220, "2.0.0", ("2.0.0 Ready to start TLS",)))
    ]
    assert not c.usable  # until the handshake is done
    c.start_tls_done()
    assert c.capabilities is None and not c.pipelining and c.usable
    assert s.drain() == []


def t_starttls_again_lhlo(s: Script) -> None:
    c = session(s, caps=CAPS_TLS)
    c.command("STARTTLS")
    s.sent()
    s.server(b"220 go\r\n")
    c.start_tls_done()
    with pytest.raises(LocalProtocolError, match="LHLO must succeed"):
        c.start_transaction(FROM, ["a@example.net"])
    c.lhlo()
    assert s.sent() == b"LHLO client.example\r\n"
    assert [e[:2] for e in s.server(CAPS)] == [("reply", "LHLO")]
    assert c.pipelining


def t_starttls_leftover(s: Script) -> None:
    c = session(s, caps=CAPS_TLS)
    c.command("STARTTLS")
    s.sent()
    # Bytes after the 220, before the handshake: sent in the clear (CVE-2011-0411).
    assert s.server(b"220 2.0.0 go\r\n250 injec") == [
        ("reply", "STARTTLS", Reply(220, "2.0.0", ("2.0.0 go",)))
    ]
    c.start_tls_done()
    assert s.drain() == [broken(RemoteProtocolError, "server sent data after its STARTTLS reply")]
    assert not c.usable


def t_bad_address(case: tuple[str, list[str], dict[str, Any], str], s: Script) -> None:
    sender, rcpts, kwargs, message = case
    c = session(s)
    with pytest.raises(LocalProtocolError, match=message):
        c.start_transaction(sender, rcpts, **kwargs)
    # Nothing was queued; the connection is as it was.
    assert s.sent() == b""
    assert c.usable and c.idle and c.open_transactions == 0 and c.content_owed is None
    txn = c.start_transaction(FROM, ["ok@example.net"])
    assert txn.id == 1
    assert s.sent() == mail_burst(FROM, "ok@example.net")
    assert s.server(b"250 ok\r\n250 ok\r\n354 go\r\n") == [("ready", 1)]


BAD_ADDRESSES: list[tuple[str, list[str], dict[str, Any], str]] = [
    (FROM, ["a\r@example.net"], {}, "forbidden character"),
    (FROM, ["a\n@example.net"], {}, "forbidden character"),
    (FROM, ["a\0@example.net"], {}, "forbidden character"),
    (FROM, ["<a@example.net"], {}, "forbidden character"),
    (FROM, ["a@example.net>"], {}, "forbidden character"),
    (FROM, ["a b@example.net"], {}, "forbidden character"),
    (FROM, ["a\t@example.net"], {}, "forbidden character"),
    (FROM, ["ok@example.net", ""], {}, "empty recipient address"),
    (FROM, ["ünï@example.net"], {}, "not ASCII"),
    ("sénder@example.org", ["ok@example.net"], {}, "not ASCII"),
    ("a\r\nRSET", ["ok@example.net"], {}, "forbidden character"),
    (FROM, [], {}, "at least one recipient"),
    (FROM, ["ok@example.net"], {"mail_params": ["SIZE =1"]}, "bad ESMTP parameter"),
    (FROM, ["ok@example.net"], {"mail_params": [""]}, "bad ESMTP parameter"),
    (FROM, ["ok@example.net"], {"mail_params": ["X=\r\n"]}, "bad ESMTP parameter"),
    (FROM, ["ok@example.net"], {"rcpt_params": [["NOTIFY=NEVER"], []]}, "one entry per"),
    (FROM, ["ok@example.net"], {"rcpt_params": [["NOTIFY=\x00"]]}, "bad ESMTP parameter"),
    (FROM, [b"ok@example.net"], {}, "must be str, not bytes"),  # type: ignore[list-item]
]


def t_smtputf8_address(s: Script) -> None:
    c = session(s)
    c.start_transaction("sénder@example.org", ["ünï@example.net"], smtputf8=True)
    assert s.sent() == mail_burst("sénder@example.org", "ünï@example.net")


def t_noop_ends_a_group(s: Script) -> None:
    c = session(s)
    c.command("NOOP")
    txn = c.start_transaction(FROM, ["a@example.net"])
    assert s.sent() == b"NOOP\r\n"
    assert c.waiting_for == "noop"
    assert s.server(b"250 2.0.0 ok\r\n") == [("reply", "NOOP", Reply(250, "2.0.0", ("2.0.0 ok",)))]
    assert s.sent() == mail_burst(FROM, "a@example.net")
    assert not txn.done


def t_rset_is_pipelined(s: Script) -> None:
    c = session(s)
    c.command("RSET")
    c.start_transaction(FROM, ["a@example.net"])
    assert s.sent() == b"RSET\r\n" + mail_burst(FROM, "a@example.net")
    assert c.waiting_for == "rset"
    evs = s.server(b"250 2.0.0 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert evs == [("reply", "RSET", Reply(250, "2.0.0", ("2.0.0 ok",))), ("ready", 1)]


def t_auth_exchange(s: Script) -> None:
    c = session(s)
    c.command("AUTH", "PLAIN")
    assert s.sent() == b"AUTH PLAIN\r\n"
    assert c.waiting_for == "auth"
    assert s.server(b"334 \r\n") == [("reply", "AUTH", Reply(334, None, ("",)))]
    c.command("AUTH-RESPONSE", "AGZvbwBiYXI=")
    assert s.sent() == b"AGZvbwBiYXI=\r\n"
    assert c.waiting_for == "auth-response"
    assert s.server(b"235 2.7.0 Authentication successful\r\n") == [
        ("reply", "AUTH-RESPONSE", Reply(235, "2.7.0", ("2.7.0 Authentication successful",)))
    ]
    with pytest.raises(LocalProtocolError, match="CR, LF or NUL"):
        c.command("AUTH-RESPONSE", "abc\r\nQUIT")
    with pytest.raises(LocalProtocolError, match="CR, LF or NUL"):
        c.command("NOOP", "x\0")
    assert s.sent() == b""


def t_internal_rset_refused(s: Script) -> None:
    c = session(s)
    c.start_transaction(FROM, ["a@example.net"])
    s.sent()
    assert s.server(b"250 ok\r\n550 no\r\n554 no recipients\r\n") == [("done", 1)]
    assert s.sent() == b"RSET\r\n"
    assert s.server(b"500 5.5.1 what RSET\r\n") == [
        broken(RemoteProtocolError, "RSET refused: 500 what RSET")
    ]


def t_end_data_wrong_transaction(s: Script) -> None:
    c = session(s)
    t1 = c.start_transaction(FROM, ["a@example.net"])
    t2 = c.start_transaction(FROM, ["b@example.net"])
    s.sent()
    assert s.server(b"250 ok\r\n250 ok\r\n354 go\r\n") == [("ready", 1)]
    with pytest.raises(LocalProtocolError, match="not owed content"):
        c.end_data(t2)
    assert s.sent() == b""
    c.end_data(t1)
    with pytest.raises(LocalProtocolError, match="not owed content"):
        c.end_data(t1)
    assert s.sent() == b".\r\n" + mail_burst(FROM, "b@example.net")


def t_reply_text_decoding(s: Script) -> None:
    c = session(s)
    c.command("NOOP")
    s.sent()
    # Invalid UTF-8 is replaced, never an error; a lone CR inside a line is text.
    assert s.server(b"250 caf\xc3\xa9 \xff\xfe x\ry\r\n") == [
        ("reply", "NOOP", Reply(250, None, ("café \ufffd\ufffd x\ry",)))
    ]
    c.command("NOOP")
    s.sent()
    assert s.server(b"250\r\n") == [("reply", "NOOP", Reply(250, None, ("",)))]
    c.command("NOOP")
    s.sent()
    assert s.server(b"250-\r\n250 \r\n") == [("reply", "NOOP", Reply(250, None, ("", "")))]


def t_lone_dot_reply_then_eof(s: Script) -> None:
    c = session(s)
    txn = c.start_transaction(FROM, ["a@example.net"])
    s.sent()
    assert s.server(b"250 ok\r\n550 no\r\n354 go\r\n") == []
    assert s.sent() == b".\r\n"
    why = "lost connection with server while waiting for the DATA reply"
    assert s.server(b"") == [broken(ServerDisconnected, why, 1)]
    assert txn.results == [R("a@example.net", 550, None, "no", "rcpt")]


def t_max_length_line_with_crlf(s: Script) -> None:
    c = session(s, max_line_length=32)
    c.command("NOOP")
    s.sent()
    # Exactly 32 bytes of line: allowed even when its CR arrives before its LF.
    exact = b"250 " + b"y" * 28
    assert s.server(exact + b"\r\n") == [("reply", "NOOP", Reply(250, None, ("y" * 28,)))]
    c.command("NOOP")
    s.sent()
    assert s.server(exact + b"y\r") == [
        broken(RemoteProtocolError, "reply line longer than 32 bytes")
    ]


def t_starttls_leftover_complete_lines(s: Script) -> None:
    c = session(s, caps=CAPS_TLS)
    c.command("STARTTLS")
    s.sent()
    # Complete continuation lines are leftovers too, not the start of a TLS-protected reply.
    assert [e[:2] for e in s.server(b"220 2.0.0 go\r\n250-injected\r\n")] == [("reply", "STARTTLS")]
    c.start_tls_done()
    assert s.drain() == [broken(RemoteProtocolError, "server sent data after its STARTTLS reply")]


def t_starttls_blocks_everything_until_done(s: Script) -> None:
    c = session(s, caps=CAPS_TLS)
    c.command("STARTTLS")
    assert not c.usable
    with pytest.raises(LocalProtocolError, match="STARTTLS in progress"):
        c.start_transaction(FROM, ["a@example.net"])
    with pytest.raises(LocalProtocolError, match="STARTTLS in progress"):
        c.lhlo()
    assert s.sent() == b"STARTTLS\r\n"
    assert [e[:2] for e in s.server(b"220 2.0.0 go\r\n")] == [("reply", "STARTTLS")]
    assert s.sent() == b""  # nothing in the clear before the handshake
    assert not c.usable
    c.start_tls_done()
    assert c.usable and s.drain() == []


def t_starttls_refused(s: Script) -> None:
    c = session(s, caps=CAPS_TLS)
    c.command("STARTTLS")
    s.sent()
    assert s.server(b"454 4.7.0 TLS not available\r\n") == [
        ("reply", "STARTTLS", Reply(454, "4.7.0", ("4.7.0 TLS not available",)))
    ]
    # Refused: the session goes on in the clear, capabilities kept.
    assert c.usable and c.capabilities is not None and c.pipelining
    c.start_transaction(FROM, ["a@example.net"])
    assert s.sent() == mail_burst(FROM, "a@example.net")


def t_end_data_only_after_354(s: Script) -> None:
    c = session(s)
    txn = c.start_transaction(FROM, ["a@example.net"])
    s.sent()
    assert c.content_owed is txn  # DATA is out, but the server has not said 354
    with pytest.raises(LocalProtocolError, match="not owed content"):
        c.end_data(txn)
    assert s.sent() == b""
    assert s.server(b"250 ok\r\n250 ok\r\n354 go\r\n") == [("ready", 1)]
    c.end_data(txn)
    assert s.sent() == b".\r\n"
    assert s.server(b"250 saved\r\n") == [("done", 1)]


def t_end_data_after_break_is_noop(s: Script) -> None:
    c = session(s)
    txn = c.start_transaction(FROM, ["a@example.net"])
    s.sent()
    assert s.server(b"250 ok\r\n250 ok\r\n354 go\r\n") == [("ready", 1)]
    c.fail(ConnectionResetError("reset"))
    assert s.drain() == [broken(ConnectionResetError, "reset", 1)]
    c.end_data(txn)  # the content writer finishing late: the transaction is decided
    assert s.sent() == b""
    assert txn.results == [R("a@example.net", 451, "4.4.2", "reset", "content", local=True)]


def t_nothing_after_quit(s: Script) -> None:
    c = session(s)
    c.command("QUIT")
    assert not c.usable and not c.closed
    with pytest.raises(LocalProtocolError, match=r"connection is closed \(QUIT was sent\)"):
        c.start_transaction(FROM, ["a@example.net"])
    with pytest.raises(LocalProtocolError, match="QUIT was sent"):
        c.command("NOOP")
    assert s.sent() == b"QUIT\r\n"
    assert [e[:2] for e in s.server(b"221 2.0.0 bye\r\n")] == [("reply", "QUIT")]
    assert s.sent() == b"" and c.closed


def t_quit_after_transaction(s: Script) -> None:
    c = session(s)
    txn = c.start_transaction(FROM, ["a@example.net"])
    c.command("QUIT")
    assert s.sent() == mail_burst(FROM, "a@example.net")
    assert s.server(b"250 ok\r\n250 ok\r\n354 go\r\n") == [("ready", 1)]
    c.end_data(txn)  # allowed: the transaction was queued before QUIT
    assert s.sent() == b".\r\nQUIT\r\n"
    assert s.server(b"250 2.0.0 saved\r\n221 2.0.0 bye\r\n") == [
        ("done", 1),
        ("reply", "QUIT", Reply(221, "2.0.0", ("2.0.0 bye",))),
    ]
    assert c.closed and txn.results[0].delivered


TRANSCRIPTS: list[tuple[str, Callable[[Script], None]]] = [
    ("greeting_lhlo_capabilities", t_greeting_lhlo_capabilities),
    ("ignore_pipelining_keyword", t_ignore_pipelining_keyword),
    ("pipelining_disabled_by_caller", t_pipelining_disabled_by_caller),
    ("lhlo_refused", t_lhlo_refused),
    ("greeting_refused", t_greeting_refused),
    ("pipelined_transaction", t_pipelined_transaction),
    ("pipelined_back_to_back", t_pipelined_back_to_back),
    ("nonpipelined_one_command_per_reply", t_nonpipelined_one_command_per_reply),
    ("nonpipelined_mail_refused", t_nonpipelined_mail_refused),
    ("nonpipelined_all_rcpt_refused", t_nonpipelined_all_rcpt_refused),
    ("multiline_replies", t_multiline_replies),
    ("results_in_rcpt_order_with_duplicates", t_results_in_rcpt_order_with_duplicates),
    ("pipelined_data_refused", t_pipelined_data_refused),
    ("pipelined_all_rcpt_refused", t_pipelined_all_rcpt_refused),
    ("pipelined_mail_refused", t_pipelined_mail_refused),
    ("354_without_accepted_recipient", t_354_without_accepted_recipient),
    ("lone_dot_reply_then_eof", t_lone_dot_reply_then_eof),
    ("unexpected_reply", t_unexpected_reply),
    ("unexpected_reply_mid_transaction", t_unexpected_reply_mid_transaction),
    *[(f"malformed_{i}", partial(t_malformed_line, line)) for i, line in enumerate(MALFORMED)],
    ("line_too_long", t_line_too_long),
    ("line_too_long_without_lf", t_line_too_long_without_lf),
    ("too_many_lines", t_too_many_lines),
    ("code_changes_inside_reply", t_code_changes_inside_reply),
    ("eof_before_greeting", t_eof_before_greeting),
    ("eof_inside_greeting", t_eof_inside_greeting),
    ("eof_after_mail", t_eof_after_mail),
    ("eof_after_mail_nonpipelined", t_eof_after_mail_nonpipelined),
    ("eof_between_final_replies", t_eof_between_final_replies),
    ("eof_while_sending_content", t_eof_while_sending_content),
    ("eof_idle", t_eof_idle),
    ("eof_after_replies_in_same_feed", t_eof_after_replies_in_same_feed),
    ("eof_after_quit", t_eof_after_quit),
    ("quit", t_quit),
    ("fail_from_outside", t_fail_from_outside),
    ("fail_with_code", t_fail_with_code),
    ("fail_before_greeting", t_fail_before_greeting),
    ("starttls", t_starttls),
    ("starttls_again_lhlo", t_starttls_again_lhlo),
    ("starttls_leftover", t_starttls_leftover),
    *[(f"bad_address_{i}", partial(t_bad_address, case)) for i, case in enumerate(BAD_ADDRESSES)],
    ("smtputf8_address", t_smtputf8_address),
    ("noop_ends_a_group", t_noop_ends_a_group),
    ("rset_is_pipelined", t_rset_is_pipelined),
    ("auth_exchange", t_auth_exchange),
    ("internal_rset_refused", t_internal_rset_refused),
    ("end_data_wrong_transaction", t_end_data_wrong_transaction),
    ("reply_text_decoding", t_reply_text_decoding),
    ("max_length_line_with_crlf", t_max_length_line_with_crlf),
    ("starttls_leftover_complete_lines", t_starttls_leftover_complete_lines),
    ("starttls_blocks_everything_until_done", t_starttls_blocks_everything_until_done),
    ("starttls_refused", t_starttls_refused),
    ("end_data_only_after_354", t_end_data_only_after_354),
    ("end_data_after_break_is_noop", t_end_data_after_break_is_noop),
    ("nothing_after_quit", t_nothing_after_quit),
    ("quit_after_transaction", t_quit_after_transaction),
]


def run_every_way(impl: ModuleType, transcript: Callable[[Script], None], how: str) -> None:
    """Run ``transcript`` with the server's bytes cut as ``how`` says."""
    if how != "every":
        transcript(Script(impl, Cut(how)))
        return
    whole = Script(impl, Cut("whole"))
    transcript(whole)
    for at in range(1, whole.fed):
        try:
            transcript(Script(impl, Cut("at", at)))
        except Exception as exc:
            raise AssertionError(f"fails when the server's bytes are cut at {at}") from exc


@pytest.mark.parametrize("how", ["whole", "bytewise", "every"])
@pytest.mark.parametrize("transcript", [t for _, t in TRANSCRIPTS], ids=[n for n, _ in TRANSCRIPTS])
def test_transcript(impl: ModuleType, transcript: Callable[[Script], None], how: str) -> None:
    run_every_way(impl, transcript, how)


def test_reply_text_strips_only_the_enhanced_code() -> None:
    # Shared code (_common.Reply.text), so one run covers both engines.
    reply = Reply(250, "2.1.5", ("2.1.5 a", "2.1.50 b", "2.1.5", "x 2.1.5"))
    assert reply.text == "a\n2.1.50 b\n\nx 2.1.5"


# --- other engine behaviour --------------------------------------------------------------


def test_compiled_engine_builds_replies_fast() -> None:
    """The C engine skips Reply's Python __init__ only while Reply is the class it expects.

    If this fails, Reply in _common changed shape: the engine still works (it
    falls back to calling Reply), but update the reference in _cproto.pyx.
    """
    c = _engine("c")
    assert c._FAST_REPLY_ACTIVE


def test_compiled_engine_builds_events_and_transactions_fast() -> None:
    """The same for ReadyForData / TransactionDone, and its typed transaction twin.

    The compiled engine's transactions are ``_cproto.CTransaction``, a virtual
    subclass of ``_common.Transaction`` with the same fields and repr.
    """
    c = _engine("c")
    assert c._FAST_EVENTS_ACTIVE
    ref = Transaction(7, "s@example.org", ("a@example.org", "b@example.org"))
    twin = c.CTransaction(7, "s@example.org", ("a@example.org", "b@example.org"))
    assert isinstance(twin, Transaction) and repr(twin) == repr(ref)
    for name in Transaction.__slots__:
        assert getattr(twin, name) == getattr(ref, name), name


def test_bad_local_name(impl: ModuleType) -> None:
    for name in ["", "a b", "a\r\nQUIT", "a\0"]:
        with pytest.raises(LocalProtocolError):
            impl.Connection(name)


def test_public_attributes(impl: ModuleType) -> None:
    c = impl.Connection("mx.example", ignore_keywords=["SIZE"], max_line_length=100)
    assert c.local_name == "mx.example"
    assert c.ignore_keywords == ("SIZE",)
    assert c.capabilities is None and c.pipelining is False
    assert c.error is None and c.closed is False
    assert c.content_owed is None and c.open_transactions == 0
    assert c.waiting_for == "greeting" and c.usable and not c.idle
    assert c.data_to_send() == b""
    assert c.next_event() is NEED_DATA


def test_ignore_keywords_drops_size(impl: ModuleType) -> None:
    s = Script(impl, Cut("whole"))
    c = session(s, ignore_keywords=("size", "8bitmime"))
    assert c.capabilities.size is None and not c.capabilities.eightbitmime
    assert c.pipelining


def test_events_come_one_reply_at_a_time(impl: ModuleType) -> None:
    """Replies are read lazily: an event is returned before later replies are parsed."""
    s = Script(impl, Cut("whole"))
    c = session(s)
    txn = c.start_transaction(FROM, ["a@example.net"])
    s.sent()
    c.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    c.command("NOOP")  # queued behind the content
    assert norm(c.next_event()) == ("ready", 1)
    c.end_data(txn)  # the dot goes out before the next reply is read
    assert c.data_to_send() == b".\r\nNOOP\r\n"
    c.receive_data(b"250 saved\r\n250 noop\r\n")
    # The final reply is in, but only NOOP's reply (the last one expected)
    # proves the stream in step: it is parsed, then the transaction comes out.
    assert norm(c.next_event()) == ("done", 1)
    assert norm(c.next_event()) == ("reply", "NOOP", Reply(250, None, ("noop",)))
    assert c.next_event() is NEED_DATA
    assert txn.results == [R("a@example.net", 250, None, "saved", "final")]


def test_large_stream_many_chunks(impl: ModuleType) -> None:
    """Over 64 KiB in flight with partial lines at every chunk end."""
    c = impl.Connection("client.example")
    c.receive_data(GREETING)
    c.next_event()
    n = 6000
    for _ in range(n):
        c.command("RSET")
    c.data_to_send()
    stream = b"".join(b"250 2.0.0 reset number %d\r\n" % i for i in range(n))
    got = []
    for i in range(0, len(stream), 4093):
        c.receive_data(stream[i : i + 4093])
        while (ev := c.next_event()) is not NEED_DATA:
            got.append(ev.reply.lines[0])
    assert got == [f"2.0.0 reset number {i}" for i in range(n)]
    assert c.idle


# --- ReplyParser ----------------------------------------------------------------------------


ENHANCED_CASES: list[tuple[int, str, str | None]] = [
    (250, "2.1.5 Ok", "2.1.5"),
    (250, "2.1.5", "2.1.5"),
    (250, "2.1.5 ", "2.1.5"),
    (550, "5.7.1 refused", "5.7.1"),
    (452, "4.2.2 full", "4.2.2"),
    (221, "2.0.0 bye", "2.0.0"),
    (250, "2.123.456 wide", "2.123.456"),
    (250, "4.1.5 class mismatch", None),
    (550, "4.1.1 class mismatch", None),
    (450, "5.1.1 class mismatch", None),
    (354, "3.0.0 no class 3", None),
    (250, "3.0.0 no class 3", None),
    (250, "2.1.5Ok", None),
    (250, "2.1.5\tOk", None),
    (250, "2.1.5.6 four parts", None),
    (250, "2.1234.5 long subject", None),
    (250, "2.1.5555 long detail", None),
    (250, "2..5 empty subject", None),
    (250, "2.1. empty detail", None),
    (250, "2.1 two parts", None),
    (250, "2.1", None),
    (250, "2 1 5", None),
    (250, " 2.1.5 leading space", None),
    (250, "2.1.5é", None),
    (250, "\uff12.1.5 fullwidth", None),
    (250, "2.\u0663.5 arabic-indic", None),
    (250, "", None),
    (250, "hello 2.1.5", None),
]


@pytest.mark.parametrize(("code", "text", "enhanced"), ENHANCED_CASES)
def test_enhanced_code(impl: ModuleType, code: int, text: str, enhanced: str | None) -> None:
    p = impl.ReplyParser()
    p.feed(b"%d %s\r\n" % (code, text.encode()))
    reply = p.next_reply()
    assert reply == Reply(code, enhanced, (text,))
    assert reply.enhanced == enhanced
    assert parse_enhanced(code, text) == enhanced  # the shared helper agrees


def test_enhanced_code_from_first_line_else_last(impl: ModuleType) -> None:
    p = impl.ReplyParser()
    p.feed(b"250-no code here\r\n250 2.1.5 but here\r\n")
    assert p.next_reply() == Reply(250, "2.1.5", ("no code here", "2.1.5 but here"))
    p.feed(b"250-a\r\n250-2.1.5 middle only\r\n250 end\r\n")
    assert p.next_reply() == Reply(250, None, ("a", "2.1.5 middle only", "end"))
    p.feed(b"250-2.0.0 first\r\n250 2.1.5 last\r\n")
    assert p.next_reply().enhanced == "2.0.0"


def parse_all(impl: ModuleType, pieces: list[bytes], **kwargs: Any) -> list[Any]:
    """Replies and errors (as ``("error", message)``) from feeding ``pieces``."""
    p = impl.ReplyParser(**kwargs)
    out: list[Any] = []
    for piece in pieces:
        p.feed(piece)
        for _ in range(len(piece) + 2):
            try:
                r = p.next_reply()
            except RemoteProtocolError as exc:
                out.append(("error", str(exc)))
                continue
            if r is None:
                break
            out.append(r)
    out.append(("left", p.buffered, p.in_reply))
    return out


def test_parser_basics(impl: ModuleType) -> None:
    p = impl.ReplyParser()
    assert p.max_line_length == 8192 and p.max_reply_lines == 200
    assert p.next_reply() is None and p.buffered == 0 and not p.in_reply
    p.feed(b"25")
    assert p.next_reply() is None and p.buffered == 2 and p.in_reply
    p.feed(b"0-first\r\n250-second\n")
    assert p.next_reply() is None
    assert p.buffered == 0 and p.in_reply  # two lines of an unfinished reply
    p.feed(bytearray(b"250 last\r\n354 go"))
    assert p.next_reply() == Reply(250, None, ("first", "second", "last"))
    assert p.next_reply() is None and p.buffered == 6
    assert p.take_buffered() == b"354 go"
    assert p.buffered == 0 and not p.in_reply and p.next_reply() is None
    p.feed(memoryview(b"221 bye\r\n"))
    assert p.next_reply() == Reply(221, None, ("bye",))
    assert p.take_buffered() == b""


def test_parser_limits_are_settable(impl: ModuleType) -> None:
    p = impl.ReplyParser(max_line_length=10, max_reply_lines=2)
    assert (p.max_line_length, p.max_reply_lines) == (10, 2)
    p.max_line_length = 20
    p.feed(b"250 " + b"x" * 16 + b"\r\n")
    assert p.next_reply() == Reply(250, None, ("x" * 16,))


def test_parser_goes_on_after_errors(impl: ModuleType) -> None:
    """After an error the parser's state is as the spec leaves it (parity, not advice)."""
    got = parse_all(
        impl,
        [b"250-a\r\nxyz\r\n251 b\r\n250 c\r\n", b"250-1\r\n250-2\r\n250-3\r\n250 4\r\n"],
        max_reply_lines=2,
    )
    assert got == [
        ("error", "malformed reply line b'xyz'"),
        ("error", "reply code changed from 250 to 251 inside a multi-line reply"),
        Reply(250, None, ("a", "c")),
        ("error", "reply longer than 2 lines"),
        ("error", "reply longer than 2 lines"),
        Reply(250, None, ("1", "2", "3", "4")),
        ("left", 0, False),
    ]


def test_parser_slow_drip_long_line(impl: ModuleType) -> None:
    p = impl.ReplyParser()
    line = b"250 " + b"x" * 8000 + b"\r\n"
    for i in range(len(line) - 1):
        p.feed(line[i : i + 1])
        assert p.next_reply() is None
    p.feed(line[-1:])
    assert p.next_reply() == Reply(250, None, ("x" * 8000,))


def test_parser_big_buffer_compaction(impl: ModuleType) -> None:
    stream = b"".join(b"250 reply %d\r\n" % i for i in range(20000)) + b"250 tail"
    got = parse_all(impl, [stream[:100000], stream[100000:], b" end\r\n"])
    assert len(got) == 20002
    assert got[-2] == Reply(250, None, ("tail end",))
    assert got[-1] == ("left", 0, False)


# --- parity oracle: hypothesis ---------------------------------------------------------------

CODES = [c for c in range(200, 600) if c % 100 < 60]

line_text = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
    st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=30).map(str.encode),
    st.sampled_from([b"", b" ", b"ok", b"Ok", b"2.1.5 ok", b"4.2.2 full", b"5.7.1 no"]),
)


@st.composite
def replies(draw: st.DrawFn) -> tuple[int, list[bytes], str]:
    code = draw(st.sampled_from(CODES))
    texts = draw(st.lists(line_text, min_size=1, max_size=4))
    if draw(st.booleans()):
        cls = draw(st.sampled_from(["2", "4", "5", str(code // 100)]))
        enh = f"{cls}.{draw(st.integers(0, 999))}.{draw(st.integers(0, 999))}".encode()
        texts[0] = enh + draw(st.sampled_from([b"", b" ", b" x", b"x"])) + texts[0]
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    return code, texts, eol


def encode_reply(code: int, texts: list[bytes], eol: str, bare_last: bool) -> bytes:
    out = b""
    for i, t in enumerate(texts):
        last = i == len(texts) - 1
        if last and bare_last and not t:
            out += b"%d" % code + eol.encode()
        else:
            out += b"%d%s%s" % (code, b" " if last else b"-", t) + eol.encode()
    return out


def cut_points(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, prev = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[prev:p])
        prev = p
    return [p for p in pieces if p]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(replies(), min_size=1, max_size=12),
    st.lists(st.booleans(), min_size=12, max_size=12),
    st.lists(st.integers(0, 10_000), max_size=8),
)
def test_parity_valid_replies(
    both: tuple[ModuleType, ModuleType],
    spec: list[tuple[int, list[bytes], str]],
    bare: list[bool],
    cuts: list[int],
) -> None:
    stream = b"".join(encode_reply(c, t, e, bare[i]) for i, (c, t, e) in enumerate(spec))
    expected = []
    for code, texts, _eol in spec:
        lines = tuple(t.decode("utf-8", "replace") for t in texts)
        enhanced = parse_enhanced(code, lines[0])
        if enhanced is None and len(lines) > 1:
            enhanced = parse_enhanced(code, lines[-1])  # Cyrus puts it on the last line
        expected.append(Reply(code, enhanced, lines))
    expected.append(("left", 0, False))
    pieces = cut_points(stream, cuts)
    for mod in both:
        assert parse_all(mod, pieces) == expected


reply_ish = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b"250",
                b"250 ",
                b"250-",
                b"354 go",
                b"550-5.1.1 x",
                b"2",
                b"25",
                b"\r",
                b"\n",
                b"\r\n",
                b"251 ",
                b"699 ",
                b"-",
                b" ",
                b"2.0.0",
                b"\xff",
                b"x" * 20,
            ]
        ),
        st.binary(max_size=6),
    ),
    max_size=30,
).map(b"".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reply_ish,
    st.lists(st.integers(0, 10_000), max_size=8),
    st.integers(4, 40),
    st.integers(1, 4),
)
def test_parity_any_bytes(
    both: tuple[ModuleType, ModuleType],
    stream: bytes,
    cuts: list[int],
    max_line: int,
    max_lines: int,
) -> None:
    pieces = cut_points(stream, cuts)
    py, c = (
        parse_all(mod, pieces, max_line_length=max_line, max_reply_lines=max_lines) for mod in both
    )
    assert c == py


SESSION_CODES = [220, 221, 235, 250, 251, 334, 354, 421, 450, 451, 452, 500, 503, 550, 554]


@st.composite
def server_replies(draw: st.DrawFn) -> bytes:
    # Mostly what a willing server says, so sessions get far; any code now and then.
    code = draw(st.one_of(st.sampled_from([250, 250, 354]), st.sampled_from(SESSION_CODES)))
    n = draw(st.integers(1, 2))
    text = draw(st.sampled_from(["ok", "2.0.0 ok", "4.2.2 full", "5.1.1 no", ""]))
    return b"".join(
        b"%d%s%s\r\n" % (code, b" " if i == n - 1 else b"-", text.encode()) for i in range(n)
    )


def run_session(
    mod: ModuleType,
    caps: bytes,
    pipelining: bool,
    txns: list[list[str]],
    commands: list[str],
    stream: bytes,
    cuts: list[int],
    eof: bool,
) -> list[Any]:
    """A random session; the trace is everything observable, step by step."""
    c = mod.Connection("client.example", pipelining=pipelining)
    trace: list[Any] = []

    def observe(label: str) -> None:
        events = []
        while (ev := c.next_event()) is not NEED_DATA:
            events.append(norm(ev))
            if isinstance(ev, ReadyForData):
                try:
                    c.end_data(ev.transaction)
                except LocalProtocolError as exc:
                    events.append(("end_data refused", str(exc)))
        trace.append(
            (
                label,
                c.data_to_send(),
                events,
                c.waiting_for,
                c.idle,
                c.usable,
                c.closed,
                c.open_transactions,
                c.content_owed is not None,
                c.pipelining,
            )
        )

    c.lhlo()
    c.receive_data(GREETING + caps)
    observe("greeting")
    opened = []
    for i, rcpts in enumerate(txns):
        try:
            opened.append(c.start_transaction(FROM, rcpts))
        except LocalProtocolError as exc:
            trace.append(("refused", str(exc)))
        if i < len(commands):
            try:
                c.command(commands[i])
            except LocalProtocolError as exc:
                trace.append(("refused", str(exc)))
        observe(f"txn {i}")
    return play_replies(c, stream, cuts, eof, observe, opened, trace)


def play_replies(c: Any, stream: bytes, cuts: list[int], eof: bool,
                 observe: Callable[[str], None], opened: list[Any], trace: list[Any]) -> list[Any]:
    """Feed ``stream`` cut at ``cuts`` (then EOF), observing after each piece; the trace."""
    for piece in cut_points(stream, cuts):
        c.receive_data(piece)
        observe("piece")
    if eof:
        c.receive_data(b"")
        observe("eof")
    for t in opened:
        trace.append((t.id, t.done, list(t.results), t.accepted, t.dot_sent, t.mail_sent))
    return trace


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([CAPS, CAPS_NO_PIPELINING, b"550 no\r\n"]),
    st.booleans(),
    st.lists(
        st.lists(
            st.sampled_from(["a@example.net", "b@example.net", "c@example.net"]),
            min_size=1,
            max_size=4,
        ),
        min_size=1,
        max_size=3,
    ),
    st.lists(st.sampled_from(["RSET", "NOOP", "QUIT", "STARTTLS"]), max_size=2),
    st.lists(server_replies(), max_size=20).map(b"".join),
    st.lists(st.integers(0, 10_000), max_size=6),
    st.booleans(),
)
def test_parity_random_sessions(
    both: tuple[ModuleType, ModuleType],
    caps: bytes,
    pipelining: bool,
    txns: list[list[str]],
    commands: list[str],
    stream: bytes,
    cuts: list[int],
    eof: bool,
) -> None:
    py, c = (run_session(m, caps, pipelining, txns, commands, stream, cuts, eof) for m in both)
    assert c == py


def test_parity_random_sessions_sees_broken_and_done(both: tuple[ModuleType, ModuleType]) -> None:
    """A fixed session through the parity harness, so a harness bug cannot hide everything."""
    stream = b"250 ok\r\n250 ok\r\n354 go\r\n250 saved\r\n"
    cut = [stream.index(b"250 saved")]  # the final reply comes after the dot was sent
    trace = run_session(both[0], CAPS, True, [["a@example.net"]], [], stream, cut, True)
    events = [e for step in trace if isinstance(step[0], str) for e in step[2]]
    assert ("ready", 1) in events and ("done", 1) in events
    assert events[-1][0] == "broken"
    assert trace == run_session(both[1], CAPS, True, [["a@example.net"]], [], stream, cut, True)


# --- helpers under test ------------------------------------------------------------------


def test_cut_pieces_cover_stream() -> None:
    data = b"0123456789"
    for at in range(0, 12):
        pieces = Cut("at", at).pieces(0, data)
        assert b"".join(pieces) == data
    assert [bytes(p) for p in Cut("bytewise").pieces(0, b"abc")] == [b"a", b"b", b"c"]


@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_enhanced_code_on_last_line_only(impl: ModuleType, how: str) -> None:
    # Cyrus: "550-Mailbox unknown..." then "550 5.1.1 User unknown" (RFC 2034
    # wants the code on every line; take it from the last when the first lacks it).
    parser = impl.ReplyParser()
    data = b"550-a\r\n550-b\r\n550 5.1.1 User unknown\r\n"
    pieces = [data] if how == "whole" else [data[i : i + 1] for i in range(len(data))]
    replies = []
    for piece in pieces:
        parser.feed(piece)
        while (reply := parser.next_reply()) is not None:
            replies.append(reply)
    assert replies == [Reply(550, "5.1.1", ("a", "b", "5.1.1 User unknown"))]
    assert replies[0].text == "a\nb\nUser unknown"


def test_secret_not_quoted_in_argument_errors(impl: ModuleType) -> None:
    s = Script(impl, Cut("whole"))
    c = session(s)
    with pytest.raises(LocalProtocolError) as info:
        c.command("AUTH-RESPONSE", "c2VjcmV0\r\nx")
    assert "c2VjcmV0" not in str(info.value)



@pytest.mark.parametrize("verb", ["MAIL", "rcpt", "DATA", "BDAT", "LHLO"])
def test_command_refuses_what_would_put_replies_out_of_step(impl: ModuleType, verb: str) -> None:
    s = Script(impl, Cut("whole"))
    c = session(s)
    with pytest.raises(LocalProtocolError, match="out of step"):
        c.command(verb, "FROM:<a@b>")
    with pytest.raises(LocalProtocolError, match="bad command verb"):
        c.command("NOOP X", None)
    assert s.sent() == b"" and c.usable and c.idle


@pytest.mark.parametrize("name", ["a\tb", "h\u00f6st", "a b", ""])
def test_lhlo_name_is_printable_ascii(impl: ModuleType, name: str) -> None:
    with pytest.raises(LocalProtocolError, match="bad LHLO name"):
        impl.Connection(name)
