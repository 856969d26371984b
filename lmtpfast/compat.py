"""``lmtpfast.compat.LMTP``: a drop-in for :class:`smtplib.LMTP` that is right after DATA.

Change ``from smtplib import LMTP`` to ``from lmtpfast.compat import LMTP``;
the constructor, methods, return values and exceptions (smtplib's own
classes) stay the same. What changes:

* ``sendmail`` reads one reply per accepted recipient after the final dot
  (RFC 2033), so the refused dict includes recipients refused there, and the
  next command no longer reads a stale reply (``smtplib.LMTP`` reads one
  reply whatever the number of recipients: CPython gh-76984).
* When every recipient is refused it raises :class:`SMTPRecipientsRefused`
  as smtplib does; when the last ones were refused after the dot the
  exception is also an :class:`SMTPDataError` (with ``smtp_code`` and
  ``smtp_error`` of the first such reply), so code written for smtplib's
  one-recipient behaviour keeps catching it.
* MAIL, every RCPT and DATA go out in one write when the server offers
  PIPELINING: one round trip instead of 2 + recipients.
* Message line ends are normalised to CRLF for bytes too (smtplib sends a
  bytes message as is; a bare LF line with a dot could end DATA early on
  servers that accept it, as Dovecot 2.3 does).

It drives lmtpfast's sans-IO engine over a blocking socket in the calling
thread, not the async client on a loop thread: smtplib callers are
synchronous code (threads, forked workers, or sync functions called from a
running event loop), and a plain socket needs no thread, no loop and no
hand-off per call, while the engine still does all of the protocol.

Not provided: ``starttls``, ``login``/``auth`` (they raise
:class:`SMTPNotSupportedError`), and the raw ``mail``/``rcpt``/``data``/
``putcmd``/``getreply`` steps, which cannot be mixed with a pipelined engine.
"""

from __future__ import annotations

import copy
import email.generator
import email.message
import email.utils
import io
import re
import socket
import sys
from collections.abc import Sequence
from smtplib import (
    LMTP_PORT,
    OLDSTYLE_AUTH,
    SMTPConnectError,
    SMTPDataError,
    SMTPHeloError,
    SMTPNotSupportedError,
    SMTPRecipientsRefused,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    quoteaddr,
)
from types import TracebackType
from typing import Any

from ._errors import LMTPError
from .proto import NEED_DATA, CommandReply, Connection, ConnectionBroken, ReadyForData, Reply
from .proto import TransactionDone as _TransactionDone
from .proto._common import encode_address
from .proto.content import encode_content

__all__ = ["LMTP", "LMTP_PORT", "RecipientsRefusedAfterData"]

_CRLF = "\r\n"
_FEATURE = re.compile(r"(?P<feature>[A-Za-z0-9][A-Za-z0-9\-]*) ?")
_DEFAULT_TIMEOUT: Any = socket._GLOBAL_DEFAULT_TIMEOUT  # type: ignore[attr-defined]


class RecipientsRefusedAfterData(SMTPRecipientsRefused, SMTPDataError):  # type: ignore[misc]
    """Every recipient was refused, the last ones after the final dot.

    An :class:`SMTPRecipientsRefused` (``recipients`` is the refused dict) and
    an :class:`SMTPDataError` (``smtp_code``/``smtp_error`` of the first reply
    after the dot), as :class:`smtplib.LMTP` raises for one recipient.
    """

    def __init__(self, recipients: dict[str, tuple[int, bytes]], code: int, msg: bytes) -> None:
        self.recipients = recipients
        self.smtp_code = code
        self.smtp_error = msg
        self.args = (recipients,)


def _fix_eols(data: str) -> str:
    return re.sub(r"(?:\r\n|\n|\r(?!\n))", _CRLF, data)


def _msg(reply: Reply) -> bytes:
    """A reply's text as smtplib returns it: each line after the code, stripped, joined by LF."""
    return b"\n".join(ln.strip(" \t\r\n").encode("utf-8", "surrogateescape")
                      for ln in reply.lines)


