"""``Proxy``: an LMTP front end that routes every recipient to its mailbox back end.

The seed's front-end tier (LMTP_README sections 1, 6, 8, 9) as a server: it
accepts LMTP (from Postfix's lmtp(8), a content filter, another lmtpfast),
routes each recipient at RCPT time through the agent's maps, and after the
final dot sends the message once per back end (single-instance store), every
back end in parallel, over the agent's pooled, pipelined connections shared
by all client sessions. The client gets exactly one reply per accepted RCPT,
in RCPT order, each the back end's own reply for that recipient.

It is the server engine (``ServerSession``) with :class:`ProxyHandler`:

* ``rcpt``: route (from memory, or a batched lookup for every RCPT of a
  pipelined group, across sessions); a recipient the recipient map does not
  know gets ``550 5.1.1``, a map failure ``451 4.3.0`` for that recipient
  only, a route back to this proxy ``451 4.4.6``;
* ``content``: kept in memory up to ``spool_threshold`` bytes, beyond that in
  a private temp file (0600, unlinked at once), so memory stays bounded
  however big the message or slow the back ends; ``Received:`` fields of the
  header are counted on the way (``hopcount_limit`` -> ``554 5.4.6``);
* ``end_of_content``: one delivery per back end (``_backends.Backends``); each
  recipient's answer is a future its back end's result fills in. A back end
  that fails, stalls or disconnects gives its own recipients transient
  replies (the agent's per-stage timeouts and failure mapping), and never
  touches the replies of the others.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import functools
import itertools
import logging
import mmap
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Any, Final

import msgspec

from .._delivery import Delivery
from .._destination import Destination
from .._errors import ContentError, LocalProtocolError
from .._results import RecipientResult, status_of
from .._routing import Routing
from .._saslserver import Exchange, SaslUsers, Step, begin
from ._backends import Backends
from ._common import Answer, Envelope, Handler
from ._session import ServerSession

if TYPE_CHECKING:
    from .._verify import VerifiedTransaction

__all__ = [
    "DEFAULT_HOPCOUNT_LIMIT",
    "DEFAULT_SPOOL_THRESHOLD",
    "ProxyHandler",
    "ProxyRecord",
    "ProxyStats",
    "loops_to",
]

log = logging.getLogger("lmtpfast.proxy")

#: Postfix's ``hopcount_limit``: more ``Received:`` fields than this is a loop.
DEFAULT_HOPCOUNT_LIMIT: Final = 50
#: Content beyond this many bytes goes to a temp file (Dovecot's proxy: 128 KiB).
DEFAULT_SPOOL_THRESHOLD: Final = 128 * 1024
# The header is searched for Received: fields up to this size (a bound).
_HEADER_SCAN_LIMIT: Final = 256 * 1024
_RECEIVED = re.compile(rb"(?:^|\n)received:", re.IGNORECASE)

_R_BAD_UTF8 = b"553 5.6.7 Address is not valid UTF-8\r\n"
_R_NEED_AUTH = b"530 5.7.0 Authentication required\r\n"
_R_AUTH_OK = b"235 2.7.0 Authentication successful\r\n"
_R_AUTH_FAILED = b"535 5.7.8 Authentication credentials invalid\r\n"
_R_AUTH_TOO_MANY = b"421 4.7.0 Too many failed authentications, closing\r\n"
_R_NEED_ENCRYPTION = (b"538 5.7.11 Encryption required for requested authentication "
                      b"mechanism\r\n")
_R_BAD_BASE64 = b"501 5.5.2 Cannot decode the response (base64)\r\n"
# AUTH failures in one session before it is closed (a brute-force brake).
_MAX_AUTH_FAILURES = 3
_PLAINTEXT = frozenset((b"PLAIN", b"LOGIN"))
_PLAINTEXT_NAMES = frozenset(("PLAIN", "LOGIN"))


def _default_enhanced(code: int) -> str:
    return f"{code // 100}.0.0" if code // 100 in (2, 4, 5) else "4.0.0"


def reply_for(result: RecipientResult) -> bytes:
    """The LMTP reply line(s) that give a client ``result`` (code, enhanced code, text).

    A back end's 421 (it closed its session) becomes 451 here: to our client a
    421 would mean that *we* close the connection (RFC 5321 3.8).
    """
    code = result.code
    if code == 421:
        code = 451
    enh = result.enhanced or _default_enhanced(code)
    text = result.text
    if text.isprintable():
        return f"{code} {enh} {text}\r\n".encode("utf-8", "replace")
    lines = [ln.replace("\r", " ") for ln in text.split("\n")] or [""]
    out = [
        f"{code}{' ' if i == len(lines) - 1 else '-'}{enh} "
        f"{''.join(c if c.isprintable() else ' ' for c in ln)}\r\n"
        for i, ln in enumerate(lines)
    ]
    return "".join(out).encode("utf-8", "replace")


def _local(address: str, code: int, enhanced: str, text: str, stage: str) -> RecipientResult:
    return RecipientResult(address=address, status=status_of(code), code=code,
                           enhanced=enhanced, text=text, stage=stage, local=True)


def loops_to(dest: Destination, listen: Sequence[tuple[str, str, int]],
             local_names: frozenset[str]) -> bool:
    """Would delivering to ``dest`` reach one of our ``listen`` sockets?

    ``listen`` holds ``(kind, host or path, port)`` as ``parse_listen`` gives
    them; ``local_names`` the host names and addresses of this machine that a
    wildcard listener (``0.0.0.0``, ``::``) answers on.
    """
    for kind, where, port in listen:
        if kind == "unix":
            if dest.is_unix and os.path.realpath(dest.path) == os.path.realpath(where):
                return True
            continue
        if dest.is_unix or dest.port != port or port == 0:
            continue
        host = dest.host.lower()
        if host == where.lower():
            return True
        if where in ("0.0.0.0", "::", "") and host in local_names:
            return True
    return False


class ProxyStats(msgspec.Struct, kw_only=True):
    """Counters of one proxy, shared by its sessions (the server's own are in ``SinkStats``)."""

    #: Messages whose content arrived in full (final dot or BDAT LAST).
    messages: int = 0
    #: Recipients accepted at RCPT (routed to a back end).
    recipients: int = 0
    #: Recipients refused at RCPT for good (unknown user 550, ``error:`` routes).
    refused: int = 0
    #: Recipients deferred at RCPT (map failure, loop, ``retry:`` routes).
    deferred: int = 0
    #: Final replies by outcome.
    delivered: int = 0
    transient: int = 0
    permanent: int = 0
    #: Transient final replies whose back end may have delivered anyway
    #: (the connection was lost after the dot).
    possibly_delivered: int = 0
    #: Transactions sent to back ends (one per back end per message, or more
    #: past a transport's ``recipient_limit``).
    backend_deliveries: int = 0
    #: Messages refused for too many ``Received:`` fields.
    too_many_hops: int = 0
    #: Messages spooled to a temp file (content over ``spool_threshold``).
    spooled: int = 0
    #: RCPTs that needed a map lookup, and the batched rounds that answered them.
    lookups: int = 0
    lookup_rounds: int = 0
    #: Content bytes received (before the proxy's own Received: field).
    content_bytes: int = 0
    #: ``verify_recipients``: RCPTs answered by their back end at RCPT time (or by
    #: its failure), and those that went unverified (every pooled connection busy,
    #: recipient limit).
    verified: int = 0
    verify_skipped: int = 0


class ProxyRecord(msgspec.Struct, frozen=True, gc=False):
    """One recipient's outcome, for the per-recipient log line.

    ``id`` names the client transaction (also in the proxy's ``Received:``
    field); ``delay`` is the time from MAIL to this final reply; ``result``
    says what the back end (or the proxy) answered, and where
    (``result.destination``).
    """

    id: str
    client: str
    sender: str
    recipient: str
    size: int
    delay: float
    result: RecipientResult


class _Body:
    """A message's content as it arrives: in memory, or past a threshold in a temp file."""

    __slots__ = ("_map", "_view", "file", "head", "hops", "parts", "scanning", "size",
                 "spool_dir", "threshold")

    def __init__(self, header: bytes, threshold: int, spool_dir: str | None) -> None:
        self.parts: list[bytes] = [header] if header else []
        self.size = len(header)
        self.threshold = threshold
        self.spool_dir = spool_dir
        self.file: IO[bytes] | None = None
        self.head = b""
        self.hops = 0
        self.scanning = True
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.scanning:
            self._scan(chunk)
        f = self.file
        if f is not None:
            f.write(chunk)
            return
        self.parts.append(chunk)
        if self.size > self.threshold:
            self._spill()

    def _scan(self, chunk: bytes) -> None:
        # Count Received: fields in the header (up to the empty line), across chunks.
        head = self.head + chunk if self.head else chunk
        end = -1
        if head.startswith((b"\r\n", b"\n")):
            end = 0
        else:
            for sep in (b"\r\n\r\n", b"\n\n"):
                at = head.find(sep)
                if at >= 0 and (end < 0 or at < end):
                    end = at
        if end >= 0 or len(head) > _HEADER_SCAN_LIMIT:
            self.hops = len(_RECEIVED.findall(head if end < 0 else head[:end]))
            self.scanning = False
            self.head = b""
        else:
            self.head = head

    def _spill(self) -> None:
        # O_TMPFILE where available: 0600 and never visible by name.
        f = tempfile.TemporaryFile(dir=self.spool_dir)  # noqa: SIM115  (closed by release)
        f.writelines(self.parts)
        self.parts = []
        self.file = f

    @property
    def spooled(self) -> bool:
        return self.file is not None

    def finish(self) -> bytes | memoryview:
        """The whole content: bytes, or a read-only map of the temp file."""
        if self.scanning:
            self.hops = len(_RECEIVED.findall(self.head))
            self.scanning = False
            self.head = b""
        f = self.file
        if f is None:
            parts = self.parts
            return parts[0] if len(parts) == 1 else b"".join(parts)
        f.flush()
        self._map = mmap.mmap(f.fileno(), self.size, prot=mmap.PROT_READ)
        self._view = memoryview(self._map)
        return self._view

    def release(self) -> None:
        """Free the memory map and the temp file (the message is on its way or refused)."""
        self.parts = []
        view, self._view = self._view, None
        if view is not None:
            try:
                view.release()
            except BufferError:
                pass  # a slice of it is still alive somewhere: garbage collection frees it
        m, self._map = self._map, None
        if m is not None:
            try:
                m.close()
            except BufferError:
                pass
        f, self.file = self.file, None
        if f is not None:
            f.close()


class _Txn:
    """One client transaction, from MAIL to its final replies."""

    __slots__ = ("body", "id", "mail_params", "pending", "rcpt_params", "routes", "sender",
                 "started", "verified", "vrcpt")

    def __init__(self, sender: str, mail_params: list[bytes], txid: str) -> None:
        self.sender = sender
        self.mail_params = mail_params
        self.id = txid
        self.started = time.monotonic()
        self.routes: dict[int, Routing] = {}
        self.rcpt_params: dict[int, list[bytes]] = {}
        self.body: _Body | None = None
        self.pending = 0  # back-end deliveries still running (the body lives until 0)
        # verify_recipients: the back-end transactions held open for this one, and
        # for each RCPT (by index) accepted on one of them, where (its position).
        self.verified: dict[tuple[str, Destination], VerifiedTransaction] | None = None
        self.vrcpt: dict[int, tuple[VerifiedTransaction, int]] | None = None


class _Client:
    """Per-connection state (``session.context``)."""

    __slots__ = ("auth_failures", "auth_required", "auth_user", "exchange", "helo", "name",
                 "peer", "txn", "unix")

    def __init__(self, peer: Any, unix: bool, auth_required: bool) -> None:
        self.peer = peer
        self.unix = unix
        self.auth_required = auth_required
        self.helo = b""
        self.txn: _Txn | None = None
        self.exchange: Exchange | None = None  # an AUTH exchange under way
        self.auth_failures = 0
        self.auth_user: str | None = None
        if unix:
            self.name = "unix socket"
        elif isinstance(peer, tuple) and peer:
            self.name = f"[{peer[0]}]"
        else:
            self.name = "unknown"


# The key of a group of recipients verified on one back-end transaction.
_VERIFIED: Final = object()

_ids = itertools.count(1)
_ID_PREFIX = secrets.token_hex(3).upper()


def _new_id() -> str:
    """A transaction id for logs and the Received: field (unique in this process)."""
    return f"{_ID_PREFIX}{next(_ids):X}"


class ProxyHandler(Handler):
    """The proxy's behaviour on the server engine (see the module docstring).

    ``backends`` routes and delivers; ``listen`` (``parse_listen`` tuples)
    and ``local_names`` let it refuse routes back to itself; ``on_result``
    hears of every recipient's final outcome (the per-recipient log line).
    """

    def __init__(
        self,
        backends: Backends,
        *,
        hostname: str,
        stats: ProxyStats | None = None,
        listen: Sequence[tuple[str, str, int]] = (),
        local_names: frozenset[str] = frozenset(),
        hopcount_limit: int = DEFAULT_HOPCOUNT_LIMIT,
        spool_threshold: int = DEFAULT_SPOOL_THRESHOLD,
        spool_dir: str | None = None,
        received_header: bool = True,
        auth_required: str = "none",
        sasl_users: SaslUsers | None = None,
        sasl_mechanisms: Sequence[str] = (),
        sasl_plaintext: bool | None = None,
        on_result: Callable[[ProxyRecord], None] | None = None,
        verify_recipients: bool | Sequence[str] = False,
    ) -> None:
        self.backends = backends
        self.set_verify(verify_recipients)
        self.hostname = hostname
        self.stats = stats if stats is not None else ProxyStats()
        self._listen = tuple(listen)
        self._local_names = local_names
        self._loop_cache: dict[Destination, bool] = {}
        self.hopcount_limit = hopcount_limit
        self.spool_threshold = spool_threshold
        self.spool_dir = spool_dir
        self.received_header = received_header
        if auth_required not in ("none", "tcp", "always"):
            raise ValueError(f"auth_required must be none, tcp or always, not {auth_required!r}")
        self._auth_required = auth_required
        self._users = sasl_users
        self._mechanisms = frozenset(sasl_mechanisms)
        self._plaintext = sasl_plaintext
        self._lhlo_variants: dict[bytes, bytes] = {}
        self.on_result = on_result
        self._batch: list[tuple[_Txn, int, str, asyncio.Future[Answer]]] | None = None
        self._date = ("", 0)
        self._inflight: set[asyncio.Task[None]] = set()

    def set_verify(self, verify: bool | Sequence[str]) -> None:
        """``verify_recipients``: every transport (True), none (False) or these names."""
        self._verify: bool | frozenset[str] = (
            verify if isinstance(verify, bool) else frozenset(verify) or False)

    def set_listen(self, listen: Sequence[tuple[str, str, int]]) -> None:
        """The proxy's own listeners (routes to them are refused)."""
        self._listen = tuple(listen)
        self._loop_cache.clear()

    # --- connection -----------------------------------------------------------

    def _client(self, session: ServerSession) -> _Client:
        """This connection's state, made on first use from the socket's addresses."""
        ctx: _Client | None = session.context
        if ctx is None:
            unix = not isinstance(session.local, tuple)
            need = self._auth_required == "always" or (self._auth_required == "tcp" and not unix)
            ctx = session.context = _Client(session.peer, unix, need)
        return ctx

    def lhlo(self, session: ServerSession, name: bytes, default: bytes) -> Answer:
        ctx = self._client(session)
        ctx.helo = name
        if self._users is not None and not self._plaintext_ok(ctx, session):
            return self._without_plaintext(default)
        return None

    # --- AUTH (RFC 4954), checked against the users table ------------------------

    def _plaintext_ok(self, ctx: _Client, session: ServerSession) -> bool:
        """PLAIN/LOGIN here? Only under TLS or on a unix socket, unless configured."""
        if self._plaintext is not None:
            return self._plaintext
        return ctx.unix or session.tls

    def _without_plaintext(self, reply: bytes) -> bytes:
        """The LHLO reply without PLAIN and LOGIN on its AUTH line (cached)."""
        out = self._lhlo_variants.get(reply)
        if out is None:
            lines = reply.split(b"\r\n")[:-1]
            kept = []
            for ln in lines:
                if ln[4:9].upper() == b"AUTH ":
                    mechs = [m for m in ln[9:].split() if m.upper() not in _PLAINTEXT]
                    if not mechs:
                        continue
                    ln = ln[:9] + b" ".join(mechs)
                kept.append(ln[4:])
            out = b"".join((b"250 " if i == len(kept) - 1 else b"250-") + ln + b"\r\n"
                           for i, ln in enumerate(kept))
            self._lhlo_variants[reply] = out
        return out

    def auth(self, session: ServerSession, mechanism: bytes, initial: bytes | None,
             default: bytes) -> Answer:
        users = self._users
        if users is None:
            return None
        ctx = self._client(session)
        mech = mechanism.decode("ascii", "replace").upper()
        if mech not in self._mechanisms:
            return None  # 504: not offered
        if mech in _PLAINTEXT_NAMES and not self._plaintext_ok(ctx, session):
            return _R_NEED_ENCRYPTION
        exchange = begin(mech, users, self.hostname)
        if exchange is None:
            return None
        try:
            data = None if initial is None else (
                b"" if initial == b"=" else base64.b64decode(initial, validate=True))
        except (binascii.Error, ValueError):
            return _R_BAD_BASE64
        ctx.exchange = exchange
        return self._auth_step(ctx, exchange.start(data))

    def auth_line(self, session: ServerSession, line: bytes, default: bytes) -> Answer:
        ctx = self._client(session)
        exchange = ctx.exchange
        if exchange is None:
            return None
        try:
            data = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            ctx.exchange = None
            return _R_BAD_BASE64
        return self._auth_step(ctx, exchange.step(data))

    def _auth_step(self, ctx: _Client, step: Step) -> Answer:
        if step.kind == "challenge":
            return b"334 " + base64.b64encode(step.data) + b"\r\n"
        exchange, ctx.exchange = ctx.exchange, None
        mech = exchange.name if exchange is not None else "?"
        if step.kind == "success":
            ctx.auth_user = step.user
            log.info("%s: AUTH %s as %r", ctx.name, mech, step.user)
            return _R_AUTH_OK
        ctx.auth_failures += 1
        who = exchange.user if exchange is not None else None
        log.warning("%s: AUTH %s failed for %r (%d)", ctx.name, mech, who, ctx.auth_failures)
        if ctx.auth_failures >= _MAX_AUTH_FAILURES:
            return _R_AUTH_TOO_MANY
        return _R_AUTH_FAILED

    def mail(
        self, session: ServerSession, sender: bytes, params: list[bytes], default: bytes
    ) -> Answer:
        if default[:1] != b"2":
            return None
        ctx = self._client(session)
        if ctx.auth_required and not session.authenticated:
            return _R_NEED_AUTH
        try:
            addr = sender.decode("ascii") if sender.isascii() else sender.decode("utf-8")
        except UnicodeDecodeError:
            return _R_BAD_UTF8
        self._drop(ctx)
        ctx.txn = _Txn(addr, params, _new_id())
        return None

    # --- recipients -----------------------------------------------------------

    def rcpt(
        self,
        session: ServerSession,
        index: int,
        recipient: bytes,
        params: list[bytes],
        default: bytes,
    ) -> Answer | asyncio.Future[Answer]:
        if default[:1] != b"2":
            return None  # the engine refused it already (syntax, limit, SMTPUTF8)
        ctx: _Client | None = session.context
        txn = ctx.txn if ctx is not None else None
        if txn is None:
            return None
        try:
            addr = (recipient.decode("ascii") if recipient.isascii()
                    else recipient.decode("utf-8"))
        except UnicodeDecodeError:
            return _R_BAD_UTF8
        if params:
            txn.rcpt_params[index] = params
        routing = self.backends.route_now(addr)
        if routing is not None:
            return self._routed(txn, index, routing)
        # A map must be asked: every RCPT of this read (and of other sessions'
        # reads in this loop iteration) goes in one batched lookup.
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        batch = self._batch
        if batch is None:
            batch = self._batch = []
            asyncio.get_running_loop().call_soon(self._lookup_batch)
        batch.append((txn, index, addr, fut))
        self.stats.lookups += 1
        return fut

    def _lookup_batch(self) -> None:
        batch, self._batch = self._batch, None
        if batch:
            self.stats.lookup_rounds += 1
            task = asyncio.ensure_future(self._lookup(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _lookup(self, batch: list[tuple[_Txn, int, str, asyncio.Future[Answer]]]) -> None:
        try:
            routings = await self.backends.route_many([b[2] for b in batch])
        except Exception:
            log.exception("routing lookup failed")
            routings = [Routing(b[2], b[2], failure=_local(
                b[2], 451, "4.3.0", "temporary lookup failure (internal error)", "route"))
                for b in batch]
        for (txn, index, _addr, fut), routing in zip(batch, routings, strict=True):
            if not fut.done():
                answer = self._routed(txn, index, routing)
                if isinstance(answer, asyncio.Future):  # verified at its back end
                    answer.add_done_callback(functools.partial(_pass_on, fut))
                else:
                    fut.set_result(answer)

    def _routed(self, txn: _Txn, index: int, routing: Routing
                ) -> Answer | asyncio.Future[Answer]:
        """The RCPT answer for a routing (and the route kept for the dot)."""
        failure = routing.failure
        stats = self.stats
        if failure is not None:
            if failure.permanent:
                stats.refused += 1
            else:
                stats.deferred += 1
            return reply_for(failure)
        dest = routing.destination
        if dest is not None and self._listen:
            loops = self._loop_cache.get(dest)
            if loops is None:
                loops = self._loop_cache[dest] = loops_to(dest, self._listen, self._local_names)
            if loops:
                stats.deferred += 1
                log.error("route for %s points back at this proxy (%s): deferred",
                          routing.address, dest)
                return (b"451 4.4.6 Mail for <" + routing.recipient.encode("utf-8", "replace")
                        + b"> would loop back to this proxy (" + str(dest).encode() + b")\r\n")
        verify = self._verify
        if verify and (verify is True or routing.transport in verify):
            answer = self._verify_rcpt(txn, index, routing)
            if answer is not None:
                return answer
        txn.routes[index] = routing
        stats.recipients += 1
        return None

    # --- verify_recipients: the RCPT forwarded to its back end -------------------

    def _verify_rcpt(self, txn: _Txn, index: int, routing: Routing
                     ) -> asyncio.Future[Answer] | None:
        """Forward the RCPT on the back end's open transaction; None: accept unverified."""
        if routing.alternatives:
            return None  # a set that fails over is routed only (docs/proxy.md)
        if not (txn.sender.isascii() and routing.address.isascii()) or any(
                p.upper() == b"SMTPUTF8" for p in txn.mail_params):
            return None  # SMTPUTF8 is settled per back end after the dot
        dest = routing.destination
        assert dest is not None
        verified = txn.verified
        if verified is None:
            verified = txn.verified = {}
            txn.vrcpt = {}
        key = (routing.transport, dest)
        vt = verified.get(key)
        if vt is None:
            eight_bit = any(p.upper() == b"BODY=8BITMIME" for p in txn.mail_params)
            vt = verified[key] = self.backends.verified(routing, txn.sender,
                                                        eight_bit=eight_bit)
        address = routing.address
        if address in vt.addresses:
            pos = vt.addresses.index(address)  # given twice: asked once
            got = vt.future(pos)
        elif vt.unverified or vt.full:
            self.stats.verify_skipped += 1
            return None
        else:
            pos = len(vt.addresses)
            got = vt.add(address)
        out: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        got.add_done_callback(lambda f: self._verified(txn, index, routing, vt, pos, f, out))
        return out

    def _verified(self, txn: _Txn, index: int, routing: Routing, vt: VerifiedTransaction,
                  pos: int, got: asyncio.Future[RecipientResult | None],
                  out: asyncio.Future[Answer]) -> None:
        if out.done():
            return
        result = None if got.cancelled() else got.result()
        stats = self.stats
        if result is None:  # unverified after all: routed only
            stats.verify_skipped += 1
            txn.routes[index] = routing
            stats.recipients += 1
            out.set_result(None)
            return
        stats.verified += 1
        if result.status == "delivered":
            txn.routes[index] = routing
            assert txn.vrcpt is not None
            txn.vrcpt[index] = (vt, pos)
            stats.recipients += 1
        elif result.status == "permanent":
            stats.refused += 1
        else:
            stats.deferred += 1
            if result.local:
                log.warning("%s: RCPT <%s> not verified at %s: %s", txn.id, routing.recipient,
                            vt.destination, result.text)
        out.set_result(reply_for(result))

    def _abandon_verified(self, txn: _Txn, keep: frozenset[int] = frozenset()) -> None:
        """RSET the back-end transactions of ``txn`` (but those whose ids are in ``keep``)."""
        verified = txn.verified
        if not verified:
            return
        for vt in verified.values():
            if id(vt) not in keep and not vt.ended:
                task = asyncio.ensure_future(vt.abandon())
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

    # --- content --------------------------------------------------------------

    def content(self, session: ServerSession, chunk: bytes) -> None:
        ctx: _Client | None = session.context
        txn = ctx.txn if ctx is not None else None
        if txn is None:
            return
        body = txn.body
        if body is None:
            body = txn.body = self._new_body(ctx, txn)  # type: ignore[arg-type]
        self.stats.content_bytes += len(chunk)
        body.add(chunk)

    def _new_body(self, ctx: _Client, txn: _Txn) -> _Body:
        header = self._received(ctx, txn) if self.received_header else b""
        return _Body(header, self.spool_threshold, self.spool_dir)

    def _received(self, ctx: _Client, txn: _Txn) -> bytes:
        now = int(time.time())
        date, when = self._date
        if when != now:
            date = email.utils.formatdate(now, localtime=True)
            self._date = (date, now)
        helo = ctx.helo.decode("utf-8", "replace") or "unknown"
        return (f"Received: from {helo} ({ctx.name})\r\n\tby {self.hostname} (lmtpfast proxy) "
                f"with LMTP id {txn.id};\r\n\t{date}\r\n").encode("utf-8", "replace")

    def end_of_content(
        self, session: ServerSession, envelope: Envelope
    ) -> Sequence[Answer | asyncio.Future[Answer]] | None:
        ctx: _Client | None = session.context
        txn = ctx.txn if ctx is not None else None
        if ctx is not None:
            ctx.txn = None
        if txn is None:
            return None
        stats = self.stats
        stats.messages += 1
        body = txn.body
        if body is None:
            body = self._new_body(ctx, txn)  # type: ignore[arg-type]
        if envelope.too_big:
            body.release()
            self._abandon_verified(txn)
            return None  # the engine's 552 for every recipient
        content = body.finish()
        if body.spooled:
            stats.spooled += 1
        n = len(envelope.recipients)
        if body.hops >= self.hopcount_limit:
            body.release()
            self._abandon_verified(txn)
            stats.too_many_hops += 1
            stats.permanent += n
            log.warning("%s: message refused: %d Received: header fields (hopcount_limit %d)",
                        txn.id, body.hops, self.hopcount_limit)
            refusal = (b"554 5.4.6 Too many hops: %d Received: header fields (limit %d)\r\n"
                       % (body.hops, self.hopcount_limit))
            return [refusal] * n
        # One delivery per back end: recipients grouped by (transport, destination).
        groups: dict[tuple[str, Destination | None], list[int]] = {}
        routes = txn.routes
        answers: list[Answer | asyncio.Future[Answer]] = []
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Answer]] = []
        for i, rid in enumerate(envelope.rcpt_ids):
            routing = routes.get(rid)
            if routing is None:  # cannot happen: an accepted RCPT was routed
                answers.append(b"451 4.3.0 Local error: recipient lost its route\r\n")
                futures.append(None)  # type: ignore[arg-type]
                continue
            fut: asyncio.Future[Answer] = loop.create_future()
            answers.append(fut)
            futures.append(fut)
            key = (routing.transport, routing.destination)
            group = groups.get(key)
            if group is None:
                groups[key] = [i]
            else:
                group.append(i)
        vrcpt = txn.vrcpt
        if vrcpt:
            groups = self._split_verified(groups, envelope.rcpt_ids, vrcpt)
        if not groups:
            body.release()
            self._abandon_verified(txn)
            return answers
        mail_params = _backend_mail_params(txn.mail_params)
        rcpt_ids = envelope.rcpt_ids
        # One Delivery for the whole message, checked and encoded once; each
        # back end gets its part of it (the same transaction it got when a
        # Delivery was built per back end, sharing the encoded content).
        try:
            delivery: Delivery | None = self.backends.prepare(
                content, txn.sender, [routes[rid].recipient for rid in rcpt_ids
                                      if rid in routes], mail_params=mail_params)
            failure: Exception | None = None
        except Exception as exc:
            delivery, failure = None, exc
        # Positions in the Delivery skip the (impossible) unrouted recipients.
        where: dict[int, int] = {}
        for i, rid in enumerate(rcpt_ids):
            if rid in routes:
                where[i] = len(where)
        txn.pending = len(groups)
        client = ctx.name  # type: ignore[union-attr]
        used: set[int] = set()
        for key, positions in groups.items():
            verified = None
            if vrcpt and key[0] is _VERIFIED:
                vt = vrcpt[rcpt_ids[positions[0]]][0]
                used.add(id(vt))
                verified = (vt, [vrcpt[rcpt_ids[i]][1] for i in positions])
            task = loop.create_task(self._deliver(
                loop, txn, body, content, delivery, failure, [where[i] for i in positions],
                [routes[rcpt_ids[i]] for i in positions], [futures[i] for i in positions],
                client, verified))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        if txn.verified:
            self._abandon_verified(txn, frozenset(used))  # nobody left on them
        return answers

    @staticmethod
    def _split_verified(
        groups: dict[tuple[Any, Any], list[int]], rcpt_ids: Sequence[int],
        vrcpt: dict[int, tuple[VerifiedTransaction, int]],
    ) -> dict[tuple[Any, Any], list[int]]:
        """The groups with each verified back-end transaction's recipients as a group of
        its own (keyed ``(_VERIFIED, id)``): they go on that transaction, the others
        (unverified ones) the plain way."""
        out: dict[tuple[Any, Any], list[int]] = {}
        for key, positions in groups.items():
            for i in positions:
                hit = vrcpt.get(rcpt_ids[i])
                k = key if hit is None else (_VERIFIED, id(hit[0]))
                group = out.get(k)
                if group is None:
                    out[k] = [i]
                else:
                    group.append(i)
        return out

    async def _deliver(
        self,
        loop: asyncio.AbstractEventLoop,
        txn: _Txn,
        body: _Body,
        content: bytes | memoryview,
        delivery: Delivery | None,
        failure: Exception | None,
        positions: list[int],
        routings: list[Routing],
        futures: list[asyncio.Future[Answer]],
        client: str,
        verified: tuple[VerifiedTransaction, list[int]] | None = None,
    ) -> None:
        stats = self.stats
        stats.backend_deliveries += 1
        try:
            if failure is not None:
                if verified is not None:
                    await verified[0].abandon()  # nothing of it can be sent
                raise failure
            if verified is None:
                assert delivery is not None
                results = await self.backends.deliver_part(delivery, positions, routings)
            else:  # on the transaction its RCPTs were verified on
                results = await self.backends.finish_verified(
                    verified[0], content, txn.sender, routings, verified[1])
        except ContentError as exc:
            results = [_local(r.recipient, 554, "5.6.0",
                              f"message content cannot be sent: {exc}", "local")
                       for r in routings]
        except LocalProtocolError as exc:
            results = [_local(r.recipient, 553, "5.1.7", f"cannot relay this envelope: {exc}",
                              "local") for r in routings]
        except Exception as exc:  # a failure of ours: defer (the back end may have it)
            log.exception("%s: delivery to a back end failed", txn.id)
            results = [RecipientResult(address=r.recipient, status="transient", code=451,
                                       enhanced="4.3.0", text=f"local error in processing: "
                                       f"{type(exc).__name__}", stage="local", local=True,
                                       possibly_delivered=True) for r in routings]
        finally:
            txn.pending -= 1
            if txn.pending <= 0:
                del content, delivery
                body.release()
        for fut, result in zip(futures, results, strict=True):
            status = result.status
            if status == "delivered":
                stats.delivered += 1
            elif status == "permanent":
                stats.permanent += 1
            else:
                stats.transient += 1
                if result.possibly_delivered:
                    stats.possibly_delivered += 1
            if not fut.done():
                fut.set_result(reply_for(result))
        if self.on_result is not None:
            # Log after the replies are written: set_result above scheduled the
            # server's done callbacks, which schedule the write (call_soon) in
            # turn; two hops put the log lines behind it, off the client's wait.
            loop.call_soon(loop.call_soon, self._report, txn, client, body.size,
                           time.monotonic() - txn.started, results)

    def _report(self, txn: _Txn, client: str, size: int, delay: float,
                results: list[RecipientResult]) -> None:
        on_result = self.on_result
        if on_result is None:
            return
        records = [ProxyRecord(txn.id, client, txn.sender, result.address, size, delay, result)
                   for result in results]
        many = getattr(on_result, "many", None)
        if many is not None:
            try:
                many(records)
            except Exception:
                log.exception("on_result failed")
            return
        for record in records:
            try:
                on_result(record)
            except Exception:
                log.exception("on_result failed")

    # --- the transaction ends without a message ---------------------------------

    def reset(self, session: ServerSession) -> None:
        ctx: _Client | None = session.context
        if ctx is not None:
            self._drop(ctx)

    def closed(self, session: ServerSession) -> None:
        ctx: _Client | None = session.context
        if ctx is not None:
            self._drop(ctx)

    def _drop(self, ctx: _Client) -> None:
        txn, ctx.txn = ctx.txn, None
        if txn is not None and txn.body is not None and txn.pending <= 0:
            txn.body.release()
        if txn is not None and txn.verified:
            self._abandon_verified(txn)

    async def wait_idle(self) -> None:
        """Wait until every lookup and back-end delivery started so far is done."""
        while self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)


def _pass_on(fut: asyncio.Future[Answer], answer: asyncio.Future[Answer]) -> None:
    if not fut.done():
        fut.set_result(answer.result())


def _backend_mail_params(params: list[bytes]) -> list[str]:
    """The client's MAIL parameters a back end gets as they are.

    SIZE, BODY and SMTPUTF8 are set per back end from the message and what
    that back end offers; RET and ENVID are DSN (``Backends.deliver``).
    """
    del params
    return []
