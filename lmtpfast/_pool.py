"""A connection pool for one LMTP destination (Postfix's connection cache, lmtp(8) section 9).

>>> pool = Pool("unix:/run/dovecot/lmtp", PoolSettings(max_connections=8))   # doctest: +SKIP
>>> results = await pool.deliver("a@example.org", ["b@example.org"], message)
>>> await pool.close()

One pool serves one destination with one set of settings, so a connection
never switches back ends. It is owned by the event loop that first uses it and
takes no locks: idle connections sit on a LIFO stack (the most recently used,
warmest one is reused first, the coldest ones age out), callers that find
every slot busy wait on futures served in order.

Pipelining across callers: ``Client.send`` may be called concurrently on one
connection, and the transactions then travel back to back. The pool uses that
only when it has to: an idle connection first; else a new connection while
fewer than ``max_connections`` are open; only when the concurrency limit is
reached does a busy connection take more transactions, up to
``pipeline_depth`` in flight, before callers queue. Back ends like Dovecot
deliver one message at a time per connection (one process each), so spreading
first keeps them parallel; pipelining at the limit keeps every connection's
pipe full instead of idling a round trip between transactions. ``docs/agent.md``
has the measurements behind this choice.

A connection that saw any error, timeout, desync or cancellation is closed,
never reused (:attr:`Client.usable` says). An idle connection the server closed
is noticed when it is taken (or, if the close was still in flight, by the
transaction failing before the server answered anything) and replaced; the
caller's delivery is retried on another connection, which is safe because
nothing of the message was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from ._destination import Destination, parse_destination
from ._errors import (
    AuthenticationError,
    ConnectError,
    ConnectTimeout,
    LMTPError,
    LocalProtocolError,
    ReplyError,
    TLSError,
)
from ._results import RecipientResult, status_of
from ._sasl import AuthPolicy, Credentials
from ._session import Client, Message, connect, message_bytes
from ._settings import PoolSettings, Timeouts
from ._tls import TLSPolicy

__all__ = ["Pool", "PoolClosed", "PoolStats"]


# A transaction on a reused connection that fails before the server answered
# anything is retried this many times in all (a fresh connection normally
# takes it the second time: by then the loop has seen the other dead ones).
_MAX_ATTEMPTS = 3

# Seconds a connection being retired may take to answer QUIT before it is cut.
_QUIT_LIMIT = 5.0



@dataclass
class PoolStats:
    """Counters for tests and benchmarks (never reset)."""

    connections_opened: int = 0
    #: Transactions put on a connection that already existed (idle or pipelined).
    connections_reused: int = 0
    connections_closed: int = 0
    connect_failures: int = 0
    transactions: int = 0
    #: Transactions retried because a reused connection had died under them.
    retries: int = 0
    #: Most connections open (or being opened) at once.
    peak_connections: int = 0
    #: Idle connections found dead (closed by the server) when taken or probed.
    dead_idle: int = 0
    #: Most transactions in flight on one connection at once.
    peak_pipelined: int = 0


class PoolClosed(LMTPError):
    """The pool was closed before a connection was free."""


class _Conn:
    """A pooled connection and its bookkeeping."""

    __slots__ = ("client", "idle_since", "load", "opened_at", "pipelining", "retired", "uses")

    def __init__(self, client: Client, now: float) -> None:
        self.client = client
        self.pipelining = client.pipelining
        self.opened_at = now
        self.idle_since = now
        self.load = 0  # transactions in flight
        self.uses = 0  # transactions given to it so far (sent or still queued)
        self.retired = False  # take no new work; close when load drops to 0


# Handed to a waiter instead of a connection: "a slot is reserved for you, open one".
_SLOT: Any = object()


def _now() -> float:
    return asyncio.get_running_loop().time()  # (a pool is only used on its loop)


class Pool:
    """Connections to one destination, reused, capped at ``settings.max_connections``."""

    def __init__(
        self,
        destination: str | Destination,
        settings: PoolSettings | None = None,
        *,
        lhlo_name: str | None = None,
        timeouts: Timeouts | None = None,
        pipelining: bool = True,
        ignore_keywords: Sequence[str] = (),
        stats: PoolStats | None = None,
        tls: TLSPolicy | str | None = None,
        auth: Credentials | AuthPolicy | None = None,
    ) -> None:
        self.destination = parse_destination(destination)
        self.settings = settings or PoolSettings()
        self.stats = stats or PoolStats()
        # Every connection of a pool has this TLS policy and SASL identity;
        # they are part of its key, so a connection authenticated as one
        # user never serves another.
        self.tls = TLSPolicy.parse(tls)
        self.auth = AuthPolicy.parse(auth)
        self._connect_kwargs: dict[str, Any] = {
            "lhlo_name": lhlo_name, "timeouts": timeouts, "pipelining": pipelining,
            "ignore_keywords": tuple(ignore_keywords), "tls": self.tls, "auth": self.auth,
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[_Conn] = []  # LIFO: the end is the most recently used
        self._conns: set[_Conn] = set()  # every open connection, idle or busy
        self._opening = 0  # slots taken by connections being opened (or reserved)
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._closing_tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._deliveries = 0  # deliver() calls in progress
        self._drained: asyncio.Future[None] | None = None
        self._closed = False
        self._dest_text = str(self.destination)
        self._down_until = 0.0  # connect_backoff: no new connections before this time
        self._down_error: BaseException | None = None

    def __repr__(self) -> str:
        return (f"<lmtpfast.Pool {self._dest_text} open={len(self._conns)} "
                f"idle={len(self._idle)} waiting={len(self._waiters)}>")

    @property
    def key(self) -> tuple[Destination, TLSPolicy, str | None]:
        """What every connection here is: destination, TLS policy, SASL identity (or ``None``)."""
        return (self.destination, self.tls, self.auth.identity if self.auth else None)

    # -- state -------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Connections open or being opened."""
        return len(self._conns) + self._opening

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def closed(self) -> bool:
        return self._closed

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("a Pool belongs to the event loop that first used it")
        return loop

    # -- delivery ----------------------------------------------------------------

    async def deliver(
        self,
        sender: str,
        recipients: Sequence[str],
        message: Message,
        *,
        mail_params: Sequence[str] = (),
    ) -> list[RecipientResult]:
        """Deliver one transaction on a pooled connection; one result per recipient.

        Failures to connect, greet or say LHLO become results (transient, or
        permanent for a 5xx greeting/LHLO), not exceptions, with ``destination``
        filled. A :class:`LocalProtocolError` (bad sender or address, NUL in the
        message) still raises: nothing was sent and retrying cannot help.
        """
        if self._loop is not asyncio.get_running_loop():
            self._bind_loop()
        if self._closed:
            raise PoolClosed(f"pool for {self._dest_text} is closed")
        raw = message if type(message) is bytes else message_bytes(message)
        dest = self._dest_text
        stats = self.stats
        self._deliveries += 1
        try:
            for attempt in range(1, _MAX_ATTEMPTS + 1):
                # Most deliveries find a connection without waiting: skip the coroutine.
                got = self._acquire_nowait()
                try:
                    conn, reused = got if got is not None else await self._acquire()
                except (LMTPError, OSError) as exc:
                    if isinstance(exc, LocalProtocolError):
                        raise
                    return _failed(recipients, exc, dest)
                if conn.load > stats.peak_pipelined:
                    stats.peak_pipelined = conn.load
                ok = False
                try:
                    results = await conn.client.send(sender, recipients, raw,
                                                     mail_params=mail_params)
                    ok = True
                except LocalProtocolError:
                    ok = conn.client.usable  # nothing was sent; the connection is intact
                    raise
                except (LMTPError, OSError) as exc:
                    # The connection broke between being handed out and this
                    # send: nothing of the transaction went out.
                    if attempt < _MAX_ATTEMPTS:
                        stats.retries += 1
                        continue
                    return _failed(recipients, exc, dest)
                finally:
                    self._release(conn, ok)
                stats.transactions += 1
                if reused and attempt < _MAX_ATTEMPTS and _died_before_reply(results):
                    # The server had closed this cached connection: nothing reached it.
                    stats.retries += 1
                    continue
                replace = msgspec.structs.replace
                return [replace(r, destination=dest) for r in results]
            raise AssertionError("unreachable")
        finally:
            self._deliveries -= 1
            if self._deliveries == 0 and self._drained is not None and not self._drained.done():
                self._drained.set_result(None)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Client]:
        """Borrow a connection for commands of your own (``async with pool.connection() as c``).

        Connect errors raise here. The connection goes back to the pool unless
        it saw an error or the block raised.
        """
        self._bind_loop()
        if self._closed:
            raise PoolClosed(f"pool for {self._dest_text} is closed")
        self._deliveries += 1
        try:
            conn, _ = await self._acquire()
            ok = False
            try:
                yield conn.client
                ok = True
            finally:
                self._release(conn, ok)
        finally:
            self._deliveries -= 1
            if self._deliveries == 0 and self._drained is not None and not self._drained.done():
                self._drained.set_result(None)

    # -- acquire / release -------------------------------------------------------

    def _acquire_nowait(self) -> tuple[_Conn, bool] | None:
        """What :meth:`_acquire` gives when that needs no waiting, else ``None``."""
        if self.settings.probe != "none" or self._waiters:
            return None  # a probe needs I/O; queued callers go first
        conn = self._take_idle()
        if conn is None:
            if self.size < self.settings.max_connections:
                return None  # a new connection is opened (by _acquire)
            conn = self._share()
            if conn is None:
                return None
        self.stats.connections_reused += 1
        return conn, True

    async def _acquire(self) -> tuple[_Conn, bool]:
        """A connection with one more transaction counted on it, and whether it existed."""
        settings = self.settings
        while True:
            conn = self._take_idle()
            if conn is not None:
                if settings.probe != "none" and not await self._probe(conn):
                    continue
                self.stats.connections_reused += 1
                return conn, True
            if self.size < settings.max_connections:
                self._check_down()
                self._opening += 1
                return await self._open(), False
            conn = self._share()
            if conn is not None:
                self.stats.connections_reused += 1
                return conn, True
            got = await self._wait()
            if got is _SLOT:
                try:
                    self._check_down()
                except BaseException:
                    self._opening -= 1
                    self._slot_freed()
                    raise
                return await self._open(), False
            self.stats.connections_reused += 1
            return got, True

    def _take_idle(self) -> _Conn | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not _alive(conn.client):
                self.stats.dead_idle += 1
                self._discard(conn)
                continue
            if self._expired(conn):
                self._discard(conn)
                continue
            conn.load = 1
            conn.uses += 1
            return conn
        return None

    def _share(self) -> _Conn | None:
        """The least loaded busy connection that may take one more transaction."""
        depth = self.settings.pipeline_depth
        if depth <= 1:
            return None
        while True:
            best: _Conn | None = None
            low = depth
            for conn in self._conns:
                load = conn.load
                if 0 < load < low and conn.pipelining and not conn.retired:
                    best, low = conn, load
                    if load == 1:
                        break
            if best is None:
                return None
            if best.client.usable and not self._expired(best):
                best.load += 1
                best.uses += 1
                return best
            best.retired = True  # it takes no more; look again

    async def _wait(self) -> Any:
        fut: asyncio.Future[Any] = self._bind_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                got = fut.result()
                if got is _SLOT:
                    self._opening -= 1
                    self._slot_freed()
                else:
                    got.uses -= 1  # handed over but never used
                    self._release(got, True)
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def _check_down(self) -> None:
        """Raise the last connect failure while the destination is backed off."""
        if self._down_error is not None:
            if _now() < self._down_until:
                raise self._down_error
            self._down_error = None

    async def _open(self) -> _Conn:
        """Open a connection in the slot already counted in ``_opening``."""
        self.stats.peak_connections = max(self.stats.peak_connections, self.size)
        try:
            client = await connect(self.destination, **self._connect_kwargs)
        except BaseException as exc:
            self._opening -= 1
            if isinstance(exc, LMTPError | OSError):
                self.stats.connect_failures += 1
                if self.settings.connect_backoff > 0:
                    self._down_error = exc
                    self._down_until = _now() + self.settings.connect_backoff
            self._slot_freed()
            raise
        self._opening -= 1
        self._down_error = None
        conn = _Conn(client, _now())
        conn.load = 1
        conn.uses = 1
        self._conns.add(conn)
        self.stats.connections_opened += 1
        # Callers that queued while connections were being opened (they are
        # not shareable before LHLO) may pipeline on this one right away;
        # else they would only trickle in, one per finished transaction.
        depth = self.settings.pipeline_depth
        if conn.pipelining and depth > 1:
            waiters = self._waiters
            while waiters and conn.load < depth and not self._expired(conn):
                fut = waiters.popleft()
                if not fut.done():
                    conn.load += 1
                    conn.uses += 1
                    fut.set_result(conn)
        return conn

    async def _probe(self, conn: _Conn) -> bool:
        try:
            if self.settings.probe == "rset":
                await conn.client.rset()
            else:
                await conn.client.noop()
            return True
        except BaseException as exc:
            self.stats.dead_idle += 1
            conn.load = 0
            conn.client.abort()
            self._discard(conn)
            if not isinstance(exc, Exception):
                raise
            return False

    def _expired(self, conn: _Conn) -> bool:
        settings = self.settings
        if settings.max_transactions and conn.uses >= settings.max_transactions:
            return True
        return _now() - conn.opened_at >= settings.reuse_time_limit

    def _release(self, conn: _Conn, ok: bool) -> None:
        conn.load -= 1
        if not ok or not conn.client.usable or conn.retired or self._expired(conn):
            conn.retired = True
            if conn.load == 0:
                self._discard(conn)
            return
        # Hand the freed capacity straight to the first waiter (FIFO, no stealing).
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                conn.load += 1
                conn.uses += 1
                fut.set_result(conn)
                return
        if conn.load == 0:
            if self._closed:
                self._discard(conn)
                return
            conn.idle_since = _now()
            self._idle.append(conn)
            self._arm_sweeper()

    def _discard(self, conn: _Conn) -> None:
        """Close a connection in the background; its slot frees once it is closed."""
        if conn not in self._conns:
            return
        self._conns.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        # The slot stays counted until the socket is closed, so the server
        # never sees more than max_connections at once.
        self._opening += 1
        self.stats.connections_closed += 1
        task = asyncio.get_running_loop().create_task(self._close_conn(conn))
        self._closing_tasks.add(task)
        task.add_done_callback(self._closing_tasks.discard)

    async def _close_conn(self, conn: _Conn) -> None:
        try:
            # QUIT politely when the connection is sound (quit() only closes
            # otherwise); a server slow to answer QUIT must not hold the slot.
            async with asyncio.timeout(_QUIT_LIMIT):
                await conn.client.quit()
        except BaseException:
            conn.client.abort()
        finally:
            self._opening -= 1
            self._slot_freed()

    def _slot_freed(self) -> None:
        """A slot became free: give it to the first waiter, reserved."""
        if self.size >= self.settings.max_connections:
            return
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                self._opening += 1
                fut.set_result(_SLOT)
                return

    # -- idle expiry -------------------------------------------------------------

    def _arm_sweeper(self) -> None:
        if self._sweeper is None and self._idle:
            oldest = self._idle[0]  # LIFO: the bottom has waited longest
            self._sweeper = asyncio.get_running_loop().call_at(
                oldest.idle_since + self.settings.idle_timeout, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = _now() - self.settings.idle_timeout
        while self._idle and self._idle[0].idle_since <= cutoff:
            self._discard(self._idle[0])
        self._arm_sweeper()

    # -- closing -----------------------------------------------------------------

    async def close(self, timeout: float | None = None) -> None:
        """Stop taking deliveries, wait for those in flight, QUIT every connection.

        Deliveries still running after ``timeout`` (default
        ``settings.close_timeout``) seconds are cut off: their connections are
        aborted, so their recipients get transient results.
        """
        if self._loop is None:
            self._closed = True
            return
        self._bind_loop()
        self._closed = True
        limit = self.settings.close_timeout if timeout is None else timeout
        if self._deliveries:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), limit)
            except TimeoutError:
                for conn in list(self._conns):
                    conn.client.abort()
                for fut in self._waiters:
                    if not fut.done():
                        fut.set_exception(PoolClosed(
                            f"pool for {self._dest_text} closed before a connection was free"))
                self._waiters.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._drained), 5.0)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._conns):
            if conn.load == 0:
                self._discard(conn)
            else:
                conn.client.abort()
                self._discard(conn)
        if self._closing_tasks:
            await asyncio.gather(*self._closing_tasks, return_exceptions=True)

    async def __aenter__(self) -> Pool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _alive(client: Client) -> bool:
    """``Client.alive()`` (a poll for an unread EOF) where the client has it, else ``usable``."""
    alive = getattr(client, "alive", None)
    return bool(alive()) if alive is not None else client.usable


