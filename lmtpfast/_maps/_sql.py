"""``pgsql:FILE.cf`` and ``mysql:FILE.cf``: Postfix's SQL maps, read unchanged.

Parameters (pgsql_table(5), mysql_table(5)): ``hosts`` (tried in random
order, unix sockets first for MySQL; ``unix:/path``, ``inet:host:port``,
``host[:port]``, and ``postgresql://`` URIs for pgsql), ``user``,
``password``, ``dbname``, ``query`` (``%`` expansions, see
:mod:`._expand`), ``result_format``, ``domain``, ``expansion_limit``, and
the pre-2.2 ``select_function``/``select_field``/``table``/``where_field``/
``additional_conditions``. Every column of every row is one result element;
NULL and empty values are skipped (Postfix warns); more elements than
``expansion_limit`` is a lookup failure for that key.

lmtpfast's own settings (Postfix ignores them): ``lmtpfast_connect_timeout``
(default 5 s), ``lmtpfast_query_timeout`` (10 s), ``lmtpfast_pool_size`` (4
connections per map), ``lmtpfast_batch`` (``yes``).

Batching. PostgreSQL: when every ``%`` expansion of the query sits inside a
plain ``'...'`` string literal, the query is run once for a whole batch of
keys as ``SELECT .. FROM unnest($1::text[], ..) WITH ORDINALITY AS k(..)
CROSS JOIN LATERAL (QUERY) AS r``, the literals replaced by the batch's
columns: one round trip for a 1,000-recipient message. A query that cannot be
rewritten (or whose rewrite the server refuses, e.g. ``WHERE id = '%s'`` on an
integer column) runs once per key, concurrently over the pool. MySQL/MariaDB:
the per-key queries of a batch go in one multi-statement round trip.

The pgsql client's encoding: Postfix 3.7 sets it to LATIN1 (its
``dict_pgsql`` hard-codes it), so a UTF-8 key reaches the server as the
Latin-1 reading of its bytes and a result comes back as Latin-1 bytes (a
value with a character outside Latin-1 is a query error). lmtpfast does the
same by default so the two route alike; ``encoding = UTF8`` (Postfix 3.8's
parameter) sends and receives UTF-8.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .._errors import ConfigurationError
from ._base import LookupResult, Map, MapError, MapWarning
from ._cf import CfFile, read_cf, split_list
from ._expand import Expander, Template, parse_template

__all__ = ["MysqlMap", "PgsqlMap", "SqlHost"]

_COMMON_KEYS = {
    "hosts", "user", "password", "dbname", "query", "result_format", "domain",
    "expansion_limit", "select_function", "select_field", "table", "where_field",
    "additional_conditions",
    "lmtpfast_connect_timeout", "lmtpfast_query_timeout", "lmtpfast_pool_size",
    "lmtpfast_batch",
}
_PGSQL_KEYS = _COMMON_KEYS | {"encoding"}
_MYSQL_KEYS = _COMMON_KEYS | {
    "option_file", "option_group", "require_result_set", "tls_cert_file", "tls_key_file",
    "tls_CAfile", "tls_CApath", "tls_verify_cert", "tls_ciphers",
}
_BATCH = 500  # keys per statement


@dataclass(frozen=True, slots=True)
class SqlHost:
    """One entry of ``hosts``: a unix socket (``path``) or TCP (``host``, ``port``), or a URI."""

    text: str
    unix: bool
    host: str
    port: int | None
    uri: str | None = None


def _parse_host(item: str, mtype: str, source: str, line: int | None) -> SqlHost:
    if mtype == "pgsql" and item.startswith(("postgresql://", "postgres://")):
        return SqlHost(item, False, "", None, uri=item)
    rest = item
    if rest.startswith(("unix:", "inet:")):
        kind, rest = rest[:4], rest[5:]
    else:
        kind = ""
    port: int | None = None
    if kind == "unix" or rest.startswith("/"):
        # A socket path is taken whole (Postfix splits no port off it; pgsql
        # then uses the default port's socket in that folder).
        if not rest.startswith("/"):
            raise ConfigurationError(f"unix: hosts entry {item!r} needs an absolute path",
                                     source=source, line=line, field="hosts")
        return SqlHost(item, True, rest, None)
    # Postfix splits the port off at the right-most ':' (dict_pgsql/dict_mysql).
    name, colon, p = rest.rpartition(":")
    if colon and not name.endswith("]") and "[" in name:
        name, p = rest, ""
    if colon and p:
        if not p.isdigit() or not 0 < int(p) < 65536:
            raise ConfigurationError(f"bad port {p!r} in hosts entry {item!r}", source=source,
                                     line=line, field="hosts")
        port = int(p)
        rest = name
    elif colon and not p:
        rest = name
    rest = rest.strip("[]")
    if not rest:
        raise ConfigurationError(f"empty host in hosts entry {item!r}", source=source,
                                 line=line, field="hosts")
    return SqlHost(item, False, rest, port)


class _Pool:
    """A few connections to whichever host answers; LIFO, bounded, broken ones dropped."""

    def __init__(self, size: int, connect: Callable[[], Awaitable[Any]],
                 close: Callable[[Any], Awaitable[None]]) -> None:
        self._size = size
        self._connect = connect
        self._close = close
        self._idle: list[Any] = []
        self._sem = asyncio.Semaphore(size)
        self._all: set[Any] = set()
        self.closed = False

    @contextlib.asynccontextmanager
    async def acquire(self) -> Any:
        async with self._sem:
            conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = await self._connect()
                self._all.add(conn)
            ok = False
            try:
                yield conn
                ok = True
            finally:
                if ok and not self.closed:
                    self._idle.append(conn)
                else:
                    self._all.discard(conn)
                    with contextlib.suppress(Exception):
                        await self._close(conn)

    async def discard_idle(self) -> None:
        """Close the idle connections (after a connection error: they may all be dead)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            self._all.discard(conn)
            with contextlib.suppress(Exception):
                await self._close(conn)

    async def aclose(self) -> None:
        self.closed = True
        conns, self._all, self._idle = list(self._all), set(), []
        for conn in conns:
            with contextlib.suppress(Exception):
                await self._close(conn)


