"""The reference LMTP client engine, in pure Python (sans-IO).

This module is the specification the compiled engine (``_cproto``) follows
line for line, and the fallback when it is not built. It does no I/O: bytes
go in with :meth:`Connection.receive_data`, events come out of
:meth:`Connection.next_event`, and the bytes to write come out of
:meth:`Connection.data_to_send`.

The design follows Postfix's ``smtp_proto.c``: commands are queued, a send
cursor moves them to the wire as pipelining allows, and one FIFO of expected
replies is the receive cursor. A reply nobody waits for, a malformed reply or
an early end of the stream breaks the connection; every transaction still
open then gets a made-up transient result per recipient, never silence.

Replies are matched to commands by position only, so a server that sends one
reply too few (or too many) after the final dot shifts every later reply:
with a transaction pipelined behind, its MAIL's 250 would read as the last
recipient's final reply. A transaction whose replies are all in is therefore
*held* (no ``TransactionDone``) until the stream is proven in step:

* the next DATA's 354 arrives exactly where it is expected (a 354 answers
  nothing but DATA, so every reply before it was in place), or
* every reply expected so far has come and no byte more is waiting.

A shifted stream shows as a 354 or other 3xx where no DATA reply is due, a
success other than 354 to DATA, a reply received before the final dot was
sent, or bytes nobody asked for. Then, and when the connection fails before
the proof, every held or open transaction is decided as unproven (see
``_common.fail_transaction``): transient, possibly delivered once the content
was sent; never delivered, never permanent. BDAT has no 354, so the proof for
pipelined BDAT transactions is the queue draining: after ``bdat_burst`` of
them are in flight unproven, nothing more is sent until it drains.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from .._errors import LocalProtocolError, RemoteProtocolError, ServerDisconnected
from ._common import (
    BDAT_BURST,
    DEFAULT_MAX_LINE_LENGTH,
    DEFAULT_MAX_REPLY_LINES,
    LOST_CODE,
    LOST_ENHANCED,
    NEED_DATA,
    PROTOCOL_CODE,
    PROTOCOL_ENHANCED,
    Capabilities,
    CommandReply,
    ConnectionBroken,
    Event,
    ReadyForData,
    Reply,
    Transaction,
    TransactionDone,
    check_command_argument,
    check_session_verb,
    encode_address,
    encode_local_name,
    encode_param,
    fail_transaction,
    finish_transaction,
    parse_enhanced,
)

__all__ = ["Connection", "ReplyParser"]

_CRLF = b"\r\n"


class ReplyParser:
    """Splits a byte stream into :class:`Reply` objects.

    Never rescans bytes it has already searched, so a peer that drips a long
    line one byte at a time costs O(n), not O(n^2). Lines may end in CRLF or
    a bare LF. Limits on line length and lines per reply are hard: going over
    is a :class:`RemoteProtocolError`.
    """

    def __init__(
        self,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_reply_lines: int = DEFAULT_MAX_REPLY_LINES,
    ) -> None:
        self.max_line_length = max_line_length
        self.max_reply_lines = max_reply_lines
        self._buf = bytearray()
        self._start = 0  # start of the current line
        self._scan = 0  # where the search for LF resumes
        self._code = 0  # code of the reply being assembled (0: none yet)
        self._lines: list[str] = []

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._start and self._start == len(self._buf):
            # Everything consumed: reset instead of growing forever.
            self._buf.clear()
            self._start = self._scan = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete reply."""
        return len(self._buf) - self._start

    @property
    def in_reply(self) -> bool:
        """True when part of a reply (a line or more) has been received."""
        return self._code != 0 or len(self._buf) > self._start

    def next_reply(self) -> Reply | None:
        """The next complete reply, or ``None`` until more bytes arrive."""
        buf = self._buf
        while True:
            nl = buf.find(b"\n", self._scan)
            if nl < 0:
                self._scan = len(buf)
                pending = self._scan - self._start
                # A line of exactly the maximum may have its CR here and its LF later.
                if pending > self.max_line_length and not (
                    pending == self.max_line_length + 1 and buf[-1] == 13
                ):
                    raise RemoteProtocolError(
                        f"reply line longer than {self.max_line_length} bytes"
                    )
                self._compact()
                return None
            end = nl - 1 if nl > self._start and buf[nl - 1] == 13 else nl
            start = self._start
            self._start = self._scan = nl + 1
            if end - start > self.max_line_length:
                raise RemoteProtocolError(f"reply line longer than {self.max_line_length} bytes")
            code, last, text = _parse_line(buf, start, end)
            if self._code and code != self._code:
                raise RemoteProtocolError(
                    f"reply code changed from {self._code} to {code} inside a multi-line reply"
                )
            self._code = code
            self._lines.append(text)
            if last:
                lines = tuple(self._lines)
                self._lines = []
                self._code = 0
                enhanced = parse_enhanced(code, lines[0])
                if enhanced is None and len(lines) > 1:
                    # RFC 2034 wants it on every line; Cyrus puts it on the last only.
                    enhanced = parse_enhanced(code, lines[-1])
                return Reply(code, enhanced, lines)
            if len(self._lines) >= self.max_reply_lines:
                raise RemoteProtocolError(f"reply longer than {self.max_reply_lines} lines")

    def take_buffered(self) -> bytes:
        """Remove and return the bytes not yet part of a reply (STARTTLS checks them)."""
        rest = bytes(self._buf[self._start :])
        self._buf.clear()
        self._start = self._scan = 0
        return rest

    def _compact(self) -> None:
        if self._start > 65536:
            del self._buf[: self._start]
            self._scan -= self._start
            self._start = 0


