"""A loopback TCP/unix proxy that breaks the byte stream on purpose.

The sink's fault plan (``lmtpfast.server.FaultPlan``) misbehaves at the
protocol level: a wrong reply, a hang-up instead of a reply. Some faults live
below that: the network cuts a connection in the middle of the message
content, a middlebox stalls one direction, a byte is flipped on the way.
:class:`FaultProxy` sits between a client and any LMTP server and does
exactly one such thing, at a byte count or at a marker in the stream, in
either direction::

    async with FaultProxy(sink.destinations[0],
                          fault=ProxyFault.parse("up@after:MIDDLE=cut")) as proxy:
        await lmtpfast.deliver(msg, sender=..., recipients=..., server=proxy.destination)

Spec grammar (``ProxyFault.parse``)::

    SPEC    = DIR "@" TRIGGER [ "#" N ] "=" ACTION *( "," ACTION )
    DIR     = up          (client -> server)
            | down        (server -> client)
    TRIGGER = at:BYTES    fire when that many bytes have passed in DIR (0: at once)
            | after:TEXT  fire right after the Nth occurrence of TEXT in DIR
            | before:TEXT fire right before it (TEXT and what follows are held)
    ACTION  = cut         close both sides (the peers see an orderly EOF)
            | reset       abort both sides with a TCP RST (SO_LINGER 0)
            | stall       forward nothing more either way; keep reading (and
                          dropping) so neither peer sees back-pressure
            | blackhole   stop reading from the client altogether (its writes
                          block once the socket buffers are full, as with a
                          dead peer) and close the server side
            | send-down:TEXT   write TEXT to the client (e.g. a 421 reply)
            | send-up:TEXT     write TEXT to the server
            | corrupt:TEXT     overwrite the next len(TEXT) bytes of DIR with TEXT

TEXT takes Python escapes (``\\r\\n``, ``\\x3d`` for ``=``, ``\\x2c`` for
``,``) and ``[[C*N]]`` for the character C N times (an oversized reply:
``send-down:250 [[x*9000]]\\r\\n``). ``N`` is the occurrence (default 1). Actions run in
order; after
``corrupt`` or ``send-*`` alone, forwarding goes on. The fault applies to one
accepted connection (``connection``, 1-based; 0 = every connection), so the
client's next connection goes through clean: that is how tests check that a
delivery after the fault succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

from .._destination import parse_destination
from .._errors import ConfigurationError

__all__ = ["FaultProxy", "ProxyFault"]

Direction = Literal["up", "down"]
ActionName = Literal["cut", "reset", "stall", "blackhole", "send-down", "send-up", "corrupt"]
_TERMINAL = frozenset({"cut", "reset", "stall", "blackhole"})
_CHUNK = 65536


_REPEAT = re.compile(r"\[\[(.)\*(\d{1,7})\]\]")


def _unescape(text: str, spec: str) -> bytes:
    text = _REPEAT.sub(lambda m: m[1] * int(m[2]), text)
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape").encode(
            "latin-1")
    except (UnicodeError, ValueError) as exc:
        raise ConfigurationError(f"bad escape in {text!r}: {exc}", source="proxy fault",
                                 field=spec) from None


@dataclass(frozen=True)
class ProxyFault:
    """Where the proxy breaks the stream (see the module docstring for the spec form)."""

    direction: Direction
    actions: tuple[tuple[ActionName, bytes], ...]
    at: int | None = None
    after: bytes | None = None
    before: bytes | None = None
    occurrence: int = 1
    connection: int = 1

    def __post_init__(self) -> None:
        def bad(problem: str) -> ConfigurationError:
            return ConfigurationError(problem, source="proxy fault")

        if self.direction not in ("up", "down"):
            raise bad(f"direction must be up or down, not {self.direction!r}")
        if sum(x is not None for x in (self.at, self.after, self.before)) != 1:
            raise bad("give exactly one of at, after, before")
        if self.at is not None and self.at < 0:
            raise bad("at must be >= 0")
        if (self.after is not None and not self.after) or (
                self.before is not None and not self.before):
            raise bad("empty marker")
        if self.occurrence < 1 or self.connection < 0:
            raise bad("occurrence must be >= 1 and connection >= 0")
        if not self.actions:
            raise bad("no action")
        for name, _ in self.actions:
            if name not in ("cut", "reset", "stall", "blackhole", "send-down", "send-up",
                            "corrupt"):
                raise bad(f"unknown action {name!r}")

    @property
    def marker(self) -> bytes | None:
        return self.after if self.after is not None else self.before

    @classmethod
    def parse(cls, spec: str, *, connection: int = 1) -> ProxyFault:
        """A fault from its textual form, e.g. ``down@before:250 2.0.0 <bob=corrupt:X``."""

        def bad(problem: str) -> ConfigurationError:
            return ConfigurationError(problem, source="proxy fault", field=spec)

        head, sep, tail = spec.partition("=")
        direction, sep2, trigger = head.partition("@")
        if not sep or not sep2:
            raise bad("expected DIR@TRIGGER=ACTION[,ACTION...], e.g. up@after:MIDDLE=cut")
        occurrence = 1
        trig, hash_, occ = trigger.rpartition("#")
        if hash_ and occ.isdigit():
            trigger, occurrence = trig, int(occ)
        kind, colon, value = trigger.partition(":")
        if not colon:
            raise bad(f"trigger {trigger!r}: expected at:N, after:TEXT or before:TEXT")
        kwargs: dict[str, int | bytes] = {}
        if kind == "at":
            if not value.isdigit():
                raise bad(f"at:{value!r} is not a byte count")
            kwargs["at"] = int(value)
        elif kind in ("after", "before"):
            kwargs[kind] = _unescape(value, spec)
        else:
            raise bad(f"unknown trigger {kind!r} (at, after, before)")
        actions: list[tuple[ActionName, bytes]] = []
        for part in tail.split(","):
            name, _, arg = part.strip().partition(":")
            if name in _TERMINAL and not arg:
                actions.append((name, b""))  # type: ignore[arg-type]
            elif name in ("send-down", "send-up", "corrupt") and arg:
                actions.append((name, _unescape(arg, spec)))  # type: ignore[arg-type]
            else:
                raise bad(f"bad action {part!r} (cut, reset, stall, blackhole, send-down:TEXT, "
                          "send-up:TEXT, corrupt:TEXT)")
        if direction not in ("up", "down"):
            raise bad(f"direction must be up or down, not {direction!r}")
        return cls(direction, tuple(actions), occurrence=occurrence,  # type: ignore[arg-type]
                   connection=connection, **kwargs)  # type: ignore[arg-type]


@dataclass
class ProxyStats:
    """What the proxy saw: connections accepted, open now, faults fired, bytes each way.

    Connections are numbered from 1 in the order accepted; ``fired_on`` and
    ``closed`` list such numbers (``closed`` in the order the links ended).
    """

    connections: int = 0
    open: int = 0
    fired: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    upstream_failures: int = 0
    fired_on: list[int] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)


class _Link:
    """One proxied connection: two pumps and the fault state they share."""

    def __init__(self, proxy: FaultProxy, number: int, creader: asyncio.StreamReader,
                 cwriter: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.number = number
        self.creader = creader
        self.cwriter = cwriter
        self.uwriter: asyncio.StreamWriter | None = None
        f = proxy.fault
        self.fault = f if f is not None and f.connection in (0, number) else None
        self.armed = self.fault is not None
        self.stalled = False
        self.blackholed = False
        self.done = False
        self.passed = {"up": 0, "down": 0}
        self.seen = 0  # occurrences of the marker so far
        self.carry = b""  # the last len(marker)-1 bytes forwarded in the fault's direction

    async def run(self) -> None:
        proxy = self.proxy
        up = proxy.upstream
        try:
            if up.is_unix:
                ureader, uwriter = await asyncio.open_unix_connection(up.path)
            else:
                ureader, uwriter = await asyncio.open_connection(up.host, up.port)
        except OSError:
            proxy.stats.upstream_failures += 1
            self._close(self.cwriter, rst=False)
            return
        self.uwriter = uwriter
        try:
            fault = self.fault
            if fault is not None and fault.at == 0:
                await self._fire(fault.direction, b"")
            await asyncio.gather(
                self._pump(self.creader, "up"),
                self._pump(ureader, "down"),
            )
            if self.blackholed:
                await self._until_client_hangs_up()
        finally:
            self._close_both(rst=False)

    async def _until_client_hangs_up(self) -> None:
        """Blackhole: the client's data is never read, so poll for its hang-up instead."""
        sock = self.cwriter.get_extra_info("socket")
        if sock is None:
            await asyncio.get_running_loop().create_future()  # until stop()
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        while not poller.poll(0):
            await asyncio.sleep(0.02)

    def _writer(self, direction: Direction) -> asyncio.StreamWriter:
        if direction == "up":
            assert self.uwriter is not None
            return self.uwriter
        return self.cwriter

    async def _pump(self, reader: asyncio.StreamReader, direction: Direction) -> None:
        stats = self.proxy.stats
        while not self.done and not self.blackholed:
            try:
                chunk = await reader.read(_CHUNK)
            except (ConnectionError, OSError):
                break
            if not chunk:
                break
            if direction == "up":
                stats.bytes_up += len(chunk)
            else:
                stats.bytes_down += len(chunk)
            if self.stalled:
                continue  # read and drop: the peer must not see back-pressure either
            fault = self.fault
            if direction == "up" and self.proxy.intercept and not (
                    self.armed and fault is not None and fault.direction == "up"
                    and self._trigger_pos(fault, chunk, peek=True) is not None):
                answer = self._intercepted(chunk)
                if answer is not None:
                    self.cwriter.write(answer)
                    continue
            if self.armed and fault is not None and fault.direction == direction:
                pos = self._trigger_pos(fault, chunk)
                if pos is not None:
                    self._forward(direction, chunk[:pos])
                    rest = await self._fire(direction, chunk[pos:])
                    if rest:
                        self._forward(direction, rest)
                    continue
                self._remember(fault, chunk)
            self._forward(direction, chunk)
        # One side closed (or the proxy cut): end the other one too. During a
        # stall only the client's close counts: the client must keep waiting.
        if self.blackholed:
            return
        if not self.stalled or direction == "up":
            self.done = True
            self._close_both(rst=False)

    def _intercepted(self, chunk: bytes) -> bytes | None:
        """The proxy's own reply when ``chunk`` is one intercepted command line."""
        if not chunk.endswith(b"\r\n") or chunk.count(b"\n") != 1:
            return None
        head = chunk[:16].upper()
        for prefix, reply in self.proxy.intercept:
            if head.startswith(prefix):
                return reply
        return None

    def _trigger_pos(self, fault: ProxyFault, chunk: bytes, peek: bool = False) -> int | None:
        """Where in ``chunk`` the fault fires, or None if not in this chunk.

        ``peek`` asks without counting marker occurrences.
        """
        if peek:
            seen, carry = self.seen, self.carry
            try:
                return self._trigger_pos(fault, chunk)
            finally:
                self.seen, self.carry = seen, carry
        passed = self.passed[fault.direction]
        if fault.at is not None:
            if passed <= fault.at < passed + len(chunk):
                return fault.at - passed
            return None
        marker = fault.marker
        assert marker is not None
        data = self.carry + chunk
        start = 0
        while True:
            i = data.find(marker, start)
            if i < 0:
                return None
            start = i + 1
            self.seen += 1
            if self.seen == fault.occurrence:
                end = i + len(marker) if fault.after is not None else i
                return max(0, end - len(self.carry))

    def _remember(self, fault: ProxyFault, chunk: bytes) -> None:
        marker = fault.marker
        if marker is not None and len(marker) > 1:
            # Keep what may begin a marker split across reads (already counted
            # occurrences in it cannot match again: they are whole).
            self.carry = (self.carry + chunk)[-(len(marker) - 1):]

    def _forward(self, direction: Direction, data: bytes) -> None:
        if not data or self.done:
            return
        self.passed[direction] += len(data)
        if self.proxy.record:
            self.proxy._log(self.number, direction, data)
        w = self._writer(direction)
        if not w.is_closing():
            w.write(data)

    async def _fire(self, direction: Direction, rest: bytes) -> bytes:
        """Carry out the fault's actions; returns what of ``rest`` still goes through."""
        fault = self.fault
        assert fault is not None
        self.armed = False
        stats = self.proxy.stats
        stats.fired += 1
        stats.fired_on.append(self.number)
        for name, arg in fault.actions:
            if name == "corrupt":
                rest = arg + rest[len(arg):]
            elif name == "send-down":
                self.cwriter.write(arg)
                if self.proxy.record:
                    self.proxy._log(self.number, "down", arg)
            elif name == "send-up":
                assert self.uwriter is not None
                self.uwriter.write(arg)
                if self.proxy.record:
                    self.proxy._log(self.number, "up", arg)
            elif name == "stall":
                self.stalled = True
                return b""
            elif name == "blackhole":
                self.blackholed = True
                if self.uwriter is not None:
                    self._close(self.uwriter, rst=False)
                return b""
            elif name in ("cut", "reset"):
                # Let what was written so far leave before the close.
                for w in (self.cwriter, self.uwriter):
                    if w is not None and name == "cut":
                        with contextlib.suppress(ConnectionError, OSError):
                            await asyncio.wait_for(w.drain(), 1.0)
                self.done = True
                self._close_both(rst=name == "reset")
                return b""
        return rest

    def _close_both(self, *, rst: bool) -> None:
        self._close(self.cwriter, rst=rst)
        if self.uwriter is not None:
            self._close(self.uwriter, rst=rst)

    @staticmethod
    def _close(writer: asyncio.StreamWriter, *, rst: bool) -> None:
        if rst:
            sock = writer.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        if not writer.is_closing():
            writer.close()


