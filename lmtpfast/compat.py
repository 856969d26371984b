"""``lmtpfast.compat.LMTP``: :class:`smtplib.LMTP`, right after DATA.

Change ``from smtplib import LMTP`` to ``from lmtpfast.compat import LMTP``.
The class *is* an :class:`smtplib.LMTP` (a subclass: ``isinstance`` checks,
``mock.create_autospec`` and ``_get_socket`` overrides keep working) with the
same constructor, methods, attributes, return values, debug output and
exceptions (smtplib's own classes). What it changes (``docs/compat.md``):

* After the final dot it reads one reply per accepted recipient (RFC 2033
  4.2); ``smtplib.LMTP`` reads one whatever the number of recipients
  (CPython gh-76984), so a recipient refused there is missing from its refused
  dict and the next command reads a stale reply. With one recipient the
  results and exceptions are smtplib's: refused after the dot is
  :class:`SMTPDataError`. With several, each recipient refused after the dot
  is in the refused dict with its own reply, and when none was delivered the
  exception is :class:`RecipientsRefusedAfterData` (both
  ``SMTPRecipientsRefused`` and ``SMTPDataError``).
* ``sendmail`` drives lmtpfast's sans-IO engine: MAIL, every RCPT and DATA
  go out in one write when the server offers PIPELINING. If the connection is
  lost after some replies after the dot, what was decided stands: delivered
  recipients are not in the refused dict, the others are refused with a
  made-up ``451 4.4.2`` that says they may have been delivered
  (:attr:`LMTP.last_results` has ``possibly_delivered`` for them).
* Everything is checked before anything is sent: a NUL byte in the message
  raises :class:`ContentError` (an ``SMTPException``), non-ASCII text without
  SMTPUTF8 ``UnicodeEncodeError``, CR/LF in an address or option
  ``ValueError``, as smtplib raises them, but with the session still in step.
* Line ends of a bytes message are normalised to CRLF too (a bare-LF ``.``
  line could end DATA early on servers that accept it, as Dovecot 2.3 does).
* LHLO is said when needed: after ``helo()`` (LMTP servers refuse HELO) and
  after a reconnect. A server that refuses LHLO but accepts HELO is an SMTP
  server, and is spoken to as one (one reply after the dot), as smtplib does.
* ``starttls()`` verifies the server's certificate by default (smtplib's
  default context does not) and refuses a server that sends anything after
  its 220 before the handshake (STARTTLS injection).
* ``login()`` prefers SCRAM-SHA-256 and SCRAM-SHA-1 (lmtpfast's SASL code:
  the password never crosses the wire, the server proves it knows it) over
  smtplib's CRAM-MD5, PLAIN and LOGIN, which are smtplib's own ``auth_*``.

The raw steps (``mail``, ``rcpt``, ``data``, ``putcmd``, ``getreply``,
``docmd``, ``send``) are smtplib's, one command at a time; ``data()`` reads
one reply per recipient that ``rcpt()`` got accepted. ``sendmail`` makes a
fresh engine for each transaction from what the session has negotiated, and
returns only once the engine expects no more replies, so the raw steps and
the pipelined path never see each other's replies. Both read through
``getreply()``: one reader, one debug trace.
"""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import sys
import warnings
from collections.abc import Callable, Sequence
from smtplib import (
    LMTP_PORT,
    SMTPAuthenticationError,
    SMTPDataError,
    SMTPException,
    SMTPHeloError,
    SMTPNotSupportedError,
    SMTPRecipientsRefused,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    quoteaddr,
)
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ._errors import AuthenticationError as _AuthenticationError
from ._errors import ContentError as _ContentError
from ._errors import LocalProtocolError, RemoteProtocolError, ServerDisconnected
from ._results import RecipientResult, status_of
from ._sasl import Credentials, Mechanism, ScramSHA1, ScramSHA256
from .proto import (
    IMPLEMENTATIONS,
    NEED_DATA,
    Connection,
    ConnectionBroken,
    ReadyForData,
    Reply,
    Transaction,
    TransactionDone,
)
from .proto._common import encode_address, encode_param
from .proto.content import encode_content

if TYPE_CHECKING:
    from _typeshed import StrOrBytesPath

__all__ = [
    "LMTP",
    "LMTP_PORT",
    "AuthenticationError",
    "ContentError",
    "RecipientsRefusedAfterData",
]

_DEFAULT_TIMEOUT: Any = socket._GLOBAL_DEFAULT_TIMEOUT  # type: ignore[attr-defined]
_MAXCHALLENGE: int = getattr(smtplib, "_MAXCHALLENGE", 5)
# login() order: SCRAM first (no password on the wire, the server is proven),
# then smtplib's own preference.
_PREFERRED_AUTH = ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN")
# What a recipient whose reply after the dot was lost is told (the engine's
# made-up reply text follows the code); smtplib has no way to say it.
_MAYBE_DELIVERED = b" (the message may have been delivered)"