def _parse_line(buf: bytearray, start: int, end: int) -> tuple[int, bool, str]:
    """Code, whether it is the last line, and the text of one reply line."""
    n = end - start
    if n < 3:
        raise RemoteProtocolError(f"malformed reply line {bytes(buf[start:end])!r}")
    d0, d1, d2 = buf[start], buf[start + 1], buf[start + 2]
    # RFC 5321 4.2: first digit 2-5, second 0-5, third 0-9.
    if not (50 <= d0 <= 53 and 48 <= d1 <= 53 and 48 <= d2 <= 57):
        raise RemoteProtocolError(f"malformed reply line {bytes(buf[start:end])!r}")
    code = (d0 - 48) * 100 + (d1 - 48) * 10 + (d2 - 48)
    if n == 3:
        return code, True, ""
    sep = buf[start + 3]
    if sep == 32:
        last = True
    elif sep == 45:
        last = False
    else:
        raise RemoteProtocolError(f"malformed reply line {bytes(buf[start:end])!r}")
    return code, last, buf[start + 4 : end].decode("utf-8", "replace")


# What the receive cursor expects next (the first item of each queue entry).
_GREETING = 0
_LHLO = 1
_MAIL = 2
_RCPT = 3
_DATA = 4
_DOT = 5  # one reply after the final dot, for one accepted recipient
_LONE_DOT = 6  # the reply to a "." sent after 354 when no recipient was accepted
_RSET_INTERNAL = 7  # RSET we sent to clean up after a failed transaction
_COMMAND = 8  # a session command the caller asked for (RSET, NOOP, QUIT, STARTTLS, AUTH...)
_BDAT_CHUNK = 9  # the reply to a BDAT chunk that is not the last
_BDAT_LAST = 10  # the replies to BDAT LAST: one per accepted recipient (or one, if none)
_BDAT_START = 11  # queue marker, never sent: the caller streams BDAT chunks from here

_STAGES = {
    _GREETING: "greeting",
    _LHLO: "lhlo",
    _MAIL: "mail",
    _RCPT: "rcpt",
    _DATA: "data",
    _DOT: "final",
    _LONE_DOT: "data",
    _BDAT_CHUNK: "data",
    _BDAT_LAST: "final",
    _RSET_INTERNAL: "rset",
}

# Commands after which nothing else may be sent until their reply arrives
# (RFC 2920 3.1: LHLO/EHLO, STARTTLS, AUTH, QUIT, NOOP end a group).
_SYNC_COMMANDS = frozenset({"LHLO", "STARTTLS", "AUTH", "QUIT", "NOOP", "AUTH-RESPONSE"})


