"""One LMTP session: the set-up sequence, transactions, QUIT.

>>> async with await lmtpfast.connect("unix:/run/dovecot/lmtp") as conn:   # doctest: +SKIP
...     results = await conn.send("a@example.org", ["b@example.org"], message)

:func:`connect` is the whole set-up, in one ordered sequence (asyncpg's
``connect_utils`` is the model): connect -> greeting -> LHLO -> STARTTLS ->
LHLO -> AUTH. The decisions come from the pure policy modules (``_tls`` says
whether and how to use TLS, ``_sasl`` picks the mechanism and computes its
steps); this module drives them over the protocol.

``send`` may be called concurrently on one connection: the transactions are
pipelined back to back (content, final dot and the next MAIL/RCPT/DATA in one
write), so a busy connection needs about one round trip per message.
"""

from __future__ import annotations

import _socket  # not socket (enum, selectors): start-up cost of `lmtpfast send`
import sys
import time
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

from ._delivery import Delivery, StreamedContent, message_bytes, pieces
from ._destination import Destination, parse_destination
from ._dsn import DSN
from ._errors import (
    AuthenticationError,
    ConnectError,
    ContentError,
    LocalProtocolError,
    ReplyError,
    ServerDisconnected,
    TLSError,
)
from ._failures import BAD_CONTENT, EIGHTBIT_MISSING, SIZE_LIMIT, SMTPUTF8_MISSING
from ._lazy import get_logger
from ._metrics import TRACE
from ._results import RecipientResult
from ._sasl import AuthPolicy, Credentials, Mechanism, authenticate
from ._settings import Timeouts
from ._tls import TLSInfo, TLSPolicy, check_starttls_reply, wants_starttls
from .proto import Capabilities, Engine, Reply, Transaction, get_engine

# asyncio, the asyncio protocol and programs (command: destinations) are
# imported where used: `lmtpfast send` runs a blocking session (connect_sync)
# once per message, and importing them would cost more than the delivery.
if TYPE_CHECKING:
    from ._blocking import BlockingProtocol
    from ._command import Program
    from ._delivery import Message
    from ._protocol import LMTPProtocol
    from .proto import Connection

    #: What a Client runs over: the asyncio protocol, or the blocking one
    #: (``connect_sync``) whose awaitables are ready when returned.
    SessionProtocol = LMTPProtocol | BlockingProtocol
    #: Opens the connection for the set-up sequence: (engine, timeouts, destination,
    #: peer) -> the protocol, and the program behind a command: destination.
    #: The last argument is the engine's name (its protocol class under asyncio).
    Opener = Callable[[Connection, Timeouts, Destination, str, str],
                      Awaitable[tuple[SessionProtocol, Program | None]]]

__all__ = ["Client", "Message", "OpenEnvelope", "SyncClient", "connect", "connect_sync", "deliver",
           "message_bytes"]

_CLIENT_LOG = "lmtpfast.client"
_SASL_LOG = "lmtpfast.sasl"


def _wire_content(body: Delivery, chunking: bool, engine: Engine) -> bytes | StreamedContent:
    """*body*'s content as a transaction sends it: streamed pieces, or the whole encoded form
    (dot-stuffed for DATA, CRLF only for BDAT)."""
    if body.streamed:
        return StreamedContent(pieces(body.content), chunking=chunking,
                               encoder=engine.ContentEncoder)
    return body.encoded(dot_stuff=not chunking, encode=engine.encode_content)


class _Prepared(NamedTuple):
    # One delivery as this server takes it: what goes out, and what was decided locally.
    rcpts: list[str]
    content: bytes | StreamedContent
    params: list[str]
    rcpt_params: list[list[str]] | None
    smtputf8: bool
    chunking: bool
    send_idx: Sequence[int]
    local: dict[int, RecipientResult] | None