def _parse_listen(listen: str) -> tuple[str, str, int]:
    """``unix:/path`` or ``host:port`` (port 0: any free one) -> (kind, where, port)."""
    if listen.startswith("unix:") or listen.startswith("/"):
        path = listen.removeprefix("unix:")
        if not path:
            raise ConfigurationError("empty socket path", source="proxy listen")
        return "unix", path, 0
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigurationError(f"expected host:port or unix:/path, not {listen!r}",
                                 source="proxy listen")
    return "inet", host.strip("[]"), int(port)


class FaultProxy:
    """Forwards connections from :attr:`destination` to ``upstream``, breaking one on purpose.

    ``listen`` is ``127.0.0.1:0`` (a free port) by default, or ``unix:/path``.
    ``fault`` is a :class:`ProxyFault` or its spec string; ``None`` forwards
    everything untouched. :attr:`stats` counts connections and fired faults;
    ``record=True`` keeps every byte for :meth:`transcript`.

    ``intercept`` lets the proxy stand in for an extension the server lacks:
    ``[(b"AUTH ", b"235 2.7.0 OK\r\n")]`` answers every client line that
    starts with ``AUTH `` (case-insensitive) itself, and the server never sees
    it. Only for commands a client sends alone (AUTH, STARTTLS), checked after
    the fault, so a fault on such a line still fires.
    """

    def __init__(self, upstream: str, *, fault: ProxyFault | str | None = None,
                 listen: str = "127.0.0.1:0", record: bool = False,
                 intercept: Sequence[tuple[bytes, bytes]] = ()) -> None:
        self.upstream = parse_destination(upstream)
        self.fault = ProxyFault.parse(fault) if isinstance(fault, str) else fault
        self._listen = _parse_listen(listen)
        self.stats = ProxyStats()
        self.record = record
        self.intercept = tuple((prefix.upper(), reply) for prefix, reply in intercept)
        self._transcripts: dict[tuple[int, str], bytearray] = {}
        self.destination = ""
        self._server: asyncio.AbstractServer | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def transcript(self, connection: int, direction: Direction) -> bytes:
        """What went through connection ``connection`` (1-based) towards ``direction``
        (``record=True`` only): ``up`` is what the server got, ``down`` what the client got."""
        return bytes(self._transcripts.get((connection, direction), b""))

    def _log(self, connection: int, direction: Direction, data: bytes) -> None:
        self._transcripts.setdefault((connection, direction), bytearray()).extend(data)

    async def start(self) -> FaultProxy:
        if self._server is not None:
            return self
        kind, where, port = self._listen
        if kind == "unix":
            self._server = await asyncio.start_unix_server(self._accept, where)
            self.destination = f"unix:{where}"
        else:
            self._server = await asyncio.start_server(self._accept, where, port)
            host, port = self._server.sockets[0].getsockname()[:2]
            self.destination = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for link in list(self._links):
            link.done = True
            link._close_both(rst=False)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        if self._listen[0] == "unix":
            with contextlib.suppress(OSError):
                os.unlink(self._listen[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        self.stats.open += 1
        link = _Link(self, self.stats.connections, reader, writer)
        self._links.add(link)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await link.run()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            self._links.discard(link)
            self.stats.open -= 1
            self.stats.closed.append(link.number)
            if task is not None:
                self._tasks.discard(task)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