class _SqlMap(Map):
    """What pgsql: and mysql: share: the .cf file, the query, the results."""

    _keys: set[str] = _COMMON_KEYS

    def __init__(self, name: str, mtype: str) -> None:
        super().__init__(name)
        self.type = mtype
        cf = read_cf(name, self._keys, mtype)
        self.cf = cf
        self.warnings = list(cf.warnings)
        self.hosts = [_parse_host(h, mtype, name, cf.lines.get("hosts"))
                      for h in split_list(cf.get_str("hosts"))] or [
            _parse_host("localhost", mtype, name, None)]
        self.user = cf.get_str("user")
        self.password = cf.get_str("password")
        self.dbname = cf.get_str("dbname")
        if not self.dbname:
            self.warnings.append(MapWarning(name, None, "no dbname: the server's default "
                                                "database for the user is used"))
        self.query = self._query_text(cf)
        self.result_format = cf.get_str("result_format", "") or "%s"
        self.q = parse_template(self.query, query=True, source=name,
                                line=cf.lines.get("query"), field="query")
        self.rf = parse_template(self.result_format, query=False, source=name,
                                 line=cf.lines.get("result_format"), field="result_format")
        self.expander = Expander(self.q, self.rf)
        self.fixed = not self.expander.partial
        self.expansion_limit = cf.get_int("expansion_limit", 0, 0)
        self.connect_timeout = cf.get_float("lmtpfast_connect_timeout", 5.0)
        self.query_timeout = cf.get_float("lmtpfast_query_timeout", 10.0)
        self.pool_size = cf.get_int("lmtpfast_pool_size", 4, 1, 256)
        self.batch = cf.get_bool("lmtpfast_batch", True)
        self.domains = DomainFilter.parse(cf.get_str("domain"), name, cf.lines.get("domain")) \
            if cf.has("domain") and cf.get_str("domain") else None
        self._pool: _Pool | None = None
        #: SQL statements sent (a batch of keys is one statement when batched).
        self.queries = 0

    def _query_text(self, cf: CfFile) -> str:
        if cf.get_str("query"):
            return cf.get_str("query")
        if cf.get_str("select_function"):
            return f"SELECT {cf.get_str('select_function')}('%s')"
        if cf.get_str("table") and cf.get_str("select_field") and cf.get_str("where_field"):
            q = (f"SELECT {cf.get_str('select_field')} FROM {cf.get_str('table')} "
                 f"WHERE {cf.get_str('where_field')} = '%s'")
            extra = cf.get_str("additional_conditions")
            return q + (" " + extra if extra else "")
        raise ConfigurationError("no query: set 'query' (or the legacy select_field, table "
                                 "and where_field)", source=self.name, field="query")

    # -- keys -> work ------------------------------------------------------------

    def _prepare(self, keys: Sequence[str]) -> tuple[dict[str, LookupResult],
                                                        list[tuple[str, dict[str, str]]]]:
        return prepare_keys(keys, self.expander, self.domains)

    def _results(self, key: str, variables: dict[str, str],
                 values: Sequence[str | None]) -> LookupResult:
        """Rows' values -> the result elements (result_format, limit)."""
        found: list[str] = []
        limit = self.expansion_limit
        for value in values:
            if value is None:
                continue
            r = self.expander.result(self.rf, value, variables)
            if r is None:
                continue
            found.append(r)
            if limit and len(found) > limit:
                return MapError(self.mapname, f"expansion limit {limit} exceeded for key "
                                f"{key!r}")
        return found or None

    def _pool_get(self) -> _Pool:
        if self._pool is None or self._pool.closed:
            self._pool = _Pool(self.pool_size, self._connect_any, self._close_conn)
        return self._pool

    async def _connect_any(self) -> Any:
        hosts = self._host_order()
        errors = []
        for host in hosts:
            try:
                return await asyncio.wait_for(self._connect(host), self.connect_timeout)
            except (OSError, TimeoutError) as exc:
                errors.append(f"{host.text}: {_why(exc)}")
            except Exception as exc:
                if _is_auth_error(exc):
                    errors.append(f"{host.text}: {type(exc).__name__}")
                else:
                    errors.append(f"{host.text}: {_why(exc)}")
        raise MapError(self.mapname, "cannot connect: " + "; ".join(errors))

    def _host_order(self) -> list[SqlHost]:
        hosts = list(self.hosts)
        random.shuffle(hosts)
        return hosts

    async def _connect(self, host: SqlHost) -> Any:
        raise NotImplementedError

    async def _close_conn(self, conn: Any) -> None:
        raise NotImplementedError

    async def _run(self, todo: list[tuple[str, dict[str, str]]]) -> dict[str, LookupResult]:
        raise NotImplementedError

    async def lookup_many(self, keys: Sequence[str]) -> dict[str, LookupResult]:
        out, todo = self._prepare(keys)
        if todo:
            size = self._chunk()
            chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
            results = await asyncio.gather(*(self._run_retry(c) for c in chunks))
            for r in results:
                out.update(r)
        return {k: out[k] for k in keys}

    def _chunk(self) -> int:
        """Keys per task: a batch where one statement answers many, else one (in parallel)."""
        return _BATCH

    async def _run_retry(self, todo: list[tuple[str, dict[str, str]]]) -> dict[str, LookupResult]:
        # A connection error is retried once on a fresh connection (another
        # host, in random order); anything else is this batch's answer.
        for attempt in (1, 2):
            try:
                return await self._run(todo)
            except MapError as exc:
                err = exc
                break
            except Exception as exc:
                err = MapError(self.mapname, _why(exc))
                if attempt == 1 and self._is_connection_error(exc):
                    await self._pool_get().discard_idle()
                    continue
                break
        return dict.fromkeys((k for k, _ in todo), err)

    def _is_connection_error(self, exc: BaseException) -> bool:
        return isinstance(exc, OSError | ConnectionError | TimeoutError | asyncio.TimeoutError)

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_auth_error(exc: BaseException) -> bool:
    name = type(exc).__name__
    return "Password" in name or "Authorization" in name or "Authentication" in name


