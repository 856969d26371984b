"""An LMTP server over asyncio: a server engine per connection, one handler for all.

:class:`Server` listens on unix and TCP sockets and runs one
:class:`~lmtpfast.server.ServerSession` (compiled, or the pure-Python
reference: ``engine=``) per connection under :class:`ServerProtocol`, which
carries out what the session returns: writes (one per read, as the engine
joins them), delays, closes, STARTTLS, and the handler's pending answers
(awaited here, then given back to the session). The sink is a ``Server``
with the sink's handler; the proxy will be one with its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import stat
from collections.abc import Mapping, Sequence
from types import ModuleType, TracebackType
from typing import Any, cast

from .._errors import ConfigurationError
from . import _session
from ._common import (
    ABORT,
    CLOSE,
    STALL,
    START_TLS,
    Delay,
    Handler,
    Item,
    Pending,
    SessionConfig,
    SinkStats,
)

__all__ = ["IMPLEMENTATION", "IMPLEMENTATIONS", "Server", "ServerProtocol", "parse_listen"]

log = logging.getLogger("lmtpfast.server")

_STOP_TIMEOUT = 5.0
# How long a connection closed with a 421 stays half-open so the client reads it.
_LINGER = 1.0


def _load_compiled() -> ModuleType | None:
    if os.environ.get("LMTPFAST_NO_EXTENSIONS") == "1":
        return None
    try:
        from . import _cserver
    except ImportError:  # not built
        return None
    return _cserver


_compiled = _load_compiled()

#: The server engines available here, by name (the tests run each).
IMPLEMENTATIONS: dict[str, ModuleType] = {"python": _session}
if _compiled is not None:
    IMPLEMENTATIONS["c"] = _compiled
#: ``"c"`` or ``"python"``: the default engine.
IMPLEMENTATION = "c" if _compiled is not None else "python"


def engine_module(engine: str | ModuleType | None) -> ModuleType:
    """The engine module for ``engine`` (``"c"``, ``"python"``, a module, or None = default)."""
    if engine is None:
        return IMPLEMENTATIONS[IMPLEMENTATION]
    if isinstance(engine, ModuleType):
        return engine
    try:
        return IMPLEMENTATIONS[engine]
    except KeyError:
        raise ConfigurationError(
            f"server engine {engine!r} is not available (have {', '.join(IMPLEMENTATIONS)})",
            source="engine",
        ) from None


def parse_listen(dest: str) -> tuple[str, str, int]:
    """A listen destination in Postfix syntax -> (``unix``|``inet``, host or path, port).

    ``unix:/path``, ``/path``, ``inet:host:port``, ``host:port``,
    ``[v6addr]:port``; port 0 picks a free one.
    """

    def bad(problem: str) -> ConfigurationError:
        return ConfigurationError(problem, source="listen", field=dest)

    d = dest.strip()
    if d.startswith("unix:"):
        path = d[5:]
        if not path:
            raise bad("empty unix socket path")
        return "unix", path, 0
    if d.startswith("/"):
        return "unix", d, 0
    if d.startswith("inet:"):
        d = d[5:]
    if d.startswith("["):
        host, sep, rest = d[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise bad("expected [address]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = d.rpartition(":")
        if not sep or ":" in host:
            raise bad("expected host:port, [v6address]:port, inet:host:port or unix:/path")
    if not host:
        raise bad("missing host (use 127.0.0.1 or [::1] for loopback)")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise bad(f"port {port_text!r} is not a number in 0..65535")
    return "inet", host, int(port_text)


def _format_inet(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Server:
    """Listen on ``listen`` (one destination or several) and serve LMTP with ``handler``.

    ``config`` is shared by every session; ``stats`` collects the counters
    (a :class:`SinkStats` unless given); ``max_connections`` > 0 refuses
    connections beyond it with ``421 4.3.2``; ``ssl_context`` is used when
    the handler accepts STARTTLS (``SessionConfig(extensions=[..., "STARTTLS"])``).
    ``idle_timeout`` (seconds, None = none) closes a connection with
    ``421 4.4.2`` when the client sent nothing for that long while the
    server waited for it (time spent waiting for the handler does not count;
    neither do stalled connections, which a fault keeps open on purpose).
    ``command_timeout`` (seconds, None = none) is a deadline, not a silence
    timer: a command line must be complete that long after the client's turn
    began (its last command, or the last answer it waited for), and while
    message content is read, each ``max_line_length`` bytes must arrive
    within it; a slow-loris client that trickles bytes gets ``421 4.4.2``
    too. ``tls_timeout`` bounds the STARTTLS handshake. ``unix_mode`` sets
    the permissions of unix sockets (``0o666`` lets Postfix's lmtp(8), user
    ``postfix``, connect). ``sockets`` maps a unix listener's path to a
    socket already bound and listening there (a parent process made it and
    forked workers that share it; :meth:`stop` leaves the path alone);
    ``reuse_port`` binds TCP listeners with ``SO_REUSEPORT``, so that
    several worker processes listen on one port and the kernel spreads the
    connections over them.
    After :meth:`start`, :attr:`destinations` holds the real destinations,
    e.g. ``"127.0.0.1:40123"`` or ``"unix:/tmp/s"``.
    """

    def __init__(
        self,
        listen: str | Sequence[str],
        handler: Handler,
        config: SessionConfig,
        *,
        stats: SinkStats | None = None,
        max_connections: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        engine: str | ModuleType | None = None,
        idle_timeout: float | None = None,
        command_timeout: float | None = None,
        tls_timeout: float | None = None,
        unix_mode: int | None = None,
        sockets: Mapping[str, socket.socket] | None = None,
        reuse_port: bool = False,
    ) -> None:
        dests = [listen] if isinstance(listen, str) else list(listen)
        if not dests:
            raise ConfigurationError("no listen destination", source="listen")
        self._listen = [parse_listen(d) for d in dests]
        if max_connections < 0:
            raise ConfigurationError("max_connections must be >= 0", source="server limits")
        if idle_timeout is not None and not idle_timeout > 0:
            raise ConfigurationError("idle_timeout must be > 0 seconds", source="server limits")
        for name, value in (("command_timeout", command_timeout), ("tls_timeout", tls_timeout)):
            if value is not None and not value > 0:
                raise ConfigurationError(f"{name} must be > 0 seconds", source="server limits")
        self.idle_timeout = idle_timeout
        self.command_timeout = command_timeout
        self.tls_timeout = tls_timeout
        self.unix_mode = unix_mode
        # Unix listeners bound and listening already (by a parent process that
        # forks workers): served as they are, never unlinked here.
        self._sockets = dict(sockets or {})
        self.reuse_port = reuse_port
        self._sweeper: asyncio.Task[None] | None = None
        self.handler = handler
        self.config = config
        self.max_connections = max_connections
        self.ssl_context = ssl_context
        #: Counters; see :class:`SinkStats`.
        self.stats = stats if stats is not None else SinkStats()
        #: The real listen destinations, once started.
        self.destinations: list[str] = []
        self._session_class: Any = engine_module(engine).ServerSession
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[str] = []
        self._connections: set[ServerProtocol] = set()

    @property
    def engine(self) -> str:
        """The server engine in use: ``"c"`` or ``"python"``."""
        return "python" if self._session_class is _session.ServerSession else "c"

    def new_session(self) -> Any:
        """A session for a new connection."""
        return self._session_class(self.config, self.handler, self.stats)

    async def start(self) -> None:
        """Start listening on every destination (all or none)."""
        if self._servers:
            return
        loop = asyncio.get_running_loop()
        try:
            for kind, where, port in self._listen:
                if kind == "unix" and where in self._sockets:
                    server = await loop.create_unix_server(
                        lambda: ServerProtocol(self), sock=self._sockets[where], backlog=1024
                    )
                    self.destinations.append(f"unix:{where}")
                elif kind == "unix":
                    with contextlib.suppress(OSError):
                        if stat.S_ISSOCK(os.stat(where).st_mode):
                            os.unlink(where)  # a stale socket of an earlier run
                    server = await loop.create_unix_server(
                        lambda: ServerProtocol(self), where, backlog=1024
                    )
                    self._unix_paths.append(where)
                    if self.unix_mode is not None:
                        os.chmod(where, self.unix_mode)
                    self.destinations.append(f"unix:{where}")
                else:
                    server = await loop.create_server(
                        lambda: ServerProtocol(self), where, port, backlog=1024,
                        reuse_port=self.reuse_port or None,
                    )
                    sockname = server.sockets[0].getsockname()
                    self.destinations.append(_format_inet(sockname[0], sockname[1]))
                self._servers.append(server)
        except BaseException:
            await self.stop()
            raise
        limits = [t for t in (self.idle_timeout, self.command_timeout) if t is not None]
        if limits:
            self._sweeper = asyncio.ensure_future(self._sweep(min(limits)))

    async def _sweep(self, shortest: float) -> None:
        # One timer for every connection: no per-read timer on the hot path.
        loop = asyncio.get_running_loop()
        idle, deadline = self.idle_timeout, self.command_timeout
        while True:
            await asyncio.sleep(max(0.02, shortest / 4))
            now = loop.time()
            for conn in list(self._connections):
                if idle is not None:
                    conn.check_idle(now, idle)
                if deadline is not None:
                    conn.check_deadline(now, deadline)

    async def stop(self) -> None:
        """Stop listening, close every connection, remove unix sockets."""
        servers, self._servers = self._servers, []
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for server in servers:
            server.close()
        for conn in list(self._connections):
            conn.abort()
        for server in servers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), _STOP_TIMEOUT)
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.unlink(path)
        self._unix_paths = []
        self.destinations = []

    async def shutdown(self, grace: float = 30.0) -> None:
        """Stop gracefully: accept nothing new, let open transactions finish.

        Connections between transactions get ``421 4.3.2`` and are closed at
        once; those in a transaction (or owed replies) as soon as they are
        between transactions, and at the latest after ``grace`` seconds;
        then :meth:`stop`.
        """
        for server in self._servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, grace)
        while True:
            for conn in list(self._connections):
                conn.close_if_idle()
            if not self._connections or loop.time() >= deadline:
                break
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        for conn in list(self._connections):
            conn.close_with_421()
        await self.stop()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def listening(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return bool(self._servers)


class ServerProtocol(asyncio.Protocol):
    """One connection: feeds the session, carries out its items in order."""

    __slots__ = (
        "_blocked",
        "_coalescing",
        "_deadline_mark",
        "_early",
        "_loop",
        "_queue",
        "_read_paused",
        "_reader",
        "_refused",
        "_seen",
        "_server",
        "_session",
        "_since",
        "_stats",
        "_timer",
        "_tls_task",
        "_transport",
        "_waits",
        "_write_paused",
        "data_received",
    )

    def __init__(self, server: Server) -> None:
        self._server = server
        self._stats = server.stats
        self._transport: asyncio.Transport | None = None
        self._refused = False
        # While a Delay runs, later items wait in _queue; after STALL/CLOSE
        # _blocked stays set and _queue is None: nothing is written again.
        self._blocked = False
        self._coalescing = False  # _blocked only until the end of this loop iteration
        self._queue: list[Item] | None = []
        self._timer: asyncio.Handle | None = None
        self._tls_task: asyncio.Future[None] | None = None
        self._waits: set[asyncio.Future[Any]] = set()
        self._read_paused = False
        self._write_paused = False
        self._loop = asyncio.get_running_loop()
        self._seen = -1  # the idle timeout: bytes received at the last sweep, and since when
        self._since = 0.0
        # The command deadline: (commands, bytes received, since when) at the
        # client's last progress.
        self._deadline_mark: tuple[int, int, float] | None = None
        # Data the TLS layer hands over before start_tls() has returned: the
        # client's first command under TLS, kept for tls_started().
        self._early: list[bytes] | None = None
        # The compiled engine brings its own data_received (the common case
        # in C: feed, then one write); set before the transport caches it.
        self._reader: Any = None
        self._session = server.new_session()
        make_reader = getattr(self._session, "reader", None)
        if make_reader is not None:
            self._reader = make_reader(self)
            self.data_received = self._reader  # type: ignore[method-assign]
        else:
            self.data_received = self._data_received  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = transport = cast(asyncio.Transport, transport)
        server = self._server
        st = self._stats
        if server.max_connections and st.connections_current >= server.max_connections:
            self._refused = True
            st.connections_refused += 1
            transport.write(b"421 4.3.2 Too many connections, try again later\r\n")
            transport.close()
            self._session = None
            return
        st.connections_total += 1
        st.connections_current += 1
        if st.connections_current > st.connections_peak:
            st.connections_peak = st.connections_current
        server._connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                # Replies are small and latency-bound; Nagle would hold them.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._reader is not None:
            self._reader.write = transport.write
        self._session.peer = transport.get_extra_info("peername")
        self._session.local = transport.get_extra_info("sockname")
        self._dispatch(self._session.start())

    def _data_received(self, data: bytes) -> None:
        session = self._session
        if session is None:
            return
        if self._early is not None:
            self._early.append(data)  # already decrypted: the session is not told of TLS yet
            return
        self._stats.bytes_received += len(data)
        items = session.receive_data(data)
        if items:
            if len(items) == 1 and not self._blocked:
                item = items[0]
                if type(item) is bytes:
                    self._transport.write(item)  # type: ignore[union-attr]
                    if session.blocked:
                        self._update_reading()
                    return
            self._dispatch(items)
        if session.blocked or self._read_paused:
            self._update_reading()

    def eof_received(self) -> bool:
        if self._blocked and self._queue is None:
            # Stalled (or already closing): nothing will ever be written again,
            # so the client's hang-up ends the connection now, not at stop().
            return False
        if self._session is not None:
            # The client may half-close and still read replies (or a delay may
            # be pending): queue the close behind them instead of closing now.
            self._dispatch(self._session.receive_data(b""))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._set_blocked(True)
        self._queue = None
        for fut in self._waits:
            fut.cancel()
        self._waits.clear()
        if not self._refused and self._session is not None:
            self._stats.connections_current -= 1
            self._server._connections.discard(self)
            session, self._session = self._session, None
            if self._reader is not None:
                self._reader.write = None  # from now on the Python path, which drops input
            session.connection_lost()

    def pause_writing(self) -> None:
        # A client that pipelines without reading replies: stop reading too,
        # so neither buffer grows without bound.
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _set_blocked(self, value: bool) -> None:
        # The compiled reader keeps its own copy: no attribute lookup per read.
        self._blocked = value
        if self._reader is not None:
            self._reader.io_blocked = value

    def check_idle(self, now: float, timeout: float) -> None:
        """The idle timeout: 421 4.4.2 after ``timeout`` seconds of silence from the client."""
        session = self._session
        if session is None:
            return
        seen = session.received
        if seen != self._seen or session.blocked or self._blocked or self._waits:
            self._seen = seen
            self._since = now
        elif now - self._since >= timeout:
            self.close_with_421(b"421 4.4.2 %s Error: timeout exceeded\r\n")

    def check_deadline(self, now: float, timeout: float) -> None:
        """The command deadline: progress (a whole command, a record of content) or 421 4.4.2."""
        session = self._session
        if session is None:
            return
        mark = self._deadline_mark
        commands, received = session.commands, session.received
        if (mark is None or session.blocked or self._blocked or self._waits
                or commands != mark[0]
                or (received - mark[1] >= self._server.config.max_line_length
                and session.in_content)):
            # Our turn (an answer owed), or the client got on: its time starts again.
            self._deadline_mark = (commands, received, now)
        elif now - mark[2] >= timeout:
            self.close_with_421(b"421 4.4.2 %s Error: timeout exceeded\r\n")

    def close_if_idle(self) -> None:
        """Shutting down: say 421 and close if no transaction is under way."""
        session = self._session
        if session is not None and session.idle and not self._blocked and not self._waits:
            self.close_with_421()

    def close_with_421(self, reply: bytes = b"421 4.3.2 %s Service shutting down\r\n") -> None:
        transport = self._transport
        if transport is None or transport.is_closing() or self._session is None:
            return
        if self._coalescing and self._timer is not None:
            self._timer.cancel()
            self._resume()  # replies already decided go out before the 421
        if not self._blocked:  # a stalled or delayed connection says nothing more
            transport.write(reply % self._server.config.hostname.encode("utf-8", "replace"))
        self._set_blocked(True)
        self._queue = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._close_after_eof(transport)

    def _close_after_eof(self, transport: asyncio.Transport) -> None:
        # Closing with the client's bytes still unread makes the kernel reset
        # the connection, and a reset can destroy the 421 before the client
        # reads it. Say EOF first and close a moment later (a lingering close).
        if not transport.can_write_eof():
            transport.close()
            return
        try:
            transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            transport.close()
            return
        transport.pause_reading()
        self._read_paused = True
        self._timer = self._loop.call_later(_LINGER, transport.close)

    # --- carrying out items -------------------------------------------------

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        session = self._session
        want = self._write_paused or (session is not None and session.blocked)
        if want and not self._read_paused:
            self._read_paused = True
            transport.pause_reading()
        elif not want and self._read_paused:
            self._read_paused = False
            transport.resume_reading()

    def _dispatch(self, items: list[Item]) -> None:
        if items and type(items[0]) is Pending:
            rest = []
            for item in items:
                if type(item) is Pending:
                    self._wait(item)
                else:
                    rest.append(item)
            items = rest
        if self._blocked:
            if self._queue is not None:
                self._queue.extend(items)
            return
        self._run(items)

    def _wait(self, pending: Pending) -> None:
        try:
            aw = pending.awaitable
            # A future (the proxy's answers) as it is; ensure_future is Python code.
            fut = aw if isinstance(aw, asyncio.Future) else asyncio.ensure_future(aw)
        except TypeError as exc:
            self._resolved(pending, None, exc)
            return
        self._waits.add(fut)

        def done(f: asyncio.Future[Any]) -> None:
            self._waits.discard(f)
            if self._session is None or f.cancelled():
                return
            exc = f.exception()
            self._resolved(pending, None if exc is not None else f.result(), exc)

        fut.add_done_callback(done)

    def _resolved(self, pending: Pending, answer: Any, exc: BaseException | None) -> None:
        session = self._session
        if session is None:
            return
        items = session.resolve(pending, answer, exc)
        if len(items) == 1 and type(items[0]) is bytes and not self._blocked:
            # A reply that came later: written at the end of this loop iteration,
            # with whatever else is answered by then (four back ends answering
            # at once cost one write). A zero-length delay keeps the order.
            self._blocked = True
            self._coalescing = True
            self._queue = [items[0]]
            self._timer = self._loop.call_soon(self._resume)
        else:
            self._dispatch(items)
        self._update_reading()

    def _run(self, items: list[Item]) -> None:
        transport = self._transport
        assert transport is not None
        pending: list[bytes] = []
        for i, item in enumerate(items):
            if type(item) is bytes:
                pending.append(item)
                continue
            if pending:
                transport.write(b"".join(pending))
                pending = []
            if isinstance(item, Delay):
                self._set_blocked(True)
                self._queue = items[i + 1 :]
                self._timer = self._loop.call_later(item.seconds, self._resume)
                return
            if item is START_TLS:
                self._set_blocked(True)
                self._queue = items[i + 1 :]
                if self._reader is not None:
                    self._reader.write = None  # the Python path, which knows about TLS
                self._tls_task = asyncio.ensure_future(self._start_tls())
                return
            if type(item) is Pending:
                self._wait(item)
                continue
            self._set_blocked(True)
            self._queue = None
            if item is CLOSE:
                transport.close()
            elif item is ABORT:
                transport.abort()
            else:
                assert item is STALL  # keep the connection open, say nothing more
            return
        if pending:
            transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def _resume(self) -> None:
        self._timer = None
        self._coalescing = False
        items = self._queue or []
        self._set_blocked(False)
        self._queue = []
        if self._transport is not None and not self._transport.is_closing():
            self._run(items)

    async def _start_tls(self) -> None:
        transport = self._transport
        ctx = self._server.ssl_context
        if transport is None or self._session is None:
            return
        if ctx is None:
            log.error("STARTTLS accepted but the server has no ssl_context")
            transport.abort()
            return
        # Plain text that came after STARTTLS went to the session, which drops
        # it (RFC 3207 6). From here on data comes through the TLS layer, which
        # may hand the client's first command over before start_tls() returns.
        self._early = []
        try:
            async with asyncio.timeout(self._server.tls_timeout):
                new = await self._loop.start_tls(transport, self, ctx, server_side=True)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("TLS handshake failed: %s", exc)
            self._early = None
            transport.abort()
            return
        if new is None or self._session is None:
            return
        self._transport = new
        if self._reader is not None:
            self._reader.write = new.write
        self._read_paused = False  # start_tls resumed reading on the new transport
        items = self._session.tls_started()
        self._resume()
        self._dispatch(items)
        early, self._early = self._early, None
        for data in early or ():
            self.data_received(data)
        self._update_reading()
