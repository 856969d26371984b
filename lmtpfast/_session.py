"""One LMTP session: connect, greeting, LHLO, transactions, QUIT.

>>> async with await lmtpfast.connect("unix:/run/dovecot/lmtp") as conn:   # doctest: +SKIP
...     results = await conn.send("a@example.org", ["b@example.org"], message)

``send`` may be called concurrently on one connection: the transactions are
pipelined back to back (content, final dot and the next MAIL/RCPT/DATA in one
write), so a busy connection needs about one round trip per message.
"""

from __future__ import annotations

import asyncio
import email.message
import email.policy
import logging
import socket
from collections.abc import Sequence

from ._destination import Destination, parse_destination
from ._dsn import DSN
from ._errors import (
    ConnectError,
    ConnectTimeout,
    ContentError,
    LocalProtocolError,
    ReplyError,
    ServerDisconnected,
    TLSError,
)
from ._protocol import STREAM_CHUNK, LMTPProtocol, StreamedContent
from ._results import RecipientResult, status_of
from ._sasl import AuthPolicy, Credentials
from ._sasl import login as sasl_login
from ._settings import Timeouts
from ._tls import TLSInfo, TLSPolicy
from ._tls import negotiate as negotiate_tls
from .proto import Capabilities, Connection, Reply
from .proto.content import encode_content

__all__ = ["Client", "Message", "connect", "deliver", "message_bytes"]

log = logging.getLogger("lmtpfast.client")

Message = bytes | bytearray | memoryview | str | email.message.Message

# Messages larger than this are streamed (encoded while written).
STREAM_THRESHOLD = 4 * STREAM_CHUNK


def message_bytes(message: Message) -> bytes | memoryview:
    """The raw bytes of a message given as bytes, str or ``email.message.Message``."""
    if isinstance(message, bytes):
        return message
    if isinstance(message, bytearray | memoryview):
        return memoryview(message).cast("B")
    if isinstance(message, str):
        return message.encode("utf-8")
    if isinstance(message, email.message.Message):
        policy = message.policy
        if isinstance(policy, email.policy.EmailPolicy):
            policy = policy.clone(linesep="\r\n")
        return message.as_bytes(policy=policy)
    raise TypeError(f"message must be bytes, str or email.message.Message, not {type(message).__name__}")


def _scan(raw: bytes | memoryview) -> tuple[int, bool]:
    """Offset of the first NUL (or -1) and whether the message is 7-bit, without copying it whole."""
    if isinstance(raw, bytes):
        return raw.find(b"\0"), raw.isascii()
    nul, ascii_only = -1, True
    for start in range(0, len(raw), STREAM_CHUNK):
        piece = bytes(raw[start : start + STREAM_CHUNK])
        if nul < 0 and (at := piece.find(b"\0")) >= 0:
            nul = start + at
        ascii_only = ascii_only and piece.isascii()
    return nul, ascii_only


def _local_result(address: str, code: int, enhanced: str, text: str) -> RecipientResult:
    return RecipientResult(address=address, status=status_of(code), code=code,
                           enhanced=enhanced, text=text, stage="local", local=True)