def prepare_keys(
    keys: Sequence[str], expander: Expander, domains: DomainFilter | None,
) -> tuple[dict[str, LookupResult], list[tuple[str, dict[str, str]]]]:
    """Answers known without a query (skipped keys: "not found") and the
    distinct (key, variables) left to ask; keys are folded to lower case."""
    out: dict[str, LookupResult] = {}
    todo: list[tuple[str, dict[str, str]]] = []
    for key in dict.fromkeys(keys):
        k = key.lower()
        v = None
        if k and "\0" not in k and (domains is None or domains.allows(k)):
            v = expander.key_vars(k)
        if v is None:
            out[key] = None
        else:
            todo.append((key, v))
    return out, todo


class DomainFilter:
    """The ``domain`` parameter: exact domain names and file maps (db_common_check_domain)."""

    def __init__(self, names: set[str], maps: list[Map]) -> None:
        self.names = names
        self.maps = maps

    @classmethod
    def parse(cls, value: str, source: str, line: int | None) -> DomainFilter:
        from . import open_map

        names: set[str] = set()
        maps: list[Map] = []
        for item in split_list(value):
            if ":" in item or item.startswith("/"):
                if item.startswith("/"):
                    item = "texthash:" + item
                m = open_map(item, cache=None)
                if not m.static:
                    raise ConfigurationError(f"domain list entry {item!r}: only file maps "
                                             "(texthash:, hash:, cdb:, lmdb:) are supported here",
                                             source=source, line=line, field="domain")
                maps.append(m)
            else:
                names.add(item.lower())
        return cls(names, maps)

    def allows(self, key: str) -> bool:
        at = key.rfind("@")
        if at <= 0:  # no domain, or an empty local part: never looked up
            return False
        domain = key[at + 1 :]
        if domain in self.names:
            return True
        return any(isinstance(m.lookup_cached(domain), list) for m in self.maps)


