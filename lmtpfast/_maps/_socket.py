"""``socketmap:`` (socketmap_table(5), netstrings) and ``tcp:`` (tcp_table(5), one line each).

``socketmap:inet:HOST:PORT:NAME`` / ``socketmap:unix:PATH:NAME``: the request
is the netstring ``NAME KEY``; the reply ``OK data``, ``NOTFOUND ``, ``TEMP
reason``, ``TIMEOUT reason`` or ``PERM reason`` (at most 100,000 bytes).

``tcp:HOST:PORT``: the request is ``get KEY\\n`` with ``%``, white space and
non-printing bytes as ``%XX``; the reply ``200 data`` (``%XX``-decoded),
``500 text`` (not found) or ``400 text`` (try again), at most 4,096 bytes.

What Postfix does and we match: keys go out with their case as given (both
types are pattern maps: no lower-casing, and routing asks them the full
address only, never ``domain`` or ``@domain``); TEMP, TIMEOUT, PERM, a 400,
a malformed reply, a timeout (100 s) or a lost connection are lookup
failures (temporary for the recipient). A connection is reused for the next
request; one that failed is closed. Each map keeps up to
``pool_size`` (4) connections, one request in flight on each.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from .._errors import ConfigurationError
from ._base import LookupResult, Map, MapError

__all__ = ["SocketMap", "TcpMap", "tcp_decode", "tcp_encode"]

_TIMEOUT = 100.0
_POOL = 4


def tcp_encode(key: str) -> str:
    """tcp_table(5) request encoding: ``%``, white space and non-printing bytes as ``%XX``."""
    out = []
    for b in key.encode("utf-8", "surrogateescape"):
        if b == 0x25 or b <= 0x20 or b >= 0x7F:
            out.append(f"%{b:02X}")
        else:
            out.append(chr(b))
    return "".join(out)


def tcp_decode(text: bytes) -> str | None:
    """Undo ``%XX``; ``None`` for a bad escape."""
    out = bytearray()
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == 0x25:
            h = text[i + 1 : i + 3]
            try:
                if len(h) != 2:
                    raise ValueError
                out.append(int(h, 16))
            except ValueError:
                return None
            i += 3
        else:
            out.append(c)
            i += 1
    return out.decode("utf-8", "surrogateescape")


class _Endpoint:
    def __init__(self, unix: str | None, host: str, port: int) -> None:
        self.unix = unix
        self.host = host
        self.port = port

    async def open(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.unix is not None:
            coro = asyncio.open_unix_connection(self.unix, limit=200_000)
        else:
            coro = asyncio.open_connection(self.host, self.port, limit=200_000)
        return await asyncio.wait_for(coro, timeout)


def _inet(text: str, source: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"expected HOST:PORT, got {text!r}", source=source)
    return host, int(port)


class _StreamMap(Map):
    fixed = False
    fold = False

    def __init__(self, name: str, endpoint: _Endpoint) -> None:
        super().__init__(name)
        self.endpoint = endpoint
        self.timeout = _TIMEOUT
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._sem: asyncio.Semaphore | None = None

    async def _ask(self, key: str) -> LookupResult:
        if self._sem is None:
            self._sem = asyncio.Semaphore(_POOL)
        async with self._sem:
            for attempt in (1, 2):
                fresh = not self._idle
                try:
                    rw = self._idle.pop() if self._idle else await self.endpoint.open(
                        self.timeout)
                except (OSError, TimeoutError) as exc:
                    return MapError(self.mapname, f"cannot connect: {type(exc).__name__}: {exc}")
                try:
                    result = await asyncio.wait_for(self._exchange(rw, key), self.timeout)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, _Bad) as exc:
                    _close(rw)
                    if attempt == 1 and not fresh and not isinstance(exc, TimeoutError | _Bad):
                        continue  # a reused connection the server had closed: once more
                    why = str(exc) if isinstance(exc, _Bad) else type(exc).__name__
                    return MapError(self.mapname, f"lookup failed: {why}")
                self._idle.append(rw)
                return result
        raise AssertionError("unreachable")

    async def _exchange(self, rw: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                        key: str) -> LookupResult:
        raise NotImplementedError

    async def lookup_many(self, keys: Sequence[str]) -> dict[str, LookupResult]:
        uniq = list(dict.fromkeys(keys))
        got = await asyncio.gather(*(self._ask(k) for k in uniq))
        out = dict(zip(uniq, got, strict=True))
        return {k: out[k] for k in keys}

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for rw in idle:
            _close(rw)

    def close_soon(self) -> None:
        idle, self._idle = self._idle, []
        for rw in idle:
            _close(rw)


class _Bad(Exception):
    pass


def _close(rw: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    with contextlib.suppress(Exception):
        rw[1].close()


class SocketMap(_StreamMap):
    """``socketmap:inet:HOST:PORT:NAME`` or ``socketmap:unix:PATH:NAME``."""

    type = "socketmap"

    def __init__(self, name: str) -> None:
        rest, colon, mapname = name.rpartition(":")
        if not colon or not mapname or not rest:
            raise ConfigurationError("expected socketmap:inet:HOST:PORT:NAME or "
                                     "socketmap:unix:PATH:NAME", source=name)
        if rest.startswith("unix:") and len(rest) > 5:
            endpoint = _Endpoint(rest[5:], "", 0)
        elif rest.startswith("inet:"):
            endpoint = _Endpoint(None, *_inet(rest[5:], name))
        else:
            raise ConfigurationError("expected socketmap:inet:HOST:PORT:NAME or "
                                     "socketmap:unix:PATH:NAME", source=name)
        super().__init__(name, endpoint)
        self.request_name = mapname

    async def _exchange(self, rw: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                        key: str) -> LookupResult:
        reader, writer = rw
        body = f"{self.request_name} {key}".encode("utf-8", "surrogateescape")
        writer.write(b"%d:%s," % (len(body), body))
        await writer.drain()
        head = await reader.readuntil(b":")
        if not head[:-1].isdigit() or len(head) > 7:
            raise _Bad("malformed netstring length")
        size = int(head[:-1])
        if size > 100_000:
            raise _Bad(f"reply of {size} bytes (over 100000)")
        data = await reader.readexactly(size + 1)
        if data[-1:] != b",":
            raise _Bad("netstring without its ','")
        reply = data[:-1].decode("utf-8", "surrogateescape")
        status, _, rest = reply.partition(" ")
        if status == "OK":
            return [rest]
        if status == "NOTFOUND":
            return None
        if status in ("TEMP", "TIMEOUT", "PERM"):
            return MapError(self.mapname, f"{status} {rest}".strip())
        raise _Bad(f"unknown reply status {status[:20]!r}")


class TcpMap(_StreamMap):
    """``tcp:HOST:PORT``."""

    type = "tcp"

    def __init__(self, name: str) -> None:
        super().__init__(name, _Endpoint(None, *_inet(name, name)))

    async def _exchange(self, rw: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                        key: str) -> LookupResult:
        reader, writer = rw
        writer.write(f"get {tcp_encode(key)}\n".encode("ascii"))
        await writer.drain()
        line = await reader.readuntil(b"\n")
        if len(line) > 4096:
            raise _Bad("reply longer than 4096 bytes")
        line = line.rstrip(b"\r\n")
        code, _, text = line.partition(b" ")
        if code == b"200":
            value = tcp_decode(text)
            if value is None:
                raise _Bad("malformed %XX encoding in the reply")
            return [value]
        if code == b"500":
            return None
        if code == b"400":
            return MapError(self.mapname, "server says try again: " +
                            text.decode("utf-8", "replace")[:200])
        raise _Bad(f"unexpected reply {line[:40]!r}")
