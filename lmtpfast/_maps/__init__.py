"""Lookup tables named ``TYPE:NAME`` as in Postfix's main.cf.

>>> m = open_map("pgsql:/etc/postfix/pgsql-transport.cf")          # doctest: +SKIP
>>> await m.lookup_many(["alice@example.com", "example.com"])       # doctest: +SKIP
{'alice@example.com': ['lmtp:unix:/run/dovecot/lmtp'], 'example.com': None}

Types: ``texthash:FILE``, ``hash:FILE``/``btree:FILE`` (their source text),
``cdb:FILE``, ``lmdb:FILE``, ``pgsql:FILE.cf``, ``mysql:FILE.cf``,
``ldap:FILE.cf``, ``socketmap:inet:HOST:PORT:NAME`` /
``socketmap:unix:PATH:NAME``, ``tcp:HOST:PORT``, ``static:VALUE``,
``inline:{key=value, ...}``; ``proxy:TYPE:NAME`` is ``TYPE:NAME`` (lmtpfast
asks the database itself). A bare path is ``texthash:PATH``.

Network maps are wrapped in a :class:`CachedMap` (TTL, negative TTL, size
bound, serve-stale, single-flight) unless ``cache=None``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from .._errors import ConfigurationError
from .._failures import MAP_FAILURE
from ._base import (
    NOT_CACHED,
    LookupResult,
    Map,
    MapError,
    MapWarning,
    NotCached,
    as_text,
    gather_lookups,
)
from ._cache import CachedMap, CacheSettings, CacheStats
from ._file import CdbMap, LmdbMap, TextMap
from ._simple import InlineMap, StaticMap

__all__ = [
    "FILE_TYPES",
    "NETWORK_TYPES",
    "NOT_CACHED",
    "CacheSettings",
    "CacheStats",
    "CachedMap",
    "LookupResult",
    "Map",
    "MapError",
    "MapWarning",
    "NotCached",
    "TextMap",
    "as_text",
    "gather_lookups",
    "is_map_name",
    "map_failure",
    "open_map",
    "split_map_name",
]

FILE_TYPES = frozenset({"texthash", "hash", "btree", "cdb", "lmdb"})
NETWORK_TYPES = frozenset({"pgsql", "mysql", "ldap", "socketmap", "tcp"})
_OTHER = frozenset({"static", "inline"})
_POSTFIX_ONLY = frozenset({"regexp", "pcre", "cidr", "unionmap", "pipemap", "randmap", "fail",
                           "environ", "internal", "nis", "nisplus", "memcache", "sqlite",
                           "sdbm", "dbm", "unix", "ldaps"})
KNOWN_TYPES = FILE_TYPES | NETWORK_TYPES | _OTHER
_TYPE = re.compile(r"([a-z][a-z0-9_]*):(.*)", re.S)

#: The temporary result a recipient gets when a map it needed could not answer
#: (Postfix: "451 4.3.0 <addr>: Temporary lookup failure"): the failure table's
#: ``map-failure`` row (lmtpfast/_failures.py).
MAP_FAILURE_CODE = MAP_FAILURE.code
MAP_FAILURE_ENHANCED = MAP_FAILURE.enhanced


def map_failure(err: MapError) -> tuple[int, str, str]:
    """(code, enhanced code, text) for a recipient whose lookup failed."""
    return (MAP_FAILURE_CODE, MAP_FAILURE_ENHANCED,
            f"temporary lookup failure in {err.map}: {err.problem}")


def split_map_name(text: str) -> tuple[str, str] | None:
    """``(type, name)`` of ``TYPE:NAME`` when TYPE is a map type we know (or Postfix has)."""
    m = _TYPE.fullmatch(text.strip())
    if m is None:
        return None
    mtype = m.group(1)
    if mtype not in KNOWN_TYPES and mtype not in _POSTFIX_ONLY and mtype != "proxy":
        return None
    return mtype, m.group(2)


def is_map_name(text: str) -> bool:
    """True for ``TYPE:NAME`` (rather than a plain file path)."""
    return split_map_name(text) is not None


def open_map(
    text: str,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    cache: CacheSettings | None = CacheSettings(),  # noqa: B008 - frozen, shared
    clock: Callable[[], float] | None = None,
) -> Map:
    """Open ``TYPE:NAME`` (a bare path is ``texthash:``); relative file names are
    taken from *base_dir*. Raises :class:`ConfigurationError` for a bad name or
    file; network maps connect lazily, at the first lookup."""
    text = text.strip()
    parsed = split_map_name(text)
    if parsed is None:
        if ":" in text.split("/", 1)[0] and not text.startswith(("/", ".")):
            head = text.partition(":")[0]
            raise ConfigurationError(
                f"unknown map type {head!r} in {text!r} (supported: "
                f"{', '.join(sorted(KNOWN_TYPES))})", source=text)
        parsed = ("texthash", text)
    mtype, name = parsed
    while mtype == "proxy":
        inner = split_map_name(name)
        if inner is None or inner[0] == "proxy":
            raise ConfigurationError(f"bad proxy: map {text!r}", source=text)
        mtype, name = inner
    if mtype in _POSTFIX_ONLY:
        raise ConfigurationError(f"map type {mtype!r} is not supported by lmtpfast "
                                 f"(supported: {', '.join(sorted(KNOWN_TYPES))})", source=text)
    if not name:
        raise ConfigurationError(f"map {text!r} has no name", source=text)

    def path(n: str) -> str:
        if base_dir is not None and not os.path.isabs(n):
            return str(Path(base_dir) / n)
        return n

    m: Map
    if mtype in ("texthash", "hash", "btree"):
        m = TextMap(path(name), mtype=mtype)
    elif mtype == "cdb":
        m = CdbMap(path(name))
    elif mtype == "lmdb":
        m = LmdbMap(path(name))
    elif mtype == "static":
        m = StaticMap(name)
    elif mtype == "inline":
        m = InlineMap(name)
    elif mtype == "pgsql":
        from ._sql import PgsqlMap

        m = PgsqlMap(path(name))
    elif mtype == "mysql":
        from ._sql import MysqlMap

        m = MysqlMap(path(name))
    elif mtype == "ldap":
        from ._ldap import LdapMap

        m = LdapMap(path(name))
    elif mtype == "socketmap":
        from ._socket import SocketMap

        m = SocketMap(name)
    else:
        from ._socket import TcpMap

        m = TcpMap(name)
    if cache is not None and not m.static:
        kw = {} if clock is None else {"clock": clock}
        m = CachedMap(m, cache, **kw)
    return m