# -- PostgreSQL ----------------------------------------------------------------

_LITERAL = re.compile(r"'(?:[^']|'')*'")


def _pg_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _batched_pg_query(template: Template) -> tuple[str, list[str]] | None:
    """The LATERAL form of a query, and the variables its columns carry; None if not possible."""
    # Mark each variable with a private-use character, then find the literals.
    marks: dict[str, str] = {}
    text_parts = []
    for is_var, text in template.tokens:
        if is_var:
            ch = marks.setdefault(text, chr(0xE000 + len(marks)))
            text_parts.append(ch)
        else:
            if any(0xE000 <= ord(c) < 0xE010 for c in text):
                return None
            text_parts.append(text)
    sql = "".join(text_parts).strip().rstrip(";").strip()
    if not marks:
        return None
    low = sql.lower()
    if "$" in sql or "--" in sql or "/*" in sql or re.search(r"\be'", low):
        return None  # dollar quotes, comments, E'' strings: leave them to the server
    inverse = {ch: var for var, ch in marks.items()}
    order = list(marks)
    out = []
    pos = 0
    for m in _LITERAL.finditer(sql):
        outside = sql[pos : m.start()]
        if any(ch in outside for ch in inverse):
            return None
        out.append(outside)
        body = m.group(0)[1:-1].replace("''", "'")
        if not any(ch in body for ch in inverse):
            out.append(m.group(0))
        else:
            pieces = []
            buf: list[str] = []
            for c in body:
                if c in inverse:
                    if buf:
                        pieces.append(_pg_literal("".join(buf)))
                        buf = []
                    pieces.append(f"k.v{order.index(inverse[c])}")
                else:
                    buf.append(c)
            if buf:
                pieces.append(_pg_literal("".join(buf)))
            out.append("(" + " || ".join(pieces) + ")" if len(pieces) > 1 else pieces[0])
        pos = m.end()
    tail = sql[pos:]
    if any(ch in tail for ch in inverse) or "'" in tail:
        return None
    out.append(tail)
    inner = "".join(out)
    cols = ", ".join(f"v{i}" for i in range(len(order)))
    arrays = ", ".join(f"${i + 1}::text[]" for i in range(len(order)))
    stmt = (f"SELECT k.n, r.* FROM unnest({arrays}) WITH ORDINALITY AS k({cols}, n) "
            f"CROSS JOIN LATERAL ({inner}) AS r")
    return stmt, order


_TEXT_TYPES = ("bool", "int2", "int4", "int8", "float4", "float8", "numeric", "date", "time",
               "timetz", "timestamp", "timestamptz", "interval", "uuid", "inet", "cidr",
               "macaddr", "json", "jsonb", "oid", "money", "bytea")