class Client:
    """An open LMTP connection. Create it with :func:`connect`."""

    def __init__(
        self, protocol: LMTPProtocol, destination: Destination, greeting: Reply,
        lhlo_reply: Reply,
    ) -> None:
        self._protocol = protocol
        self.destination = destination
        self.greeting = greeting
        self.lhlo_reply = lhlo_reply
        self.transactions = 0  # started on this connection
        self._use_chunking = True

    @property
    def capabilities(self) -> Capabilities:
        caps = self._protocol.engine.capabilities
        assert caps is not None
        return caps

    @property
    def pipelining(self) -> bool:
        return self._protocol.engine.pipelining

    @property
    def chunking(self) -> bool:
        """True when messages go as BDAT chunks (RFC 3030) rather than DATA."""
        return self._use_chunking and self.capabilities.chunking

    #: The SASL identity this session authenticated as (``None``: no AUTH was done).
    authenticated_as: str | None = None
    #: The SASL mechanism that authenticated it.
    auth_mechanism: str | None = None

    @property
    def tls(self) -> TLSInfo | None:
        """What STARTTLS negotiated (version, cipher, peer certificate), or ``None`` in plain text."""
        return self._protocol.tls

    @property
    def usable(self) -> bool:
        """True while the connection can take another transaction."""
        return self._protocol.usable

    @property
    def idle(self) -> bool:
        return self._protocol.usable and self._protocol.engine.idle

    def alive(self) -> bool:
        """Usable, and (when idle) the server has not closed or written to the socket.

        Pools call this before reusing an idle connection: it catches a server
        that closed the connection a moment ago, before the event loop has
        read the EOF, at the cost of one poll(2). With BDAT a whole
        transaction leaves in one write, so writing into such a connection
        would leave its recipients "possibly delivered" instead of retried.
        """
        proto = self._protocol
        if not proto.usable:
            return False
        return not proto.engine.idle or proto.peer_silent()

    def __repr__(self) -> str:
        state = "open" if self.usable else "closed"
        return f"<lmtpfast.Client {self.destination} {state}>"

    async def send(
        self,
        sender: str,
        recipients: Sequence[str],
        message: Message,
        *,
        mail_params: Sequence[str] = (),
        rcpt_params: Sequence[Sequence[str]] | None = None,
        dsn: DSN | None = None,
    ) -> list[RecipientResult]:
        """Deliver ``message``; one result per recipient, in RCPT order.

        ``dsn`` (RFC 3461) is passed on when the server advertises DSN and
        dropped otherwise. ``mail_params``/``rcpt_params`` add raw ESMTP
        parameters; SIZE, BODY and SMTPUTF8 are added here as needed.

        Partial failure is data, not an exception. A :class:`LocalProtocolError`
        means the arguments themselves are wrong (nothing was sent);
        :class:`ServerDisconnected` means the connection was already unusable.
        """
        if isinstance(recipients, str):
            raise LocalProtocolError("recipients must be a sequence of addresses, not one string")
        recipients = list(recipients)
        if not recipients:
            raise LocalProtocolError("no recipients")
        raw = message_bytes(message)
        nul, ascii_only = _scan(raw)
        if nul >= 0:
            raise ContentError(f"message contains a NUL byte at offset {nul}; it cannot be sent")
        caps = self.capabilities
        params = list(mail_params)
        if rcpt_params is not None and len(rcpt_params) != len(recipients):
            raise LocalProtocolError("rcpt_params must have one entry per recipient")
        if dsn is not None and caps.dsn:
            params += dsn.mail_params()
            extra = dsn.rcpt_params(recipients)
            rcpt_params = (extra if rcpt_params is None else
                           [[*a, *b] for a, b in zip(rcpt_params, extra, strict=True)])
        # Parameter names the caller gave (the common case gives none).
        upper = {p.split("=", 1)[0].upper() for p in params} if params else set()

        # SMTPUTF8 (RFC 6531): needed when an address is not ASCII.
        needs_utf8 = not sender.isascii() or not all(r.isascii() for r in recipients)
        local: dict[int, RecipientResult] = {}
        if needs_utf8 and not caps.smtputf8:
            why = "non-ASCII address, and the server does not offer SMTPUTF8"
            if not sender.isascii():
                return [_local_result(r, 553, "5.6.7", why) for r in recipients]
            for i, r in enumerate(recipients):
                if not r.isascii():
                    local[i] = _local_result(r, 553, "5.6.7", why)
        elif needs_utf8 and "SMTPUTF8" not in upper:
            params.append("SMTPUTF8")

        chunking = self.chunking
        if len(raw) > STREAM_THRESHOLD:
            content: bytes | StreamedContent = StreamedContent(memoryview(raw).cast("B"),
                                                               chunking=chunking)
            size = len(raw)
        else:
            content = encode_content(raw, dot_stuff=not chunking)
            size = len(content)
        eight_bit = not ascii_only
        limit = caps.size
        if limit and size > limit:
            why = f"message of {size} bytes exceeds the server's size limit of {limit} bytes"
            return [_local_result(r, 552, "5.3.4", why) for r in recipients]
        if limit is not None and "SIZE" not in upper:
            params.append(f"SIZE={size}")
        if eight_bit and caps.eightbitmime and "BODY" not in upper:
            params.append("BODY=8BITMIME")

        if local:
            send_idx = [i for i in range(len(recipients)) if i not in local]
            if not send_idx:
                return [local[i] for i in range(len(recipients))]
            send_rcpts = [recipients[i] for i in send_idx]
        else:  # the common case: every recipient goes to the server
            send_idx = None
            send_rcpts = recipients
        send_params = None
        if rcpt_params is not None:
            send_params = [list(rcpt_params[i]) for i in (send_idx or range(len(recipients)))]
        self.transactions += 1
        fut = self._protocol.transaction(
            sender, send_rcpts, content, mail_params=params, rcpt_params=send_params,
            smtputf8="SMTPUTF8" in params, chunking=chunking,
        )
        try:
            # Cancelling the caller cancels fut too; the transport skips done futures.
            results = await fut
        except asyncio.CancelledError:
            # The server may be mid-transaction: the connection cannot be reused.
            self._protocol.abort(ServerDisconnected("delivery cancelled by the caller"))
            raise
        if send_idx is not None:
            merged = dict(zip(send_idx, results, strict=True))
            merged.update(local)
            results = [merged[i] for i in range(len(recipients))]
        return results

    async def command(self, verb: str, argument: str | None = None) -> Reply:
        """Send a session command and return its reply; a refusal raises :class:`ReplyError`."""
        reply = await self._protocol.command(verb, argument)
        if not 200 <= reply.code < 400:
            raise ReplyError(reply.code, reply.enhanced, reply.text, verb.lower())
        return reply

    async def noop(self) -> Reply:
        return await self.command("NOOP")

    async def rset(self) -> Reply:
        return await self.command("RSET")

    async def quit(self) -> None:
        """Say QUIT politely and close; errors on the way out are ignored."""
        proto = self._protocol
        if proto.usable:
            try:
                await proto.command("QUIT")
            except Exception:
                pass
        proto.close()
        await proto.wait_closed()

    def abort(self) -> None:
        """Drop the connection at once (open transactions get transient results)."""
        self._protocol.abort(ServerDisconnected("connection aborted by the client"))

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if exc[0] is None:
            await self.quit()
        else:
            self.abort()
            await self._protocol.wait_closed()