def _bare(address: str) -> str:
    """The address smtplib would put between ``<>`` (``quoteaddr`` accepts ``Name <a@b>``)."""
    quoted = quoteaddr(address)
    return quoted[1:-1] if quoted.startswith("<") and quoted.endswith(">") else quoted


def _raw_reply(reply: Reply) -> bytes:
    lines = reply.lines or ("",)
    out = [f"{reply.code}-{ln}\r\n" for ln in lines[:-1]]
    out.append(f"{reply.code} {lines[-1]}\r\n")
    return "".join(out).encode("utf-8", "surrogateescape")


class LMTP:
    """smtplib.LMTP's interface on lmtpfast's engine (see the module docstring)."""

    ehlo_msg = "lhlo"
    default_port = LMTP_PORT
    debuglevel = 0
    sock: socket.socket | None = None
    file: Any = None  # smtplib's reply reader; always None here
    helo_resp: bytes | None = None
    ehlo_resp: bytes | None = None
    does_esmtp = False

    def __init__(
        self,
        host: str = "",
        port: int = LMTP_PORT,
        local_hostname: str | None = None,
        source_address: tuple[str, int] | None = None,
        timeout: float | None = _DEFAULT_TIMEOUT,
    ) -> None:
        self._host = host
        self.timeout = timeout
        self.esmtp_features: dict[str, str] = {}
        self.command_encoding = "ascii"
        self.source_address = source_address
        self._auth_challenge_count = 0
        self._engine: Any = None
        self._greeting: Reply | None = None
        self._lhlo_done = False
        if local_hostname is not None:
            self.local_hostname = local_hostname
        else:
            fqdn = socket.getfqdn()
            if "." in fqdn:
                self.local_hostname = fqdn
            else:
                addr = "127.0.0.1"
                try:
                    addr = socket.gethostbyname(socket.gethostname())
                except socket.gaierror:
                    pass
                self.local_hostname = f"[{addr}]"
        if host:
            code, msg = self.connect(host, port)
            if code != 220:
                self.close()
                raise SMTPConnectError(code, msg)

    # -- context manager, debug ----------------------------------------------------

    def __enter__(self) -> LMTP:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            code, message = self.docmd("QUIT")
            if code != 221:
                raise SMTPResponseException(code, message)
        except SMTPServerDisconnected:
            pass
        finally:
            self.close()

    def set_debuglevel(self, debuglevel: int) -> None:
        """Accepted for compatibility; lmtpfast prints no protocol trace."""
        self.debuglevel = debuglevel

    # -- connection ----------------------------------------------------------------

    def connect(self, host: str = "localhost", port: int = 0,
                source_address: tuple[str, int] | None = None) -> tuple[int, bytes]:
        """Connect to ``host`` (a path starting with ``/`` is a unix socket); return the greeting."""
        if source_address:
            self.source_address = source_address
        if host[:1] == "/":
            if self.timeout is not None and not self.timeout:
                raise ValueError("Non-blocking socket (timeout=0) is not supported")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                if self.timeout is not _DEFAULT_TIMEOUT:
                    sock.settimeout(self.timeout)
                sock.connect(host)
            except OSError:
                sock.close()
                raise
        else:
            if not port and host.find(":") == host.rfind(":"):
                i = host.rfind(":")
                if i >= 0:
                    host, port_text = host[:i], host[i + 1 :]
                    try:
                        port = int(port_text)
                    except ValueError:
                        raise OSError("nonnumeric port") from None
            if not port:
                port = self.default_port
            sys.audit("smtplib.connect", self, host, port)
            if self.timeout is not None and not self.timeout:
                raise ValueError("Non-blocking socket (timeout=0) is not supported")
            sock = socket.create_connection((host, port), self.timeout, self.source_address)
        self.close()
        self.sock = sock
        self._engine = Connection(self.local_hostname)
        self._lhlo_done = False
        reply = self._wait_reply("greeting")
        self._greeting = reply
        return reply.code, _msg(reply)

    def close(self) -> None:
        """Close the connection (no QUIT)."""
        sock, self.sock = self.sock, None
        self._engine = None
        if sock is not None:
            sock.close()

    # -- I/O -------------------------------------------------------------------------

    def _require(self) -> Any:
        if self.sock is None or self._engine is None:
            raise SMTPServerDisconnected("please run connect() first")
        return self._engine

    def _flush(self) -> None:
        engine = self._require()
        data = engine.data_to_send()
        if data:
            self._send(data)

    def _send(self, data: bytes) -> None:
        assert self.sock is not None
        try:
            self.sock.sendall(data)
        except OSError:
            self.close()
            raise SMTPServerDisconnected("Server not connected") from None

    def _next_event(self) -> object:
        """The engine's next event, reading from the socket as needed."""
        engine = self._require()
        eof = False
        while True:
            ev = engine.next_event()
            if isinstance(ev, ConnectionBroken):
                self.close()
                why = f": {ev.error}" if isinstance(ev.error, LMTPError) else ""
                raise SMTPServerDisconnected(f"Connection unexpectedly closed{why}")
            if ev is not NEED_DATA:
                return ev
            if eof or engine.error is not None:
                self.close()
                raise SMTPServerDisconnected("Connection unexpectedly closed")
            # Without pipelining each reply releases the next command: send it
            # before waiting for more.
            out = engine.data_to_send()
            if out:
                self._send(out)
            assert self.sock is not None
            try:
                chunk = self.sock.recv(65536)
            except OSError as exc:
                self.close()
                raise SMTPServerDisconnected(f"Connection unexpectedly closed: {exc}") from None
            eof = not chunk
            engine.receive_data(chunk)  # b"" is the end of the stream

    def _wait_reply(self, command: str) -> Reply:
        while True:
            ev = self._next_event()
            if isinstance(ev, CommandReply) and ev.command == command:
                reply: Reply = ev.reply
                return reply

    def _fresh_engine(self, name: str) -> Any:
        """An engine with another LHLO name, fed the greeting already received."""
        assert self._greeting is not None
        engine = Connection(name)
        engine.receive_data(_raw_reply(self._greeting))
        ev = engine.next_event()
        assert isinstance(ev, CommandReply) and ev.command == "greeting"
        return engine

    # -- session commands ------------------------------------------------------------

    def docmd(self, cmd: str, args: str = "") -> tuple[int, bytes]:
        """Send a command and return ``(code, message)``."""
        engine = self._require()
        verb = cmd.upper()
        if verb in ("LHLO", "EHLO"):
            return self.ehlo(args)
        engine.command(verb, args or None)
        self._flush()
        reply = self._wait_reply(verb)
        return reply.code, _msg(reply)

    def ehlo(self, name: str = "") -> tuple[int, bytes]:
        """LHLO (``smtplib.LMTP`` sends LHLO for ``ehlo()`` too); parses ``esmtp_features``."""
        self.esmtp_features = {}
        engine = self._require()
        name = name or self.local_hostname
        if name != engine.local_name:
            if self._lhlo_done:
                raise ValueError("the LHLO name cannot change after the first LHLO")
            engine = self._engine = self._fresh_engine(name)
        engine.lhlo()
        self._flush()
        reply = self._wait_reply("LHLO")
        self._lhlo_done = True
        code, msg = reply.code, _msg(reply)
        self.ehlo_resp = msg
        if code != 250:
            return code, msg
        self.does_esmtp = True
        for each in msg.decode("latin-1").split("\n")[1:]:
            auth_match = OLDSTYLE_AUTH.match(each)
            if auth_match:
                self.esmtp_features["auth"] = (self.esmtp_features.get("auth", "") + " "
                                               + str(auth_match.groups(0)[0]))
                continue
            m = _FEATURE.match(each)
            if m:
                feature = m.group("feature").lower()
                params = m.string[m.end("feature"):].strip()
                if feature == "auth":
                    self.esmtp_features[feature] = (self.esmtp_features.get(feature, "") + " "
                                                    + params)
                else:
                    self.esmtp_features[feature] = params
        return code, msg

    lhlo = ehlo

    def helo(self, name: str = "") -> tuple[int, bytes]:
        """HELO (LMTP servers normally refuse it; kept for smtplib's fallback)."""
        engine = self._require()
        engine.command("HELO", name or self.local_hostname)
        self._flush()
        reply = self._wait_reply("HELO")
        self.helo_resp = _msg(reply)
        return reply.code, self.helo_resp

    def ehlo_or_helo_if_needed(self) -> None:
        """LHLO (or HELO) unless one was already said; :class:`SMTPHeloError` if both fail."""
        if (self.helo_resp is None and self.ehlo_resp is None
                and not 200 <= self.ehlo()[0] <= 299):
            code, resp = self.helo()
            if not 200 <= code <= 299:
                raise SMTPHeloError(code, resp)

    def has_extn(self, opt: str) -> bool:
        return opt.lower() in self.esmtp_features

    def noop(self) -> tuple[int, bytes]:
        return self.docmd("noop")

    def rset(self) -> tuple[int, bytes]:
        self.command_encoding = "ascii"
        return self.docmd("rset")

    def verify(self, address: str) -> tuple[int, bytes]:
        return self.docmd("vrfy", _bare(address))

    vrfy = verify

    def expn(self, address: str) -> tuple[int, bytes]:
        return self.docmd("expn", _bare(address))

    def help(self, args: str = "") -> bytes:
        return self.docmd("help", args)[1]

    def quit(self) -> tuple[int, bytes]:
        """QUIT and close; returns the QUIT reply."""
        res = self.docmd("quit")
        self.ehlo_resp = self.helo_resp = None
        self.esmtp_features = {}
        self.does_esmtp = False
        self.close()
        return res

    def starttls(self, *args: Any, **kwargs: Any) -> tuple[int, bytes]:
        raise SMTPNotSupportedError("STARTTLS is not supported by lmtpfast.compat.LMTP yet")

    def login(self, *args: Any, **kwargs: Any) -> tuple[int, bytes]:
        raise SMTPNotSupportedError("AUTH is not supported by lmtpfast.compat.LMTP yet")

    auth = login

    # -- mail ----------------------------------------------------------------------------

    def sendmail(
        self,
        from_addr: str,
        to_addrs: str | Sequence[str],
        msg: str | bytes,
        mail_options: Sequence[str] = (),
        rcpt_options: Sequence[str] = (),
    ) -> dict[str, tuple[int, bytes]]:
        """One transaction; the dict of refused recipients, as ``smtplib.sendmail``.

        Raises :class:`SMTPSenderRefused`, :class:`SMTPRecipientsRefused`
        (every recipient refused, at RCPT or after the dot — see
        :class:`RecipientsRefusedAfterData`), :class:`SMTPDataError` (DATA
        refused), :class:`SMTPServerDisconnected`, :class:`SMTPHeloError`,
        :class:`SMTPNotSupportedError` as smtplib does.
        """
        self.ehlo_or_helo_if_needed()
        engine = self._require()
        if isinstance(msg, str):
            msg = _fix_eols(msg).encode("ascii")
        esmtp_opts: list[str] = []
        if self.does_esmtp:
            if self.has_extn("size"):
                esmtp_opts.append(f"size={len(msg)}")
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
        rcpt_opts = list(rcpt_options) if rcpt_options and self.does_esmtp else []
        # smtplib would send an empty or malformed address and collect the
        # server's refusal; the engine will not send it, so refuse it here.
        local_errs: dict[int, tuple[int, bytes]] = {}
        send_idx: list[int] = []
        for i, addr in enumerate(to_addrs):
            if any(c in addr for c in "\r\n\0"):
                raise ValueError(f"address {addr!r} contains CR, LF or NUL")
            try:
                encode_address(_bare(addr), utf8=True)
                send_idx.append(i)
            except LMTPError:
                local_errs[i] = (501, b"5.1.3 Bad recipient address syntax")
        if not send_idx:
            raise SMTPRecipientsRefused({to_addrs[i]: e for i, e in local_errs.items()})
        txn = engine.start_transaction(
            _bare(from_addr), [_bare(to_addrs[i]) for i in send_idx], mail_params=esmtp_opts,
            rcpt_params=[rcpt_opts] * len(send_idx) if rcpt_opts else None, smtputf8=utf8,
        )
        content = encode_content(msg)
        self._flush()
        while True:
            ev = self._next_event()
            if isinstance(ev, ReadyForData) and ev.transaction is txn:
                self._send(content)
                engine.end_data(txn)
                self._flush()
            elif isinstance(ev, _TransactionDone) and ev.transaction is txn:
                break
        self._flush()  # an RSET the engine queued to clean up, if any

        mail = txn.mail_reply
        assert mail is not None
        if mail.code != 250:
            if mail.code == 421:
                self.close()
            raise SMTPSenderRefused(mail.code, _msg(mail), from_addr)
        senderrs: dict[str, tuple[int, bytes]] = {}
        refused = len(local_errs)
        replies = dict(zip(send_idx, txn.rcpt_replies, strict=True))
        for i, addr in enumerate(to_addrs):
            if i in local_errs:
                senderrs[addr] = local_errs[i]
                continue
            reply = replies[i]
            assert reply is not None
            if reply.code not in (250, 251):
                senderrs[addr] = (reply.code, _msg(reply))
                refused += 1
            if reply.code == 421:
                self.close()
                raise SMTPRecipientsRefused(senderrs)
        if refused == len(to_addrs):
            raise SMTPRecipientsRefused(senderrs)
        data = txn.data_reply
        assert data is not None
        if data.code != 354:
            if data.code == 421:
                self.close()
            raise SMTPDataError(data.code, _msg(data))
        first_final: Reply | None = None
        delivered = 0
        for idx in txn.accepted:
            reply = txn.final_replies[idx]
            assert reply is not None
            if reply.code == 250:
                delivered += 1
                continue
            senderrs[to_addrs[send_idx[idx]]] = (reply.code, _msg(reply))
            if first_final is None:
                first_final = reply
            if reply.code == 421:
                self.close()
        if not delivered:
            assert first_final is not None
            raise RecipientsRefusedAfterData(senderrs, first_final.code, _msg(first_final))
        return senderrs

    def send_message(
        self,
        msg: email.message.Message,
        from_addr: str | None = None,
        to_addrs: str | Sequence[str] | None = None,
        mail_options: Sequence[str] = (),
        rcpt_options: Sequence[str] = (),
    ) -> dict[str, tuple[int, bytes]]:
        """Flatten an ``email.message.Message`` and :meth:`sendmail` it, as smtplib does
        (sender and recipients from the headers when not given, ``Bcc`` removed)."""
        self.ehlo_or_helo_if_needed()
        resent = msg.get_all("Resent-Date")
        if resent is None:
            header_prefix = ""
        elif len(resent) == 1:
            header_prefix = "Resent-"
        else:
            raise ValueError("message has more than one 'Resent-' header block")
        if from_addr is None:
            from_addr = (msg[header_prefix + "Sender"] if (header_prefix + "Sender") in msg
                         else msg[header_prefix + "From"])
            from_addr = email.utils.getaddresses([from_addr])[0][1]
        if to_addrs is None:
            addr_fields = [f for f in (msg[header_prefix + "To"], msg[header_prefix + "Bcc"],
                                       msg[header_prefix + "Cc"]) if f is not None]
            to_addrs = [a[1] for a in email.utils.getaddresses(addr_fields)]
        elif isinstance(to_addrs, str):
            to_addrs = [to_addrs]
        msg_copy = copy.copy(msg)
        del msg_copy["Bcc"]
        del msg_copy["Resent-Bcc"]
        international = False
        try:
            "".join([from_addr, *to_addrs]).encode("ascii")
        except UnicodeEncodeError:
            if not self.has_extn("smtputf8"):
                raise SMTPNotSupportedError(
                    "One or more source or delivery addresses require internationalized "
                    "email support, but the server does not advertise the required SMTPUTF8 "
                    "capability") from None
            international = True
        with io.BytesIO() as bytesmsg:
            if international:
                g = email.generator.BytesGenerator(bytesmsg, policy=msg.policy.clone(utf8=True))  # type: ignore[call-arg]
                mail_options = (*mail_options, "SMTPUTF8", "BODY=8BITMIME")
            else:
                g = email.generator.BytesGenerator(bytesmsg)
            g.flatten(msg_copy, linesep="\r\n")
            flatmsg = bytesmsg.getvalue()
        return self.sendmail(from_addr, to_addrs, flatmsg, mail_options, rcpt_options)
