"""The delivery agent: route each recipient, batch per back end, deliver through pools.

>>> async with lmtpfast.Agent.from_config("lmtpfast.toml") as agent:     # doctest: +SKIP
...     results = await agent.deliver(message, sender="a@example.org",
...                                   recipients=["u1@domain1.name", "u2@domain2.name"])

What Postfix's queue manager and lmtp(8) do for the seed's front end (LMTP_README
sections 6, 8, 9), in one object:

1. each recipient is rewritten by the virtual map, then routed by the
   transport map (per address, per domain, per parent domain, ``*``) or the
   default route to a (transport, destination);
2. recipients with the same (transport, destination) go into one transaction
   (the single-instance store of section 8), split at the transport's
   recipient limit; duplicates after rewriting are sent once;
3. the transactions go out concurrently, each through the pool of its
   (transport, destination), so a connection never switches back ends and the
   transport's concurrency limit holds however many ``deliver()`` calls run.

``deliver()`` returns one :class:`~lmtpfast.RecipientResult` per input
recipient, in input order, with ``address`` as given and ``destination``
saying which server decided it. No route, connect failures and refusals are
results, not exceptions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import msgspec

from ._config import (
    DEFAULT_TRANSPORT,
    AgentConfig,
    Transport,
    config_from_dict,
    load_config,
)
from ._destination import Destination, parse_destination
from ._errors import ConfigurationError, ContentError, LocalProtocolError
from ._maps import Map, is_map_name
from ._pool import Pool, PoolStats
from ._results import RecipientResult, status_of
from ._routing import Route, Router, Routing, TransportMap, VirtualMap, as_maps, parse_route
from ._session import Message, message_bytes
from ._settings import PoolSettings
from .proto._common import address_problem

__all__ = ["Agent", "AgentStats", "Routing"]  # Routing lives in _routing

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)")
_ROUTE_CACHE_SIZE = 65536
_FOREVER = float("inf")
_monotonic = time.monotonic


def _route_ttl(router: Router, cache: Any) -> float:
    """How long a routing may be reused: forever for file maps, else the shortest cache TTL."""
    if router.static:
        return _FOREVER
    ttls = []
    for m in router.maps:
        if m.static:
            continue
        settings = getattr(m, "settings", None)
        if settings is None:
            return 0.0  # an uncached network map: ask every time
        ttls.append(min(settings.ttl, settings.negative_ttl))
    return min(ttls, default=_FOREVER)


@dataclass
class AgentStats(PoolStats):
    """Totals over every pool of an agent (a snapshot; see :attr:`Agent.stats`).

    The pool counters are summed; the ``peak_*`` ones are the largest of any
    one pool.
    """

    deliveries: int = 0
    recipients: int = 0
    pools: int = 0


_POOL_COUNTERS = tuple(f.name for f in dataclasses.fields(PoolStats))


def _refusal(recipient: str, code: int, enhanced: str, text: str, stage: str) -> RecipientResult:
    return RecipientResult(address=recipient, status=status_of(code), code=code,
                           enhanced=enhanced, text=text, stage=stage, local=True)


def _as_map(value: Any, cls: type[Any], what: str) -> Any:
    if value is None or isinstance(value, cls | Map | list | tuple):
        return value
    if isinstance(value, str) and (is_map_name(value) or "," in value):
        return value  # TYPE:NAME (or a list): opened by as_maps
    if isinstance(value, str | os.PathLike):
        return cls.from_file(value)
    if isinstance(value, Mapping):
        return cls(value)
    raise ConfigurationError(f"must be a {cls.__name__}, a mapping or a file path, "
                             f"not {type(value).__name__}", field=what)


def _as_transport(name: str, value: Any) -> Transport:
    if isinstance(value, Transport):
        return value
    if isinstance(value, Mapping):
        cfg = config_from_dict({"transports": {name: dict(value)}})
        return cfg.transports[name.lower()]
    raise ConfigurationError(f"must be a lmtpfast.Transport or a mapping, "
                             f"not {type(value).__name__}", field=f"transports.{name}")


class Agent:
    """Routes recipients and delivers through per-(transport, destination) pools.

    Build it from a TOML file (:meth:`from_config`), for a single server
    (:meth:`for_server`), or from Python objects::

        Agent(transports={"lmtp1": Transport(destination="unix:/path/name")},
              transport_map={"domain1.name": "lmtp1:", "domain2.name": "lmtp2:lmtp2host"},
              default="lmtp:unix:/var/imap/socket/lmtp")

    ``transport_map`` and ``virtual_map`` take a map object, a ``{key: value}``
    mapping or a map file path. The agent belongs to the event loop that
    first uses it; :mod:`lmtpfast._sync` runs one from threads.
    """

    def __init__(
        self,
        transports: Mapping[str, Transport | Mapping[str, Any]] | None = None,
        transport_map: TransportMap | Mapping[str, str] | str | os.PathLike[str] | None = None,
        virtual_map: VirtualMap | Mapping[str, str] | str | os.PathLike[str] | None = None,
        default: str | Route | None = None,
        *,
        lhlo_name: str | None = None,
        recipient_delimiter: str = "",
        recipient_map: Map | str | Sequence[Map | str] | None = None,
        no_route: Literal["defer", "bounce"] = "defer",
        config: AgentConfig | None = None,
    ) -> None:
        if config is None:
            route = parse_route(default, source="default") if isinstance(default, str) else default
            tmap = _as_map(transport_map, TransportMap, "transport_map")
            vmap = _as_map(virtual_map, VirtualMap, "virtual_map")
            config = AgentConfig(
                transports={n: _as_transport(n, t) for n, t in (transports or {}).items()},
                transport_map=tmap if isinstance(tmap, TransportMap) else None,
                virtual_map=vmap if isinstance(vmap, VirtualMap) else None,
                transport_maps=() if isinstance(tmap, TransportMap) else as_maps(
                    tmap, "transport_map"),
                virtual_maps=() if isinstance(vmap, VirtualMap) else as_maps(vmap, "virtual_map"),
                recipient_maps=None if recipient_map is None else as_maps(
                    recipient_map, "recipient_map"),
                default=route,
                lhlo_name=lhlo_name,
                recipient_delimiter=recipient_delimiter,
                no_route=no_route,
            )
        elif any(x is not None for x in (transports, transport_map, virtual_map, default,
                                          recipient_map)):
            raise TypeError("give either config= or the individual settings, not both")
        config.check_routes_something()
        self.config = config
        self._transports: Mapping[str, Transport] = config.transports
        self._router = Router(
            transport_maps=(*((config.transport_map.as_map(),) if config.transport_map else ()),
                            *config.transport_maps),
            virtual_maps=(*((config.virtual_map.as_map(),) if config.virtual_map else ()),
                          *config.virtual_maps),
            recipient_maps=config.recipient_maps,
            default=config.default,
            destinations={n: t.dest for n, t in config.transports.items()},
            delimiter=config.recipient_delimiter,
            default_transport=DEFAULT_TRANSPORT,
            no_route=config.no_route,
        )
        self._pools: dict[tuple[str, Destination], Pool] = {}
        # Routes from file maps never change; from network maps they are kept
        # as long as the shortest cache TTL (the maps' caches decide freshness).
        self._route_ttl = _route_ttl(self._router, config.map_cache)
        self._route_cache: dict[str, tuple[Routing, Pool | None, int, float]] = {}
        self._closed = False
        self._deliveries = 0
        self._recipients = 0

    # -- constructors --------------------------------------------------------------

    @classmethod
    def from_config(cls, config: str | os.PathLike[str] | AgentConfig | Mapping[str, Any]) -> Agent:
        """An agent from a TOML file path, an :class:`AgentConfig`, or the file's data as a dict."""
        if isinstance(config, AgentConfig):
            return cls(config=config)
        if isinstance(config, Mapping):
            return cls(config=config_from_dict(config))
        return cls(config=load_config(config))

    @classmethod
    def for_server(cls, destination: str | Destination, **settings: Any) -> Agent:
        """An agent that sends every recipient to one server.

        ``settings`` are :class:`Transport` fields (``recipient_limit``,
        ``lhlo_name``, ``timeouts``, ``pipelining``, ``ignore_keywords``) and
        :class:`PoolSettings` fields (``max_connections``, ``pipeline_depth`` ...).
        """
        pool_names = set(PoolSettings.__struct_fields__)
        transport_names = {f.name for f in fields(Transport)} - {"destination"}
        pool_kw = {k: settings.pop(k) for k in list(settings) if k in pool_names}
        unknown = set(settings) - transport_names
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        if pool_kw:
            if "pool" in settings:
                raise TypeError("give pool=PoolSettings(...) or pool fields, not both")
            settings["pool"] = PoolSettings(**pool_kw)
        transport = Transport(destination=parse_destination(destination), **settings)
        return cls(transports={DEFAULT_TRANSPORT: transport}, default=Route(DEFAULT_TRANSPORT))

    # -- routing -------------------------------------------------------------------

    def route(self, recipient: str) -> Routing:
        """Rewrite and route one recipient (what :meth:`deliver` does first).

        Answers from the maps' memory; a recipient that needs a network map
        lookup raises :class:`RuntimeError` (use :meth:`route_many`).
        """
        r = self._router.route_cached(recipient)
        if r is None:
            raise RuntimeError(f"routing {recipient!r} needs a map lookup: use "
                               "'await agent.route_many([...])'")
        return r

    async def route_many(self, recipients: Sequence[str]) -> list[Routing]:
        """Rewrite and route recipients, asking network maps (batched) as needed."""
        return await self._router.route_many(recipients)

    def _entry(self, r: Routing) -> tuple[Routing, Pool | None, int, float]:
        expires = _monotonic() + self._route_ttl if self._route_ttl < _FOREVER else _FOREVER
        if r.failure is None:
            assert r.destination is not None
            return (r, self._pool(r.transport, r.destination),
                    self._transports[r.transport].recipient_limit, expires)
        return (r, None, 0, expires)

    def _remember(self, recipient: str, hit: tuple[Routing, Pool | None, int, float]) -> None:
        r = hit[0]
        if self._route_ttl <= 0 or (r.failure is not None and r.failure.transient):
            return  # a lookup failure is never remembered
        cache = self._route_cache
        if len(cache) >= _ROUTE_CACHE_SIZE:
            cache.clear()
        cache[recipient] = hit

    def _cached_route(self, recipient: str) -> tuple[Routing, Pool | None, int, float] | None:
        """The routing of ``recipient``, its pool and recipient limit, or None (needs I/O)."""
        hit = self._route_cache.get(recipient) if isinstance(recipient, str) else None
        if hit is not None and (hit[3] == _FOREVER or hit[3] > _monotonic()):
            return hit
        r = self._router.route_cached(recipient)
        if r is None:
            return None
        hit = self._entry(r)
        self._remember(recipient, hit)
        return hit

    async def _routes(self, recipients: Sequence[str]
                      ) -> list[tuple[Routing, Pool | None, int, float]]:
        """Every recipient's routing: from memory, else one batched round of lookups."""
        routed = [self._cached_route(rcpt) for rcpt in recipients]
        missing = [i for i, e in enumerate(routed) if e is None]
        if missing:
            got = await self._router.route_many([recipients[i] for i in missing])
            for i, r in zip(missing, got, strict=True):
                hit = self._entry(r)
                self._remember(recipients[i], hit)
                routed[i] = hit
        return routed  # type: ignore[return-value]

    def _pool(self, name: str, dest: Destination) -> Pool:
        pool = self._pools.get((name, dest))
        if pool is None:
            t = self._transports[name]
            pool = Pool(dest, t.pool, lhlo_name=t.lhlo_name or self.config.lhlo_name,
                        timeouts=t.timeouts, pipelining=t.pipelining,
                        ignore_keywords=t.ignore_keywords,
                        tls=t.tls, auth=t.auth_for(dest))
            # The TLS policy and SASL identity are functions of (transport,
            # destination), so this key separates identities (see Pool.key).
            self._pools[(name, dest)] = pool
        return pool

    # -- delivery --------------------------------------------------------------------

    async def deliver(
        self,
        message: Message,
        *,
        sender: str,
        recipients: Sequence[str],
        mail_params: Sequence[str] = (),
    ) -> list[RecipientResult]:
        """Deliver ``message`` to ``recipients``; one result per recipient, in input order.

        Raises :class:`LocalProtocolError` only for what no recipient could
        change: a bad sender address or a NUL byte in the message.
        """
        if self._closed:
            raise RuntimeError("the agent is closed")
        if isinstance(recipients, str):
            raise TypeError("recipients must be a sequence of addresses, not one string")
        if not recipients:
            raise LocalProtocolError("no recipients: a delivery needs at least one")
        if address_problem(sender, allow_empty=True) is not None:
            raise LocalProtocolError(f"bad sender address {sender!r}")
        raw = message_bytes(message)
        nul = raw.find(b"\0") if isinstance(raw, bytes) else -1
        if nul >= 0:
            raise ContentError(f"message contains a NUL byte at offset {nul}; it cannot be sent")
        self._deliveries += 1
        self._recipients += len(recipients)
        replace = msgspec.structs.replace
        n = len(recipients)
        if n == 1:  # the common cases first, without the grouping machinery
            rcpt = recipients[0]
            hit = self._cached_route(rcpt) or (await self._routes(recipients))[0]
            r, pool = hit[0], hit[1]
            if pool is None:
                assert r.failure is not None
                return [r.failure]
            (result,) = await pool.deliver(sender, [r.address], raw, mail_params=mail_params)
            return [result if result.address == rcpt else replace(result, address=rcpt)]
        routed = await self._routes(recipients)
        pool = routed[0][1]
        if pool is not None and n <= routed[0][2] and all(e[1] is pool for e in routed):
            addresses = [e[0].address for e in routed]
            if len(set(addresses)) == n:  # one back end, no duplicates: one transaction
                results = await pool.deliver(sender, addresses, raw, mail_params=mail_params)
                return [res if res.address == rcpt else replace(res, address=rcpt)
                        for res, rcpt in zip(results, recipients, strict=True)]
        out: list[RecipientResult | None] = [None] * n
        # pool (one per transport and destination) -> final address -> input positions
        groups: dict[Pool, tuple[int, dict[str, list[int]]]] = {}
        for i, (r, rpool, limit, _) in enumerate(routed):
            if rpool is None:
                out[i] = r.failure
                continue
            entry = groups.get(rpool)
            if entry is None:
                entry = groups[rpool] = (limit, {})
            positions = entry[1].get(r.address)
            if positions is None:
                entry[1][r.address] = [i]
            else:
                positions.append(i)

        batches: list[tuple[Pool, dict[str, list[int]], list[str]]] = []
        for gpool, (limit, by_address) in groups.items():
            addresses = list(by_address)
            for start in range(0, len(addresses), limit):
                batches.append((gpool, by_address, addresses[start : start + limit]))

        if len(batches) == 1:
            bpool, _, chunk = batches[0]
            outcomes = [await bpool.deliver(sender, chunk, raw, mail_params=mail_params)]
        elif batches:
            outcomes = await asyncio.gather(*(
                bpool.deliver(sender, chunk, raw, mail_params=mail_params)
                for bpool, _, chunk in batches))
        else:
            outcomes = []
        for (_, by_address, chunk), results in zip(batches, outcomes, strict=True):
            for address, result in zip(chunk, results, strict=True):
                for i in by_address[address]:
                    rcpt = recipients[i]
                    out[i] = result if rcpt == result.address else replace(result, address=rcpt)
        return out  # type: ignore[return-value]  # every slot is filled above

    # -- state, closing ----------------------------------------------------------------

    @property
    def stats(self) -> AgentStats:
        """Counters summed over every pool (peak: the largest of any one pool)."""
        total = AgentStats(deliveries=self._deliveries, recipients=self._recipients,
                           pools=len(self._pools))
        for pool in self._pools.values():
            for f in _POOL_COUNTERS:
                mine, theirs = getattr(total, f), getattr(pool.stats, f)
                setattr(total, f, max(mine, theirs) if f.startswith("peak_") else mine + theirs)
        return total

    def pools(self) -> dict[tuple[str, Destination], Pool]:
        """The pools made so far, by (transport name, destination)."""
        return dict(self._pools)

    def maps(self) -> tuple[Map, ...]:
        """Every lookup table routing uses (their ``stats``, when cached, feed the metrics)."""
        return tuple(self._router.maps)

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self, timeout: float | None = None) -> None:
        """Refuse new deliveries, let those in flight finish (up to each pool's
        ``close_timeout``, or ``timeout``), QUIT every connection, close the maps."""
        self._closed = True
        if self._pools:
            await asyncio.gather(*(p.close(timeout) for p in self._pools.values()))
        await self._router.aclose()

    async def __aenter__(self) -> Agent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<lmtpfast.Agent transports={sorted(self._transports)} pools={len(self._pools)}>"
