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
import time
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, fields
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from ._config import (
    DEFAULT_TRANSPORT,
    AgentConfig,
    Transport,
    config_from_dict,
    load_config,
)
from ._delivery import Delivery, Message
from ._destination import Destination, parse_destination
from ._dsn import DSN
from ._errors import ConfigurationError, LMTPError, LocalProtocolError, PoolClosed
from ._failures import (
    DEAD_DESTINATION,
    LOCAL_ERROR,
    LOST_AFTER_DOT,
    SETUP_STAGES,
    failure_results,
)
from ._maps import Map, is_map_name
from ._pool import Pool, PoolStats
from ._results import RecipientResult
from ._routing import Route, Router, Routing, TransportMap, VirtualMap, as_maps, parse_route
from ._settings import PoolSettings, ShapingSettings
from ._shaping import (
    DestinationShaper,
    Outcome,
    Shaper,
    ShapingEvent,
    ShapingState,
    ShapingUnavailable,
)
from .proto import Engine

if TYPE_CHECKING:
    from ._verify import VerifiedTransaction

__all__ = ["Agent", "AgentStats", "Routing"]  # Routing lives in _routing

_ROUTE_CACHE_SIZE = 65536
_FOREVER = float("inf")
_monotonic = time.monotonic

# A transaction on a reused connection that fails before the server answered
# anything is tried this many times in all (a fresh connection normally
# takes it the second time: by then the loop has seen the other dead ones).
_MAX_ATTEMPTS = 3


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
    #: Transactions tried again because a reused connection had died under them.
    retries: int = 0
    #: Follow-up transactions for recipients a server refused with "452 too many
    #: recipients" (RFC 5321 4.5.3.1.10).
    follow_ups: int = 0


_POOL_COUNTERS = tuple(f.name for f in dataclasses.fields(PoolStats))


class _Target:
    """Where a route's transactions go: one pool, its shaping, how to treat that transport."""

    __slots__ = ("dest", "limit", "pool", "shaper", "skip_5xx_greeting")

    def __init__(self, pool: Pool, limit: int, skip_5xx_greeting: bool,
                 shaper: DestinationShaper) -> None:
        self.pool = pool
        self.dest = str(pool.destination)
        self.limit = limit
        self.skip_5xx_greeting = skip_5xx_greeting
        self.shaper = shaper


def _too_many_recipients(r: RecipientResult) -> bool:
    """A "452 too many recipients" at RCPT (RFC 5321 4.5.3.1.10): send the rest again now."""
    return (r.code == 452 and r.stage == "rcpt" and not r.local
            and (r.enhanced == "4.5.3" or "too many recipients" in r.text.lower()))


def _died_before_reply(results: list[RecipientResult]) -> bool:
    """True when the connection failed before the server answered this transaction at all."""
    return all(r.local and r.stage == "mail" and not r.possibly_delivered and r.transient
               for r in results)


def _unreachable(r: RecipientResult | None) -> bool:
    """The back end could not be had (connect, greeting, LHLO, TLS, AUTH): nothing reached it."""
    return (r is not None and r.local and r.transient and not r.possibly_delivered
            and r.stage in SETUP_STAGES)