async def connect(
    destination: str | Destination,
    *,
    lhlo_name: str | None = None,
    timeouts: Timeouts | None = None,
    pipelining: bool = True,
    chunking: bool = True,
    ignore_keywords: Sequence[str] = (),
    max_line_length: int | None = None,
    max_reply_lines: int | None = None,
    tls: TLSPolicy | str | None = None,
    auth: Credentials | AuthPolicy | None = None,
) -> Client:
    """Connect to an LMTP server, read its greeting and say LHLO.

    ``pipelining`` and ``chunking`` (BDAT, RFC 3030) are used when the server
    advertises them, unless turned off here.

    Raises :class:`ConnectError` (:class:`ConnectTimeout`) when the server
    cannot be reached, :class:`ReplyError` when the greeting or LHLO is refused.

    ``tls`` is a :class:`~lmtpfast.TLSPolicy` or a security level name
    (``none``, ``may``, ``encrypt``, ``verify``); after STARTTLS, LHLO is said
    again and only its capabilities count. :class:`TLSError` when TLS is
    required and cannot be had (not offered, refused, handshake or certificate
    failure); at ``may`` a failed handshake is retried once in plain text.
    ``auth`` (:class:`~lmtpfast.Credentials` or
    :class:`~lmtpfast.AuthPolicy`) authenticates with the best mechanism
    the server offers; a refusal is a :class:`ReplyError` at stage ``auth``,
    a local problem an :class:`~lmtpfast.AuthenticationError`.
    """
    options = dict(locals())  # for the plain-text retry of level "may"
    dest = parse_destination(destination)
    tls_policy = TLSPolicy.parse(tls)
    auth_policy = AuthPolicy.parse(auth)
    timeouts = timeouts or Timeouts()
    loop = asyncio.get_running_loop()
    kwargs = {}
    if max_line_length is not None:
        kwargs["max_line_length"] = max_line_length
    if max_reply_lines is not None:
        kwargs["max_reply_lines"] = max_reply_lines
    engine = Connection(lhlo_name or socket.gethostname() or "localhost",
                        pipelining=pipelining, ignore_keywords=ignore_keywords, **kwargs)
    peer = str(dest)

    def factory() -> LMTPProtocol:
        return LMTPProtocol(engine, timeouts, loop, peer)

    try:
        async with asyncio.timeout(timeouts.connect):
            if dest.is_unix:
                _, protocol = await loop.create_unix_connection(factory, dest.path)
            else:
                _, protocol = await loop.create_connection(factory, dest.host, dest.port)
    except TimeoutError:
        raise ConnectTimeout(f"connect to {peer} timed out after {timeouts.connect:g}s") from None
    except OSError as exc:
        raise ConnectError(f"cannot connect to {peer}: {exc.strerror or exc}") from exc
    try:
        greeting = await protocol.wait_greeting()
        if greeting.code != 220:
            raise ReplyError(greeting.code, greeting.enhanced, greeting.text, "greeting")
        lhlo = await protocol.command("LHLO")
        if not 200 <= lhlo.code < 300:
            raise ReplyError(lhlo.code, lhlo.enhanced, lhlo.text, "lhlo")
        lhlo, tls_info = await negotiate_tls(protocol, tls_policy, dest, lhlo)
        mechanism = await sasl_login(protocol, auth_policy, dest, encrypted=tls_info is not None)
    except TLSError as exc:
        protocol.abort(ServerDisconnected("session setup failed"))
        if tls_policy.level != "may":
            raise
        # Postfix's opportunistic TLS: a failed handshake is retried in plain text.
        log.warning("%s; tls_security_level = may: retrying in plain text", exc)
        options["tls"] = None
        return await connect(**options)
    except BaseException:
        protocol.abort(ServerDisconnected("session setup failed"))
        raise
    protocol.setup_stage = None  # the session is ready: later failures are not set-up ones
    client = Client(protocol, dest, greeting, lhlo)
    if mechanism is not None and auth_policy is not None:
        client.authenticated_as = auth_policy.identity
        client.auth_mechanism = mechanism.name
    client._use_chunking = chunking
    return client


async def deliver(
    message: Message,
    *,
    sender: str,
    recipients: Sequence[str],
    server: str | Destination,
    **connect_options: object,
) -> list[RecipientResult]:
    """Connect, deliver one message, QUIT. One result per recipient, in order."""
    client = await connect(server, **connect_options)  # type: ignore[arg-type]
    try:
        return await client.send(sender, recipients, message)
    finally:
        await client.quit()
