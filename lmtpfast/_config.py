"""Agent configuration: one TOML file, or the same from Python objects.

The file (see ``examples/lmtpfast.toml`` and ``docs/agent.md``)::

    lhlo_name = "mx1.example.org"
    default = "lmtp:unix:/var/imap/socket/lmtp"     # the seed's mailbox_transport
    transport_map = "transport"                     # Postfix map files, relative to
    virtual_map = "virtual"                         # this file's folder (or inline tables)

    [defaults]                                      # inherited by every transport
    recipient_limit = 50
    pool = { max_connections = 20 }

    [transports.lmtp1]                              # master.cf's lmtp1 ... lmtp
    destination = "unix:/path/name"
    timeouts = { final = 120 }

    [transports.cyrus]                              # TLS and SASL (docs/security.md)
    destination = "backend.example.org:24"
    tls_security_level = "verify"                   # none, may, encrypt, verify
    tls_ca_file = "/etc/lmtpfast/backend-ca.pem"    # default: the system store
    sasl_password_maps = "sasl_passwd"              # mode 0600, relative to this file
    sasl_mechanisms = ["SCRAM-SHA-256", "SCRAM-SHA-1"]

It is parsed with :mod:`tomllib` and validated with msgspec; every error is a
:class:`~lmtpfast.ConfigurationError` naming the file, the key (or map line)
and the problem. Map files are read and checked when the config is loaded,
and every transport a route names must be declared (``lmtp`` always exists).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from ._destination import Destination, DestinationSet, parse_destination
from ._errors import ConfigurationError
from ._maps import CacheSettings, Map, is_map_name, open_map, split_map_name
from ._passwords import PasswordMap
from ._routing import ERROR_TRANSPORTS, Route, TransportMap, VirtualMap, parse_route
from ._sasl import DEFAULT_MECHANISMS, AuthPolicy, Credentials, parse_mechanisms
from ._settings import PoolSettings, ShapingSettings, Timeouts
from ._tls import TLSPolicy

__all__ = [
    "DEFAULT_RECIPIENT_LIMIT",
    "DEFAULT_TRANSPORT",
    "AgentConfig",
    "Transport",
    "config_from_dict",
    "load_config",
]

#: The transport that always exists and that ``:nexthop`` routes use (Postfix's ``lmtp``).
DEFAULT_TRANSPORT = "lmtp"
#: Recipients per transaction at most (``lmtp_destination_recipient_limit``).
DEFAULT_RECIPIENT_LIMIT = 50

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True, slots=True)
class Transport:
    """One named transport (what a ``master.cf`` line gives Postfix): its own pools and settings.

    ``destination`` is used when a route names the transport without a next
    hop (``lmtp1:``); with neither, the recipient's domain on port 24 is used,
    as Postfix does. ``destinations`` instead names a set of back ends that
    share the transport's users: each user goes to one of them by consistent
    (rendezvous) hashing of the address (:class:`~lmtpfast.DestinationSet`);
    ``failover`` says whether the users of a member that cannot be reached
    are deferred (False, the default: their mailboxes are there) or tried
    on their next member.
    """

    destination: str | Destination | None = None
    destinations: tuple[str | Destination, ...] = ()
    failover: bool = False
    recipient_limit: int = DEFAULT_RECIPIENT_LIMIT
    lhlo_name: str | None = None
    pipelining: bool = True
    #: LHLO keywords to ignore (``lmtp_discard_lhlo_keywords``), e.g. ``("PIPELINING",)``.
    ignore_keywords: tuple[str, ...] = ()
    pool: PoolSettings = field(default_factory=PoolSettings)
    timeouts: Timeouts = field(default_factory=Timeouts)
    #: Traffic shaping per destination: concurrency window, rate delay, message
    #: rate, dead-destination detection (file key ``shaping = { ... }``).
    shaping: ShapingSettings = field(default_factory=ShapingSettings)
    #: STARTTLS policy: a :class:`~lmtpfast.TLSPolicy` or a level name
    #: (file keys ``tls_security_level``, ``tls_ca_file``, ``tls_cert_file`` ...).
    tls: TLSPolicy = field(default_factory=TLSPolicy)
    #: Password maps searched in order per destination (``sasl_password_maps``).
    sasl_password_maps: tuple[PasswordMap, ...] = ()
    #: Credentials for every destination of this transport (Python only: a
    #: config file names a password map, never a password).
    sasl_credentials: Credentials | None = None
    #: SASL mechanisms allowed, best first (``sasl_mechanisms``).
    sasl_mechanisms: tuple[str, ...] = DEFAULT_MECHANISMS
    #: PLAIN/LOGIN allowed? ``None``: not on unencrypted TCP (Postfix's noplaintext).
    sasl_allow_plaintext: bool | None = None
    #: A 5xx greeting defers the recipients, as Postfix's ``lmtp_skip_5xx_greeting
    #: = yes`` (a back end that greets with 554 is usually starting or stopping);
    #: ``False`` takes it as permanent.
    skip_5xx_greeting: bool = True

    def __post_init__(self) -> None:
        if self.destination is not None and not isinstance(self.destination, Destination):
            object.__setattr__(self, "destination", parse_destination(self.destination))
        if self.destinations:
            if self.destination is not None:
                raise ConfigurationError("give destination or destinations, not both",
                                         field="destinations")
            members = tuple(parse_destination(d) for d in self.destinations)
            DestinationSet(members)  # checks: no duplicates
            object.__setattr__(self, "destinations", members)
        limit = self.recipient_limit
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigurationError(f"must be an integer >= 1, got {limit!r}",
                                     field="recipient_limit")
        if not isinstance(self.ignore_keywords, tuple):
            object.__setattr__(self, "ignore_keywords", tuple(self.ignore_keywords))
        if not isinstance(self.pool, PoolSettings):
            raise ConfigurationError("must be a PoolSettings", field="pool")
        if not isinstance(self.timeouts, Timeouts):
            raise ConfigurationError("must be a Timeouts", field="timeouts")
        if not isinstance(self.shaping, ShapingSettings):
            raise ConfigurationError("must be a ShapingSettings", field="shaping")
        if not isinstance(self.tls, TLSPolicy):
            object.__setattr__(self, "tls", TLSPolicy.parse(self.tls))
        maps: Any = self.sasl_password_maps
        if isinstance(maps, PasswordMap | str | os.PathLike):
            maps = (maps,)
        object.__setattr__(self, "sasl_password_maps", tuple(
            m if isinstance(m, PasswordMap) else PasswordMap.from_file(m) for m in maps))
        if self.sasl_credentials is not None and not isinstance(self.sasl_credentials, Credentials):
            raise ConfigurationError("must be a lmtpfast.Credentials", field="sasl_credentials")
        object.__setattr__(self, "sasl_mechanisms", parse_mechanisms(self.sasl_mechanisms))

    @property
    def dest(self) -> Destination | None:
        """``destination`` parsed (``None`` when not set)."""
        return self.destination if isinstance(self.destination, Destination) else None

    @property
    def targets(self) -> Destination | DestinationSet | None:
        """Where routes without a next hop go: ``destination``, or the set of ``destinations``."""
        if self.destinations:
            return DestinationSet(self.destinations, self.failover)  # type: ignore[arg-type]
        return self.dest

    def auth_for(self, destination: str | Destination) -> AuthPolicy | None:
        """How to authenticate to ``destination``: ``sasl_credentials``, else the first
        password map that has it; ``None`` when neither does (no AUTH then)."""
        creds = self.sasl_credentials
        if creds is None:
            for pmap in self.sasl_password_maps:
                creds = pmap.lookup(destination)
                if creds is not None:
                    break
        if creds is None:
            return None
        return AuthPolicy(creds, self.sasl_mechanisms, self.sasl_allow_plaintext)


@dataclass(frozen=True)
class AgentConfig:
    """Everything an :class:`~lmtpfast.Agent` needs, validated."""

    transports: Mapping[str, Transport] = field(default_factory=dict)
    transport_map: TransportMap | None = None
    virtual_map: VirtualMap | None = None
    #: Further ``TYPE:NAME`` maps searched after ``transport_map``/``virtual_map``
    #: (all of them, in order, when those are ``None``): Postfix's
    #: ``transport_maps``/``virtual_alias_maps`` lists.
    transport_maps: tuple[Map, ...] = ()
    virtual_maps: tuple[Map, ...] = ()
    #: Recipients not found here are refused (``550 5.1.1``) before any LMTP
    #: connection; ``None``: no recipient check (Postfix's ``relay_recipient_maps``).
    recipient_maps: tuple[Map, ...] | None = None
    #: How network maps' answers are cached (the ``[map_cache]`` table).
    map_cache: CacheSettings = field(default_factory=CacheSettings)
    #: The route for recipients no map entry matches (``mailbox_transport``).
    default: Route | None = None
    lhlo_name: str | None = None
    #: Characters that start an address extension (``recipient_delimiter``, e.g. ``"+"``).
    recipient_delimiter: str = ""
    #: A recipient no route matches: ``"defer"`` (the default: 451 4.4.4, tried
    #: again, as for any failure of ours) or ``"bounce"`` (554 5.4.4, final).
    no_route: Literal["defer", "bounce"] = "defer"
    #: Where ``lmtpfast enqueue``/``replay`` find the queue when the command line
    #: names none (a spool path, ``dir:PATH``, ``postgresql://...``); never in the
    #: repr (a URL may carry a password).
    queue: str | None = field(default=None, repr=False)
    #: Where this came from, for error messages.
    source: str = "<python>"

    def __post_init__(self) -> None:
        transports = {}
        for name, transport in self.transports.items():
            key = _transport_name(name, self.source, f"transports.{name}")
            if key in transports:
                raise ConfigurationError(f"transport {name!r} declared twice (names ignore case)",
                                         source=self.source, field=f"transports.{name}")
            if not isinstance(transport, Transport):
                raise ConfigurationError("must be a lmtpfast.Transport",
                                         source=self.source, field=f"transports.{name}")
            transports[key] = transport
        transports.setdefault(DEFAULT_TRANSPORT, Transport())
        object.__setattr__(self, "transports", transports)
        if self.transport_map is not None:
            for entry, route in self.transport_map.routes():
                self._check_route(route, entry.source, entry.line,
                                  None if entry.line is not None else f"transport_map.{entry.key}")
        if self.default is not None:
            self._check_route(self.default, self.source, None, "default")
        if self.no_route not in ("defer", "bounce"):
            raise ConfigurationError(f"must be 'defer' or 'bounce', not {self.no_route!r}",
                                     source=self.source, field="no_route")

    def check_routes_something(self) -> None:
        """Raise :class:`ConfigurationError` if no recipient could ever be routed.

        With neither a default route nor a transport map entry every recipient
        would be refused (or deferred forever): that is a broken configuration,
        refused before anything is delivered.
        """
        if self.default is None and not self.transport_map and not self.transport_maps:
            raise ConfigurationError(
                "this configuration routes nothing: give a default route (default = "
                "\"lmtp:unix:/path\") or a transport_map with entries", source=self.source)

    def _check_route(self, route: Route, source: str, line: int | None, key: str | None) -> None:
        name = route.transport or DEFAULT_TRANSPORT
        if name in ERROR_TRANSPORTS or name in self.transports:
            return
        declared = ", ".join(sorted(self.transports))
        raise ConfigurationError(
            f"route {str(route)!r} names transport {name!r}, which is not declared "
            f"(add [transports.{name}]; declared: {declared})",
            source=source, line=line, field=key)


def _transport_name(name: str, source: str, key: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigurationError(f"bad transport name {name!r}", source=source, field=key)
    low = name.lower()
    if low in ERROR_TRANSPORTS:
        raise ConfigurationError(f"{low!r} is a built-in transport and cannot be declared",
                                 source=source, field=key)
    return low


# -- the file format ---------------------------------------------------------------

class _TimeoutsTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Mirrors transport.Timeouts (a test checks the names stay in step).
    connect: Annotated[float, msgspec.Meta(gt=0)] | None = None
    greeting: Annotated[float, msgspec.Meta(gt=0)] | None = None
    lhlo: Annotated[float, msgspec.Meta(gt=0)] | None = None
    starttls: Annotated[float, msgspec.Meta(gt=0)] | None = None
    auth: Annotated[float, msgspec.Meta(gt=0)] | None = None
    mail: Annotated[float, msgspec.Meta(gt=0)] | None = None
    rcpt: Annotated[float, msgspec.Meta(gt=0)] | None = None
    data: Annotated[float, msgspec.Meta(gt=0)] | None = None
    content: Annotated[float, msgspec.Meta(gt=0)] | None = None
    final: Annotated[float, msgspec.Meta(gt=0)] | None = None
    rset: Annotated[float, msgspec.Meta(gt=0)] | None = None
    quit: Annotated[float, msgspec.Meta(gt=0)] | None = None
    command: Annotated[float, msgspec.Meta(gt=0)] | None = None

    def to_timeouts(self) -> Timeouts:
        given = {name: getattr(self, name) for name in Timeouts.__struct_fields__
                 if getattr(self, name) is not None}
        return Timeouts(**given)


class _TransportTable(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    destination: str | None = None
    destinations: list[str] = []
    failover: bool = False
    recipient_limit: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_RECIPIENT_LIMIT
    lhlo_name: str | None = None
    pipelining: bool = True
    ignore_keywords: list[str] = []
    skip_5xx_greeting: bool = True
    pool: PoolSettings = PoolSettings()
    shaping: ShapingSettings = ShapingSettings()
    timeouts: _TimeoutsTable = _TimeoutsTable()
    tls_security_level: str = "none"
    tls_ca_file: str | None = None
    tls_ca_path: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_server_hostname: str | None = None
    tls_verify: bool | None = None
    tls_min_version: str = "TLSv1.2"
    sasl_password_maps: str | list[str] = []
    sasl_mechanisms: str | list[str] | None = None
    sasl_allow_plaintext: bool | None = None


class _MapCacheTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Mirrors _maps.CacheSettings (same defaults).
    ttl: Annotated[float, msgspec.Meta(ge=0)] = 300.0
    negative_ttl: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    size: Annotated[int, msgspec.Meta(ge=0)] = 100_000
    stale: Annotated[float, msgspec.Meta(ge=0)] = 3600.0


class _FileTable(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    lhlo_name: str | None = None
    default: str | None = None
    transport_map: str | list[str] | dict[str, str] | None = None
    virtual_map: str | list[str] | dict[str, str] | None = None
    recipient_map: str | list[str] | None = None
    map_cache: _MapCacheTable = _MapCacheTable()
    recipient_delimiter: str = ""
    no_route: str = "defer"
    queue: str | None = None
    defaults: dict[str, Any] = {}
    transports: dict[str, Any] = {}


_PATH = re.compile(r"^(?P<problem>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def _convert(data: Any, typ: type[Any], source: str, prefix: str) -> Any:
    """msgspec.convert with errors that name the source and the dotted key."""
    try:
        return msgspec.convert(data, typ)
    except msgspec.ValidationError as exc:
        m = _PATH.match(str(exc))
        assert m is not None
        problem, path = m.group("problem"), (m.group("path") or "")
        key = prefix + path.replace("[...]", "")
        unknown = re.match(r"Object contains unknown field `([^`]*)`", problem)
        if unknown:
            key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
            problem = "unknown key"
        raise ConfigurationError(problem, source=source, field=key.strip(".") or None) from None
    except ConfigurationError as exc:  # raised by a __post_init__ outside msgspec's wrapping
        key = ".".join(p for p in (prefix, exc.field) if p)
        raise ConfigurationError(exc.problem, source=source, field=key or None) from None


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _security_from_table(
    table: _TransportTable, source: str, key: str, base: Path,
) -> tuple[TLSPolicy, tuple[PasswordMap, ...], tuple[str, ...]]:
    """The ``tls_*`` and ``sasl_*`` keys; file paths are relative to ``base``."""
    def path(value: str | None, name: str) -> str | None:
        if value is None:
            return None
        if not value:
            raise ConfigurationError("empty path", source=source, field=name)
        return str(base / value)

    try:
        tls = TLSPolicy(
            level=table.tls_security_level.strip().lower(),  # type: ignore[arg-type]
            ca_file=path(table.tls_ca_file, "tls_ca_file"),
            ca_path=path(table.tls_ca_path, "tls_ca_path"),
            cert_file=path(table.tls_cert_file, "tls_cert_file"),
            key_file=path(table.tls_key_file, "tls_key_file"),
            server_hostname=table.tls_server_hostname, verify=table.tls_verify,
            min_version=table.tls_min_version,  # type: ignore[arg-type]
        )
        mechanisms = (DEFAULT_MECHANISMS if table.sasl_mechanisms is None
                      else parse_mechanisms(table.sasl_mechanisms))
    except ConfigurationError as exc:
        sub = f"{key}.{exc.field}" if exc.field else key
        raise ConfigurationError(exc.problem, source=source, field=sub) from None
    names = table.sasl_password_maps
    if isinstance(names, str):
        names = [names]
    maps = []
    for name in names:
        parsed = split_map_name(name)
        prefix = ""
        if parsed is not None:  # TYPE:NAME (Postfix's smtp_sasl_password_maps form)
            prefix, name = parsed[0] + ":", parsed[1]
        try:
            file = path(name, "sasl_password_maps")
        except ConfigurationError as exc:
            raise ConfigurationError(exc.problem, source=source,
                                     field=f"{key}.sasl_password_maps") from None
        assert file is not None
        maps.append(PasswordMap.from_file(prefix + file))  # its errors name the map file
    return tls, tuple(maps), mechanisms


def _transport_from_table(
    table: _TransportTable, source: str, key: str, base: Path | None = None,
) -> Transport:
    try:
        dest = None if table.destination is None else parse_destination(table.destination)
    except ConfigurationError as exc:
        raise ConfigurationError(exc.problem, source=source, field=f"{key}.destination") from None
    try:
        members = tuple(parse_destination(d) for d in table.destinations)
    except ConfigurationError as exc:
        raise ConfigurationError(exc.problem, source=source,
                                 field=f"{key}.destinations") from None
    name = table.lhlo_name
    if name is not None and (not name or any(c.isspace() or c == "\0" for c in name)):
        raise ConfigurationError(f"bad LHLO name {name!r}", source=source,
                                 field=f"{key}.lhlo_name")
    tls, maps, mechanisms = _security_from_table(table, source, key, base or Path.cwd())
    try:
        return Transport(
            destination=dest, destinations=members, failover=table.failover,
            recipient_limit=table.recipient_limit,
            lhlo_name=name, pipelining=table.pipelining,
            skip_5xx_greeting=table.skip_5xx_greeting,
            ignore_keywords=tuple(table.ignore_keywords), pool=table.pool,
            shaping=table.shaping,
            timeouts=table.timeouts.to_timeouts(),
            tls=tls, sasl_password_maps=maps, sasl_mechanisms=mechanisms,
            sasl_allow_plaintext=table.sasl_allow_plaintext,
        )
    except ConfigurationError as exc:
        sub = f"{key}.{exc.field}" if exc.field else key
        raise ConfigurationError(exc.problem, source=source, field=sub) from None


def config_from_dict(
    data: Mapping[str, Any], *, source: str = "<python>",
    base_dir: str | os.PathLike[str] | None = None,
) -> AgentConfig:
    """Validate a config given as the TOML file's data (map paths relative to ``base_dir``)."""
    if not isinstance(data, Mapping):
        raise ConfigurationError("the configuration must be a table", source=source)
    top: _FileTable = _convert(dict(data), _FileTable, source, "")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if not isinstance(top.defaults, Mapping):
        raise ConfigurationError("must be a table", source=source, field="defaults")
    _convert(top.defaults, _TransportTable, source, "defaults")  # its own errors, its own key

    transports: dict[str, Transport] = {}
    for name, raw in top.transports.items():
        key = f"transports.{name}"
        lname = _transport_name(name, source, key)
        if lname in transports:
            raise ConfigurationError(f"transport {name!r} declared twice (names ignore case)",
                                     source=source, field=key)
        if not isinstance(raw, Mapping):
            raise ConfigurationError("must be a table", source=source, field=key)
        table: _TransportTable = _convert(_merge(top.defaults, raw), _TransportTable, source, key)
        transports[lname] = _transport_from_table(table, source, key, base)
    if DEFAULT_TRANSPORT not in transports and top.defaults:
        table = _convert(dict(top.defaults), _TransportTable, source, "defaults")
        transports[DEFAULT_TRANSPORT] = _transport_from_table(table, source, "defaults", base)

    mc = top.map_cache
    cache = CacheSettings(ttl=mc.ttl, negative_ttl=mc.negative_ttl, size=mc.size, stale=mc.stale)

    def read(kind: str, value: str | list[str] | dict[str, str] | None
             ) -> tuple[Any, tuple[Map, ...]]:
        """``(checked text map or None, further maps)`` for one map setting."""
        cls = TransportMap if kind == "transport_map" else VirtualMap
        if value is None:
            return None, ()
        if isinstance(value, dict):  # an inline table: same keys and values as the file
            try:
                return cls(value, source=source), ()
            except ConfigurationError as exc:
                raise ConfigurationError(exc.problem, source=source, field=kind) from None
        names = _map_names(value, source, kind)
        first: Any = None
        rest: list[Map] = []
        for i, name in enumerate(names):
            parsed = split_map_name(name)
            if i == 0 and (parsed is None or parsed[0] in ("texthash", "hash", "btree")):
                # A text file: checked entry by entry when the config is loaded.
                file = name if parsed is None else parsed[1]
                first = cls.from_file(base / file)
                continue
            rest.append(_open(name, base, cache, source, kind))
        return first, tuple(rest)

    tmap, tmaps = read("transport_map", top.transport_map)
    vmap, vmaps = read("virtual_map", top.virtual_map)
    rmaps: tuple[Map, ...] | None = None
    if top.recipient_map is not None:
        rmaps = tuple(_open(n, base, cache, source, "recipient_map")
                      for n in _map_names(top.recipient_map, source, "recipient_map"))

    default = None
    if top.default is not None:
        try:
            default = parse_route(top.default, source=source)
        except ConfigurationError as exc:
            raise ConfigurationError(exc.problem, source=source, field="default") from None
    if top.lhlo_name is not None and (not top.lhlo_name or any(c.isspace() for c in top.lhlo_name)):
        raise ConfigurationError(f"bad LHLO name {top.lhlo_name!r}", source=source,
                                 field="lhlo_name")
    return AgentConfig(
        transports=transports,
        transport_map=tmap,
        virtual_map=vmap,
        transport_maps=tmaps,
        virtual_maps=vmaps,
        recipient_maps=rmaps,
        map_cache=cache,
        default=default,
        lhlo_name=top.lhlo_name,
        recipient_delimiter=top.recipient_delimiter,
        no_route=top.no_route,  # type: ignore[arg-type]  # checked by AgentConfig
        queue=_queue_location(top.queue, source),
        source=source,
    )