class Client:
    """An open LMTP connection. Create it with :func:`connect`."""

    #: The SASL identity this session authenticated as (``None``: no AUTH was done).
    authenticated_as: str | None = None
    #: The SASL mechanism that authenticated it.
    auth_mechanism: str | None = None

    def __init__(
        self, protocol: SessionProtocol, destination: Destination, greeting: Reply,
        lhlo_reply: Reply, engine: Engine, *, chunking: bool = True,
        program: Program | None = None,
    ) -> None:
        self._protocol = protocol
        #: The LMTP program behind a ``command:`` destination (``None`` for a socket).
        self.program = program
        self.destination = destination
        self.greeting = greeting
        self.lhlo_reply = lhlo_reply
        #: The core this session runs on (``engine.name``: ``"c"`` or ``"python"``).
        self.engine = engine
        self.transactions = 0  # started on this connection
        self._use_chunking = chunking
        # (smtputf8, 8bitmime, dsn, size limit, chunking): read once, by _prepare.
        self._facts: tuple[bool, bool, bool, int | None, bool] | None = None

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

    @property
    def tls(self) -> TLSInfo | None:
        """What STARTTLS negotiated (version, cipher, peer certificate); ``None``: plain text."""
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
        delivery: Delivery | str,
        recipients: Sequence[str] | None = None,
        message: Message | None = None,
        *,
        mail_params: Sequence[str] = (),
        rcpt_params: Sequence[Sequence[str]] | None = None,
        dsn: DSN | None = None,
    ) -> list[RecipientResult]:
        """Deliver one message; one result per recipient, in RCPT order.

        ``send(delivery)`` takes a :class:`~lmtpfast.Delivery`;
        ``send(sender, recipients, message, ...)`` builds one (see
        :meth:`Delivery.build`). ``dsn`` (RFC 3461) is passed on when the
        server advertises DSN and dropped otherwise. ``mail_params`` and
        ``rcpt_params`` add raw ESMTP parameters; SIZE, BODY and SMTPUTF8 are
        added here as needed.

        Partial failure is data, not an exception: a recipient whose address
        cannot be sent, or that the server cannot take (SIZE, SMTPUTF8,
        8BITMIME), gets its result from the failure table and the others go
        on. :class:`LocalProtocolError` means the request itself is wrong (a
        bad sender, a NUL byte: nothing was sent); :class:`ServerDisconnected`
        means the connection was already unusable.
        """
        if type(delivery) is not Delivery:
            if not isinstance(delivery, str) or recipients is None or message is None:
                raise TypeError("send(delivery) or send(sender, recipients, message)")
            delivery = Delivery.build(message, sender=delivery, recipients=recipients,
                                      mail_params=mail_params, rcpt_params=rcpt_params, dsn=dsn)
        elif recipients is not None or message is not None or mail_params or rcpt_params or dsn:
            raise TypeError("send(delivery) takes no other arguments: they are in the Delivery")
        return await self._send(delivery)

    async def _send(self, d: Delivery) -> list[RecipientResult]:
        prep = self._prepare(d)
        if type(prep) is list:
            return prep
        assert type(prep) is _Prepared
        self.transactions += 1
        fut = self._protocol.transaction(
            d.sender, prep.rcpts, prep.content, mail_params=prep.params,
            rcpt_params=prep.rcpt_params, smtputf8=prep.smtputf8, chunking=prep.chunking,
        )
        try:
            # Cancelling the caller cancels fut too; the transport skips done futures.
            results = await fut
        except BaseException:
            # Only cancellation (or an interrupt) comes out of this await: the
            # server may be mid-transaction, so the connection cannot be reused.
            self._protocol.abort(ServerDisconnected("delivery cancelled by the caller"))
            raise
        if prep.local:
            return self._merge(d, results, prep.send_idx, prep.local)
        return results

    def send_many(
        self, deliveries: Iterable[Delivery] | AsyncIterable[Delivery], *, window: int = 32,
    ) -> AsyncIterator[tuple[Delivery, list[RecipientResult]]]:
        """Deliver many messages pipelined on this connection; yield each as it is decided.

        Yields ``(delivery, results)`` (one result per recipient, in RCPT
        order, as :meth:`send` returns them) in the order the server decides
        them. Up to ``window`` transactions are in flight at once; there is
        no task and no future per message, only one wake-up per batch of
        replies, so this is the fast way to send a stream of messages
        (``lmtpfast bench`` uses it; replay can feed it its claims).

        ``deliveries`` may be a plain or an async iterable; it is read only
        as the window has room, and never read past what can be sent: when
        the connection breaks, the deliveries in flight are yielded with
        their (transient) results first, then :class:`ServerDisconnected` is
        raised and the iterator stays where it was (its next item was not
        taken). A delivery the engine refuses to encode (a bad parameter) is
        yielded with permanent ``bad-content`` results and the others go on.
        Leaving the loop early (``break``, an exception, cancellation) with
        transactions still in flight aborts the connection, as cancelling
        :meth:`send` does: their outcome is not known.
        """
        from ._protocol import CLMTPProtocol

        if CLMTPProtocol is not None and type(self._protocol) is CLMTPProtocol:
            # The compiled consumer (_csession.pyx) on the compiled protocol:
            # _send_many below is its reference, run on the Python protocol.
            try:
                from ._csession import send_many
            except ImportError:
                pass
            else:
                return send_many(self, self._protocol, deliveries, window)
        return self._send_many(deliveries, window)

    async def _send_many(
        self, deliveries: Iterable[Delivery] | AsyncIterable[Delivery], window: int,
    ) -> AsyncIterator[tuple[Delivery, list[RecipientResult]]]:
        # send_many in Python: the reference of _csession.send_many, line for line.
        from ._protocol import LMTPProtocol

        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        protocol = self._protocol
        if not isinstance(protocol, LMTPProtocol):
            raise TypeError("send_many() needs an asyncio session (connect(), not connect_sync())")
        # Woken once per half window of decisions (or when none is left in
        # flight): the connection keeps going on the other half meanwhile.
        batch = protocol.new_batch(max(1, window // 2))
        pending: dict[Transaction, tuple[Delivery, _Prepared]] = {}
        ready: deque[tuple[Delivery, list[RecipientResult]]] = deque()
        source: Iterator[Delivery] | None = None
        asource: AsyncIterator[Delivery] | None = None
        if isinstance(deliveries, AsyncIterable):
            asource = aiter(deliveries)
        else:
            source = iter(deliveries)
        more = True
        try:
            while True:
                # Fill the window, as far as the connection can take more.
                while more and len(pending) < window and protocol.usable:
                    try:
                        if source is not None:
                            d = next(source)
                        else:
                            assert asource is not None
                            d = await anext(asource)
                    except (StopIteration, StopAsyncIteration):
                        more = False
                        break
                    prep = self._prepare(d)
                    if type(prep) is list:
                        ready.append((d, prep))
                        continue
                    assert type(prep) is _Prepared
                    try:
                        txn = protocol.submit(
                            batch, d.sender, prep.rcpts, prep.content, mail_params=prep.params,
                            rcpt_params=prep.rcpt_params, smtputf8=prep.smtputf8,
                            chunking=prep.chunking)
                    except LocalProtocolError as exc:
                        if not protocol.usable:
                            raise
                        ready.append((d, [BAD_CONTENT.result(r, detail=exc)
                                          for r in d.recipients]))
                        continue
                    self.transactions += 1
                    pending[txn] = (d, prep)
                done = batch.done
                while done:
                    txn = done.popleft()
                    d, prep = pending.pop(txn)
                    results = txn.results
                    if prep.local:
                        results = self._merge(d, results, prep.send_idx, prep.local)
                    ready.append((d, results))
                while ready:
                    yield ready.popleft()
                if not pending:
                    if not more:
                        return
                    if not protocol.usable:
                        raise protocol.error or ServerDisconnected(
                            f"connection to {self.destination} is closed")
                    continue
                # The window is full, the source is drained or the connection is done.
                batch.in_flight = len(pending) - len(done)
                await batch.wait()
        finally:
            if pending:
                protocol.abort(ServerDisconnected("send_many() left with deliveries in flight"))

    def open_transaction(
        self, sender: str, *, eight_bit: bool = False, smtputf8: bool = False,
    ) -> OpenEnvelope:
        """Send MAIL alone: recipients follow one at a time, each answered as it comes.

        For a front end that relays its back end's RCPT replies (the proxy's
        ``verify_recipients``): :meth:`OpenEnvelope.rcpt` sends one RCPT,
        :meth:`OpenEnvelope.send` the content after the last one (one
        transaction), :meth:`OpenEnvelope.abandon` an RSET instead. MAIL says
        ``BODY=8BITMIME`` for ``eight_bit`` and ``SMTPUTF8`` for ``smtputf8``
        where the server offers them (the content is not known yet, so no
        SIZE). Needs an asyncio session that nobody else sends on meanwhile.
        """
        from ._protocol import LMTPProtocol

        protocol = self._protocol
        if not isinstance(protocol, LMTPProtocol):
            raise TypeError("open_transaction() needs an asyncio session (connect())")
        caps = self.capabilities
        params = []
        if eight_bit and caps.eightbitmime:
            params.append("BODY=8BITMIME")
        if smtputf8:
            if not caps.smtputf8:
                raise LocalProtocolError(f"{self.destination} does not offer SMTPUTF8")
            params.append("SMTPUTF8")
        txn, mail = protocol.open_transaction(sender, mail_params=params, smtputf8=smtputf8)
        self.transactions += 1
        return OpenEnvelope(self, protocol, txn, mail, smtputf8)

    def _session_facts(self) -> tuple[bool, bool, bool, int | None, bool]:
        """(smtputf8, 8bitmime, dsn, size limit, chunking): what ``_prepare`` decides on."""
        facts = self._facts
        if facts is None:
            # What the server offers is settled once the session is set up.
            caps = self.capabilities
            facts = self._facts = (caps.smtputf8, caps.eightbitmime, caps.dsn, caps.size,
                                   self.chunking)
        return facts

    def _prepare(self, d: Delivery) -> list[RecipientResult] | _Prepared:
        """What this server needs for ``d``: its final results now, or the transaction to send."""
        has_smtputf8, has_8bitmime, has_dsn, limit, chunking = self._session_facts()
        n = len(d.recipients)
        local: dict[int, RecipientResult] | None = dict(d.refused) if d.refused else None

        # SMTPUTF8 (RFC 6531): needed when an address is not ASCII.
        smtputf8 = d.smtputf8
        if smtputf8 and not has_smtputf8:
            local = local or {}
            every = not d.sender.isascii()
            for i, r in enumerate(d.recipients):
                if i not in local and (every or not r.isascii()):
                    local[i] = SMTPUTF8_MISSING.result(r)
            smtputf8 = False
        # 8-bit content to a server without 8BITMIME (RFC 5321 2.4: MUST NOT):
        # converted to 7 bits as Postfix does, or refused when it cannot be.
        body = d
        if d.eight_bit and not has_8bitmime:
            try:
                body = d.seven_bit()
            except ContentError as exc:
                return self._merge(d, [], range(0), {
                    i: (local or {}).get(i) or EIGHTBIT_MISSING.result(r, detail=exc)
                    for i, r in enumerate(d.recipients)})

        params = list(d.mail_params) if d.mail_params else []
        if has_dsn and d.dsn_mail:
            params += d.dsn_mail
        content = _wire_content(body, chunking, self.engine)
        given = d.given
        if limit is not None:
            size = body.size
            if limit and size > limit:
                return self._merge(d, [], range(0), {
                    i: (local or {}).get(i) or SIZE_LIMIT.result(r, size=size, limit=limit)
                    for i, r in enumerate(d.recipients)})
            if "SIZE" not in given:
                params.append(f"SIZE={size}")
        if body.eight_bit and "BODY" not in given:
            params.append("BODY=8BITMIME")
        if smtputf8 and "SMTPUTF8" not in given:
            params.append("SMTPUTF8")

        if local:
            send_idx: Sequence[int] = [i for i in range(n) if i not in local]
            if not send_idx:
                return [local[i] for i in range(n)]
            rcpts = [d.recipients[i] for i in send_idx]
        else:  # the common case: every recipient goes to the server
            send_idx = range(n)
            rcpts = list(d.recipients)
        rcpt_params: list[list[str]] | None = None
        extra, dsn_rcpt = d.rcpt_params, d.dsn_rcpt if has_dsn else None
        if extra is not None or dsn_rcpt is not None:
            rcpt_params = [[*(extra[i] if extra is not None else ()),
                            *(dsn_rcpt[i] if dsn_rcpt is not None else ())] for i in send_idx]

        return _Prepared(rcpts, content, params, rcpt_params, smtputf8 or "SMTPUTF8" in given,
                         chunking, send_idx, local)

    @staticmethod
    def _merge(
        d: Delivery, results: list[RecipientResult], sent: Sequence[int],
        local: dict[int, RecipientResult],
    ) -> list[RecipientResult]:
        merged = dict(zip(sent, results, strict=True))
        merged.update(local)
        return [merged[i] for i in range(len(d.recipients))]

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
        await self.wait_closed()

    def abort(self) -> None:
        """Drop the connection at once (open transactions get transient results)."""
        self._protocol.abort(ServerDisconnected("connection aborted by the client"))

    async def wait_closed(self) -> None:
        """Return once the connection is closed (by either side), and its program has ended."""
        await self._protocol.wait_closed()
        if self.program is not None:
            await self.program.finish()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if exc[0] is None:
            await self.quit()
        else:
            self.abort()
            await self.wait_closed()


class OpenEnvelope:
    """A transaction whose recipients are sent one at a time (:meth:`Client.open_transaction`)."""

    def __init__(self, client: Client, protocol: LMTPProtocol, txn: Transaction,
                 mail: Awaitable[Reply], smtputf8: bool) -> None:
        self.client = client
        self._protocol = protocol
        self._txn = txn
        self._smtputf8 = smtputf8
        self._mail = mail
        mail.add_done_callback(_retrieved)  # type: ignore[attr-defined]
        self.closed = False

    @property
    def mail_reply(self) -> Reply | None:
        """The reply to MAIL, once in (a refusal answers every RCPT of it)."""
        return self._txn.mail_reply

    @property
    def recipients(self) -> list[str]:
        return self._txn.recipients

    @property
    def replied(self) -> bool:
        """Some reply of this transaction came in (the server saw it)."""
        return self._txn.mail_reply is not None

    def rcpt(self, address: str, *, flush: bool = True) -> Awaitable[Reply]:
        """Send ``RCPT TO:<address>``; the awaitable gets its reply (an error if the
        connection breaks or the stage times out first). ``flush=False``: queue it
        until :meth:`flush` (several RCPTs in one write)."""
        if self.closed:
            raise LocalProtocolError("the envelope is closed")
        return self._protocol.add_recipient(self._txn, address, smtputf8=self._smtputf8,
                                            flush=flush)

    def flush(self) -> None:
        """Write the RCPTs queued with ``flush=False``."""
        if self._protocol.usable:
            self._protocol.flush()

    async def send(self, d: Delivery) -> list[RecipientResult]:
        """The content of ``d`` after the last RCPT: one result per :meth:`rcpt`, in order.

        The content is fitted to the server as :meth:`Client.send` does (a
        7-bit conversion where 8BITMIME is missing, its SIZE limit, DATA or
        BDAT); a message the server cannot take is abandoned (RSET) and its
        accepted recipients get the failure table's result.
        """
        self.closed = True
        txn = self._txn
        if txn.done or not self._protocol.usable:
            self._protocol.abort(ServerDisconnected("connection unusable"))
            return txn.results  # the connection broke: decided already
        client = self.client
        caps = client.capabilities
        chunking = client.chunking
        body = d
        local: Any = None
        if d.eight_bit and not caps.eightbitmime:
            try:
                body = d.seven_bit()
            except ContentError as exc:
                local = (EIGHTBIT_MISSING, {"detail": exc})
        limit = caps.size
        if local is None and limit and body.size > limit:
            local = (SIZE_LIMIT, {"size": body.size, "limit": limit})
        if local is not None:
            results = await self.abandon()
            failure, fields = local
            accepted = set(txn.accepted)
            return [failure.result(r.address, **fields) if i in accepted else r
                    for i, r in enumerate(results)]
        content = _wire_content(body, chunking, client.engine)
        fut = self._protocol.close_transaction(txn, content, chunking=chunking)
        try:
            return await fut
        except BaseException:
            self._protocol.abort(ServerDisconnected("delivery cancelled by the caller"))
            raise

    async def abandon(self) -> list[RecipientResult]:
        """RSET instead of the content (the client went away or reset); nothing is delivered.

        The results say what each RCPT got (accepted ones: transient, never
        delivered). A connection that cannot take the RSET is aborted.
        """
        self.closed = True
        txn = self._txn
        protocol = self._protocol
        if txn.done:
            return txn.results
        if not protocol.usable:
            protocol.abort(ServerDisconnected("connection unusable"))
            return txn.results
        fut = protocol.abandon_transaction(txn)
        try:
            return await fut
        except BaseException:
            protocol.abort(ServerDisconnected("RSET cancelled by the caller"))
            raise


def _retrieved(fut: Any) -> None:
    # A MAIL reply nobody awaits must not log "exception was never retrieved".
    if not fut.cancelled():
        fut.exception()


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
    engine: str | Engine | ModuleType | None = None,
) -> Client:
    """Connect to an LMTP server and set the session up: greeting, LHLO, STARTTLS, AUTH.

    ``pipelining`` and ``chunking`` (BDAT, RFC 3030) are used when the server
    advertises them, unless turned off here. ``engine`` picks the core:
    ``"c"`` (compiled), ``"python"`` (the reference), or ``None`` for the
    default (compiled when built).

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
    from ._protocol import open_connection

    return await _connect(open_connection, destination, lhlo_name=lhlo_name,
                          timeouts=timeouts, pipelining=pipelining, chunking=chunking,
                          ignore_keywords=ignore_keywords, max_line_length=max_line_length,
                          max_reply_lines=max_reply_lines, tls=tls, auth=auth, engine=engine)


async def _connect(
    opener: Opener,
    destination: str | Destination,
    *,
    lhlo_name: str | None,
    timeouts: Timeouts | None,
    pipelining: bool,
    chunking: bool,
    ignore_keywords: Sequence[str],
    max_line_length: int | None,
    max_reply_lines: int | None,
    tls: TLSPolicy | str | None,
    auth: Credentials | AuthPolicy | None,
    engine: str | Engine | ModuleType | None,
) -> Client:
    """:func:`connect` over the connections ``opener`` makes (asyncio or blocking)."""
    dest = parse_destination(destination)
    tls_policy = TLSPolicy.parse(tls)
    settings = _Setup(
        dest, lhlo_name or _socket.gethostname() or "localhost", timeouts or Timeouts(),
        pipelining, chunking, tuple(ignore_keywords), max_line_length, max_reply_lines,
        AuthPolicy.parse(auth), get_engine(engine), opener)
    try:
        return await settings.run(tls_policy)
    except TLSError as exc:
        if tls_policy.level != "may":
            raise
        # Postfix's opportunistic TLS: a failed handshake is retried in plain text.
        get_logger(_CLIENT_LOG).warning(
            "%s; tls_security_level = may: retrying in plain text", exc)
        return await settings.run(TLSPolicy.parse(None))


def _clock() -> Callable[[], float]:
    """The running loop's clock under asyncio (its timers' time), else monotonic time."""
    if "asyncio" in sys.modules:
        import asyncio

        try:
            return asyncio.get_running_loop().time
        except RuntimeError:
            pass
    return time.monotonic


class _Setup:
    """The session set-up sequence for one destination (what :func:`connect` runs)."""

    def __init__(
        self, dest: Destination, lhlo_name: str, timeouts: Timeouts, pipelining: bool,
        chunking: bool, ignore_keywords: tuple[str, ...], max_line_length: int | None,
        max_reply_lines: int | None, auth: AuthPolicy | None, engine: Engine, opener: Opener,
    ) -> None:
        self.dest = dest
        self.peer = str(dest)
        self.lhlo_name = lhlo_name
        self.timeouts = timeouts
        self.pipelining = pipelining
        self.chunking = chunking
        self.ignore_keywords = ignore_keywords
        self.limits = {k: v for k, v in (("max_line_length", max_line_length),
                                         ("max_reply_lines", max_reply_lines)) if v is not None}
        self.auth = auth
        self.engine = engine
        self.opener = opener

    async def run(self, tls_policy: TLSPolicy) -> Client:
        # Whoever measures this attempt (replay, the daemon) gets each stage's time.
        trace = TRACE.get()
        clock = _clock()
        since = clock()
        peer = self.peer

        def lap(stage: str) -> None:
            nonlocal since
            if trace is not None:
                now = clock()
                trace.stage(peer, stage, now - since)
                since = now

        protocol, program = await self._open()
        lap("connect")
        try:
            greeting = await protocol.wait_greeting()
            lap("greeting")
            if greeting.code != 220:
                raise ReplyError(greeting.code, greeting.enhanced, greeting.text, "greeting")
            lhlo = await self._lhlo(protocol)
            lap("lhlo")
            tls_info = None
            caps = protocol.engine.capabilities
            if wants_starttls(tls_policy, caps is not None and caps.starttls, self.peer):
                hostname = tls_policy.hostname_for(self.dest.host)
                context = tls_policy.context()
                reply = await protocol.command("STARTTLS")
                if check_starttls_reply(tls_policy, reply, self.peer):
                    tls_info = await protocol.start_tls(context, hostname, tls_policy.verifies)
                    lap("starttls")
                    lhlo = await self._lhlo(protocol)  # only the new capabilities count
                    lap("lhlo")
            mechanism = await self._login(protocol, encrypted=tls_info is not None)
            if mechanism is not None:
                lap("auth")
        except BaseException as exc:
            protocol.abort(ServerDisconnected("session setup failed"))
            if program is not None:
                if not isinstance(exc, Exception):  # cancelled: reaped in the background
                    program.finish()
                    raise
                await protocol.wait_closed()
                await self._program_ended(program, protocol, exc)
            raise
        protocol.setup_stage = None  # the session is ready: later failures are not set-up ones
        client = Client(protocol, self.dest, greeting, lhlo, self.engine, chunking=self.chunking,
                        program=program)
        if mechanism is not None and self.auth is not None:
            client.authenticated_as = self.auth.identity
            client.auth_mechanism = mechanism.name
        return client

    @staticmethod
    async def _program_ended(program: Program, protocol: SessionProtocol,
                             exc: BaseException) -> None:
        """A program whose session failed is reaped; one that exited before
        its greeting is a connect failure that says why."""
        rc = await program.finish()
        if rc is not None and protocol.setup_stage == "greeting" and isinstance(
                exc, ServerDisconnected):
            why = f": {program.last_words}" if program.last_words else ""
            raise ConnectError(f"{program.peer} ended before its greeting with "
                               f"{program.status_text()}{why}") from exc

    async def _open(self) -> tuple[SessionProtocol, Program | None]:
        conn = self.engine.Connection(self.lhlo_name, pipelining=self.pipelining,
                                      ignore_keywords=self.ignore_keywords, **self.limits)
        return await self.opener(conn, self.timeouts, self.dest, self.peer, self.engine.name)

    @staticmethod
    async def _lhlo(protocol: SessionProtocol) -> Reply:
        reply = await protocol.command("LHLO")
        if not 200 <= reply.code < 300:
            raise ReplyError(reply.code, reply.enhanced, reply.text, "lhlo")
        return reply

    async def _login(self, protocol: SessionProtocol, *, encrypted: bool) -> Mechanism | None:
        """AUTH as the policy says; the mechanism used, or ``None``.

        Nothing happens without a policy or when the server advertises no AUTH
        (as Postfix: the server then decides whether it takes mail anyway). A
        failure is logged at WARNING with the destination, user name,
        mechanism and the server's reply, never the password, and re-raised.
        """
        policy = self.auth
        if policy is None:
            return None
        caps = protocol.engine.capabilities
        # The server's own order, for messages (Capabilities.auth is a set).
        offered = caps.keywords.get("AUTH", "").upper().split() if caps is not None else []
        if not offered:
            return None
        peer = self.peer
        try:
            mechanism = policy.select(offered, encrypted=encrypted, unix=self.dest.is_local,
                                      peer=peer)
        except AuthenticationError as exc:
            get_logger(_SASL_LOG).warning(
                "SASL authentication to %s as %s not attempted: %s", peer, policy.identity, exc)
            raise
        try:
            await authenticate(protocol.command, mechanism)
        except (ReplyError, AuthenticationError) as exc:
            get_logger(_SASL_LOG).warning(
                "SASL authentication to %s as %s with %s failed: %s", peer, policy.identity,
                mechanism.name, exc)
            raise
        return mechanism


async def deliver(
    message: Message | Delivery,
    *,
    sender: str | None = None,
    recipients: Sequence[str] | None = None,
    server: str | Destination,
    **connect_options: object,
) -> list[RecipientResult]:
    """Connect, deliver one message, QUIT. One result per recipient, in order.

    ``message`` may be a :class:`~lmtpfast.Delivery` (then without
    ``sender``/``recipients``).
    """
    if isinstance(message, Delivery):
        delivery = message
    else:
        if sender is None or recipients is None:
            raise TypeError("deliver() needs sender= and recipients= (or a Delivery)")
        delivery = Delivery.build(message, sender=sender, recipients=recipients)
    client = await connect(server, **connect_options)  # type: ignore[arg-type]
    try:
        return await client.send(delivery)
    finally:
        await client.quit()


def connect_sync(
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
    engine: str | Engine | ModuleType | None = None,
) -> SyncClient:
    """:func:`connect` on a blocking socket, without an event loop: a :class:`SyncClient`.

    The same set-up sequence, options, errors and results as :func:`connect`;
    for a program that delivers one message and exits (``lmtpfast send``, run
    by an MTA per message), where importing asyncio would cost more than the
    delivery. Not for many messages or many threads: use :class:`SyncAgent`.
    """
    from ._blocking import open_blocking, run_now

    client = run_now(_connect(
        open_blocking, destination, lhlo_name=lhlo_name, timeouts=timeouts,
        pipelining=pipelining, chunking=chunking, ignore_keywords=ignore_keywords,
        max_line_length=max_line_length, max_reply_lines=max_reply_lines, tls=tls, auth=auth,
        engine=engine))
    return SyncClient(client)


class SyncClient:
    """A blocking :class:`Client` (see :func:`connect_sync`): each call returns when done."""

    def __init__(self, client: Client) -> None:
        from ._blocking import run_now

        self._run = run_now
        #: The session underneath (its properties: ``capabilities``, ``tls``, ...).
        self.client = client

    def send(self, delivery: Delivery | str, recipients: Sequence[str] | None = None,
             message: Message | None = None, **options: Any) -> list[RecipientResult]:
        """:meth:`Client.send`, blocking."""
        return self._run(self.client.send(delivery, recipients, message, **options))

    def command(self, verb: str, argument: str | None = None) -> Reply:
        return self._run(self.client.command(verb, argument))

    def noop(self) -> Reply:
        return self._run(self.client.noop())

    def rset(self) -> Reply:
        return self._run(self.client.rset())

    def quit(self) -> None:
        """Say QUIT politely and close; errors on the way out are ignored."""
        self._run(self.client.quit())

    def abort(self) -> None:
        self.client.abort()

    @property
    def usable(self) -> bool:
        return self.client.usable

    def __getattr__(self, name: str) -> Any:
        # The read-only facts of the session (capabilities, tls, greeting, ...).
        return getattr(self.client, name)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.quit()
        else:
            self.abort()

    def __repr__(self) -> str:
        return repr(self.client).replace("lmtpfast.Client", "lmtpfast.SyncClient")
