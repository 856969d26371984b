"""``ldap:FILE.cf``: Postfix's LDAP map (ldap_table(5)) over bonsai's asyncio client.

Parameters: ``server_host`` (names, ``host:port`` or LDAP URLs, ``ldapi://``
included; tried in order, as OpenLDAP does), ``server_port`` (389),
``search_base`` (``%`` expansions, RFC 2253 quoting), ``query_filter``
(default ``mailacceptinggeneralid=%s``, RFC 2254 quoting), ``result_format``
(or the old ``result_filter``), ``result_attribute`` (default ``maildrop``),
``special_result_attribute`` (DNs followed recursively up to
``recursion_limit``), ``terminal_result_attribute``,
``leaf_result_attribute``, ``scope`` (``sub``, ``base``, ``one``), ``bind``
(``yes``/``simple``, ``no``/``none``; ``sasl`` is refused), ``bind_dn``,
``bind_pw``, ``timeout`` (10 s), ``domain``, ``expansion_limit``,
``size_limit``, ``dereference``, ``version``, ``start_tls``,
``tls_ca_cert_file``, ``tls_require_cert``. A search base that does not
exist is "not found", as in Postfix.

Every attribute value of every entry is one result element. A message's
keys are searched concurrently over a small pool of connections
(``lmtpfast_pool_size``, default 8): bonsai's asyncio connection carries one
operation at a time, so each search holds a connection.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Sequence
from typing import Any

from .._errors import ConfigurationError
from ._base import LookupResult, Map, MapError, MapWarning
from ._cf import read_cf, split_list
from ._expand import Expander, parse_template
from ._sql import DomainFilter, _Pool, prepare_keys

__all__ = ["LdapMap", "dn_quote", "filter_quote"]

_KEYS = {
    "server_host", "server_port", "timeout", "search_base", "query_filter", "result_format",
    "result_filter", "domain", "result_attribute", "special_result_attribute",
    "terminal_result_attribute", "leaf_result_attribute", "scope", "bind", "bind_dn",
    "bind_pw", "cache", "cache_expiry", "cache_size", "recursion_limit", "expansion_limit",
    "size_limit", "dereference", "chase_referrals", "version", "debuglevel", "sasl_mechs",
    "sasl_realm", "sasl_authz_id", "sasl_minssf", "start_tls", "tls_ca_cert_dir",
    "tls_ca_cert_file", "tls_cert", "tls_key", "tls_require_cert", "tls_random_file",
    "tls_cipher_suite", "special_result_filter",
    "lmtpfast_pool_size",
}


def _hex_escape(value: str, specials: str) -> str:
    return "".join(f"\\{ord(c):02X}" if c in specials else c for c in value)


def filter_quote(value: str) -> str:
    """RFC 2254 quoting for ``query_filter`` (``*()\\`` and NUL as ``\\XX``)."""
    return _hex_escape(value, "*()\\\0")


def dn_quote(value: str) -> str:
    """RFC 2253 quoting for ``search_base`` (Postfix quotes every special, not only the edges)."""
    return _hex_escape(value, ' \t"#+,;<>\\=')


def _server_urls(hosts: str, port: int) -> list[str]:
    urls = []
    for item in split_list(hosts):
        if "://" in item:
            urls.append(item)
        elif item.startswith("["):
            urls.append(f"ldap://{item}" if "]:" in item else f"ldap://{item}:{port}")
        elif ":" in item:
            urls.append(f"ldap://{item}")
        else:
            urls.append(f"ldap://{item}:{port}")
    return urls


class LdapMap(Map):
    """``ldap:FILE.cf`` (see the module docstring)."""

    type = "ldap"

    def __init__(self, name: str) -> None:
        try:
            import bonsai
        except ImportError:
            raise ConfigurationError("ldap: maps need bonsai (pip install 'lmtpfast[ldap]'; it "
                                     "builds against libldap-dev and libsasl2-dev)",
                                     source=name) from None
        super().__init__(name)
        cf = read_cf(name, _KEYS, "ldap")
        self.cf = cf
        self.warnings = list(cf.warnings)
        lines = cf.lines
        port = cf.get_int("server_port", 389, 1, 65535)
        self.urls = _server_urls(cf.get_str("server_host", "localhost") or "localhost", port)
        self.timeout = cf.get_float("timeout", 10.0)
        base = cf.get_str("search_base")
        if not cf.has("search_base"):
            self.warnings.append(MapWarning(name, None, "no search_base (ldap_table(5): 'you "
                                            "must configure this')"))
        self.base = parse_template(base, query=True, source=name,
                                   line=lines.get("search_base"), field="search_base")
        self.filter = parse_template(cf.get_str("query_filter", "mailacceptinggeneralid=%s"),
                                     query=True, source=name, line=lines.get("query_filter"),
                                     field="query_filter")
        rf = cf.get_str("result_format") or cf.get_str("result_filter") or "%s"
        self.rf = parse_template(rf, query=False, source=name,
                                 line=lines.get("result_format", lines.get("result_filter")),
                                 field="result_format")
        self.expander = Expander(self.base, self.filter, self.rf)
        self.fixed = not self.expander.partial

        def attrs(key: str, default: str = "") -> list[str]:
            return [a.lower() for a in split_list(cf.get_str(key, default))]

        self.result_attrs = attrs("result_attribute", "maildrop")
        self.special_attrs = attrs("special_result_attribute")
        self.terminal_attrs = attrs("terminal_result_attribute")
        self.leaf_attrs = attrs("leaf_result_attribute")
        self.attrlist = list(dict.fromkeys(self.result_attrs + self.special_attrs +
                                           self.terminal_attrs + self.leaf_attrs))
        self.scope = {"sub": 2, "base": 0, "one": 1}[cf.get_choice("scope", "sub",
                                                                  ("sub", "base", "one"))]
        bind = cf.get_choice("bind", "yes", ("yes", "no", "simple", "none", "sasl"))
        if bind == "sasl":
            raise ConfigurationError("bind = sasl is not supported by lmtpfast (use a simple "
                                     "bind or none)", source=name, line=lines.get("bind"),
                                     field="bind")
        self.bind = bind in ("yes", "simple")
        self.bind_dn = cf.get_str("bind_dn")
        self.bind_pw = cf.get_str("bind_pw")
        self.recursion_limit = cf.get_int("recursion_limit", 1000, 1)
        self.expansion_limit = cf.get_int("expansion_limit", 0, 0)
        self.size_limit = cf.get_int("size_limit", self.expansion_limit, 0)
        self.dereference = cf.get_int("dereference", 0, 0, 3)
        version = cf.get_int("version", 3, 2, 3)
        if version != 3:
            self.warnings.append(MapWarning(name, lines.get("version"), "lmtpfast speaks LDAP "
                                            "version 3 only"))
        self.start_tls = cf.get_bool("start_tls", False)
        self.ca_file = cf.get_str("tls_ca_cert_file")
        self.require_cert = cf.get_bool("tls_require_cert", False)
        self.pool_size = cf.get_int("lmtpfast_pool_size", 8, 1, 256)
        for old in ("cache", "cache_expiry", "cache_size"):
            if cf.has(old):
                self.warnings.append(MapWarning(name, lines.get(old), f"{old} is no longer "
                                                "supported by Postfix (ignored)"))
        self.domains = DomainFilter.parse(cf.get_str("domain"), name, lines.get("domain")) \
            if cf.get_str("domain") else None
        self._bonsai = bonsai
        self._pool: _Pool | None = None

    # -- connection -------------------------------------------------------------

    async def _connect(self) -> Any:
        bonsai = self._bonsai
        errors = []
        for url in self.urls:
            try:
                client = bonsai.LDAPClient(url, tls=self.start_tls)
                if self.ca_file:
                    client.set_ca_cert(self.ca_file)
                if self.start_tls or url.startswith("ldaps:"):
                    client.set_cert_policy("demand" if self.require_cert else "never")
                if self.bind:
                    client.set_credentials("SIMPLE", user=self.bind_dn or "",
                                           password=self.bind_pw or "")
                return await client.connect(is_async=True, timeout=self.timeout)
            except (bonsai.LDAPError, OSError, TimeoutError) as exc:
                errors.append(f"{_safe_url(url)}: {type(exc).__name__}: {_first(exc)}")
        raise MapError(self.mapname, "cannot connect: " + "; ".join(errors))

    async def _close_conn(self, conn: Any) -> None:
        conn.close()

    def _pool_get(self) -> _Pool:
        if self._pool is None or self._pool.closed:
            self._pool = _Pool(self.pool_size, self._connect, self._close_conn)
        return self._pool

    # -- lookups --------------------------------------------------------------------

    async def lookup_many(self, keys: Sequence[str]) -> dict[str, LookupResult]:
        out, todo = prepare_keys(keys, self.expander, self.domains)
        if todo:
            got = await asyncio.gather(*(self._one(k, v) for k, v in todo))
            out.update(zip((k for k, _ in todo), got, strict=True))
        return {k: out[k] for k in keys}

    async def _search(self, conn: Any, base: str, scope: int, flt: str) -> list[Any]:
        return list(await conn.search(base, scope, flt, self.attrlist or ["1.1"],
                                      timeout=self.timeout, sizelimit=self.size_limit))

    async def _one(self, key: str, v: dict[str, str]) -> LookupResult:
        for attempt in (1, 2):
            try:
                async with self._pool_get().acquire() as conn:
                    return await self._one_on(conn, key, v)
            except _Reconnect as exc:
                if attempt == 2:
                    return MapError(self.mapname, str(exc))
            except MapError as exc:
                return exc
        raise AssertionError("unreachable")

    async def _one_on(self, conn: Any, key: str, v: dict[str, str]) -> LookupResult:
        bonsai = self._bonsai
        base = self.expander.expand(self.base, v, dn_quote)
        flt = self.expander.expand(self.filter, v, filter_quote)
        if not flt.startswith("("):
            flt = f"({flt})"
        try:
            entries = await self._search(conn, base, self.scope, flt)
            found: list[str] = []
            await self._values(conn, entries, v, found, 0)
        except _LimitError:
            return MapError(self.mapname, f"expansion limit {self.expansion_limit} exceeded for "
                            f"key {key!r}")
        except bonsai.NoSuchObjectError:
            return None
        except bonsai.SizeLimitError:
            return MapError(self.mapname, f"more than size_limit={self.size_limit} entries for "
                            f"key {key!r}")
        except (bonsai.ConnectionError, bonsai.ClosedConnection, bonsai.TimeoutError,
                OSError, TimeoutError) as exc:
            # The pool drops this connection (the exception leaves acquire()).
            raise _Reconnect(f"search failed: {type(exc).__name__}: {_first(exc)}") from None
        except bonsai.LDAPError as exc:
            return MapError(self.mapname, f"search failed: {type(exc).__name__}: {_first(exc)}")
        return found or None

    async def _values(self, conn: Any, entries: list[Any], v: dict[str, str],
                      found: list[str], depth: int) -> None:
        limit = self.expansion_limit
        for entry in entries:
            names = {str(a).lower(): a for a in entry}
            terminal = [n for n in names if n in self.terminal_attrs]
            has_special = any(n in self.special_attrs for n in names)
            for low, attr in names.items():
                if terminal:
                    wanted = low in self.terminal_attrs
                else:
                    wanted = low in self.result_attrs or (low in self.leaf_attrs and
                                                          not has_special)
                if wanted:
                    for value in entry[attr]:
                        text = value.decode("utf-8", "surrogateescape") if isinstance(
                            value, bytes) else str(value)
                        r = self.expander.result(self.rf, text, v)
                        if r is None:
                            continue
                        found.append(r)
                        if limit and len(found) > limit:
                            raise _LimitError
                if not terminal and low in self.special_attrs and depth < self.recursion_limit:
                    for dn in entry[attr]:
                        sub = await self._search(conn, str(dn), 0, "(objectclass=*)")
                        await self._values(conn, sub, v, found, depth + 1)

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()


class _Reconnect(Exception):
    pass


class _LimitError(Exception):
    pass


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _safe_url(url: str) -> str:
    # An LDAP URL has no password; strip any query part anyway.
    return urllib.parse.urlsplit(url)._replace(query="").geturl()