class PgsqlMap(_SqlMap):
    """``pgsql:FILE.cf`` over asyncpg (see the module docstring)."""

    type = "pgsql"
    _keys = _PGSQL_KEYS

    def __init__(self, name: str) -> None:
        try:
            import asyncpg  # noqa: F401
        except ImportError:
            raise ConfigurationError("pgsql: maps need asyncpg (pip install 'lmtpfast[pgsql]')",
                                     source=name) from None
        super().__init__(name, "pgsql")
        enc = self.cf.get_str("encoding", "LATIN1").upper().replace("-", "")
        if enc not in ("LATIN1", "UTF8"):
            raise ConfigurationError(f"unsupported encoding {self.cf.get_str('encoding')!r}: "
                                     "expected LATIN1 (Postfix 3.7) or UTF8", source=name,
                                     line=self.cf.lines.get("encoding"), field="encoding")
        self.latin1 = enc == "LATIN1"
        if any(h.uri for h in self.hosts) and (self.user or self.password or self.dbname):
            self.warnings.append(MapWarning(name, self.cf.lines.get("hosts"), "user, password "
                                            "and dbname are not used with a postgresql:// "
                                            "URI in hosts (Postfix passes the URI alone)"))
        self._batched = _batched_pg_query(self.q) if self.batch else None

    async def _connect(self, host: SqlHost) -> Any:
        import asyncpg

        kw: dict[str, Any] = {"timeout": self.connect_timeout, "statement_cache_size": 256}
        if host.uri is not None:
            # Postfix hands a URI to libpq alone: user, password and dbname
            # come from the URI (or libpq's defaults), not from the .cf file.
            conn = await asyncpg.connect(host.uri, **kw)
        else:
            if self.user:
                kw["user"] = self.user
            if self.password:
                kw["password"] = self.password
            if self.dbname:
                kw["database"] = self.dbname
            conn = await asyncpg.connect(host=host.host, port=host.port or 5432, **kw)
        # Results as PostgreSQL's own text output, as libpq gives them to Postfix.
        for t in _TEXT_TYPES:
            await conn.set_type_codec(t, schema="pg_catalog", encoder=str, decoder=str,
                                      format="text")
        return conn

    async def _close_conn(self, conn: Any) -> None:
        await asyncio.wait_for(conn.close(), 2.0)

    def _is_connection_error(self, exc: BaseException) -> bool:
        import asyncpg

        return super()._is_connection_error(exc) or isinstance(exc, (
            asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError,
            asyncpg.PostgresConnectionError, asyncpg.AdminShutdownError,
            asyncpg.CannotConnectNowError))

    def _chunk(self) -> int:
        # Per-key queries run in parallel over the pool, one key per task.
        return _BATCH if self._batched is not None else 1

    def _enc(self, s: str) -> str:
        return s.encode("utf-8").decode("latin-1") if self.latin1 else s

    def _dec(self, s: str | None) -> str | None:
        if s is None or not self.latin1:
            return s
        try:
            return s.encode("latin-1").decode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise MapError(self.mapname, "a result has a character with no equivalent in "
                           "encoding LATIN1 (Postfix 3.7 fails the same way; set "
                           "'encoding = UTF8')") from None

    async def _run(self, todo: list[tuple[str, dict[str, str]]]) -> dict[str, LookupResult]:
        import asyncpg

        pool = self._pool_get()
        try:
            async with pool.acquire() as conn:
                if self._batched is not None:
                    try:
                        return await self._run_batched(conn, todo)
                    except (asyncpg.PostgresSyntaxError, asyncpg.UndefinedFunctionError,
                            asyncpg.DatatypeMismatchError, asyncpg.InvalidTextRepresentationError,
                            asyncpg.AmbiguousColumnError, asyncpg.UndefinedColumnError,
                            asyncpg.FeatureNotSupportedError, asyncpg.DuplicateColumnError):
                        # The rewrite is not this query's equal: per key from now on.
                        self._batched = None
                return await self._run_each(conn, todo)
        except asyncpg.PostgresError as exc:
            if self._is_connection_error(exc):
                raise
            raise MapError(self.mapname, f"query failed: {_why(exc)}") from None

    async def _run_batched(self, conn: Any, todo: list[tuple[str, dict[str, str]]]
                           ) -> dict[str, LookupResult]:
        assert self._batched is not None
        stmt, order = self._batched
        arrays = [[self._enc(v[var]) for _, v in todo] for var in order]
        self.queries += 1
        rows = await conn.fetch(stmt, *arrays, timeout=self.query_timeout)
        per: list[list[str | None]] = [[] for _ in todo]
        for row in rows:
            vals = per[int(row[0]) - 1]
            vals.extend(self._dec(x) for x in list(row)[1:])
        return {key: self._results(key, v, per[i]) for i, (key, v) in enumerate(todo)}

    async def _run_each(self, conn: Any, todo: list[tuple[str, dict[str, str]]]
                        ) -> dict[str, LookupResult]:
        scs = conn.get_settings().standard_conforming_strings == "on"

        def quote(s: str) -> str:
            s = self._enc(s).replace("'", "''")
            return s if scs else s.replace("\\", "\\\\")

        out: dict[str, LookupResult] = {}
        for key, v in todo:
            sql = self.expander.expand(self.q, v, quote)
            self.queries += 1
            rows = await conn.fetch(sql, timeout=self.query_timeout)
            out[key] = self._results(key, v, [self._dec(x) for row in rows for x in row])
        return out