def _session_broke(results: list[RecipientResult]) -> bool:
    """True when the engine made results up because the session failed (lost, timed out,
    out of step), not because of the message (those are stage ``local``)."""
    return any(r.local and r.stage != "local" for r in results)


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
    mapping or a map file path. ``engine`` picks the core every connection
    runs on (``"c"``, ``"python"``; default: compiled when built). The agent
    belongs to the event loop that first uses it; :mod:`lmtpfast._sync` runs
    one from threads.

    The agent is where failures become results: a connection that cannot be
    had, a session that breaks before its transaction, a reused connection
    found dead (the transaction is tried again on another: nothing reached the
    server) all get their result from the failure table (``_failures``).
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
        engine: str | Engine | ModuleType | None = None,
        clock: Callable[[], float] | None = None,
        shaping_state: ShapingState | None = None,
        on_shaping: Callable[[ShapingEvent], None] | None = None,
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
        self.engine = engine
        self._clock = clock  # the pools' clock (seconds, monotonic; default: the loop's)
        #: Traffic shaping per destination (``_shaping.py``); ``shaping_state`` is
        #: shared with other agents (a reloaded daemon's), ``on_shaping`` hears
        #: every decision (the daemon logs and counts them).
        self.shaper = Shaper(shaping_state, clock=clock, listener=on_shaping)
        self._transports: Mapping[str, Transport] = config.transports
        self._router = Router(
            transport_maps=(*((config.transport_map.as_map(),) if config.transport_map else ()),
                            *config.transport_maps),
            virtual_maps=(*((config.virtual_map.as_map(),) if config.virtual_map else ()),
                          *config.virtual_maps),
            recipient_maps=config.recipient_maps,
            default=config.default,
            destinations={n: t.targets for n, t in config.transports.items()},
            delimiter=config.recipient_delimiter,
            default_transport=DEFAULT_TRANSPORT,
            no_route=config.no_route,
        )
        self._pools: dict[tuple[str, Destination], _Target] = {}
        # Routes from file maps never change; from network maps they are kept
        # as long as the shortest cache TTL (the maps' caches decide freshness).
        self._route_ttl = _route_ttl(self._router, config.map_cache)
        self._route_cache: dict[str, tuple[Routing, _Target | None, float]] = {}
        self._closed = False
        self._deliveries = 0
        self._recipients = 0
        self._retries = 0
        self._follow_ups = 0

    # -- constructors --------------------------------------------------------------

    @classmethod
    def from_config(
        cls, config: str | os.PathLike[str] | AgentConfig | Mapping[str, Any], *,
        engine: str | Engine | ModuleType | None = None,
        clock: Callable[[], float] | None = None,
        shaping_state: ShapingState | None = None,
        on_shaping: Callable[[ShapingEvent], None] | None = None,
    ) -> Agent:
        """An agent from a TOML file path, an :class:`AgentConfig`, or the file's data as a dict."""
        kw: dict[str, Any] = {"engine": engine, "clock": clock, "shaping_state": shaping_state,
                              "on_shaping": on_shaping}
        if isinstance(config, AgentConfig):
            return cls(config=config, **kw)
        if isinstance(config, Mapping):
            return cls(config=config_from_dict(config), **kw)
        return cls(config=load_config(config), **kw)

    @classmethod
    def for_server(cls, destination: str | Destination, **settings: Any) -> Agent:
        """An agent that sends every recipient to one server (one default route).

        ``settings`` are :class:`Transport` fields (``recipient_limit``,
        ``lhlo_name``, ``timeouts``, ``pipelining``, ``ignore_keywords``,
        ``skip_5xx_greeting``...), :class:`PoolSettings` fields
        (``max_connections``, ``pipeline_depth`` ...), :class:`ShapingSettings`
        fields (``concurrency_limit``, ``rate_delay``, ``dead_after`` ...),
        ``engine``, ``clock``, ``shaping_state`` and ``on_shaping``.
        """
        agent_kw = {k: settings.pop(k) for k in ("engine", "clock", "shaping_state", "on_shaping")
                    if k in settings}
        pool_names = set(PoolSettings.__struct_fields__)
        transport_names = {f.name for f in fields(Transport)} - {"destination"}
        pool_kw = {k: settings.pop(k) for k in list(settings) if k in pool_names}
        shaping_names = set(ShapingSettings.__struct_fields__)
        shaping_kw = {k: settings.pop(k) for k in list(settings) if k in shaping_names}
        unknown = set(settings) - transport_names
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        if pool_kw:
            if "pool" in settings:
                raise TypeError("give pool=PoolSettings(...) or pool fields, not both")
            settings["pool"] = PoolSettings(**pool_kw)
        if shaping_kw:
            if "shaping" in settings:
                raise TypeError("give shaping=ShapingSettings(...) or shaping fields, not both")
            settings["shaping"] = ShapingSettings(**shaping_kw)
        transport = Transport(destination=parse_destination(destination), **settings)
        return cls(transports={DEFAULT_TRANSPORT: transport}, default=Route(DEFAULT_TRANSPORT),
                   **agent_kw)

    # -- routing -------------------------------------------------------------------

    def route(self, recipient: str) -> Routing:
        """Rewrite and route one recipient (what :meth:`deliver` does first).

        Answers from memory: the agent's route cache (file-map routes for
        ever, network-map routes for the maps' cache TTL, failures never),
        else the maps' own; a recipient that needs a network map lookup raises
        :class:`RuntimeError` (use :meth:`route_many`).
        """
        hit = self._cached_route(recipient)
        if hit is None:
            raise RuntimeError(f"routing {recipient!r} needs a map lookup: use "
                               "'await agent.route_many([...])'")
        return hit[0]

    async def route_many(self, recipients: Sequence[str]) -> list[Routing]:
        """Rewrite and route recipients, asking network maps (batched) as needed."""
        return [hit[0] for hit in await self._routes(recipients)]

    def _entry(self, r: Routing) -> tuple[Routing, _Target | None, float]:
        expires = _monotonic() + self._route_ttl if self._route_ttl < _FOREVER else _FOREVER
        if r.failure is None:
            assert r.destination is not None
            return (r, self._target(r.transport, r.destination), expires)
        return (r, None, expires)

    def _remember(self, recipient: str, hit: tuple[Routing, _Target | None, float]) -> None:
        r = hit[0]
        if self._route_ttl <= 0 or (r.failure is not None and r.failure.transient):
            return  # a lookup failure is never remembered
        cache = self._route_cache
        if len(cache) >= _ROUTE_CACHE_SIZE:
            cache.clear()
        cache[recipient] = hit

    def _cached_route(self, recipient: str) -> tuple[Routing, _Target | None, float] | None:
        """The routing of ``recipient`` and its target, or None (a map must be asked)."""
        hit = self._route_cache.get(recipient)
        if hit is not None and (hit[2] == _FOREVER or hit[2] > _monotonic()):
            return hit
        r = self._router.route_cached(recipient)
        if r is None:
            return None
        hit = self._entry(r)
        self._remember(recipient, hit)
        return hit

    async def _routes(self, recipients: Sequence[str]
                      ) -> list[tuple[Routing, _Target | None, float]]:
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

    def _target(self, name: str, dest: Destination) -> _Target:
        target = self._pools.get((name, dest))
        if target is None:
            t = self._transports[name]
            pool = Pool(dest, t.pool, lhlo_name=t.lhlo_name or self.config.lhlo_name,
                        timeouts=t.timeouts, pipelining=t.pipelining,
                        ignore_keywords=t.ignore_keywords,
                        tls=t.tls, auth=t.auth_for(dest), engine=self.engine,
                        clock=self._clock)
            # The TLS policy and SASL identity are functions of (transport,
            # destination), so this key separates identities (see Pool.key).
            shaper = self.shaper.destination(str(pool.destination), t.shaping)
            target = self._pools[(name, dest)] = _Target(pool, t.recipient_limit,
                                                         t.skip_5xx_greeting, shaper)
        return target

    # -- delivery --------------------------------------------------------------------

    async def deliver(
        self,
        message: Message | Delivery,
        *,
        sender: str | None = None,
        recipients: Sequence[str] | None = None,
        mail_params: Sequence[str] = (),
        dsn: DSN | None = None,
    ) -> list[RecipientResult]:
        """Deliver a message to its recipients; one result per recipient, in input order.

        ``deliver(delivery)`` takes a :class:`~lmtpfast.Delivery` (built once
        by the caller, e.g. replay); ``deliver(message, sender=...,
        recipients=..., mail_params=..., dsn=...)`` builds one. DSN reaches
        every back end that advertises it.

        Raises :class:`LocalProtocolError` only for what no recipient could
        change: a bad sender address or a NUL byte in the message.
        """
        if self._closed:
            raise RuntimeError("the agent is closed")
        if type(message) is Delivery:
            if sender is not None or recipients is not None or mail_params or dsn is not None:
                raise TypeError("deliver(delivery) takes no other arguments")
            d = message
        else:
            if recipients is None:
                raise TypeError("deliver() needs sender= and recipients= (or a Delivery)")
            d = Delivery.build(message, sender=sender,  # type: ignore[arg-type]
                               recipients=recipients,
                               mail_params=mail_params, dsn=dsn)
        rcpts = d.recipients
        n = len(rcpts)
        self._deliveries += 1
        self._recipients += n
        refused = d.refused
        if n == 1 and not refused:  # the common cases first, without the grouping machinery
            rcpt = rcpts[0]
            hit = self._cached_route(rcpt) or (await self._routes(rcpts))[0]
            r, target = hit[0], hit[1]
            if target is None:
                assert r.failure is not None
                return [r.failure]
            if not r.alternatives:
                sub = d if r.address == rcpt else d.subset((0,), (r.address,))
                return await self._send(target, sub, rcpts)
            return await self._deliver_routed(d, [hit])
        if refused:  # recipients whose address cannot be sent are not routed
            good = [i for i in range(n) if i not in refused]
            got = await self._routes([rcpts[i] for i in good])
            routed: list[tuple[Routing, _Target | None, float] | None] = [None] * n
            for i, e in zip(good, got, strict=True):
                routed[i] = e
        else:
            routed = await self._routes(rcpts)  # type: ignore[assignment]
        return await self._deliver_routed(d, routed)

    async def deliver_many(
        self, deliveries: Iterable[Delivery] | AsyncIterable[Delivery], *,
        concurrency: int = 64,
        errors: Callable[[Delivery, Exception], list[RecipientResult]] | None = None,
    ) -> AsyncIterator[tuple[Delivery, list[RecipientResult]]]:
        """Deliver a stream of deliveries; yield ``(delivery, results)`` as each is decided.

        ``results`` are what :meth:`deliver` returns for it. At most
        ``concurrency`` deliveries are taken from the source and not yet
        consumed (under way, or decided and waiting for the consumer), so an
        endless async iterator (a queue being claimed) is read only as fast as
        it is delivered and consumed. Results come in the order they are
        decided, not the input order.

        A delivery whose recipients all go to one back end over plain routes
        (no destination set to fail over, no shaping limit, a route known
        without a map lookup, the destination not marked dead) is pipelined:
        each connection of that back end's pool runs one
        :meth:`Client.send_many`, up to ``concurrency / connections``
        transactions in flight, without a task or a future per delivery.
        Every other delivery goes the way of :meth:`deliver`, a task each; so
        does one whose connection broke before the server saw it (tried again
        on another connection, as :meth:`deliver` does).

        ``errors``, when given, turns an exception :meth:`deliver` raised for
        one delivery (:class:`LocalProtocolError`: a bad sender, a NUL byte)
        into that delivery's results; without it the exception ends the
        stream. Leaving the loop early cancels the deliveries under way
        (their connections are aborted; their outcome is not known).
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if self._closed:
            raise RuntimeError("the agent is closed")
        many = _Many(self, deliveries, concurrency, errors)
        try:
            async for item in many.results():
                yield item
        finally:
            await many.close()

    def _lane_for(self, d: Delivery) -> tuple[_Target, Delivery] | None:
        """The back end ``d`` can be pipelined to, and what to send it, or None (the slow way)."""
        if d.refused:
            return None
        rcpts = d.recipients
        target: _Target | None = None
        addresses: list[str] | None = None
        for i, rcpt in enumerate(rcpts):
            hit = self._cached_route(rcpt)
            if hit is None:
                return None
            r, t = hit[0], hit[1]
            if t is None or r.alternatives or (target is not None and t is not target):
                return None
            target = t
            if r.address != rcpt and addresses is None:
                addresses = list(rcpts[:i])
            if addresses is not None:
                addresses.append(r.address)
        if (target is None or len(rcpts) > target.limit or not target.shaper.unshaped()
                or target.pool.settings.probe != "none"):
            return None
        if addresses is None:
            return target, d
        if len(set(addresses)) != len(rcpts):
            return None  # duplicates after rewriting: deliver() sends each once
        return target, d.subset(range(len(rcpts)), addresses)

    def _stamp(self, target: _Target, results: list[RecipientResult],
               addresses: Sequence[str] | None) -> list[RecipientResult]:
        dest = target.dest
        replace = msgspec.structs.replace
        if addresses is None:
            return [r if r.destination == dest else replace(r, destination=dest)
                    for r in results]
        return [r if r.destination == dest and r.address == a else
                replace(r, address=a, destination=dest)
                for r, a in zip(results, addresses, strict=True)]

    async def _send_again(self, target: _Target, d: Delivery, results: list[RecipientResult]
                          ) -> list[RecipientResult]:
        """Send the recipients refused with "452 too many recipients" again, in rounds."""
        latest, positions = results, list(range(len(results)))
        while True:
            again = [positions[j] for j, r in enumerate(latest) if _too_many_recipients(r)]
            # No progress (everyone refused so) ends it: each round must shrink the set.
            if not again or len(again) == len(latest):
                return results
            self._follow_ups += 1
            latest, positions = await self._attempt(target, d.subset(again)), again
            for i, r in zip(again, latest, strict=True):
                results[i] = r

    async def deliver_routed(
        self, delivery: Delivery, routings: Sequence[Routing],
    ) -> list[RecipientResult]:
        """Deliver to recipients routed earlier: ``routings[i]`` is ``delivery.recipients[i]``'s.

        For a front end that routes at RCPT time (the proxy) and must not
        route twice (a map that goes down between RCPT and the dot cannot
        turn an accepted recipient into a failure). Grouping, recipient
        limits, retries and failures as results are those of :meth:`deliver`.
        """
        if self._closed:
            raise RuntimeError("the agent is closed")
        if len(routings) != len(delivery.recipients):
            raise ValueError("one routing per recipient of the delivery")
        self._deliveries += 1
        self._recipients += len(routings)
        routed: list[tuple[Routing, _Target | None, float] | None] = [
            None if i in delivery.refused else self._entry(r) for i, r in enumerate(routings)]
        return await self._deliver_routed(delivery, routed)

    def verified_transaction(self, routing: Routing, sender: str, *,
                             eight_bit: bool = False) -> VerifiedTransaction:
        """A transaction toward ``routing``'s back end whose RCPTs go out as they come.

        For a front end that verifies recipients at RCPT time (the proxy's
        ``verify_recipients``): the same pool, shaping and recipient limit as
        :meth:`deliver_routed` (``_verify.py``). ``routing`` must be a route.
        """
        from ._verify import VerifiedTransaction

        if self._closed:
            raise RuntimeError("the agent is closed")
        target = self._entry(routing)[1]
        if target is None:
            raise ValueError(f"{routing.recipient!r} has no route: {routing.failure}")
        return VerifiedTransaction(target.pool, target.shaper, target.dest, target.limit,
                                   target.skip_5xx_greeting, sender, eight_bit=eight_bit)

    async def _deliver_routed(
        self, d: Delivery, routed: Sequence[tuple[Routing, _Target | None, float] | None],
    ) -> list[RecipientResult]:
        out = await self._deliver_once(d, routed)
        # A destination set that fails over: the recipients whose member could
        # not be had (nothing reached it) go to their next-ranked member.
        again = [i for i, e in enumerate(routed)
                 if e is not None and e[0].alternatives and _unreachable(out[i])]
        if not again:
            return out
        rerouted: list[tuple[Routing, _Target | None, float] | None] = []
        for i in again:
            r = routed[i][0]  # type: ignore[index]  # not None: filtered above
            rest = r.alternatives
            rerouted.append(self._entry(dataclasses.replace(
                r, destination=rest[0], alternatives=rest[1:])))
        for i, result in zip(again, await self._deliver_routed(d.subset(again), rerouted),
                             strict=True):
            out[i] = result
        return out

    async def _deliver_once(
        self, d: Delivery, routed: Sequence[tuple[Routing, _Target | None, float] | None],
    ) -> list[RecipientResult]:
        rcpts = d.recipients
        n = len(rcpts)
        refused = d.refused
        first = routed[0]
        if first is not None and first[1] is not None and n <= first[1].limit and all(
                e is not None and e[1] is first[1] for e in routed):
            addresses = [e[0].address for e in routed if e is not None]
            if len(set(addresses)) == n:  # one back end, no duplicates: one transaction
                sub = d if addresses == list(rcpts) else d.subset(range(n), addresses)
                return await self._send(first[1], sub, rcpts)
        out: list[RecipientResult | None] = [None] * n
        # target (one per transport and destination) -> final address -> input positions
        groups: dict[_Target, dict[str, list[int]]] = {}
        for i, entry in enumerate(routed):
            if entry is None:
                out[i] = refused[i]
                continue
            r, target = entry[0], entry[1]
            if target is None:
                out[i] = r.failure
                continue
            by_address = groups.get(target)
            if by_address is None:
                by_address = groups[target] = {}
            positions = by_address.get(r.address)
            if positions is None:
                by_address[r.address] = [i]
            else:
                positions.append(i)

        batches: list[tuple[_Target, dict[str, list[int]], list[str]]] = []
        for target, by_address in groups.items():
            addresses = list(by_address)
            for start in range(0, len(addresses), target.limit):
                batches.append((target, by_address, addresses[start : start + target.limit]))

        def part(by_address: dict[str, list[int]], chunk: list[str]) -> Delivery:
            # The first input position of each address carries its parameters.
            return d.subset([by_address[a][0] for a in chunk], chunk)

        if len(batches) == 1:
            target, by_address, chunk = batches[0]
            outcomes = [await self._send(target, part(by_address, chunk))]
        elif batches:
            outcomes = await asyncio.gather(*(
                self._send(target, part(by_address, chunk))
                for target, by_address, chunk in batches))
        else:
            outcomes = []
        replace = msgspec.structs.replace
        for (_, by_address, chunk), results in zip(batches, outcomes, strict=True):
            for address, result in zip(chunk, results, strict=True):
                for i in by_address[address]:
                    rcpt = rcpts[i]
                    out[i] = result if rcpt == result.address else replace(result, address=rcpt)
        return out  # type: ignore[return-value]  # every slot is filled above

    async def _send(
        self, target: _Target, d: Delivery, addresses: Sequence[str] | None = None,
    ) -> list[RecipientResult]:
        """One transaction's results, with ``destination`` (and ``addresses``, when given) set.

        Sends the recipients a server refused with "452 too many recipients"
        again at once, in follow-up transactions, while each round gets some
        recipient past that (so a server that says 452 to everything is not
        hammered), as Postfix does.
        """
        results = await self._attempt(target, d)
        if len(results) > 1:  # one recipient refused so is no progress: nothing to follow up
            results = await self._send_again(target, d, results)
        return self._stamp(target, results, addresses)

    async def _attempt(self, target: _Target, d: Delivery) -> list[RecipientResult]:
        """:meth:`_send_once` as the destination's shaping allows (``_shaping.py``).

        A destination marked dead gets no connection attempt: its recipients
        are deferred at once (``DEAD_DESTINATION``, never a bounce).
        """
        shaper = target.shaper
        try:
            ticket = await shaper.admit()
        except ShapingUnavailable as exc:
            # The shared limits cannot be asked: defer rather than exceed them.
            return LOCAL_ERROR.results(d.recipients, destination=target.dest,
                                       detail=f"traffic shaping state unavailable: {exc}")
        if ticket is None:
            return DEAD_DESTINATION.results(d.recipients, destination=target.dest,
                                            dest=target.dest, count=shaper.settings.dead_after,
                                            detail=shaper.reason() or "no session")
        outcome: Outcome = "cancelled"
        reason = ""
        try:
            results, outcome = await self._send_once(target, d)
            if outcome != "ok" and results:
                reason = results[0].text
            return results
        finally:
            shaper.done(ticket, outcome, reason)

    async def _send_once(self, target: _Target, d: Delivery
                         ) -> tuple[list[RecipientResult], Outcome]:
        """Send ``d`` on a pooled connection; failures before any reply become results.

        A transaction that provably reached nobody (the connection broke before
        it was sent, or a reused connection died before the server answered
        anything) is tried again on another connection, up to ``_MAX_ATTEMPTS``.
        The outcome says whether the server was reached (for shaping).
        """
        pool = target.pool
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            conn = pool.acquire_nowait()
            if conn is None:
                try:
                    conn = await pool.acquire()
                except (LMTPError, OSError) as exc:
                    if isinstance(exc, LocalProtocolError):
                        raise
                    return failure_results(exc, d.recipients, destination=target.dest,
                                           skip_5xx_greeting=target.skip_5xx_greeting), (
                        "cancelled" if isinstance(exc, PoolClosed) else "setup_failed")
            reused = conn.transactions > 0
            ok = False
            try:
                results = await conn.send(d)
                ok = True
            except LocalProtocolError:
                ok = conn.usable  # nothing was sent; the connection is intact
                raise
            except (LMTPError, OSError) as exc:
                # The connection broke between being handed out and this send:
                # nothing of the transaction went out.
                if attempt < _MAX_ATTEMPTS:
                    self._retries += 1
                    continue
                return failure_results(exc, d.recipients, destination=target.dest,
                                       skip_5xx_greeting=target.skip_5xx_greeting), "broken"
            finally:
                pool.release(conn, reusable=ok)
            if reused and attempt < _MAX_ATTEMPTS and _died_before_reply(results):
                # The server had closed this cached connection: nothing reached it.
                self._retries += 1
                continue
            return results, "broken" if _session_broke(results) else "ok"
        raise AssertionError("unreachable")

    # -- state, closing ----------------------------------------------------------------

    @property
    def stats(self) -> AgentStats:
        """Counters summed over every pool (peak: the largest of any one pool)."""
        total = AgentStats(deliveries=self._deliveries, recipients=self._recipients,
                           pools=len(self._pools), retries=self._retries,
                           follow_ups=self._follow_ups)
        for target in self._pools.values():
            stats = target.pool.stats
            for f in _POOL_COUNTERS:
                mine, theirs = getattr(total, f), getattr(stats, f)
                setattr(total, f, max(mine, theirs) if f.startswith("peak_") else mine + theirs)
        return total

    def pools(self) -> dict[tuple[str, Destination], Pool]:
        """The pools made so far, by (transport name, destination)."""
        return {key: target.pool for key, target in self._pools.items()}

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
            await asyncio.gather(*(t.pool.close(timeout) for t in self._pools.values()))
        await self._router.aclose()

    async def __aenter__(self) -> Agent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<lmtpfast.Agent transports={sorted(self._transports)} pools={len(self._pools)}>"



_END = object()


class _Lane:
    """The deliveries waiting for one back end's pipelined connections."""

    __slots__ = ("connections", "queue", "target", "wake")

    def __init__(self, target: _Target) -> None:
        self.target = target
        #: (what the caller gave, what is sent, the caller's addresses when they differ)
        self.queue: deque[tuple[Delivery, Delivery, tuple[str, ...] | None]] = deque()
        self.wake = asyncio.Event()
        self.connections = 0


