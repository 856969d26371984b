"""Transport and virtual maps in Postfix's text syntax (transport(5), virtual(5)).

A map file is what ``postmap`` reads: one ``key value`` per line, ``#``
comments, blank lines ignored, a line starting with white space continues the
previous one, keys are case-insensitive. The seed's examples work verbatim::

    # /etc/postfix/transport
    domain1.name    lmtp1:unix:/path/name
    domain2.name    lmtp2:lmtp2host
    example.org     lmtp:unix:/var/imap/socket/lmtp
    foo.com         lmtp1:lmtp1host

    # /etc/postfix/virtual
    mlist@example.org   mlist@localhost

Transport lookup order for ``user+ext@sub.example.org`` (transport(5)):
``user+ext@sub.example.org``, ``user@sub.example.org`` (when a recipient
delimiter is set), ``sub.example.org``, ``.example.org``, ``.org``, ``*``;
then the default route (the seed's ``mailbox_transport``). Unlike the Postfix
of the seed, per-recipient keys work, which is what the single-instance store
of section 8 needed a virtual table for.

A transport map value is ``transport:nexthop``: ``lmtp1:unix:/path``,
``lmtp2:host`` (port 24), ``lmtp:`` (the transport's own destination),
``:host`` (the default transport), ``error:text`` (refuse for good) and
``retry:text`` (try later), as Postfix's error(8) and retry transports.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from ._destination import Destination, parse_destination
from ._errors import ConfigurationError

__all__ = [
    "ERROR_TRANSPORTS",
    "MapEntry",
    "Route",
    "TransportMap",
    "VirtualMap",
    "parse_route",
    "read_map_lines",
]

#: Transports that deliver nothing: ``error`` refuses for good, ``retry`` for now.
ERROR_TRANSPORTS = frozenset({"error", "retry"})

_TRANSPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_DOMAIN = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*")
_BAD_ADDRESS_CHARS = frozenset("\r\n\0<> \t,")
# Rewrites applied to one address at most (Postfix stops loops the same way).
MAX_REWRITES = 20


@dataclass(frozen=True, slots=True)
class Route:
    """Where a map sends a recipient: a transport name and a next hop.

    ``nexthop`` is empty when the transport's own destination applies;
    ``destination`` is it parsed (``None`` when empty or for ``error``/``retry``,
    whose ``nexthop`` is the text given to the recipient).
    """

    transport: str
    nexthop: str = ""
    destination: Destination | None = None

    def __str__(self) -> str:
        return f"{self.transport}:{self.nexthop}"


@dataclass(frozen=True, slots=True)
class MapEntry:
    """One map entry and where it was written (for error messages)."""

    key: str
    value: str
    source: str
    line: int | None


def _fail(problem: str, source: str, line: int | None) -> ConfigurationError:
    return ConfigurationError(problem, source=source, line=line)


def read_map_lines(text: str, source: str) -> Iterator[tuple[int, str, str]]:
    """``(line number, key, value)`` per logical line of a Postfix map file.

    Comment lines (first non-blank character ``#``) and blank lines are
    skipped; a line that starts with white space continues the previous
    logical line (its number is the first line's). A line without a value,
    or a continuation with nothing to continue, is a :class:`ConfigurationError`.
    """
    pending: tuple[int, str] | None = None

    def finish(start: int, logical: str) -> tuple[int, str, str]:
        parts = logical.split(None, 1)
        if len(parts) < 2:
            raise _fail(f"expected 'key value', found only {parts[0]!r} (the value is missing)",
                        source, start)
        return start, parts[0], parts[1].strip()

    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if raw[0] in " \t":
            if pending is None:
                raise _fail("continuation line (starts with white space) with no line before it",
                            source, number)
            pending = (pending[0], pending[1] + " " + stripped)
            continue
        if pending is not None:
            yield finish(*pending)
        pending = (number, stripped)
    if pending is not None:
        yield finish(*pending)


def _read_file(path: str | os.PathLike[str]) -> tuple[str, str]:
    source = os.fspath(path)
    try:
        data = Path(source).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read map file: {exc.strerror or exc}",
                                 source=source) from None
    try:
        return data.decode("utf-8"), source
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _fail("not valid UTF-8", source, line) from None


def parse_route(value: str, *, source: str = "<route>", line: int | None = None) -> Route:
    """Parse a transport map value ``transport:nexthop`` (also used for the default route)."""
    value = value.strip()
    transport, sep, nexthop = value.partition(":")
    if not sep:
        raise _fail(f"bad route {value!r}: expected 'transport:nexthop' (e.g. "
                    "'lmtp:unix:/var/imap/socket/lmtp' or 'lmtp1:')", source, line)
    transport = transport.strip().lower()
    nexthop = nexthop.strip()
    if transport and not _TRANSPORT_NAME.fullmatch(transport):
        raise _fail(f"bad transport name {transport!r} in route {value!r}", source, line)
    if transport in ERROR_TRANSPORTS:
        return Route(transport, nexthop)
    if any(c.isspace() for c in nexthop):
        raise _fail(f"white space in next hop {nexthop!r} of route {value!r}", source, line)
    dest = None
    if nexthop:
        try:
            dest = parse_destination(nexthop)
        except ConfigurationError as exc:
            raise _fail(f"bad next hop in route {value!r}: {exc.problem}", source, line) from None
    return Route(transport, nexthop, dest)


def _check_domain(domain: str, what: str, source: str, line: int | None) -> None:
    if domain.startswith("[") and domain.endswith("]"):
        return  # an address literal
    if not _DOMAIN.fullmatch(domain):
        raise _fail(f"bad {what} {domain!r}", source, line)


class _MapFile:
    """What every map shares: built from a mapping, map text or a file, entry by entry."""

    def __init__(
        self, entries: Mapping[str, str] | Iterable[MapEntry] = (), *, source: str = "<python>",
    ) -> None:
        self.source = source
        self._entries: dict[str, MapEntry] = {}
        self._clear()
        items: Iterable[MapEntry]
        if isinstance(entries, Mapping):
            items = [MapEntry(str(k), str(v), source, None) for k, v in entries.items()]
        else:
            items = entries
        for entry in items:
            self._add(entry)

    @classmethod
    def parse(cls, text: str, source: str = "<string>") -> Self:
        return cls((MapEntry(k, v, source, n) for n, k, v in read_map_lines(text, source)),
                   source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Self:
        text, source = _read_file(path)
        return cls.parse(text, source)

    def _clear(self) -> None:
        raise NotImplementedError

    def _add(self, entry: MapEntry) -> None:
        raise NotImplementedError


class TransportMap(_MapFile):
    """A transport map: recipient address or domain -> :class:`Route`.

    Build it from a file (:meth:`from_file`), from map text (:meth:`parse`)
    or from a ``{key: value}`` mapping. Keys: ``user@domain``, ``domain``,
    ``.domain`` (subdomains of domain), ``*``.
    """

    def _clear(self) -> None:
        self._routes: dict[str, Route] = {}

    def _add(self, entry: MapEntry) -> None:
        key = entry.key.strip().lower()
        src, line = entry.source, entry.line
        if not key:
            raise _fail("empty key", src, line)
        if key.startswith("@"):
            raise _fail(f"key {entry.key!r}: write the domain alone ({key[1:]!r}) to route a "
                        "whole domain, '.domain' for its subdomains", src, line)
        if key != "*":
            if _BAD_ADDRESS_CHARS & set(key):
                raise _fail(f"bad key {entry.key!r}", src, line)
            local, at, domain = key.rpartition("@")
            if at:
                if not local:
                    raise _fail(f"bad key {entry.key!r}: empty local part", src, line)
                _check_domain(domain, "domain in key", src, line)
            else:
                _check_domain(domain.removeprefix("."), "domain key", src, line)
        if key in self._entries:
            first = self._entries[key]
            where = f" (first on line {first.line})" if first.line else ""
            raise _fail(f"duplicate key {entry.key!r}{where}", src, line)
        self._routes[key] = parse_route(entry.value, source=src, line=line)
        self._entries[key] = MapEntry(key, entry.value, src, line)

    def __len__(self) -> int:
        return len(self._routes)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._routes

    def entries(self) -> list[MapEntry]:
        """Every entry with its source line, in file order."""
        return list(self._entries.values())

    def routes(self) -> Iterator[tuple[MapEntry, Route]]:
        for key, route in self._routes.items():
            yield self._entries[key], route

    def lookup(self, address: str, delimiter: str = "") -> tuple[str, Route] | None:
        """The matching key and route for ``address``, in transport(5) order, or ``None``."""
        routes = self._routes
        if not routes:
            return None
        address = address.lower()
        local, at, domain = address.rpartition("@")
        if at:
            route = routes.get(address)
            if route is not None:
                return address, route
            if delimiter and local:
                base = _strip_extension(local, delimiter)
                if base != local:
                    key = f"{base}@{domain}"
                    route = routes.get(key)
                    if route is not None:
                        return key, route
        else:
            domain = address  # a bare name: match it as a domain
        if domain:
            route = routes.get(domain)
            if route is not None:
                return domain, route
            rest = domain
            while True:
                dot = rest.find(".")
                if dot < 0:
                    break
                rest = rest[dot + 1 :]
                key = "." + rest
                route = routes.get(key)
                if route is not None:
                    return key, route
        route = routes.get("*")
        if route is not None:
            return "*", route
        return None


def _strip_extension(local: str, delimiter: str) -> str:
    cut = min((i for i in (local.find(d) for d in delimiter) if i > 0), default=-1)
    return local[:cut] if cut > 0 else local


class VirtualMap(_MapFile):
    """A virtual (rewrite) map: ``user@domain`` or ``@domain`` -> one address.

    A value ``@otherdomain`` keeps the local part (virtual(5)). Unlike
    Postfix's virtual aliases a key maps to one address only: the agent
    returns one outcome per input recipient, so one-to-many expansion is left
    to the caller. Rewriting repeats on the result (up to 20 times; an
    address that maps to itself stops it).
    """

    def _clear(self) -> None:
        self._map: dict[str, str] = {}

    def _add(self, entry: MapEntry) -> None:
        key = entry.key.strip().lower()
        value = entry.value.strip()
        src, line = entry.source, entry.line
        _, at, domain = key.rpartition("@")
        if not at or _BAD_ADDRESS_CHARS & set(key):
            raise _fail(f"bad key {entry.key!r}: expected 'user@domain' or '@domain'", src, line)
        _check_domain(domain, "domain in key", src, line)
        if not value or len(value.replace(",", " ").split()) != 1:
            raise _fail(f"key {entry.key!r} maps to {value!r}: give exactly one address (this is "
                        "a rewrite map; expand lists before delivery)", src, line)
        _, v_at, v_domain = value.rpartition("@")
        if not v_at or _BAD_ADDRESS_CHARS & set(value):
            raise _fail(f"bad address {value!r} for key {entry.key!r}: expected "
                        "'user@domain' or '@domain'", src, line)
        _check_domain(v_domain.lower(), "domain in value", src, line)
        if key in self._entries:
            first = self._entries[key]
            where = f" (first on line {first.line})" if first.line else ""
            raise _fail(f"duplicate key {entry.key!r}{where}", src, line)
        self._map[key] = value
        self._entries[key] = MapEntry(key, value, src, line)

    def __len__(self) -> int:
        return len(self._map)

    def entries(self) -> list[MapEntry]:
        return list(self._entries.values())

    def _once(self, address: str, delimiter: str) -> str | None:
        m = self._map
        low = address.lower()
        local, _, domain = address.rpartition("@")
        value = m.get(low)
        if value is None and delimiter and local:
            base = _strip_extension(local, delimiter)
            if base != local:
                value = m.get(f"{base}@{domain}".lower())
        if value is None:
            value = m.get("@" + domain.lower())
        if value is None:
            return None
        if value.startswith("@"):
            return local + value
        return value

    def rewrite(self, address: str, delimiter: str = "") -> str:
        """``address`` after rewriting; unchanged when no key matches.

        Raises :class:`ValueError` on a rewrite loop.
        """
        if not self._map or "@" not in address:
            return address
        seen = {address.lower()}
        current = address
        for _ in range(MAX_REWRITES):
            nxt = self._once(current, delimiter)
            if nxt is None or nxt.lower() == current.lower():
                return current if nxt is None else nxt
            if nxt.lower() in seen:
                raise ValueError(f"virtual map loop at {nxt!r}")
            seen.add(nxt.lower())
            current = nxt
        raise ValueError(f"more than {MAX_REWRITES} virtual map rewrites for {address!r}")