class RecipientsRefusedAfterData(SMTPRecipientsRefused, SMTPDataError):  # type: ignore[misc]
    """Several recipients were accepted, and none of them delivered after the final dot.

    An :class:`SMTPRecipientsRefused` (``recipients`` holds each refused
    recipient's own reply, RCPT refusals included) and an
    :class:`SMTPDataError` (``smtp_code``/``smtp_error`` of the first reply
    after the dot that refused). With one accepted recipient compat raises a
    plain :class:`SMTPDataError`, as smtplib does.
    """

    def __init__(self, recipients: dict[str, tuple[int, bytes]], code: int, msg: bytes) -> None:
        self.recipients = recipients
        self.smtp_code = code
        self.smtp_error = msg
        self.args = (recipients,)


class ContentError(SMTPException, _ContentError):
    """The message cannot be sent as it is (a NUL byte); nothing was sent.

    Both an ``smtplib.SMTPException`` and :class:`lmtpfast.ContentError`
    (a ``ValueError``). ``offset`` is the position of the NUL.
    """

    offset: int | None = None


class AuthenticationError(SMTPException, _AuthenticationError):
    """SASL failed on our side (e.g. a SCRAM server signature that does not verify).

    Not an :class:`SMTPAuthenticationError` on purpose: ``login()`` does not
    fall back to another mechanism (that could hand the password to an
    impostor). The connection is closed when the server already said 235.
    """


def _engine_class(engine: str | ModuleType | None) -> Callable[..., Any]:
    if engine is None:
        return Connection
    if isinstance(engine, str):
        module = IMPLEMENTATIONS.get(engine)
        if module is None:
            raise ValueError(f"engine {engine!r} is not available "
                             f"(available: {', '.join(IMPLEMENTATIONS)})")
        engine = module
    cls: Callable[..., Any] = engine.Connection
    return cls


def _bare(quoted: str) -> str:
    """What smtplib puts between ``<>``, from ``quoteaddr()``'s result (it accepts ``Name
    <a@b>``)."""
    return quoted[1:-1] if quoted.startswith("<") and quoted.endswith(">") else quoted


def _check_address(address: str) -> None:
    # quoteaddr() would drop CR and LF silently ("a\r\nRCPT TO:<x@y>" becomes
    # <x@y>): a mangled address is refused, never sent somewhere else.
    if any(c in address for c in "\r\n\0"):
        raise ValueError(f"address {address!r} contains CR, LF or NUL")


def _check_command(cmd: str) -> None:
    # smtplib's putcmd() check (bpo-43124), done before anything is sent.
    if "\r" in cmd or "\n" in cmd:
        shown = cmd.replace("\n", "\\n").replace("\r", "\\r")
        raise ValueError(f"command and arguments contain prohibited newline characters: {shown}")


def _encode_message(msg: Any) -> tuple[bytes, int]:
    """The content as sent after DATA (CRLF, dot-stuffed, no final dot) and its RFC 1870 size."""
    if isinstance(msg, str):
        msg = msg.encode("ascii")  # smtplib's rule: a str message is ASCII
    try:
        content = encode_content(msg)
    except _ContentError as exc:
        err = ContentError(str(exc))
        err.offset = getattr(exc, "offset", None)
        raise err from None
    # Every line that starts with "." got one more: RFC 1870 counts without them.
    stuffed = content.count(b"\n.") + content.startswith(b".")
    return content, len(content) - stuffed


def _reply_bytes(code: int, msg: bytes) -> bytes:
    """A reply as the engine reads it, from what ``getreply()`` returned."""
    lines = msg.split(b"\n")
    head = b"".join(b"%03d-%s\r\n" % (code, ln) for ln in lines[:-1])
    return head + b"%03d %s\r\n" % (code, lines[-1])


