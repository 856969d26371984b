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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from ._destination import DEFAULT_PORT, Destination, DestinationSet, parse_destination
from ._errors import ConfigurationError
from ._failures import (
    ALIAS_LOOP,
    BAD_RECIPIENT,
    ERROR_TRANSPORT,
    MAP_FAILURE,
    NO_DESTINATION,
    NO_ROUTE,
    NO_ROUTE_BOUNCE,
    RETRY_TRANSPORT,
    UNKNOWN_RECIPIENT,
)
from ._maps import (
    NOT_CACHED,
    Map,
    MapError,
    TextMap,
    as_text,
    gather_lookups,
    map_failure,
    open_map,
)
from ._results import RecipientResult, status_of
from .proto._common import address_problem

__all__ = [
    "ERROR_TRANSPORTS",
    "MapEntry",
    "Route",
    "Router",
    "Routing",
    "TransportMap",
    "VirtualMap",
    "as_maps",
    "parse_route",
    "read_map_lines",
]

#: Transports that deliver nothing: ``error`` refuses for good, ``retry`` for now.
ERROR_TRANSPORTS = frozenset({"error", "retry"})

_TRANSPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_DOMAIN = re.compile(rf"(?:{_LABEL})(?:\.{_LABEL})*")
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

    def as_map(self) -> Map:
        """This map as a ``texthash:`` :class:`~lmtpfast._maps.Map` (checked entries, raw
        values)."""
        m = getattr(self, "_as_map", None)
        if m is None:
            m = TextMap(self.source, entries={k: e.value for k, e in self._entries.items()})
            self._as_map = m
        return m


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


# -- routing over any TYPE:NAME map ---------------------------------------------------------

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)")
#: Lookup rounds one routing may take (virtual rewrites, recipient check, transport).
_MAX_ROUNDS = MAX_REWRITES + 4


@dataclass(frozen=True, slots=True)
class Routing:
    """How one recipient was routed (see :meth:`lmtpfast.Agent.route`).

    ``address`` is the recipient after the virtual map; ``key`` the map key
    that matched (``"default"`` for the default route). When ``failure`` is
    set the recipient is not delivered: it holds the result to give.
    """

    recipient: str
    address: str
    transport: str = ""
    destination: Destination | None = None
    key: str = ""
    failure: RecipientResult | None = None
    #: With a transport whose destination set fails over: the other members,
    #: best first, to try when ``destination`` cannot be reached.
    alternatives: tuple[Destination, ...] = ()


def _operator_result(recipient: str, name: str, key: str, nexthop: str) -> RecipientResult:
    """The result of an ``error:``/``retry:`` route: the operator's text and enhanced code."""
    entry = ERROR_TRANSPORT if name == "error" else RETRY_TRANSPORT
    mt = _ENHANCED.match(nexthop)
    enhanced = mt.group(1) if mt else entry.enhanced
    text = (nexthop[mt.end():] if mt else nexthop) or f"{name} transport ({key})"
    code = entry.code
    if mt and enhanced[0] != str(code)[0]:
        code = 550 if enhanced[0] == "5" else 450
    return RecipientResult(recipient, status_of(code), code, enhanced, text, entry.stage,
                           None, True)


class _NeedIO(Exception):
    """Raised inside a routing when a lookup has no answer without I/O."""

    def __init__(self, pairs: list[tuple[Map, str]]) -> None:
        self.pairs = pairs


_Found = tuple[str, Map, list[str]]


def _map_of(value: Any, what: str, base_dir: str | None) -> Map:
    if isinstance(value, Map):
        return value
    if isinstance(value, _MapFile):
        return value.as_map()
    if isinstance(value, str | os.PathLike):
        return open_map(os.fspath(value), base_dir=base_dir)
    raise ConfigurationError(f"must be a map name (TYPE:NAME), a file path or a map, "
                             f"not {type(value).__name__}", field=what)


def as_maps(value: Any, what: str, base_dir: str | None = None) -> tuple[Map, ...]:
    """One map, a list of maps, or a Postfix list string ``"hash:/a, pgsql:/b.cf"``."""
    if value is None:
        return ()
    if isinstance(value, str) and ("," in value or " " in value.strip()):
        items: list[Any] = [p for p in re.split(r"[\s,]+", value) if p]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        items = [value]
    return tuple(_map_of(v, what, base_dir) for v in items)