class Connection:
    """The client side of one LMTP connection, without I/O.

    Typical use::

        conn = Connection("mx1.example")
        # ... connect, then feed what the server sends:
        conn.receive_data(chunk)            # b"" means the server closed
        ev = conn.next_event()              # CommandReply("greeting", ...)
        conn.lhlo(); transport.write(conn.data_to_send())
        txn = conn.start_transaction(sender, recipients)
        transport.write(conn.data_to_send())
        # on ReadyForData(txn): write the encoded content, then
        conn.end_data(txn); transport.write(conn.data_to_send())
        # on TransactionDone(txn): txn.results has one result per recipient

    With PIPELINING (advertised and not disabled) MAIL, every RCPT and DATA
    go out in one write, and the content with its final dot may be followed
    by the next transaction's commands in the same write. A transaction's
    ``TransactionDone`` comes once its replies are proven in step (see the
    module docstring); ``bdat_burst`` bounds the pipelined BDAT transactions
    in flight before the replies must drain.
    """

    def __init__(
        self,
        local_name: str = "localhost",
        *,
        pipelining: bool = True,
        ignore_keywords: Iterable[str] = (),
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_reply_lines: int = DEFAULT_MAX_REPLY_LINES,
        bdat_burst: int = BDAT_BURST,
    ) -> None:
        if not isinstance(bdat_burst, int) or bdat_burst < 1:
            raise ValueError(f"bdat_burst must be an integer >= 1, got {bdat_burst!r}")
        self.local_name = local_name
        self._local_name_bytes = encode_local_name(local_name)
        self._allow_pipelining = pipelining
        self.ignore_keywords = tuple(ignore_keywords)
        self._parser = ReplyParser(max_line_length, max_reply_lines)
        self._expect: deque[tuple[int, Transaction | None, int, str]] = deque(
            [(_GREETING, None, 0, "greeting")]
        )
        self._outq: deque[tuple[bytes, int, Transaction | None, int, str]] = deque()
        self._wbuf: list[bytes] = []
        self._events: deque[Event] = deque()
        self._content_owed: Transaction | None = None  # DATA sent, content not yet
        self._data_ready: Transaction | None = None  # 354 received, content not yet
        self._quit_queued = False
        # BDAT transactions whose last chunk is sent but whose outcome is not
        # known: a failed one leaves the server inside the transaction, so the
        # next MAIL must be preceded by RSET (RFC 3030 2). _reset_covered: the
        # ones such an RSET already followed.
        self._bdat_unsettled: list[Transaction] = []
        self._reset_covered: set[int] = set()
        # Transactions whose replies are all in, not yet proven in step (in order).
        self._held: list[Transaction] = []
        # BDAT transactions sent since the last proof, and how many may be.
        self._bdat_inflight = 0
        self._bdat_burst = bdat_burst
        # A streamed BDAT transaction whose chunks were stopped (RFC 3030 2).
        self._stream_stopped: Transaction | None = None
        self._tls_pending = False  # STARTTLS queued; nothing more until start_tls_done()
        self._sync_pending = 1  # greeting: nothing goes out before it
        self._txn_seq = 0
        self._open: list[Transaction] = []  # transactions not yet done (held too), in order
        # A transaction whose envelope is still growing (open_transaction): no
        # other may start until it is closed or abandoned. _incremental: the
        # last such transaction; its MAIL and RCPT replies are also events.
        self._growing: Transaction | None = None
        self._incremental: Transaction | None = None
        self.capabilities: Capabilities | None = None
        self.pipelining = False
        self.error: Exception | None = None
        self.closed = False  # QUIT answered or stream ended
        self._eof = False

    # -- state ----------------------------------------------------------------

    @property
    def waiting_for(self) -> str | None:
        """The stage whose reply is awaited first (for timers), or ``None``."""
        if not self._expect:
            return None
        kind, _txn, _idx, name = self._expect[0]
        return _STAGES.get(kind, name.lower())

    @property
    def content_owed(self) -> Transaction | None:
        """The transaction whose content must be sent next, if any."""
        return self._content_owed

    @property
    def idle(self) -> bool:
        """No reply expected, nothing queued, no open transaction."""
        return not self._expect and not self._outq and not self._open and self.error is None

    @property
    def usable(self) -> bool:
        """The connection can take new commands."""
        return (
            self.error is None and not self.closed and not self._quit_queued
            and not self._tls_pending
        )

    @property
    def open_transactions(self) -> int:
        return len(self._open)

    # -- input ----------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the server; ``b""`` means it closed the connection."""
        if self.error is not None or self.closed:
            return
        if data:
            self._parser.feed(data)
        else:
            # Replies already buffered are still processed before the EOF counts.
            self._eof = True

    def next_event(self) -> Event:
        """The next event, or ``NEED_DATA`` when more bytes are needed."""
        events = self._events
        while not events:
            if self.error is not None or self.closed:
                return NEED_DATA
            try:
                reply = self._parser.next_reply()
            except RemoteProtocolError as exc:
                self._break(exc, PROTOCOL_CODE, PROTOCOL_ENHANCED)
                continue
            if reply is None:
                if self._eof:
                    self._on_eof()
                    continue
                return NEED_DATA
            self._on_reply(reply)
        return events.popleft()

    def fail(self, error: Exception, code: int = LOST_CODE, enhanced: str = LOST_ENHANCED) -> None:
        """Break the connection from outside (timeout, write error, cancellation).

        Every open transaction is decided with a made-up ``code`` reply; a
        :class:`ConnectionBroken` event follows.
        """
        if self.error is None and not self.closed:
            self._break(error, code, enhanced)

    def data_to_send(self) -> bytes:
        """The bytes to write now (maybe empty)."""
        if not self._wbuf:
            return b""
        out = b"".join(self._wbuf)
        self._wbuf.clear()
        return out

    # -- commands ---------------------------------------------------------------

    def lhlo(self) -> None:
        """Queue LHLO; its :class:`CommandReply` sets :attr:`capabilities`."""
        self._check_usable()
        self._queue(b"LHLO " + self._local_name_bytes + _CRLF, _LHLO, None, 0, "LHLO")
        self._pump()

    def command(self, verb: str, argument: str | None = None) -> None:
        """Queue a session command (``RSET``, ``NOOP``, ``QUIT``, ``STARTTLS``, ``AUTH``...).

        Its reply comes back as ``CommandReply(verb, reply)``. ``AUTH-RESPONSE``
        sends ``argument`` alone as a line (a SASL response).
        """
        self._check_usable()
        verb = check_session_verb(verb)
        if verb == "AUTH-RESPONSE":
            line = check_command_argument(argument or "") + _CRLF
        else:
            line = check_command_argument(verb)
            if argument:
                line += b" " + check_command_argument(argument)
            line += _CRLF
        if verb == "QUIT":
            self._quit_queued = True
        elif verb == "STARTTLS":
            self._tls_pending = True
        self._queue(line, _COMMAND, None, 0, verb)
        self._pump()

    def start_transaction(
        self,
        sender: str,
        recipients: Sequence[str],
        *,
        mail_params: Sequence[str] = (),
        rcpt_params: Sequence[Sequence[str]] | None = None,
        smtputf8: bool = False,
        chunking: bool = False,
        body: bytes | None = None,
    ) -> Transaction:
        """Queue MAIL, one RCPT per recipient and DATA; return the transaction.

        With ``body`` (content already CRLF-normalised, not dot-stuffed) the
        transaction uses CHUNKING (RFC 3030) instead: ``BDAT n LAST`` and the
        body follow the RCPTs at once, so with PIPELINING a whole transaction
        is one write and nothing waits for a 354. With ``chunking`` and no
        body, :class:`ReadyForData` comes as soon as the RCPTs are sent and
        the caller streams the content with :meth:`send_chunk`.

        Every argument is checked before anything is queued, so a bad address
        raises :class:`LocalProtocolError` and leaves the connection as it was.
        """
        self._check_usable()
        if self.capabilities is None:
            raise LocalProtocolError("LHLO must succeed before a transaction")
        if not recipients:
            raise LocalProtocolError("a transaction needs at least one recipient")
        if self._growing is not None:
            raise LocalProtocolError("a transaction with an open envelope is in progress")
        if rcpt_params is not None and len(rcpt_params) != len(recipients):
            raise LocalProtocolError("rcpt_params must have one entry per recipient")
        mail = b"MAIL FROM:<" + encode_address(sender, allow_empty=True, utf8=smtputf8) + b">"
        for p in mail_params:
            mail += b" " + encode_param(p)
        rcpt_lines = []
        for i, rcpt in enumerate(recipients):
            line = b"RCPT TO:<" + encode_address(rcpt, utf8=smtputf8) + b">"
            if rcpt_params is not None:
                for p in rcpt_params[i]:
                    line += b" " + encode_param(p)
            rcpt_lines.append(line + _CRLF)
        self._txn_seq += 1
        txn = Transaction(self._txn_seq, sender, recipients)
        self._open.append(txn)
        self._queue(mail + _CRLF, _MAIL, txn, 0, "MAIL")
        for i, line in enumerate(rcpt_lines):
            self._queue(line, _RCPT, txn, i, "RCPT")
        self._queue_content_command(txn, chunking, body)
        self._pump()
        return txn

    def _queue_content_command(self, txn: Transaction, chunking: bool,
                               body: bytes | None) -> None:
        """DATA, or BDAT LAST with the body, or the marker where streamed BDAT starts."""
        if body is not None:
            self._queue(b"BDAT %d LAST\r\n" % len(body) + body, _BDAT_LAST, txn, 0, "BDAT")
        elif chunking:
            self._queue(b"", _BDAT_START, txn, 0, "BDAT")
        else:
            self._queue(b"DATA\r\n", _DATA, txn, 0, "DATA")

    def send_chunk(self, txn: Transaction, data: bytes, last: bool = False) -> None:
        """Queue one BDAT chunk of a streamed CHUNKING transaction (after its ReadyForData).

        ``data`` must be CRLF-normalised (not dot-stuffed); the last call has
        ``last=True`` (``data`` may then be empty: ``BDAT 0 LAST``).
        """
        if self.error is not None or txn is self._stream_stopped:
            return  # decided already: nothing more of it may be sent
        if self._data_ready is not txn or self._content_owed is not txn:
            raise LocalProtocolError("send_chunk() for a transaction that is not streaming BDAT")
        if not self.pipelining and self._expect:
            raise LocalProtocolError(
                "without PIPELINING each BDAT chunk waits for the reply to the one before "
                "(send the next one on ReadyForData)")
        if last:
            self._wbuf.append(b"BDAT %d LAST\r\n" % len(data))
            self._wbuf.append(data)
            self._expect.append((_BDAT_LAST, txn, 0, "BDAT"))
            self._data_ready = self._content_owed = None
            txn.dot_sent = True
            self._bdat_unsettled.append(txn)
            self._pump()
        elif data:
            self._wbuf.append(b"BDAT %d\r\n" % len(data))
            self._wbuf.append(data)
            self._expect.append((_BDAT_CHUNK, txn, 0, "BDAT"))

    def end_data(self, txn: Transaction) -> None:
        """The content of ``txn`` has been written: queue the final dot.

        Only valid after :class:`ReadyForData` for ``txn``; a no-op once the
        connection is broken (the transaction is already decided).
        """
        if self.error is not None:
            return
        if self._data_ready is not txn:
            raise LocalProtocolError("end_data() for a transaction that is not owed content")
        if self._parser.in_reply:
            # Received before the dot was sent, so it cannot answer the dot.
            self._break(RemoteProtocolError(
                "reply received before the end of the message content: replies out of step"),
                PROTOCOL_CODE, PROTOCOL_ENHANCED, desync=True)
            return
        self._data_ready = None
        self._content_owed = None
        self._wbuf.append(b".\r\n")
        txn.dot_sent = True
        for idx in txn.accepted:
            self._expect.append((_DOT, txn, idx, "."))
        self._pump()

    # -- a transaction whose envelope grows (RCPT verification by a proxy) -----

    def open_transaction(
        self, sender: str, *, mail_params: Sequence[str] = (), smtputf8: bool = False,
    ) -> Transaction:
        """Queue MAIL alone: recipients follow one at a time, the content later.

        :meth:`add_recipient` queues a RCPT, :meth:`close_transaction` the
        DATA (or BDAT) and :meth:`abandon_transaction` an RSET instead. Each
        MAIL and RCPT reply of the transaction is also given as
        ``CommandReply("MAIL"/"RCPT", reply)`` as it arrives, so a caller can
        pass it on at once (a proxy relaying its back end's RCPT replies).
        Only on a connection with no other transaction open; none may start
        until this one's envelope is closed or abandoned.
        """
        self._check_usable()
        if self.capabilities is None:
            raise LocalProtocolError("LHLO must succeed before a transaction")
        if self._open:
            raise LocalProtocolError("open_transaction() needs a connection with no "
                                     "transaction in progress")
        mail = b"MAIL FROM:<" + encode_address(sender, allow_empty=True, utf8=smtputf8) + b">"
        for p in mail_params:
            mail += b" " + encode_param(p)
        self._txn_seq += 1
        txn = Transaction(self._txn_seq, sender, ())
        self._open.append(txn)
        self._growing = self._incremental = txn
        self._queue(mail + _CRLF, _MAIL, txn, 0, "MAIL")
        self._pump()
        return txn

    def add_recipient(
        self, txn: Transaction, recipient: str, params: Sequence[str] = (), *,
        smtputf8: bool = False,
    ) -> int:
        """Queue one more RCPT of an open transaction; its index in ``txn.recipients``."""
        self._check_usable()
        if txn is not self._growing:
            raise LocalProtocolError("add_recipient() for a transaction whose envelope is "
                                     "not open")
        line = b"RCPT TO:<" + encode_address(recipient, utf8=smtputf8) + b">"
        for p in params:
            line += b" " + encode_param(p)
        idx = len(txn.recipients)
        txn.recipients.append(recipient)
        txn.rcpt_replies.append(None)
        txn.final_replies.append(None)
        self._queue(line + _CRLF, _RCPT, txn, idx, "RCPT")
        self._pump()
        return idx

    def close_transaction(
        self, txn: Transaction, *, chunking: bool = False, body: bytes | None = None,
    ) -> None:
        """The envelope is complete: queue DATA, or BDAT (as :meth:`start_transaction`)."""
        self._check_usable()
        if txn is not self._growing:
            raise LocalProtocolError("close_transaction() for a transaction whose envelope "
                                     "is not open")
        if not txn.recipients:
            raise LocalProtocolError("a transaction needs at least one recipient")
        self._growing = None
        self._queue_content_command(txn, chunking, body)
        self._pump()

    def abandon_transaction(self, txn: Transaction) -> None:
        """Give up an open transaction before its content: RSET after its RCPTs.

        It is done (``TransactionDone``, nothing delivered) once the RSET is
        answered; the replies to its RCPTs still come first.
        """
        self._check_usable()
        if txn is not self._growing:
            raise LocalProtocolError("abandon_transaction() for a transaction whose envelope "
                                     "is not open")
        self._growing = None
        self._queue(b"RSET\r\n", _RSET_INTERNAL, txn, 0, "RSET")
        self._pump()

    def _abandoned(self, txn: Transaction) -> None:
        # The RSET of abandon_transaction() was answered: nothing of it was delivered.
        if txn in self._open:
            self._open.remove(txn)
        fail_transaction(txn, LOST_CODE, LOST_ENHANCED,
                         "transaction abandoned before its content was sent", "data")
        self._events.append(TransactionDone(txn))

    def start_tls_done(self) -> None:
        """TLS is up after ``STARTTLS``: forget the server's capabilities.

        Bytes that arrived after the 220 reply and before the handshake were
        sent in the clear and could be an injection (CVE-2011-0411): they
        break the connection instead of being read as TLS-protected replies.
        """
        partial = self._parser.in_reply
        leftover = self._parser.take_buffered()
        self._tls_pending = False
        if leftover or partial:
            self._break(
                RemoteProtocolError("server sent data after its STARTTLS reply"),
                PROTOCOL_CODE, PROTOCOL_ENHANCED
            )
            return
        self.capabilities = None
        self.pipelining = False

    # -- internals ---------------------------------------------------------------

    def _check_usable(self) -> None:
        if self.error is not None:
            raise LocalProtocolError(f"connection is broken: {self.error}")
        if self.closed or self._quit_queued:
            raise LocalProtocolError("connection is closed (QUIT was sent)")
        if self._tls_pending:
            raise LocalProtocolError("STARTTLS in progress: call start_tls_done() first")

    def _queue(
        self, line: bytes, kind: int, txn: Transaction | None, idx: int, name: str
    ) -> None:
        self._outq.append((line, kind, txn, idx, name))

    def _pump(self) -> None:
        """Move queued commands to the write buffer as far as the protocol allows."""
        outq = self._outq
        while outq and self._content_owed is None and not self._sync_pending:
            if not self.pipelining and self._expect:
                return
            if outq[0][1] == _MAIL and self._bdat_inflight >= self._bdat_burst:
                if self._expect:
                    return  # let the replies drain: the proof for the BDAT ones sent
                self._bdat_inflight = 0
            line, kind, txn, idx, name = outq.popleft()
            if kind == _BDAT_START:
                # Nothing is sent: the caller streams the chunks now.
                self._content_owed = self._data_ready = txn
                assert txn is not None
                self._bdat_inflight += 1
                self._events.append(ReadyForData(txn))
                continue
            if kind == _MAIL and self._bdat_unsettled:
                self._wbuf.append(b"RSET\r\n")
                self._expect.append((_RSET_INTERNAL, None, 0, "RSET"))
                self._reset_covered.update(t.id for t in self._bdat_unsettled)
                self._bdat_unsettled.clear()
            self._wbuf.append(line)
            self._expect.append((kind, txn, idx, name))
            if kind == _BDAT_LAST:
                assert txn is not None
                txn.dot_sent = True  # the whole content is on its way
                self._bdat_unsettled.append(txn)
                self._bdat_inflight += 1
            elif kind == _MAIL:
                assert txn is not None
                txn.mail_sent = True
            elif kind == _DATA:
                # Nothing may follow DATA until its content has been sent.
                self._content_owed = txn
                # ...but only once 354 arrives; until then the owed content
                # blocks the queue exactly like a pending sync command.
            elif kind == _LHLO or (kind == _COMMAND and name in _SYNC_COMMANDS):
                self._sync_pending += 1

    def _on_reply(self, reply: Reply) -> None:
        if not self._expect:
            if reply.code == 421:
                # RFC 5321 3.8: a server may say 421 at any time and close (Dovecot
                # shutting down with a transaction open): the session is lost.
                self._break(ServerDisconnected(
                    f"server closed the session: {reply.code} {reply.text}"),
                    LOST_CODE, LOST_ENHANCED, desync=True)
                return
            self._break(
                RemoteProtocolError(f"unexpected reply nobody waited for: {reply.code}"),
                PROTOCOL_CODE,
                PROTOCOL_ENHANCED,
                desync=True,
            )
            return
        kind, txn, idx, name = self._expect.popleft()
        code = reply.code
        if 300 <= code < 400 and kind != _DATA and (code == 354 or kind != _COMMAND):
            # 354 answers DATA only, and nothing but a session command (AUTH's
            # 334) takes another 3xx: the reply is in the wrong place, so the
            # stream is shifted.
            self._break(RemoteProtocolError(
                f"{code} reply while waiting for the {_STAGES.get(kind, name).upper()} reply: "
                "replies out of step"),
                PROTOCOL_CODE, PROTOCOL_ENHANCED, desync=True)
            return
        if kind == _RCPT:
            assert txn is not None
            txn.rcpt_replies[idx] = reply
            accepted = txn.accepted
            if 200 <= code < 300:
                mail = txn.mail_reply
                if mail is not None and 200 <= mail.code < 300:
                    accepted.append(idx)
            if txn is self._incremental:
                self._events.append(CommandReply("RCPT", reply))
            if not accepted and idx == len(txn.recipients) - 1 and txn is not self._growing:
                if not self.pipelining:
                    # Every recipient refused: do not send DATA, reset instead.
                    self._drop_queued(txn)
                    self._outq.appendleft((b"RSET\r\n", _RSET_INTERNAL, None, 0, "RSET"))
                    self._complete(txn)
                elif self._data_ready is txn and self._content_owed is txn:
                    # Streaming BDAT and nobody accepted: send no more of it.
                    self._stop_stream(txn)
        elif kind == _DOT:
            assert txn is not None
            txn.final_replies[idx] = reply
            if idx == txn.accepted[-1]:
                self._complete(txn)
        elif kind == _MAIL:
            assert txn is not None
            txn.mail_reply = reply
            if txn is self._incremental:
                self._events.append(CommandReply("MAIL", reply))
            if not 200 <= code < 300 and not self.pipelining and txn is not self._growing:
                self._drop_queued(txn)
                self._complete(txn)
        elif kind == _DATA:
            assert txn is not None
            self._on_data_reply(txn, reply)
            if self.error is not None:
                return
        elif kind == _LONE_DOT:
            assert txn is not None
            self._complete(txn)
        elif kind == _BDAT_CHUNK:
            assert txn is not None
            stopped = txn is self._stream_stopped
            if not 200 <= code < 300 and txn.data_reply is None:
                txn.data_reply = reply  # decides every accepted recipient
                if self._data_ready is txn:
                    self._stop_stream(txn)  # RFC 3030 2: no further chunk
            if stopped:
                if not self._owes_more(txn):
                    self._complete(txn)  # the last chunk reply it was owed
            elif not self.pipelining and self._data_ready is txn:
                self._events.append(ReadyForData(txn))  # the next chunk may go
        elif kind == _BDAT_LAST:
            assert txn is not None
            self._on_bdat_last(txn, reply)
        elif kind == _RSET_INTERNAL:
            if not 200 <= code < 300:
                self._break(
                    RemoteProtocolError(f"RSET refused: {code} {reply.text}"),
                    PROTOCOL_CODE, PROTOCOL_ENHANCED,
                    desync=True,
                )
                return
            if txn is not None:
                self._abandoned(txn)
        else:
            if kind == _GREETING:
                name = "greeting"
            elif kind == _LHLO:
                if 200 <= code < 300:
                    self.capabilities = caps = Capabilities.from_reply(reply, self.ignore_keywords)
                    self.pipelining = self._allow_pipelining and caps.pipelining
            elif name == "QUIT":  # _COMMAND from here on
                self.closed = True
            elif name == "STARTTLS" and not 200 <= code < 300:
                self._tls_pending = False  # refused: go on in the clear
            # After a 334 to AUTH the exchange goes on with AUTH-RESPONSE
            # lines, each synchronous again.
            if kind != _COMMAND or name in _SYNC_COMMANDS:
                self._sync_pending -= 1
            # The transactions it proves in step come out before the reply.
            self._settle()
            if self.error is not None:
                return
            self._events.append(CommandReply(name, reply))
        if not self._expect:
            self._settle()  # (a call only when it can prove something)
        if self.error is None:
            self._pump()

    def _on_data_reply(self, txn: Transaction, reply: Reply) -> None:
        if reply.code != 354 and reply.code < 400:
            # A success that is not 354 cannot answer DATA: the replies are out
            # of step (an unsolicited reply shifted them). Never read it as a
            # final reply: that would report a delivery nobody stored.
            self._break(RemoteProtocolError(
                f"{reply.code} reply to DATA, 354 expected: replies out of step"),
                PROTOCOL_CODE, PROTOCOL_ENHANCED,
                desync=True)
            return
        txn.data_reply = reply
        mail_ok = txn.mail_reply is not None and 200 <= txn.mail_reply.code < 300
        if reply.code == 354:
            # In its place, so every reply before it was: the proof.
            self._bdat_inflight = 0
            if self._held:
                self._release_held()
            if txn.accepted:
                self._data_ready = txn
                self._events.append(ReadyForData(txn))
                return  # _content_owed stays set until end_data()
            # 354 although nothing was accepted (possible with pipelining):
            # RFC 2920 says send a lone dot; its reply decides nothing.
            self._content_owed = None
            self._wbuf.append(b".\r\n")
            self._expect.append((_LONE_DOT, txn, 0, "."))
            return
        self._content_owed = None
        if mail_ok:
            # The server still holds the MAIL transaction: clear it before the next one.
            self._outq.appendleft((b"RSET\r\n", _RSET_INTERNAL, None, 0, "RSET"))
        self._complete(txn)

    def _on_bdat_last(self, txn: Transaction, reply: Reply) -> None:
        # RFC 2033 4.2 / RFC 3030: one reply per accepted recipient after the
        # last chunk. Which recipients were accepted is known only now (the
        # RCPT replies came first), so the remaining expectations go in here.
        accepted = txn.accepted
        if accepted and txn.data_reply is None:
            txn.final_replies[accepted[0]] = reply
            for idx in reversed(accepted[1:]):
                self._expect.appendleft((_DOT, txn, idx, "."))
            if len(accepted) == 1:
                self._complete(txn)
            return
        # Nothing accepted, or a chunk was refused: the server owes one reply.
        if txn.data_reply is None:
            txn.data_reply = reply
        mail = txn.mail_reply
        if mail is not None and 200 <= mail.code < 300 and txn.id not in self._reset_covered:
            self._outq.appendleft((b"RSET\r\n", _RSET_INTERNAL, None, 0, "RSET"))
        self._complete(txn)

    def _stop_stream(self, txn: Transaction) -> None:
        """Stop a streamed BDAT transaction that can no longer succeed (RFC 3030 2).

        Its later chunks are dropped (``send_chunk`` does nothing); it is
        complete once the replies to the chunks already sent are in. The
        server may still hold the MAIL transaction: RSET it.
        """
        self._data_ready = self._content_owed = None
        self._stream_stopped = txn
        mail = txn.mail_reply
        if mail is not None and 200 <= mail.code < 300:
            self._outq.appendleft((b"RSET\r\n", _RSET_INTERNAL, None, 0, "RSET"))
        if not self._owes_more(txn):
            self._complete(txn)

    def _owes_more(self, txn: Transaction) -> bool:
        """A reply to a command of ``txn`` is still expected (they are contiguous)."""
        return bool(self._expect) and self._expect[0][1] is txn

    def _drop_queued(self, txn: Transaction) -> None:
        self._outq = deque(item for item in self._outq if item[2] is not txn)

    def _complete(self, txn: Transaction) -> None:
        """Every reply of ``txn`` is in: hold it until the stream is proven in step."""
        if txn.dot_sent:
            if txn in self._bdat_unsettled:
                self._bdat_unsettled.remove(txn)
            self._reset_covered.discard(txn.id)
        self._held.append(txn)

    def _settle(self) -> None:
        """After a reply: if no reply is expected any more, the held transactions are proven."""
        if self._expect or self.error is not None:
            return
        self._bdat_inflight = 0
        if not self._held:
            return
        if self._parser.in_reply:
            # Bytes nobody asked for: a surplus reply, so the ones before may be shifted.
            self._break(RemoteProtocolError(
                "server sent more replies than there were commands: replies out of step"),
                PROTOCOL_CODE, PROTOCOL_ENHANCED, desync=True)
            return
        self._release_held()

    def _release_held(self) -> None:
        """The stream is proven in step up to here: decide the held transactions."""
        self._bdat_inflight = 0
        held = self._held
        if not held:
            return
        for txn in held:
            finish_transaction(txn)
            self._open.remove(txn)
            self._events.append(TransactionDone(txn))
        held.clear()

    def _on_eof(self) -> None:
        if self._expect and self._expect[0][3] == "QUIT" and not self._held:
            self.closed = True
            return
        stage = self.waiting_for
        if self._parser.in_reply:
            why = "server closed the connection in the middle of a reply"
        elif stage is not None:
            why = f"lost connection with server while waiting for the {stage.upper()} reply"
        elif self._content_owed is not None:
            why = "lost connection with server while sending message content"
        elif self._open:
            why = "lost connection with server before sending the transaction"
        else:
            why = "server closed an idle connection"
        self._break(ServerDisconnected(why), LOST_CODE, LOST_ENHANCED)

    def _break(self, error: Exception, code: int, enhanced: str, desync: bool = False) -> None:
        self.error = error
        failed = self._open
        self._open = []
        stage = self.waiting_for or "mail"
        why = str(error)
        # A shifted stream, or held transactions never proven: no reply since
        # the last proof is trusted (the held ones come first in _open).
        unproven = desync or bool(self._held)
        self._held = []
        for txn in failed:
            # The transaction whose content was being streamed (DATA or BDAT).
            where = "content" if txn is self._data_ready else stage
            fail_transaction(txn, code, enhanced, why, where, unproven=unproven)
        self._expect.clear()
        self._outq.clear()
        self._wbuf.clear()
        self._content_owed = None
        self._data_ready = None
        self._growing = None
        self._events.append(ConnectionBroken(error, failed))