class _Take:
    """The iterator one ``send_many`` reads: what is waiting now (it ends when none is)."""

    __slots__ = ("lane", "taken")

    def __init__(self, lane: _Lane, taken: dict[int, tuple[Delivery, tuple[str, ...] | None]]
                 ) -> None:
        self.lane = lane
        self.taken = taken

    def __iter__(self) -> _Take:
        return self

    def __next__(self) -> Delivery:
        queue = self.lane.queue
        if not queue:
            raise StopIteration
        d, sub, addresses = queue.popleft()
        self.taken[id(sub)] = (d, addresses)
        return sub


class _Many:
    """One :meth:`Agent.deliver_many` stream: a reader of the source, pipelined lanes per
    back end, a task per delivery that goes the slow way, and one queue of results."""

    def __init__(self, agent: Agent, deliveries: Iterable[Delivery] | AsyncIterable[Delivery],
                 concurrency: int,
                 errors: Callable[[Delivery, Exception], list[RecipientResult]] | None) -> None:
        self.agent = agent
        self.concurrency = concurrency
        self.errors = errors
        self.out: asyncio.Queue[Any] = asyncio.Queue()
        #: Taken from the source and not yet handed to the consumer.
        self.inflight = 0
        self.room = asyncio.Event()
        self.ended = False
        self.closing = False
        self.lanes: dict[_Target, _Lane] = {}
        self.tasks: set[asyncio.Future[Any]] = set()
        self.deliveries = deliveries
        self.reader = asyncio.ensure_future(self._read())

    async def results(self) -> AsyncIterator[tuple[Delivery, list[RecipientResult]]]:
        out = self.out
        ended = False
        while not (ended and self.inflight == 0):
            item = await out.get()
            if item is _END:
                ended = True
                continue
            if isinstance(item, BaseException):
                raise item
            self.inflight -= 1
            self.room.set()
            yield item

    async def close(self) -> None:
        self.ended = self.closing = True
        tasks = [self.reader, *self.tasks]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- the source ----------------------------------------------------------------------

    async def _read(self) -> None:
        agent = self.agent
        deliveries = self.deliveries
        source: Iterator[Delivery] | None = None
        asource: AsyncIterator[Delivery] | None = None
        if isinstance(deliveries, AsyncIterable):
            asource = aiter(deliveries)
        else:
            source = iter(deliveries)
        try:
            while True:
                while self.inflight >= self.concurrency:
                    self.room.clear()
                    await self.room.wait()
                if source is not None:
                    d = next(source, None)
                else:
                    d = await anext(asource, None)  # type: ignore[arg-type]
                if d is None:
                    break
                self.inflight += 1
                if agent._closed:
                    raise RuntimeError("the agent is closed")
                fast = agent._lane_for(d) if type(d) is Delivery else None
                if fast is None:
                    self._spawn(self._slow(d))
                    continue
                target, sub = fast
                agent._deliveries += 1
                agent._recipients += len(d.recipients)
                lane = self._lane(target)
                lane.queue.append((d, sub, None if sub is d else d.recipients))
                lane.wake.set()
        except Exception as exc:
            self.out.put_nowait(exc)
        finally:
            self.ended = True
            for lane in self.lanes.values():
                lane.wake.set()
            self.out.put_nowait(_END)

    def _lane(self, target: _Target) -> _Lane:
        lane = self.lanes.get(target)
        if lane is None:
            lane = self.lanes[target] = _Lane(target)
            n = max(1, min(target.pool.settings.max_connections, self.concurrency))
            window = max(1, self.concurrency // n)
            for _ in range(n):
                self._spawn(self._run_lane(lane, window))
        return lane

    # -- the slow way: deliver(), a task each ------------------------------------------------

    async def _slow(self, d: Delivery) -> None:
        try:
            try:
                results = await self.agent.deliver(d)
            except Exception as exc:
                if self.errors is None:
                    raise
                results = self.errors(d, exc)
        except Exception as exc:
            self.out.put_nowait(exc)
            return
        self.out.put_nowait((d, results))

    def _again(self, d: Delivery) -> None:
        """Deliver ``d`` the slow way after all (counted there)."""
        if self.closing:
            return  # the stream is being torn down: nothing starts any more
        self.agent._deliveries -= 1
        self.agent._recipients -= len(d.recipients)
        self._spawn(self._slow(d))

    # -- a pipelined connection -------------------------------------------------------------

    async def _run_lane(self, lane: _Lane, window: int) -> None:
        try:
            await self._lane_loop(lane, window)
        except Exception as exc:
            self.out.put_nowait(exc)

    async def _lane_loop(self, lane: _Lane, window: int) -> None:
        target = lane.target
        pool = target.pool
        shaper = target.shaper
        queue = lane.queue
        taken: dict[int, tuple[Delivery, tuple[str, ...] | None]] = {}
        while True:
            if not queue:
                if self.ended:
                    return
                lane.wake.clear()
                await lane.wake.wait()
                continue
            if not shaper.unshaped():
                # Marked dead (by deliveries that went the slow way): deliver() defers them.
                while queue:
                    self._again(queue.popleft()[0])
                continue
            conn = pool.acquire_nowait()
            if conn is None:
                if pool.size < pool.settings.max_connections:
                    # A connection is to be opened: by one delivery the ordinary way,
                    # which reports a failure (as its results, to the shaping) once.
                    d = queue.popleft()[0]
                    self.agent._deliveries -= 1
                    self.agent._recipients -= len(d.recipients)
                    await self._slow(d)
                    continue
                try:
                    conn = await pool.acquire()
                except (LMTPError, OSError) as exc:
                    if isinstance(exc, LocalProtocolError):
                        raise
                    if queue:
                        self._again(queue.popleft()[0])
                    continue
            ok = False
            broke: BaseException | None = None
            try:
                async for sub, results in conn.send_many(_Take(lane, taken), window=window):
                    d, addresses = taken.pop(id(sub))
                    if _died_before_reply(results):
                        self._again(d)  # nothing reached the server: another connection
                        continue
                    if not results[0].local:
                        shaper.reached()
                    if len(results) > 1 and any(map(_too_many_recipients, results)):
                        self._spawn(self._follow_up(target, d, sub, results, addresses))
                        continue
                    self.out.put_nowait((d, self.agent._stamp(target, results, addresses)))
                ok = True
            except (LMTPError, OSError) as exc:
                broke = exc  # what was in flight when the connection broke was yielded first
            finally:
                pool.release(conn, reusable=ok)
            if taken:
                self._left(target, taken, broke)

    def _left(self, target: _Target, taken: dict[int, tuple[Delivery, tuple[str, ...] | None]],
              exc: BaseException | None) -> None:
        """What a ``send_many`` that raised took and did not yield back.

        The last one taken was never sent (taking it is what failed, or the
        connection was found broken): it goes the slow way. Any other was in
        flight when ``send_many`` gave up on the connection without its reply
        (not a break, which yields them first): it may have been delivered.
        """
        left = list(taken.values())
        taken.clear()
        d, _ = left.pop()
        self._again(d)
        for d, addresses in left:
            results = LOST_AFTER_DOT.results(
                addresses or d.recipients, destination=target.dest,
                detail=f"the connection to {target.dest} was given up with this transaction in "
                       f"flight: {exc}")
            self.out.put_nowait((d, results))

    async def _follow_up(self, target: _Target, d: Delivery, sub: Delivery,
                         results: list[RecipientResult], addresses: tuple[str, ...] | None
                         ) -> None:
        agent = self.agent
        try:
            results = await agent._send_again(target, sub, results)
        except Exception as exc:
            self.out.put_nowait(exc)
            return
        self.out.put_nowait((d, agent._stamp(target, results, addresses)))