def _died_before_reply(results: list[RecipientResult]) -> bool:
    """True when the connection failed before the server answered this transaction at all."""
    return all(r.local and r.stage == "mail" and not r.possibly_delivered and r.transient
               for r in results)


def _failed(recipients: Sequence[str], exc: BaseException, dest: str) -> list[RecipientResult]:
    """Results for recipients that never reached a server (connect, greeting, LHLO failed)."""
    if isinstance(exc, ReplyError) and exc.stage == "auth":
        # A refused AUTH defers, as Postfix does (smtp_sasl_auth_soft_bounce):
        # credentials or the server's user database get fixed, then mail flows.
        reply = " ".join(str(p) for p in (exc.code, exc.enhanced, exc.text) if p)
        text = f"SASL authentication to {dest} failed; server said: {reply}"
        enhanced: str | None = "4.7.0"
        code, stage, local = 454, "auth", True
        if exc.transient:
            code, enhanced, local = exc.code, exc.enhanced, False
    elif isinstance(exc, AuthenticationError):
        code, enhanced, stage, local = 454, "4.7.0", "auth", True
        text = f"SASL authentication to {dest} failed: {exc}"
    elif isinstance(exc, TLSError):
        code, enhanced, stage, text, local = 454, "4.7.5", "starttls", str(exc), True
    elif isinstance(exc, ReplyError):
        code, enhanced, stage = exc.code, exc.enhanced, exc.stage or "connect"
        text = f"{dest} refused the session: {exc.code} {exc.text}".rstrip()
        local = False
    elif isinstance(exc, ConnectTimeout | ConnectError):
        code, enhanced, stage, text, local = 451, "4.4.1", "connect", str(exc), True
    elif isinstance(exc, PoolClosed):
        code, enhanced, stage, text, local = 451, "4.3.2", "connect", str(exc), True
    else:  # a timeout or a broken session during greeting/LHLO
        code, enhanced, local = 451, "4.4.2", True
        stage = getattr(exc, "stage", "") or "connect"
        text = f"session with {dest} failed: {exc}"
    if enhanced is None:
        enhanced = "5.0.0" if code >= 500 else "4.0.0"
    return [
        RecipientResult(address=r, status=status_of(code), code=code, enhanced=enhanced,
                        text=text, stage=stage, destination=dest, local=local)
        for r in recipients
    ]