# -- MySQL / MariaDB --------------------------------------------------------------

_MYSQL_ESCAPES = {"\0": "\\0", "\n": "\\n", "\r": "\\r", "\\": "\\\\", "'": "\\'",
                  '"': '\\"', "\x1a": "\\Z"}


def mysql_quote(s: str) -> str:
    """What mysql_real_escape_string does (for the default sql_mode)."""
    return "".join(_MYSQL_ESCAPES.get(c, c) for c in s)


class MysqlMap(_SqlMap):
    """``mysql:FILE.cf`` over asyncmy (see the module docstring)."""

    type = "mysql"
    _keys = _MYSQL_KEYS

    def __init__(self, name: str) -> None:
        try:
            import asyncmy  # noqa: F401
        except ImportError:
            raise ConfigurationError("mysql: maps need asyncmy (pip install 'lmtpfast[mysql]')",
                                     source=name) from None
        super().__init__(name, "mysql")
        self.require_result_set = self.cf.get_bool("require_result_set", True)
        for k in ("option_file", "tls_cert_file", "tls_key_file", "tls_CAfile", "tls_CApath"):
            if self.cf.get_str(k):
                self.warnings.append(MapWarning(name, self.cf.lines.get(k),
                                                    f"{k} is not supported by lmtpfast yet"))

    def _host_order(self) -> list[SqlHost]:
        # mysql_table(5): random order, every unix socket before any TCP host.
        unix = [h for h in self.hosts if h.unix or h.host == "localhost"]
        inet = [h for h in self.hosts if h not in unix]
        random.shuffle(unix)
        random.shuffle(inet)
        return unix + inet

    async def _connect(self, host: SqlHost) -> Any:
        import asyncmy
        from asyncmy.constants import CLIENT

        kw: dict[str, Any] = {
            "user": self.user or None, "password": self.password, "database": self.dbname or None,
            "connect_timeout": self.connect_timeout, "autocommit": True,
            "charset": "utf8mb4", "client_flag": CLIENT.MULTI_STATEMENTS | CLIENT.MULTI_RESULTS,
        }
        if host.unix:
            kw["unix_socket"] = host.host
        elif host.host == "localhost":
            # libmysqlclient: "localhost" means the default unix socket, even with inet:.
            kw["unix_socket"] = "/run/mysqld/mysqld.sock"
        else:
            kw["host"] = host.host
            kw["port"] = host.port or 3306
        return await asyncmy.connect(**kw)

    async def _close_conn(self, conn: Any) -> None:
        conn.close()

    def _is_connection_error(self, exc: BaseException) -> bool:
        from asyncmy.errors import InterfaceError, OperationalError

        if isinstance(exc, OperationalError):
            code = exc.args[0] if exc.args else 0
            return code in (2002, 2003, 2006, 2013, 2055, 1053, 1927)
        return super()._is_connection_error(exc) or isinstance(exc, InterfaceError)

    async def _run(self, todo: list[tuple[str, dict[str, str]]]) -> dict[str, LookupResult]:
        from asyncmy.errors import MySQLError

        pool = self._pool_get()
        sqls = [self.expander.expand(self.q, v, mysql_quote).strip().rstrip(";") for _, v in todo]
        out: dict[str, LookupResult] = {}
        try:
            async with pool.acquire() as conn:
                per = 1 if not self.batch else 100
                for start in range(0, len(sqls), per):
                    part = sqls[start : start + per]
                    keys = todo[start : start + per]
                    async with conn.cursor() as cur:
                        self.queries += 1
                        await asyncio.wait_for(cur.execute(";\n".join(part)), self.query_timeout)
                        for i, (key, v) in enumerate(keys):
                            if i:
                                await cur.nextset()
                            if cur.description is None:
                                if self.require_result_set:
                                    out[key] = MapError(self.mapname, "query returned no "
                                                        "result set (require_result_set = yes)")
                                else:
                                    out[key] = None
                                continue
                            rows = await cur.fetchall()
                            vals = [None if x is None else _mysql_text(x)
                                    for row in rows for x in row]
                            out[key] = self._results(key, v, vals)
        except MySQLError as exc:
            if self._is_connection_error(exc):
                raise
            raise MapError(self.mapname, f"query failed: {_why(exc)}") from None
        return out


def _mysql_text(x: Any) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8", "surrogateescape")
    return str(x)
