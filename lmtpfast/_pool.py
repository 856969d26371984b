"""A pool of connections to one LMTP destination (Postfix's connection cache, lmtp(8) section 9).

>>> async with Pool("unix:/run/dovecot/lmtp",              # doctest: +SKIP
...                 PoolSettings(max_connections=8)) as pool:
...     async with pool.acquire() as conn:
...         results = await conn.send(delivery)

A pool only pools (asyncpg's ``pool.py`` is the model): it opens connections
(``_session.connect``), hands them out, takes them back, and closes the ones
that are broken, too old, too used or idle too long. Retries and turning
failures into per-recipient results are the agent's job (``_agent.py``).

One pool serves one destination with one set of settings (TLS policy, SASL
identity), so a connection never switches back ends or users. It belongs to
the event loop that first uses it and takes no locks:

* idle connections sit on a LIFO stack: the most recently used, warmest one
  is reused first, the coldest ones age out (``idle_timeout``, checked by one
  timer, :meth:`Pool.sweep`);
* ``max_connections`` bounds the connections open or being opened; callers
  that find every slot busy wait on futures served in order;
* a connection once ``max_transactions`` were given to it, ``reuse_time_limit``
  seconds after it opened, or opened before :meth:`Pool.expire_connections`
  (a generation counter) is closed when it comes back instead of reused;
* pipelining across callers: ``Client.send`` may be called concurrently on one
  connection. The pool uses that only when it has to: an idle connection
  first; else a new one while fewer than ``max_connections`` are open; only at
  the limit does a busy connection take more callers, up to ``pipeline_depth``
  in flight, before callers queue. Back ends like Dovecot deliver one message
  at a time per connection, so spreading first keeps them parallel;
  ``docs/agent.md`` has the measurements.

A connection that saw any error, timeout, desync or cancellation is closed,
never reused (:attr:`Client.usable` says). Time comes from ``clock`` (the
loop's clock by default), so tests can age connections without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any

from ._destination import Destination, parse_destination
from ._errors import LMTPError, PoolClosed
from ._sasl import AuthPolicy, Credentials
from ._session import Client, connect
from ._settings import PoolSettings, Timeouts
from ._tls import TLSPolicy
from .proto import Engine, get_engine

__all__ = ["Pool", "PoolClosed", "PoolStats"]

# Seconds a connection being retired may take to answer QUIT before it is cut.
_QUIT_LIMIT = 5.0


@dataclass
class PoolStats:
    """Counters for tests and benchmarks (never reset)."""

    connections_opened: int = 0
    #: Times a connection that already existed was handed out (idle or pipelined).
    connections_reused: int = 0
    connections_closed: int = 0
    connect_failures: int = 0
    #: Transactions sent on this pool's connections.
    transactions: int = 0
    #: Most connections open (or being opened) at once.
    peak_connections: int = 0
    #: Idle connections found dead (closed by the server) when taken or probed.
    dead_idle: int = 0
    #: Most callers holding one connection at once (transactions pipelined on it).
    peak_pipelined: int = 0


class _Holder:
    """A pooled connection and its bookkeeping."""

    __slots__ = ("client", "exclusive", "generation", "idle_since", "load", "opened_at",
                 "pipelining", "retired", "sent", "uses")

    def __init__(self, client: Client, now: float, generation: int) -> None:
        self.client = client
        self.pipelining = client.pipelining
        self.opened_at = now
        self.idle_since = now
        self.generation = generation
        self.load = 0  # callers holding it now
        self.uses = 0  # times handed out (sent or still to send)
        self.sent = 0  # client.transactions already counted in the stats
        self.retired = False  # hand it out no more; close when load drops to 0
        self.exclusive = False  # acquire_exclusive(): shared with nobody until released


# Handed to a waiter instead of a connection: "a slot is reserved for you, open one".
_SLOT: Any = object()


class _Acquire:
    """What :meth:`Pool.acquire` returns: ``await`` it, or use it with ``async with``."""

    __slots__ = ("_client", "_pool")

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, Client]:
        return self._pool._acquire().__await__()

    async def __aenter__(self) -> Client:
        self._client = await self._pool._acquire()
        return self._client

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        client, self._client = self._client, None
        if client is not None:
            # A connection whose borrower raised is not reused: it may be mid-command.
            self._pool.release(client, reusable=et is None)


class Pool:
    """Connections to one destination, reused, at most ``settings.max_connections`` at once.

    ``connect`` options (``lhlo_name``, ``timeouts``, ``pipelining``,
    ``ignore_keywords``, ``tls``, ``auth``, ``engine``) apply to every
    connection. ``clock`` (seconds, monotonic) defaults to the event loop's.
    """

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
        engine: str | Engine | ModuleType | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.destination = parse_destination(destination)
        self.settings = settings or PoolSettings()
        self.stats = stats or PoolStats()
        # Every connection of a pool has this TLS policy and SASL identity;
        # they are part of its key, so a connection authenticated as one
        # user never serves another.
        self.tls = TLSPolicy.parse(tls)
        self.auth = AuthPolicy.parse(auth)
        self.engine = get_engine(engine)
        self._connect_kwargs: dict[str, Any] = {
            "lhlo_name": lhlo_name, "timeouts": timeouts, "pipelining": pipelining,
            "ignore_keywords": tuple(ignore_keywords), "tls": self.tls, "auth": self.auth,
            "engine": self.engine,
        }
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[_Holder] = []  # LIFO: the end is the most recently used
        self._holders: dict[Client, _Holder] = {}  # every open connection, idle or busy
        self._opening = 0  # slots taken by connections being opened, reserved or closing
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._closing_tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._generation = 0
        self._outstanding = 0  # acquisitions not yet released (or still waiting)
        self._drained: asyncio.Future[None] | None = None
        self._closed = False
        self._dest_text = str(self.destination)
        self._down_until = 0.0  # connect_backoff: no new connections before this time
        self._down_error: BaseException | None = None

    def __repr__(self) -> str:
        return (f"<lmtpfast.Pool {self._dest_text} open={len(self._holders)} "
                f"idle={len(self._idle)} waiting={len(self._waiters)}>")

    @property
    def key(self) -> tuple[Destination, TLSPolicy, str | None]:
        """What every connection here is: destination, TLS policy, SASL identity (or ``None``)."""
        return (self.destination, self.tls, self.auth.identity if self.auth else None)

    # -- state -------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Connections open, being opened or being closed."""
        return len(self._holders) + self._opening

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def closed(self) -> bool:
        return self._closed

    def _now(self) -> float:
        clock = self._clock
        if clock is not None:
            return clock()
        loop = self._loop
        return (loop or asyncio.get_running_loop()).time()

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("a Pool belongs to the event loop that first used it")

    # -- acquire / release -------------------------------------------------------

    def acquire(self) -> _Acquire:
        """A connection: ``conn = await pool.acquire()`` ... ``pool.release(conn)``,
        or ``async with pool.acquire() as conn``.

        An idle connection, a new one, or (at ``max_connections``) a busy one
        with room in its pipeline; else wait for one. Connect failures raise
        (:class:`ConnectError`, :class:`ReplyError`, :class:`TLSError`...);
        :class:`PoolClosed` once the pool is closed.
        """
        return _Acquire(self)

    #: ``async with pool.connection() as conn``: the same as :meth:`acquire`.
    connection = acquire

    def acquire_nowait(self) -> Client | None:
        """A connection if one can be had without waiting or I/O, else ``None``.

        The agent's fast path: most deliveries find an idle or shareable
        connection, and this skips a coroutine. Release it as any other.
        """
        if self._loop is not asyncio.get_running_loop():
            self._bind_loop()
        if self._closed or self.settings.probe != "none" or self._waiters:
            return None  # a probe needs I/O; queued callers go first
        holder = self._take_idle()
        if holder is None:
            if self.size < self.settings.max_connections:
                return None  # a new connection is opened (by acquire)
            holder = self._share()
            if holder is None:
                return None
        return self._hand_out(holder)

    async def acquire_exclusive(self) -> Client | None:
        """A connection nobody else sends on until it is released, or ``None``.

        An idle connection, or a new one while fewer than ``max_connections``
        are open; ``None`` when every slot is busy or callers are queued (the
        caller does without rather than wait). For a transaction held open
        across the caller's own round trips (the proxy's RCPT verification),
        which no pipelined caller may join. Connect failures raise as
        :meth:`acquire`'s do. Release it with :meth:`release`.
        """
        self._bind_loop()
        if self._closed:
            raise PoolClosed(f"pool for {self._dest_text} is closed")
        self._outstanding += 1
        holder: _Holder | None = None
        try:
            while holder is None:
                holder = self._take_idle()
                if holder is not None:
                    if self.settings.probe != "none" and not await self._probe(holder):
                        holder = None
                    continue
                if self.size >= self.settings.max_connections or self._waiters:
                    break
                self._check_down()
                self._opening += 1
                holder = await self._open(share=False)
        except BaseException:
            self._outstanding -= 1
            self._check_drained()
            raise
        self._outstanding -= 1
        if holder is None:
            self._check_drained()
            return None
        holder.exclusive = True
        holder.pipelining = False  # _share() passes it by
        return self._hand_out(holder)

    async def _acquire(self) -> Client:
        self._bind_loop()
        if self._closed:
            raise PoolClosed(f"pool for {self._dest_text} is closed")
        self._outstanding += 1  # close() waits for callers still waiting, too
        try:
            holder = await self._get()
        except BaseException:
            self._outstanding -= 1
            self._check_drained()
            raise
        self._outstanding -= 1  # _hand_out counts it again, with no await between
        return self._hand_out(holder)

    def _hand_out(self, holder: _Holder) -> Client:
        self._outstanding += 1
        stats = self.stats
        if holder.uses > 1:
            stats.connections_reused += 1
        if holder.load > stats.peak_pipelined:
            stats.peak_pipelined = holder.load
        return holder.client

    async def _get(self) -> _Holder:
        """A holder with one more caller counted on it."""
        settings = self.settings
        while True:
            holder = self._take_idle()
            if holder is not None:
                if settings.probe != "none" and not await self._probe(holder):
                    continue
                return holder
            if self.size < settings.max_connections:
                self._check_down()
                self._opening += 1
                return await self._open()
            holder = self._share()
            if holder is not None:
                return holder
            got = await self._wait()
            if got is _SLOT:
                try:
                    self._check_down()
                except BaseException:
                    self._opening -= 1
                    self._slot_freed()
                    raise
                return await self._open()
            if isinstance(got, _Holder):
                return got

    def release(self, client: Client, *, reusable: bool = True) -> None:
        """Give a connection back. ``reusable=False`` closes it (it saw something odd).

        A connection that is broken, retired, too old or too used is closed
        instead of kept; its capacity goes to the first waiter otherwise.
        """
        holder = self._holders.get(client)
        if holder is None or holder.load <= 0:
            raise ValueError(f"{client!r} was not acquired from {self!r}")
        self._outstanding -= 1
        holder.load -= 1
        if holder.exclusive:
            holder.exclusive = False
            holder.pipelining = client.pipelining
        sent = client.transactions - holder.sent
        if sent:
            self.stats.transactions += sent
            holder.sent = client.transactions
        self._put_back(holder, reusable=reusable)
        self._check_drained()

    def _put_back(self, holder: _Holder, *, reusable: bool) -> None:
        if not reusable or holder.retired or not holder.client.usable or self._expired(holder):
            holder.retired = True
            if holder.load == 0:
                self._discard(holder)
        else:
            self._give(holder)

    def _give(self, holder: _Holder) -> None:
        # The freed capacity goes straight to the first waiter (FIFO, no stealing).
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                holder.load += 1
                holder.uses += 1
                fut.set_result(holder)
                return
        if holder.load == 0:
            if self._closed:
                self._discard(holder)
                return
            holder.idle_since = self._now()
            self._idle.append(holder)
            self._arm_sweeper()

    def expire_connections(self) -> None:
        """Retire every connection open now: idle ones close at once, busy ones when released.

        New connections are opened as needed (asyncpg's generation counter:
        after a configuration or server change, nothing older is reused).
        """
        self._generation += 1
        for holder in list(self._idle):
            self._discard(holder)
        for holder in self._holders.values():
            holder.retired = True

    def _take_idle(self) -> _Holder | None:
        idle = self._idle
        while idle:
            holder = idle.pop()
            if not holder.client.alive():
                self.stats.dead_idle += 1
                self._discard(holder)
                continue
            if self._expired(holder):
                self._discard(holder)
                continue
            holder.load = 1
            holder.uses += 1
            return holder
        return None

    def _share(self) -> _Holder | None:
        """The least loaded busy connection that may take one more caller."""
        depth = self.settings.pipeline_depth
        if depth <= 1:
            return None
        while True:
            best: _Holder | None = None
            low = depth
            for holder in self._holders.values():
                load = holder.load
                if 0 < load < low and holder.pipelining and not holder.retired:
                    best, low = holder, load
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
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                got = fut.result()
                if got is _SLOT:
                    self._opening -= 1
                    self._slot_freed()
                elif isinstance(got, _Holder):
                    got.uses -= 1  # handed over but never used
                    got.load -= 1
                    self._put_back(got, reusable=True)
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def _check_down(self) -> None:
        """Raise the last connect failure while the destination is backed off."""
        if self._down_error is not None:
            if self._now() < self._down_until:
                raise self._down_error
            self._down_error = None

    async def _open(self, *, share: bool = True) -> _Holder:
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
                    self._down_until = self._now() + self.settings.connect_backoff
            self._slot_freed()
            raise
        self._opening -= 1
        self._down_error = None
        holder = _Holder(client, self._now(), self._generation)
        holder.load = 1
        holder.uses = 1
        self._holders[client] = holder
        self.stats.connections_opened += 1
        if self._closed:
            holder.retired = True
        # Callers that queued while connections were being opened (they are
        # not shareable before LHLO) may pipeline on this one right away;
        # else they would only trickle in, one per finished transaction.
        depth = self.settings.pipeline_depth
        if share and holder.pipelining and depth > 1:
            waiters = self._waiters
            while waiters and holder.load < depth and not self._expired(holder):
                fut = waiters.popleft()
                if not fut.done():
                    holder.load += 1
                    holder.uses += 1
                    fut.set_result(holder)
        return holder

    async def _probe(self, holder: _Holder) -> bool:
        try:
            if self.settings.probe == "rset":
                await holder.client.rset()
            else:
                await holder.client.noop()
            return True
        except BaseException as exc:
            self.stats.dead_idle += 1
            holder.load = 0
            holder.client.abort()
            self._discard(holder)
            if not isinstance(exc, Exception):
                raise
            return False

    def _expired(self, holder: _Holder) -> bool:
        settings = self.settings
        if holder.generation != self._generation:
            return True
        if settings.max_transactions and holder.uses >= settings.max_transactions:
            return True
        return self._now() - holder.opened_at >= settings.reuse_time_limit

    def _discard(self, holder: _Holder) -> None:
        """Close a connection in the background; its slot frees once it is closed."""
        if self._holders.pop(holder.client, None) is None:
            return
        if holder in self._idle:
            self._idle.remove(holder)
        # The slot stays counted until the socket is closed, so the server
        # never sees more than max_connections at once.
        self._opening += 1
        self.stats.connections_closed += 1
        assert self._loop is not None
        task = self._loop.create_task(self._close_conn(holder))
        self._closing_tasks.add(task)
        task.add_done_callback(self._closing_tasks.discard)

    async def _close_conn(self, holder: _Holder) -> None:
        try:
            # QUIT politely when the connection is sound (quit() only closes
            # otherwise); a server slow to answer QUIT must not hold the slot.
            async with asyncio.timeout(_QUIT_LIMIT):
                await holder.client.quit()
        except BaseException:
            holder.client.abort()
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
        if self._sweeper is None and self._idle and self._loop is not None:
            oldest = self._idle[0]  # LIFO: the bottom has waited longest
            delay = oldest.idle_since + self.settings.idle_timeout - self._now()
            self._sweeper = self._loop.call_later(max(delay, 0.0), self._on_sweep)

    def _on_sweep(self) -> None:
        self._sweeper = None
        self.sweep()

    def sweep(self) -> int:
        """Close the connections idle for ``idle_timeout`` or more; how many were closed.

        The pool's idle timer calls this; a test with an injected clock may too.
        """
        cutoff = self._now() - self.settings.idle_timeout
        closed = 0
        while self._idle and self._idle[0].idle_since <= cutoff:
            self._discard(self._idle[0])
            closed += 1
        if self._sweeper is not None and not self._idle:
            self._sweeper.cancel()
            self._sweeper = None
        self._arm_sweeper()
        return closed

    # -- closing -----------------------------------------------------------------

    def _check_drained(self) -> None:
        if (self._outstanding == 0 and self._drained is not None
                and not self._drained.done()):
            self._drained.set_result(None)

    async def close(self, timeout: float | None = None) -> None:
        """Hand out nothing more, wait for the connections in use, QUIT every connection.

        Connections still in use after ``timeout`` (default
        ``settings.close_timeout``) seconds are aborted, so their transactions
        get transient results; callers still waiting get :class:`PoolClosed`.
        """
        if self._loop is None:
            self._closed = True
            return
        self._bind_loop()
        self._closed = True
        limit = self.settings.close_timeout if timeout is None else timeout
        if self._outstanding > 0:
            self._drained = self._loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), limit)
            except TimeoutError:
                self.terminate()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._drained), 5.0)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for holder in list(self._holders.values()):
            if holder.load:
                holder.client.abort()
            self._discard(holder)
        if self._closing_tasks:
            await asyncio.gather(*self._closing_tasks, return_exceptions=True)

    def terminate(self) -> None:
        """Abort every connection at once and fail every waiter with :class:`PoolClosed`."""
        self._closed = True
        for holder in list(self._holders.values()):
            holder.client.abort()
        waiters, self._waiters = self._waiters, deque()
        for fut in waiters:
            if not fut.done():
                fut.set_exception(PoolClosed(
                    f"pool for {self._dest_text} closed before a connection was free"))

    async def __aenter__(self) -> Pool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