def _queue_location(value: str | None, source: str) -> str | None:
    if value is None:
        return None
    if not value.strip() or "\n" in value or "\0" in value:
        raise ConfigurationError("bad queue location (a spool path, dir:PATH or "
                                 "postgresql://...)", source=source, field="queue")
    return value


def _map_names(value: str | list[str], source: str, kind: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ConfigurationError("empty map name", source=source, field=kind)
        # A Postfix list: "hash:/a, pgsql:/b.cf" (a plain path never holds ", ").
        parts = re.split(r"[\s,]+", item.strip())
        if len(parts) > 1 and not all(is_map_name(p) for p in parts):
            raise ConfigurationError(f"{item!r}: a list of maps is written 'TYPE:NAME, "
                                     "TYPE:NAME' (or a TOML list)", source=source, field=kind)
        names.extend(parts)
    return names


def _open(name: str, base: Path, cache: CacheSettings, source: str, kind: str) -> Map:
    try:
        return open_map(name, base_dir=base, cache=cache)
    except ConfigurationError as exc:
        if exc.source and exc.source != name:
            raise  # the map's own file and line
        raise ConfigurationError(exc.problem, source=source, field=kind) from None


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A TOML file's data; :class:`ConfigurationError` with the file and line when it is bad."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file: {exc.strerror or exc}",
                                 source=source) from None
    except UnicodeDecodeError as exc:
        at = exc.object[: exc.start].count(b"\n") + 1
        column = exc.start - (exc.object.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigurationError(f"not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at column "
                                 f"{column})", source=source, line=at) from None
    except tomllib.TOMLDecodeError as exc:
        text = str(exc)
        m = re.search(r"\(at line (\d+), column (\d+)\)", text)
        line = int(m.group(1)) if m else None
        problem = re.sub(r"\s*\(at line \d+, column \d+\)", "", text)
        if m:
            problem += f" (column {m.group(2)})"
        raise ConfigurationError(f"TOML syntax: {problem}", source=source, line=line) from None


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate a TOML config file (map paths are relative to its folder)."""
    source = os.fspath(path)
    data = read_toml(source)
    return config_from_dict(data, source=source, base_dir=Path(source).resolve().parent)
