"""``Sink``: a fast LMTP server for tests, benchmarks and the demo.

Runs one :class:`~lmtpfast.server._session.ServerSession` per connection
under an ``asyncio.Protocol``: each read is handed to the session whole and
its replies go out in one ``transport.write``. Messages are discarded,
stored in a Maildir per recipient local part, and/or kept in memory
(``collect=True``) for tests to inspect.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import stat
import time
from collections.abc import Sequence
from types import TracebackType
from typing import cast

import msgspec

from .._errors import ConfigurationError
from ._faults import FaultEngine, FaultPlan
from ._session import (
    ABORT,
    CLOSE,
    DEFAULT_EXTENSIONS,
    DEFAULT_MAX_LINE_LENGTH,
    DEFAULT_MAX_RECIPIENTS,
    DEFAULT_MAX_SIZE,
    STALL,
    Delay,
    Item,
    ServerSession,
    SessionConfig,
    SinkStats,
)

__all__ = ["ReceivedMessage", "Sink"]

log = logging.getLogger("lmtpfast.sink")

_STOP_TIMEOUT = 5.0


class ReceivedMessage(msgspec.Struct, frozen=True):
    """A message as the sink received it (``collect=True``).

    ``recipients`` are those that got a 2xx reply after the content, in RCPT
    order, duplicates included; ``content`` is exactly what was decoded.
    """

    sender: str
    recipients: list[str]
    content: bytes


def _parse_listen(dest: str) -> tuple[str, str, int]:
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


class Sink:
    """An LMTP server that accepts (or, with faults, mishandles) everything.

    ``listen`` is one destination or a list (see :func:`_parse_listen`);
    after :meth:`start`, :attr:`destinations` holds the real ones, e.g.
    ``"127.0.0.1:40123"`` or ``"unix:/tmp/s"``. ``extensions`` are the LHLO
    keywords advertised *and* honoured (drop one to turn it off);
    ``max_size`` 0 means no limit. ``maildir`` stores each message once per
    accepted recipient in ``maildir/<local part>/new/``; ``collect`` keeps
    them in :attr:`messages`. ``max_connections`` > 0 refuses connections
    beyond it with ``421 4.3.2``. ``received_headers`` prepends
    ``Return-Path`` and ``Delivered-To`` to stored copies.
    """

    def __init__(
        self,
        listen: str | Sequence[str],
        *,
        maildir: str | os.PathLike[str] | None = None,
        hostname: str = "lmtpfast-sink",
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
        max_size: int = DEFAULT_MAX_SIZE,
        faults: FaultPlan | None = None,
        max_connections: int = 0,
        collect: bool = False,
        received_headers: bool = False,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
    ) -> None:
        dests = [listen] if isinstance(listen, str) else list(listen)
        if not dests:
            raise ConfigurationError("no listen destination", source="listen")
        self._listen = [_parse_listen(d) for d in dests]
        if not hostname or any(c in hostname for c in " \r\n\0"):
            raise ConfigurationError(f"bad hostname {hostname!r}", source="hostname")
        if max_size < 0 or max_connections < 0 or max_line_length < 64 or max_recipients < 1:
            raise ConfigurationError("limits must be positive", source="sink limits")
        self.maildir = os.fspath(maildir) if maildir is not None else None
        self.collect = collect
        self.received_headers = received_headers
        self.max_connections = max_connections
        self.faults = faults if faults is not None else FaultPlan()
        #: Counters; see :class:`SinkStats`.
        self.stats = SinkStats()
        #: Messages received, when ``collect`` is true.
        self.messages: list[ReceivedMessage] = []
        #: The real listen destinations, once started.
        self.destinations: list[str] = []
        self._engine = FaultEngine(self.faults)
        store = self.maildir is not None or collect
        self._config = SessionConfig(
            hostname=hostname,
            extensions=extensions,
            max_size=max_size,
            max_line_length=max_line_length,
            max_recipients=max_recipients,
            deliver=self._deliver if store else None,
            faults=self._engine,
        )
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[str] = []
        self._connections: set[_SinkProtocol] = set()
        self._created: set[str] = set()
        self._seq = itertools.count(1)
        self._host_tag = socket.gethostname().replace("/", "_").replace(":", "_") or "sink"

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start listening on every destination (all or none)."""
        if self._servers:
            return
        loop = asyncio.get_running_loop()
        try:
            for kind, where, port in self._listen:
                if kind == "unix":
                    server = await loop.create_unix_server(
                        lambda: _SinkProtocol(self), where, backlog=1024
                    )
                    self._unix_paths.append(where)
                    self.destinations.append(f"unix:{where}")
                else:
                    server = await loop.create_server(
                        lambda: _SinkProtocol(self), where, port, backlog=1024
                    )
                    sockname = server.sockets[0].getsockname()
                    self.destinations.append(_format_inet(sockname[0], sockname[1]))
                self._servers.append(server)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop listening, close every connection, remove unix sockets."""
        servers, self._servers = self._servers, []
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

    async def __aenter__(self) -> Sink:
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

    # --- storage -----------------------------------------------------------------

    def _deliver(self, sender: bytes, recipients: Sequence[bytes], content: bytes) -> list[bool]:
        if self.collect:
            self.messages.append(
                ReceivedMessage(
                    sender=_text(sender), recipients=[_text(r) for r in recipients], content=content
                )
            )
        if self.maildir is None:
            return [True] * len(recipients)
        return [self._store(sender, r, content) for r in recipients]

    def _store(self, sender: bytes, rcpt: bytes, content: bytes) -> bool:
        assert self.maildir is not None
        box = os.path.join(self.maildir, _mailbox_name(rcpt))
        try:
            if box not in self._created:
                for sub in ("tmp", "new", "cur"):
                    os.makedirs(os.path.join(box, sub), exist_ok=True)
                self._created.add(box)
            now = time.time()
            name = (
                f"{int(now)}.M{int(now * 1e6) % 1000000}P{os.getpid()}"
                f"Q{next(self._seq)}.{self._host_tag}"
            )
            tmp = os.path.join(box, "tmp", name)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if self.received_headers:
                    os.write(
                        fd, b"Return-Path: <" + sender + b">\r\nDelivered-To: " + rcpt + b"\r\n"
                    )
                view = memoryview(content)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.rename(tmp, os.path.join(box, "new", name))
        except OSError as exc:
            log.warning("cannot store message for %s: %s", _text(rcpt), exc)
            self.stats.store_errors += 1
            return False
        return True


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _mailbox_name(rcpt: bytes) -> str:
    """The Maildir folder of a recipient: its local part, made safe as a file name."""
    local = rcpt.rpartition(b"@")[0] if b"@" in rcpt else rcpt
    if local[:1] == b'"' and local[-1:] == b'"' and len(local) >= 2:
        local = local[1:-1]
    name = local.decode("utf-8", "replace").replace("/", "_").replace("\0", "_")
    if not name or name.startswith("."):
        name = "_" + name  # never "", ".", ".." or a hidden folder
    return name


class _SinkProtocol(asyncio.Protocol):
    """One connection: feeds the session, carries out its instructions in order."""

    __slots__ = (
        "_blocked",
        "_loop",
        "_queue",
        "_refused",
        "_session",
        "_sink",
        "_stats",
        "_timer",
        "_transport",
    )

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._stats = sink.stats
        self._transport: asyncio.Transport | None = None
        self._session: ServerSession | None = None
        self._refused = False
        # While a Delay runs, later items wait in _queue; after STALL/CLOSE
        # _blocked stays set and _queue is None: nothing is written again.
        self._blocked = False
        self._queue: list[Item] | None = []
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = transport = cast(asyncio.Transport, transport)
        sink = self._sink
        st = self._stats
        if sink.max_connections and st.connections_current >= sink.max_connections:
            self._refused = True
            st.connections_refused += 1
            transport.write(b"421 4.3.2 Too many connections, try again later\r\n")
            transport.close()
            return
        st.connections_total += 1
        st.connections_current += 1
        if st.connections_current > st.connections_peak:
            st.connections_peak = st.connections_current
        sink._connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                # Replies are small and latency-bound; Nagle would hold them.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._session = ServerSession(sink._config, st)
        self._dispatch(self._session.start())

    def data_received(self, data: bytes) -> None:
        session = self._session
        if session is None:
            return
        self._stats.bytes_received += len(data)
        items = session.receive_data(data)
        if items:
            if len(items) == 1 and not self._blocked:
                item = items[0]
                if type(item) is bytes:
                    assert self._transport is not None
                    self._transport.write(item)
                    return
            self._dispatch(items)

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
        self._blocked = True
        self._queue = None
        if not self._refused and self._session is not None:
            self._stats.connections_current -= 1
            self._sink._connections.discard(self)
            self._session = None

    def pause_writing(self) -> None:
        # A client that pipelines without reading replies: stop reading too,
        # so neither buffer grows without bound.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _dispatch(self, items: list[Item]) -> None:
        if self._blocked:
            if self._queue is not None:
                self._queue.extend(items)
            return
        self._run(items)

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
                self._blocked = True
                self._queue = items[i + 1 :]
                self._timer = self._loop.call_later(item.seconds, self._resume)
                return
            self._blocked = True
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
        items = self._queue or []
        self._blocked = False
        self._queue = []
        if self._transport is not None and not self._transport.is_closing():
            self._run(items)