class Router:
    """Virtual rewrite, recipient check and transport lookup over ``TYPE:NAME`` maps.

    The search orders are Postfix's: transport(5) ``user+ext@domain``,
    ``user@domain``, ``domain``, ``.parent``..., ``*``; virtual(5)
    ``user+ext@domain``, ``user@domain``, ``@domain``; the recipient map the
    same as virtual. For each key the maps are asked in order. Partial keys
    (all but the full address) go to fixed maps only (not ``tcp:``,
    ``socketmap:`` or SQL/LDAP queries using ``%u``/``%d``), as Postfix does.

    :meth:`route_cached` answers without I/O when every lookup it needs is
    in a map's memory (file maps always); :meth:`route_many` routes a whole
    message's recipients with one batched ``lookup_many`` per map and round
    (a 1,000-recipient message: a few round trips). A lookup failure is that
    recipient's ``451 4.3.0`` result, never an exception.
    """

    def __init__(
        self,
        *,
        transport_maps: Sequence[Map] = (),
        virtual_maps: Sequence[Map] = (),
        recipient_maps: Sequence[Map] | None = None,
        default: Route | None = None,
        destinations: Mapping[str, Destination | DestinationSet | None] | None = None,
        delimiter: str = "",
        default_transport: str = "lmtp",
        no_route: str = "defer",
    ) -> None:
        self.transport_maps = tuple(transport_maps)
        self.virtual_maps = tuple(virtual_maps)
        self.recipient_maps = None if recipient_maps is None else tuple(recipient_maps)
        self.default = default
        self.destinations = dict(destinations or {})
        self.delimiter = delimiter
        self.default_transport = default_transport
        #: A recipient no route matches: "defer" (451 4.4.4) or "bounce" (554 5.4.4).
        self.no_route = no_route
        every = (*self.transport_maps, *self.virtual_maps, *(self.recipient_maps or ()))
        #: True when no map does I/O: a routing never changes and may be kept.
        self.static = all(m.static for m in every)
        self._routes: dict[str, Route | ConfigurationError] = {}

    @property
    def maps(self) -> tuple[Map, ...]:
        return (*self.transport_maps, *self.virtual_maps, *(self.recipient_maps or ()))

    # -- lookups ---------------------------------------------------------------------

    @staticmethod
    def _find(maps: Sequence[Map], keys: Sequence[str], local: Mapping[tuple[int, str], Any]
              ) -> _Found | MapError | None:
        """First (key, map, value) in key-then-map order; raises _NeedIO when unknown."""
        need: list[tuple[Map, str]] = []
        for i, key in enumerate(keys):
            for m in maps:
                if i and not m.fixed:
                    continue
                k = key.lower() if m.fold else key
                r = local.get((id(m), k), NOT_CACHED) if local else NOT_CACHED
                if r is NOT_CACHED:
                    r = m.lookup_cached(k)
                if r is NOT_CACHED:
                    need.append((m, k))
                    continue
                if r is None:
                    continue
                if need:  # an earlier key is unknown: it may win
                    raise _NeedIO(need)
                if isinstance(r, MapError):
                    return r
                return key, m, r  # type: ignore[return-value]
        if need:
            raise _NeedIO(need)
        return None

    def _alias_keys(self, address: str) -> list[str]:
        local, at, domain = address.rpartition("@")
        if not at:
            return [address]
        keys = [address]
        if self.delimiter and local:
            base = _strip_extension(local, self.delimiter)
            if base != local:
                keys.append(f"{base}@{domain}")
        keys.append("@" + domain)
        return keys

    def _transport_keys(self, address: str) -> list[str]:
        local, at, domain = address.rpartition("@")
        keys = [address]
        if at:
            if self.delimiter and local:
                base = _strip_extension(local, self.delimiter)
                if base != local:
                    keys.append(f"{base}@{domain}")
        else:
            domain = address
        if domain:
            if at:
                keys.append(domain)
            rest = domain
            while (dot := rest.find(".")) >= 0:
                rest = rest[dot + 1 :]
                keys.append("." + rest)
        keys.append("*")
        return keys

    def _route_value(self, value: str, m: Map) -> Route | ConfigurationError:
        got = self._routes.get(value)
        if got is None:
            try:
                got = parse_route(value, source=m.mapname)
            except ConfigurationError as exc:
                got = exc
            if len(self._routes) > 4096:
                self._routes.clear()
            self._routes[value] = got
        return got

    # -- one recipient -------------------------------------------------------------------

    def _route(self, recipient: str, local: Mapping[tuple[int, str], Any]) -> Routing:
        if not isinstance(recipient, str):
            raise TypeError(f"recipient must be str, not {type(recipient).__name__}")
        if not recipient or address_problem(recipient) is not None:
            return Routing(recipient, recipient, failure=BAD_RECIPIENT.result(
                recipient, detail=repr(recipient)))

        def temp(err: MapError, address: str) -> Routing:
            return Routing(recipient, address, failure=MAP_FAILURE.result(
                recipient, detail=map_failure(err)[2]))

        address = recipient
        rewritten = False
        if self.virtual_maps and "@" in recipient:
            seen = {address.lower()}
            for _ in range(MAX_REWRITES + 1):
                found = self._find(self.virtual_maps, self._alias_keys(address.lower()), local)
                if found is None:
                    break
                if isinstance(found, MapError):
                    return temp(found, address)
                key, m, values = found
                if len(values) != 1 or len(values[0].replace(",", " ").split()) != 1:
                    return temp(MapError(m.mapname, f"{key!r} maps to {as_text(values)!r}: "
                                         "lmtpfast rewrites an address to exactly one"), address)
                nxt = values[0].strip()
                if nxt.startswith("@"):
                    nxt = address.rpartition("@")[0] + nxt
                if nxt.lower() == address.lower():
                    address = nxt
                    break
                if nxt.lower() in seen:
                    return Routing(recipient, recipient, failure=ALIAS_LOOP.result(
                        recipient, detail=f"virtual map loop at {nxt!r}"))
                seen.add(nxt.lower())
                address = nxt
                rewritten = True
            else:
                return Routing(recipient, recipient, failure=ALIAS_LOOP.result(
                    recipient,
                    detail=f"more than {MAX_REWRITES} virtual map rewrites for {recipient!r}"))

        if self.recipient_maps is not None and not rewritten:
            found = self._find(self.recipient_maps, self._alias_keys(recipient.lower()), local)
            if isinstance(found, MapError):
                return temp(found, address)
            if found is None:
                return Routing(recipient, address, failure=UNKNOWN_RECIPIENT.result(
                    recipient))

        if self.transport_maps:
            found = self._find(self.transport_maps, self._transport_keys(address.lower()), local)
        else:
            found = None
        if isinstance(found, MapError):
            return temp(found, address)
        if found is not None:
            key, m, values = found
            parsed = self._route_value(as_text(values), m)
            if isinstance(parsed, ConfigurationError):
                return temp(MapError(m.mapname, f"bad value for {key!r}: {parsed.problem}"),
                            address)
            route = parsed
        elif self.default is not None:
            key, route = "default", self.default
        else:
            # A failure of ours (the configuration): it defers by default, as a
            # map that is down does; no_route = "bounce" makes it final.
            entry = NO_ROUTE_BOUNCE if self.no_route == "bounce" else NO_ROUTE
            return Routing(recipient, address, failure=entry.result(recipient, to=address))
        name = route.transport or self.default_transport
        if name in ERROR_TRANSPORTS:
            return Routing(recipient, address, name, key=key,
                           failure=_operator_result(recipient, name, key, route.nexthop))
        if name not in self.destinations:
            # Only a network map can name a transport the config lacks (files are
            # checked at load): ours to fix, so defer.
            return Routing(recipient, address, name, key=key, failure=MAP_FAILURE.result(
                recipient, detail=f"route {str(route)!r} for {address} names transport "
                f"{name!r}, which is not declared"))
        dest = route.destination or self.destinations[name]
        if isinstance(dest, DestinationSet):
            # User affinity across a set of back ends: rendezvous hashing of the
            # user (without an address extension: user+ext has user's mailbox).
            user = address.lower()
            part, at, domain = user.rpartition("@")
            if self.delimiter and at and part:
                user = f"{_strip_extension(part, self.delimiter)}@{domain}"
            if dest.failover:
                ranked = dest.ranked(user)
                return Routing(recipient, address, name, ranked[0], key, alternatives=ranked[1:])
            dest = dest.pick(user)
        if dest is None:
            domain = address.rpartition("@")[2]
            if not domain or "@" not in address:
                return Routing(recipient, address, name, key=key, failure=NO_DESTINATION.result(
                    recipient, to=address, route=str(route), transport=name))
            dest = Destination("inet", host=domain.strip("[]"), port=DEFAULT_PORT)
        return Routing(recipient, address, name, dest, key)

    # -- public ------------------------------------------------------------------------------

    def route_cached(self, recipient: str) -> Routing | None:
        """The routing without I/O, or ``None`` when a map must be asked."""
        try:
            return self._route(recipient, {})
        except _NeedIO:
            return None

    async def route_many(self, recipients: Sequence[str]) -> list[Routing]:
        """Route every recipient; batched lookups, a few round trips whatever the count."""
        local: dict[tuple[int, str], Any] = {}
        out: list[Routing | None] = [None] * len(recipients)
        pending = list(range(len(recipients)))
        for _ in range(_MAX_ROUNDS):
            needs: dict[int, tuple[Map, dict[str, None]]] = {}
            still = []
            for i in pending:
                try:
                    out[i] = self._route(recipients[i], local)
                except _NeedIO as need:
                    still.append(i)
                    for m, k in need.pairs:
                        entry = needs.get(id(m))
                        if entry is None:
                            entry = needs[id(m)] = (m, {})
                        entry[1][k] = None
            pending = still
            if not pending:
                break
            pairs = [(m, list(keys)) for m, keys in needs.values()]
            answers = await gather_lookups(pairs)
            for (m, keys), got in zip(pairs, answers, strict=True):
                for k in keys:
                    local[(id(m), k)] = got.get(k, MapError(m.mapname, "no answer"))
        for i in pending:  # rounds exhausted (cannot happen with sane maps): defer
            err = MapError("routing", "too many lookup rounds")
            out[i] = Routing(recipients[i], recipients[i], failure=MAP_FAILURE.result(
                recipients[i], detail=map_failure(err)[2]))
        return out  # type: ignore[return-value]

    async def route(self, recipient: str) -> Routing:
        return (await self.route_many([recipient]))[0]

    async def aclose(self) -> None:
        for m in self.maps:
            await m.aclose()