class LMTP(smtplib.LMTP):
    """:class:`smtplib.LMTP` with RFC 2033's replies after DATA (see the module docstring).

    ``engine`` (keyword only, an addition): ``"c"``, ``"python"`` or an engine
    module; default the compiled engine when it is built.
    """

    # Facts about the current connection; class defaults because
    # smtplib's __init__ connects before the rest of the instance is set up.
    _lhlo_tried = False
    _lhlo_ok = False
    _helo_tried = False
    _helo_ok = False
    _helo_name = ""
    _tls_host: str | None = None
    _sasl: Mechanism | None = None
    _caps_key: tuple[tuple[str, str], ...] | None = None
    _caps_reply = b""

    #: One :class:`lmtpfast.RecipientResult` per recipient of the last
    #: ``sendmail()`` (in the order given), or per accepted recipient of the
    #: last raw ``data()``: status, code, text and ``possibly_delivered``.
    last_results: list[RecipientResult]

    # smtplib's private helpers, not in its type stubs.
    _print_debug: Callable[..., None]
    _rset: Callable[[], None]

    def __init__(
        self,
        host: str = "",
        port: int = LMTP_PORT,
        local_hostname: str | None = None,
        source_address: tuple[str, int] | None = None,
        timeout: float = _DEFAULT_TIMEOUT,
        *,
        engine: str | ModuleType | None = None,
    ) -> None:
        self._new_engine = _engine_class(engine)
        self._rcpts: list[str] = []
        self._raw_text: dict[tuple[int, str], bytes] = {}
        self.last_results = []
        super().__init__(host, port, local_hostname, source_address, timeout)

    # -- connection ----------------------------------------------------------------

    def _reset_session(self) -> None:
        self._lhlo_tried = self._lhlo_ok = self._helo_tried = self._helo_ok = False
        self._helo_name = ""
        self._rcpts = []

    def connect(self, host: str = "localhost", port: int = 0,
                source_address: Any = None) -> tuple[int, bytes]:
        """Connect (a ``host`` starting with ``/`` is a unix socket); return the greeting.

        A connection already open is closed first; the next transaction says
        LHLO again (smtplib would send MAIL unannounced after a reconnect).
        """
        if self.sock is not None:
            self.close()
        self._reset_session()
        name: str | None = None
        if host[:1] != "/":
            name = host
            if not port and host.find(":") == host.rfind(":") and ":" in host:
                name = host[: host.rfind(":")]
        self._tls_host = name
        return super().connect(host, port, source_address)

    def close(self) -> None:
        """Close the connection (no QUIT)."""
        self._reset_session()
        super().close()

    # -- greetings -----------------------------------------------------------------

    def ehlo(self, name: str = "") -> tuple[int, bytes]:
        """LHLO (as ``smtplib.LMTP.ehlo``); parses ``esmtp_features``."""
        self._lhlo_tried, self._lhlo_ok = True, False
        code, msg = super().ehlo(name)
        self._lhlo_ok = code == 250
        return code, msg

    def lhlo(self, name: str = "") -> tuple[int, bytes]:
        """The same as :meth:`ehlo`."""
        return self.ehlo(name)

    def helo(self, name: str = "") -> tuple[int, bytes]:
        """HELO, as smtplib sends it (LMTP servers refuse it; LHLO follows when needed)."""
        self._helo_tried, self._helo_ok, self._helo_name = True, False, name
        code, msg = super().helo(name)
        self._helo_ok = 200 <= code <= 299
        return code, msg

    def ehlo_or_helo_if_needed(self) -> None:
        """LHLO unless it was accepted on this connection; HELO if LHLO fails, as smtplib.

        Differs from smtplib only where LMTP needs it: after ``helo()`` alone
        (refused by LMTP servers, or an SMTP habit) LHLO is still tried, and a
        reconnect needs a new LHLO even without ``quit()``.
        """
        if self._lhlo_ok:
            return
        if not self._lhlo_tried and not self._helo_tried:
            if not 200 <= self.ehlo()[0] <= 299:
                code, resp = self.helo()
                if not 200 <= code <= 299:
                    raise SMTPHeloError(code, resp)
        elif not self._lhlo_tried:
            self.ehlo(self._helo_name)  # refused: HELO's session goes on, as smtplib's would

    def _smtp_peer(self) -> bool:
        """The server refused LHLO and accepted HELO: it speaks SMTP (one reply after DATA)."""
        return self._helo_ok and not self._lhlo_ok

    # -- raw steps -------------------------------------------------------------------

    def mail(self, sender: str, options: Sequence[str] = ()) -> tuple[int, bytes]:
        """MAIL FROM, as smtplib; starts counting the recipients :meth:`data` answers for."""
        _check_address(sender)
        self._rcpts = []
        return super().mail(sender, options)

    def rcpt(self, recip: str, options: Sequence[str] = ()) -> tuple[int, bytes]:
        """RCPT TO, as smtplib; an accepted recipient gets its own reply after DATA."""
        _check_address(recip)
        code, msg = super().rcpt(recip, options)
        if 200 <= code <= 299:
            self._rcpts.append(recip)
        return code, msg

    def rset(self) -> tuple[int, bytes]:
        """RSET, as smtplib."""
        self._rcpts = []
        return super().rset()

    def data(self, msg: Any) -> tuple[int, bytes]:
        """DATA, the message, and one reply per recipient accepted since ``mail()``.

        Returns the first reply if every recipient was delivered, else the
        first one that was not (all replies are in :attr:`last_results`); with
        one recipient that is exactly smtplib's return value. The message is
        checked before DATA is sent (:class:`ContentError`,
        ``UnicodeEncodeError``). Raises :class:`SMTPDataError` if DATA is
        refused and :class:`SMTPServerDisconnected` if the connection is lost
        before the first reply after the dot; lost later, the recipients
        without a reply get a made-up ``451 4.4.2`` (possibly delivered).
        """
        content, _size = _encode_message(msg)
        rcpts, self._rcpts = self._rcpts, []
        return self._data(content, rcpts)

    def _data(self, content: bytes, rcpts: list[str]) -> tuple[int, bytes]:
        self.putcmd("data")
        code, repl = self.getreply()
        if self.debuglevel > 0:
            self._print_debug("data:", (code, repl))
        if code != 354:
            raise SMTPDataError(code, repl)
        self.send(content + b".\r\n")
        owed = 1 if self._smtp_peer() or not rcpts else len(rcpts)
        names = rcpts if rcpts else [""]
        results: list[RecipientResult] = []
        replies: list[tuple[int, bytes]] = []
        for i in range(owed):
            try:
                code, repl = self.getreply()
            except (SMTPServerDisconnected, SMTPResponseException):
                if not replies:
                    raise
                self.close()
                why = "connection lost after the final dot, before this recipient's reply"
                for name in names[i:owed]:
                    results.append(RecipientResult(name, "transient", 451, "4.4.2", why, "final",
                                                   local=True, possibly_delivered=True))
                    replies.append((451, b"4.4.2 " + why.encode() + _MAYBE_DELIVERED))
                break
            if self.debuglevel > 0:
                self._print_debug("data:", (code, repl))
            replies.append((code, repl))
            text = repl.decode("utf-8", "replace")
            results.append(RecipientResult(names[i], status_of(code), code, None, text, "final"))
            if code == 421 and i + 1 < owed:
                self.close()  # the server is going away: the others will get no reply
                why = "the server closed the connection (421) before this recipient's reply"
                for name in names[i + 1 : owed]:
                    results.append(RecipientResult(name, "transient", 451, "4.4.2", why, "final",
                                                   local=True, possibly_delivered=True))
                    replies.append((451, b"4.4.2 " + why.encode() + _MAYBE_DELIVERED))
                break
        self.last_results = results
        for code, repl in replies:
            if not 200 <= code <= 299:
                return code, repl
        return replies[0]

    # -- sendmail ----------------------------------------------------------------------

    def sendmail(
        self,
        from_addr: str,
        to_addrs: str | Sequence[str],
        msg: Any,
        mail_options: Sequence[str] = (),
        rcpt_options: Sequence[str] = (),
    ) -> dict[str, tuple[int, bytes]]:
        """One transaction; the dict of refused recipients, as ``smtplib.sendmail``.

        The refused dict also holds recipients refused after the final dot,
        each with its own reply. Raises as smtplib: :class:`SMTPHeloError`,
        :class:`SMTPSenderRefused`, :class:`SMTPRecipientsRefused` (every
        recipient refused at RCPT), :class:`SMTPDataError` (DATA refused, or
        the one accepted recipient refused after the dot),
        :class:`SMTPNotSupportedError` (SMTPUTF8), :class:`SMTPServerDisconnected`;
        and :class:`RecipientsRefusedAfterData` when several were accepted and
        none delivered. Nothing is sent when the arguments cannot be
        (:class:`ContentError`, ``UnicodeEncodeError``, ``ValueError``).
        """
        content, size = _encode_message(msg)
        self.ehlo_or_helo_if_needed()
        esmtp_opts: list[str] = []
        if self.does_esmtp:
            if self.has_extn("size"):
                esmtp_opts.append(f"size={size}")
            esmtp_opts.extend(mail_options)
        utf8 = any(x.lower() == "smtputf8" for x in esmtp_opts)
        if utf8:
            if not self.has_extn("smtputf8"):
                raise SMTPNotSupportedError("SMTPUTF8 not supported by server")
            self.command_encoding = "utf-8"
        if isinstance(to_addrs, str):
            to_addrs = [to_addrs]
        to_addrs = list(to_addrs)
        if not to_addrs:
            raise SMTPRecipientsRefused({})
        rcpt_opts = list(rcpt_options) if self.does_esmtp else []
        # Every command line as smtplib would send it, checked before the first one goes.
        for addr in (from_addr, *to_addrs):
            _check_address(addr)
        quoted = [quoteaddr(a) for a in (from_addr, *to_addrs)]
        rcpt_tail = "".join(" " + o for o in rcpt_opts)
        lines = ["mail FROM:" + quoted[0] + "".join(" " + o for o in esmtp_opts)]
        lines += ["rcpt TO:" + q + rcpt_tail for q in quoted[1:]]
        for line in lines:
            _check_command(line)
            if "\0" in line:
                raise ValueError(f"command contains NUL: {line!r}")
            line.encode(self.command_encoding)  # UnicodeEncodeError, as smtplib's putcmd
        if self._smtp_peer():
            return self._sendmail_smtp(from_addr, to_addrs, content, esmtp_opts, rcpt_opts)
        return self._sendmail_lmtp(from_addr, to_addrs, [_bare(q) for q in quoted], content,
                                   esmtp_opts, rcpt_opts, utf8)

    def _sendmail_smtp(self, from_addr: str, to_addrs: list[str], content: bytes,
                       esmtp_opts: list[str], rcpt_opts: list[str]) -> dict[str, tuple[int, bytes]]:
        """smtplib's sequence, one command at a time, for a server that speaks SMTP."""
        code, resp = self.mail(from_addr, esmtp_opts)
        if code != 250:
            self._after_refusal(code)
            raise SMTPSenderRefused(code, resp, from_addr)
        senderrs: dict[str, tuple[int, bytes]] = {}
        for each in to_addrs:
            code, resp = self.rcpt(each, rcpt_opts)
            if code not in (250, 251):
                senderrs[each] = (code, resp)
            if code == 421:
                self.close()
                raise SMTPRecipientsRefused(senderrs)
        if len(senderrs) == len(to_addrs):
            self._rset()
            raise SMTPRecipientsRefused(senderrs)
        rcpts, self._rcpts = self._rcpts, []
        code, resp = self._data(content, rcpts)
        if code != 250:
            self._after_refusal(code)
            raise SMTPDataError(code, resp)
        return senderrs

    def _after_refusal(self, code: int) -> None:
        # smtplib: 421 means the server is closing; anything else leaves a
        # transaction to reset (RSET also finds out whether it hung up).
        if code == 421:
            self.close()
        else:
            self._rset()

    def _capability_reply(self) -> bytes:
        """The LHLO reply the engine is primed with: what ``esmtp_features`` says now."""
        key = tuple(self.esmtp_features.items())
        if key != self._caps_key:  # rebuilt only when the features change
            lines = [b"lmtpfast.compat"]
            for keyword, params in key:
                lines.append(f"{keyword.upper()} {params}".strip().encode("utf-8", "replace"))
            self._caps_key, self._caps_reply = key, _reply_bytes(250, b"\n".join(lines))
        return self._caps_reply

    def _primed_engine(self) -> Any:
        """A fresh engine in the state this session is in: greeted, LHLO done."""
        engine = self._new_engine("localhost")
        engine.receive_data(b"220 lmtpfast.compat\r\n")
        engine.next_event()
        engine.lhlo()
        engine.data_to_send()  # said on the socket already (or not needed): never sent
        engine.receive_data(self._capability_reply())
        ev = engine.next_event()
        if engine.capabilities is None or ev is NEED_DATA:
            raise RuntimeError(f"could not prime the engine: {ev!r}")
        return engine

    def _sendmail_lmtp(self, from_addr: str, to_addrs: list[str], bare: list[str],
                       content: bytes, esmtp_opts: list[str], rcpt_opts: list[str],
                       utf8: bool) -> dict[str, tuple[int, bytes]]:
        """``bare``: the sender then each recipient, as smtplib would put them between <>."""
        sender = bare[0]
        try:
            encode_address(sender, allow_empty=True, utf8=utf8)
        except LocalProtocolError:
            raise SMTPSenderRefused(501, b"5.1.7 Bad sender address syntax", from_addr) from None
        mail_params = " ".join(esmtp_opts).split()
        rcpt_params = " ".join(rcpt_opts).split()
        for p in (*mail_params, *rcpt_params):
            encode_param(p)  # LocalProtocolError (a ValueError) before anything is sent
        # smtplib would send an address the engine refuses (space, <, >, empty)
        # and collect the server's refusal: refuse it here instead.
        local: dict[int, RecipientResult] = {}
        sent: list[int] = []
        for i, addr in enumerate(to_addrs):
            try:
                encode_address(bare[i + 1], utf8=utf8)
                sent.append(i)
            except LocalProtocolError:
                local[i] = RecipientResult(addr, "permanent", 501, "5.1.3",
                                           "Bad recipient address syntax", "local", local=True)
        if not sent:
            self.last_results = [local[i] for i in range(len(to_addrs))]
            raise SMTPRecipientsRefused({to_addrs[i]: _tuple(r) for i, r in local.items()})
        engine = self._primed_engine()
        txn = engine.start_transaction(
            sender, [bare[i + 1] for i in sent], mail_params=mail_params,
            rcpt_params=[rcpt_params] * len(sent) if rcpt_params else None, smtputf8=utf8)
        self._raw_text = {}
        try:
            failure = self._drive(engine, txn, content)
        except BaseException:
            # Whatever stopped us (a signal, a bug), never leave replies owed on the wire.
            if not engine.idle:
                self.close()
            raise
        results = dict(zip(sent, txn.results, strict=True))
        self.last_results = [local[i] if i in local else results[i] for i in range(len(to_addrs))]
        return self._outcome(engine, txn, failure, from_addr, to_addrs, sent, local)

    def _drive(self, engine: Any, txn: Transaction, content: bytes) -> BaseException | None:
        """Run the transaction until the engine owes nothing; the exception that cut it, if any."""
        failure: BaseException | None = None
        closing = False  # a 421 arrived: the server is going away, send nothing more
        while True:
            ev = engine.next_event()
            if ev is NEED_DATA:
                # Each reply may release the next command (no PIPELINING): send it first.
                out = engine.data_to_send()
                if out and not closing:
                    try:
                        self.send(out)
                    except SMTPServerDisconnected as exc:
                        failure = exc
                        engine.fail(ServerDisconnected(f"lost connection while sending: {exc}"))
                        continue
                if engine.error is not None or engine.idle:
                    break
                if closing:
                    engine.fail(ServerDisconnected(
                        "the server replied 421 and closes the connection"))
                    continue
                try:
                    code, msg = self.getreply()
                except SMTPServerDisconnected as exc:
                    failure = exc
                    engine.receive_data(b"")  # the engine decides what is lost
                    continue
                except SMTPResponseException as exc:  # a line longer than smtplib allows
                    failure = exc
                    engine.fail(RemoteProtocolError(
                        f"unreadable reply ({exc.smtp_code} {exc.smtp_error!s})"))
                    continue
                self._raw_text[(code, msg.decode("utf-8", "replace"))] = msg
                engine.receive_data(_reply_bytes(code, msg))
                closing = code == 421
            elif isinstance(ev, ReadyForData):
                if self.debuglevel > 0 and txn.data_reply is not None:
                    self._print_debug("data:", (354, self._text(txn.data_reply)))
                engine.end_data(txn)
                try:
                    self.send(content + engine.data_to_send())
                except SMTPServerDisconnected as exc:
                    failure = exc
                    engine.fail(ServerDisconnected(f"lost connection while sending: {exc}"))
            elif isinstance(ev, TransactionDone) and self.debuglevel > 0:
                for idx in txn.accepted:
                    final = txn.final_replies[idx]
                    if final is not None:
                        self._print_debug("data:", (final.code, self._text(final)))
            elif isinstance(ev, ConnectionBroken):
                break
        if closing or engine.error is not None:
            self.close()
        return failure

    def _text(self, reply: Reply) -> bytes:
        """A reply's message as ``getreply()`` returned it."""
        joined = "\n".join(reply.lines)
        raw = self._raw_text.get((reply.code, joined))
        return raw if raw is not None else joined.encode("utf-8")

    def _outcome(self, engine: Any, txn: Transaction, failure: BaseException | None,
                 from_addr: str, to_addrs: list[str], sent: list[int],
                 local: dict[int, RecipientResult]) -> dict[str, tuple[int, bytes]]:
        """smtplib's answer for a done (or cut) transaction: the refused dict, or its exception."""
        broken = engine.error is not None

        def lost() -> BaseException:
            self.close()
            if isinstance(failure, SMTPException):
                return failure
            return SMTPServerDisconnected(f"Connection unexpectedly closed: {engine.error}")

        mail = txn.mail_reply
        if mail is None:
            raise lost()
        if not 200 <= mail.code <= 299:
            if mail.code == 421 or broken:
                self.close()
            else:
                self._rset()  # as smtplib (it also finds out whether the server hung up)
            raise SMTPSenderRefused(mail.code, self._text(mail), from_addr)
        senderrs: dict[str, tuple[int, bytes]] = {}
        position = {i: k for k, i in enumerate(sent)}
        for i, addr in enumerate(to_addrs):
            if i in local:
                senderrs[addr] = _tuple(local[i])
                continue
            reply = txn.rcpt_replies[position[i]]
            if reply is None:
                raise lost()
            if not 200 <= reply.code <= 299:
                senderrs[addr] = (reply.code, self._text(reply))
            if reply.code == 421:
                self.close()
                raise SMTPRecipientsRefused(senderrs)
        if not txn.accepted:
            raise SMTPRecipientsRefused(senderrs)  # the engine has reset the transaction
        data = txn.data_reply
        if data is None:
            raise lost()
        if data.code != 354:
            if data.code == 421 or broken:
                self.close()
            raise SMTPDataError(data.code, self._text(data))
        delivered = answered = 0
        first_refusal: Reply | None = None
        for idx in txn.accepted:
            addr = to_addrs[sent[idx]]
            final = txn.final_replies[idx]
            if final is None:
                made_up = txn.results[idx]
                senderrs[addr] = (made_up.code, _tuple(made_up)[1] + _MAYBE_DELIVERED)
                continue
            answered += 1
            if 200 <= final.code <= 299:
                delivered += 1
                continue
            senderrs[addr] = (final.code, self._text(final))
            if first_refusal is None:
                first_refusal = final
        if delivered:
            return senderrs
        if not answered:
            raise lost()
        assert first_refusal is not None
        if len(txn.accepted) == 1:
            raise SMTPDataError(first_refusal.code, self._text(first_refusal))
        raise RecipientsRefusedAfterData(senderrs, first_refusal.code, self._text(first_refusal))

    # -- STARTTLS ------------------------------------------------------------------------

    if sys.version_info >= (3, 12):
        def starttls(self, *, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
            """STARTTLS (see :meth:`_starttls`)."""
            return self._starttls(context, None, None)
    else:
        def starttls(self, keyfile: StrOrBytesPath | None = None,
                     certfile: StrOrBytesPath | None = None,
                     context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
            """STARTTLS (see :meth:`_starttls`); ``keyfile``/``certfile`` as smtplib 3.11."""
            if context is not None and keyfile is not None:
                raise ValueError("context and keyfile arguments are mutually exclusive")
            if context is not None and certfile is not None:
                raise ValueError("context and certfile arguments are mutually exclusive")
            if keyfile is not None or certfile is not None:
                warnings.warn("keyfile and certfile are deprecated, use a custom context instead",
                              DeprecationWarning, 2)
            return self._starttls(context, keyfile, certfile)

    def _starttls(self, context: ssl.SSLContext | None, keyfile: StrOrBytesPath | None,
                  certfile: StrOrBytesPath | None) -> tuple[int, bytes]:
        """Put the connection in TLS mode, as smtplib, but verified by default.

        Without ``context`` the certificate must verify against the system's
        CAs (``SSL_CERT_FILE``/``SSL_CERT_DIR`` are honoured) and carry the
        host name given to ``connect()``; over a unix socket only the chain
        is checked. For smtplib's unverified behaviour pass
        ``context=ssl._create_unverified_context()``. A handshake failure
        closes the connection (it cannot go on in clear text) and raises the
        ``ssl`` error. Afterwards every capability is forgotten: the next
        command says LHLO again.
        """
        self.ehlo_or_helo_if_needed()
        if not self.has_extn("starttls"):
            raise SMTPNotSupportedError("STARTTLS extension not supported by server.")
        resp, reply = self.docmd("STARTTLS")
        if resp != 220:
            raise SMTPResponseException(resp, reply)
        if self._input_pending():
            self.close()
            raise SMTPServerDisconnected(
                "the server sent more after its 220 reply to STARTTLS, before the handshake "
                "(a STARTTLS injection?): connection closed")
        hostname = self._tls_host
        if context is None:
            context = ssl.create_default_context()
            context.check_hostname = hostname is not None
            if certfile is not None:
                context.load_cert_chain(certfile, keyfile)
        assert self.sock is not None
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname=hostname)
        except BaseException:
            self.close()
            raise
        self.file = None
        # RFC 3207: forget everything not learnt under TLS.
        self.helo_resp = self.ehlo_resp = None
        self.esmtp_features = {}
        self.does_esmtp = False
        self._reset_session()
        return resp, reply

    def _input_pending(self) -> bool:
        """Bytes already received after the last reply (read without blocking)."""
        reader, sock = self.file, self.sock
        peek = getattr(reader, "peek", None)
        if peek is None or sock is None:
            return False
        timeout = sock.gettimeout()
        try:
            sock.settimeout(0.0)
            data = peek(1)
        except OSError:
            data = b""
        finally:
            sock.settimeout(timeout)
        return bool(data)

    # -- AUTH ----------------------------------------------------------------------------

    def auth(self, mechanism: str, authobject: Any, *,
             initial_response_ok: bool = True) -> tuple[int, bytes]:
        """One AUTH exchange, as smtplib's ``auth()``.

        ``authobject(challenge=None)`` returns the response (``str``, sent as
        UTF-8 where smtplib allows only ASCII, or ``bytes``). A failure on our
        side (lmtpfast's :class:`lmtpfast.AuthenticationError`, e.g. a SCRAM
        server signature that does not verify) cancels the exchange with
        ``*`` and raises :class:`AuthenticationError`.
        """
        mechanism = mechanism.upper()
        self._sasl = None
        try:
            initial = authobject() if initial_response_ok else None
        except _AuthenticationError as exc:
            raise AuthenticationError(str(exc)) from None
        if initial is not None:
            # RFC 4954: "=" is an empty initial response
            code, resp = self.docmd("AUTH", mechanism + " " + (_b64(initial) or "="))
            self._auth_challenge_count = 1
        else:
            code, resp = self.docmd("AUTH", mechanism)
            self._auth_challenge_count = 0
        while code == 334:
            self._auth_challenge_count += 1
            challenge = base64.decodebytes(resp)
            try:
                answer = authobject(challenge)
            except _AuthenticationError as exc:
                try:
                    self.docmd("*")  # RFC 4954: cancel; the session stays usable
                except SMTPServerDisconnected:
                    pass
                raise AuthenticationError(str(exc)) from None
            code, resp = self.docmd(_b64(answer))
            if self._auth_challenge_count > _MAXCHALLENGE:
                raise SMTPException("Server AUTH mechanism infinite loop. Last response: "
                                    + repr((code, resp)))
        if code in (235, 503):
            if code == 235 and self._sasl is not None:
                try:
                    self._sasl.finish()
                except _AuthenticationError as exc:
                    self.close()  # authenticated to a server that did not prove itself
                    raise AuthenticationError(str(exc)) from None
            return code, resp
        raise SMTPAuthenticationError(code, resp)

    def _scram(self, mechanism: type[Mechanism], challenge: bytes | None) -> str:
        sasl = self._sasl
        if sasl is None or type(sasl) is not mechanism:
            sasl = self._sasl = mechanism(Credentials(self.user, self.password))
            if challenge:
                raise _AuthenticationError(f"{sasl.name}: the server spoke first")
            first = sasl.initial_response()
            assert first is not None
            return first.decode("utf-8")
        return sasl.respond(challenge or b"").decode("utf-8")

    def auth_scram_sha_256(self, challenge: bytes | None = None) -> str:
        """SCRAM-SHA-256 (RFC 7677) for :meth:`auth`, with lmtpfast's SASL code."""
        return self._scram(ScramSHA256, challenge)

    def auth_scram_sha_1(self, challenge: bytes | None = None) -> str:
        """SCRAM-SHA-1 (RFC 5802) for :meth:`auth`, with lmtpfast's SASL code."""
        return self._scram(ScramSHA1, challenge)

    def login(self, user: str, password: str, *,
              initial_response_ok: bool = True) -> tuple[int, bytes]:
        """AUTH with the best mechanism both sides have, as smtplib's ``login()``.

        Order: SCRAM-SHA-256, SCRAM-SHA-1, CRAM-MD5, PLAIN, LOGIN (smtplib:
        CRAM-MD5, PLAIN, LOGIN). As smtplib, a refusal moves on to the next
        mechanism and the last :class:`SMTPAuthenticationError` is raised;
        a failure on our side (:class:`AuthenticationError`) is raised at once.
        """
        self.ehlo_or_helo_if_needed()
        if not self.has_extn("auth"):
            raise SMTPNotSupportedError("SMTP AUTH extension not supported by server.")
        advertised = self.esmtp_features["auth"].upper().split()
        authlist = [m for m in _PREFERRED_AUTH if m in advertised]
        if not authlist:
            raise SMTPException("No suitable authentication method found.")
        self.user, self.password = user, password
        last: SMTPAuthenticationError | None = None
        for mechanism in authlist:
            method = getattr(self, "auth_" + mechanism.lower().replace("-", "_"))
            try:
                code, resp = self.auth(mechanism, method, initial_response_ok=initial_response_ok)
            except SMTPAuthenticationError as exc:
                last = exc
                continue
            if code in (235, 503):
                return code, resp
        assert last is not None
        raise last


def _b64(response: str | bytes) -> str:
    data = response.encode("utf-8") if isinstance(response, str) else response
    return base64.b64encode(data).decode("ascii")


def _tuple(result: RecipientResult) -> tuple[int, bytes]:
    """A made-up result as smtplib's ``(code, message)``."""
    enh = f"{result.enhanced} " if result.enhanced else ""
    return result.code, (enh + result.text).encode("utf-8")

