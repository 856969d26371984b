"""lmtpfast's pgsql:, mysql: and ldap: maps answer exactly what Postfix's ``postmap -q`` answers.

One data set is loaded into a private PostgreSQL, MariaDB and slapd; the same
``.cf`` files (Postfix's formats, unchanged) are given to ``postmap -q`` (Debian's
postfix-pgsql, postfix-mysql, postfix-ldap) and to ``lmtpfast map query``'s
code path, for a shared corpus of keys: full addresses, domains, ``.parent``
keys, ``+extension`` addresses, upper case, ``%`` expansions (``%s %u %d %1
%2 %U %D %%``), keys missing the part a template needs, multi-row results,
``expansion_limit``, ``domain`` lists, quoting of ``' \\ * ( ) %``, NULL and
empty values, LDAP search-base expansion and DN recursion. Every answer must
match: the value printed, "not found", or a lookup failure (``postmap`` exits 1
with a ``fatal:`` line; lmtpfast reports a :class:`MapError`, exit 75).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lmtpfast import MapError, open_map
from lmtpfast._testing.fixtures import PgDatabase, require_peer
from lmtpfast._testing.mariadb import TempMariaDB
from lmtpfast._testing.slapd import TempSlapd

pytestmark = pytest.mark.maps

# key -> values (several rows), as each backend stores them
DATA: dict[str, list[str | None]] = {
    "alice@example.com": ["lmtp:unix:/run/alice"],
    "bob@example.com": ["lmtp:inet:127.0.0.2:24"],
    "example.com": ["lmtp:mail1"],
    ".example.com": ["lmtp:sub"],
    "@example.com": ["catchall@example.com"],
    "multi@example.com": ["a@x.example", "b@x.example", "c@x.example"],
    "o'brien@example.com": ["quote-ok"],
    "user": ["local-user"],
    "star*@example.com": ["star"],
    "percent%sign@example.com": ["pct@example.com"],
    "back\\slash@example.com": ["bs"],
    "(paren)@example.com": ["paren"],
    "carol@example.org": [None, ""],
    "mail.example.com": ["mail1.example.com"],
    "group@example.com": ["group-own@example.com"],
}
DOMAINS = {"example.com": "mx1.example.com", "example.org": "mx2.example.org",
           "sub.example.com": "mx3.example.com"}

KEYS = [
    "alice@example.com", "Alice@Example.COM", "bob@example.com", "bob+ext@example.com",
    "example.com", "EXAMPLE.COM", "sub.example.com", ".example.com", "deep.sub.example.com",
    "@example.com", "user", "user@", "nobody@nowhere.org", "carol@example.org",
    "o'brien@example.com", "multi@example.com", "x@a.b.c.example.com", "x@mail.sub.example.com",
    "percent%sign@example.com", "star*@example.com", "(paren)@example.com",
    "back\\slash@example.com", "mail.example.com", "a@mail.example.com", "group@example.com",
    "x@com", "@", "jürgen@example.com", "user@example.com", "User+Tag@Example.com",
]

SQL_QUERIES: dict[str, str] = {
    "full": "query = SELECT v FROM maps WHERE k='%s' ORDER BY n",
    "user": "query = SELECT v FROM maps WHERE k='%u' ORDER BY n\nresult_format = %s via %D",
    "domain": "query = SELECT host FROM domains WHERE d='%d'\nresult_format = smtp:[%s]",
    "parts": "query = SELECT host FROM domains WHERE d='%2.%1'\nresult_format = %s for %U",
    "limit": "query = SELECT v FROM maps WHERE k='%s' ORDER BY n\ndomain = example.com, "
             "example.org\nexpansion_limit = 2",
    "resultparts": "query = SELECT v FROM maps WHERE k='%s' ORDER BY n\n"
                   "result_format = %u at %d (%S)",
    "legacy": "select_field = v\ntable = maps\nwhere_field = k\n"
              "additional_conditions = AND v <> 'star' ORDER BY n",
    "like": "query = SELECT v FROM maps WHERE k LIKE '%%@%d' AND k <> '%s' ORDER BY k, n\n"
            "expansion_limit = 20",
    "uppercase": "query = SELECT v FROM maps WHERE k='%U@%D' ORDER BY n",
}

LDAP_BASE = "dc=example,dc=com"
LDAP_CF: dict[str, str] = {
    "full": f"search_base = ou=maps,{LDAP_BASE}\nquery_filter = (cn=%s)\n"
            "result_attribute = lmtpfastTransport",
    "user": f"search_base = ou=maps,{LDAP_BASE}\nquery_filter = (cn=%u)\n"
            "result_attribute = lmtpfastTransport\nresult_format = %s via %D",
    "base": f"search_base = cn=%d,ou=domains,{LDAP_BASE}\nscope = base\n"
            "query_filter = (objectClass=*)\nresult_attribute = lmtpfastTransport\n"
            "result_format = smtp:[%s]",
    "limit": f"search_base = ou=maps,{LDAP_BASE}\nquery_filter = cn=%s\n"
             "result_attribute = lmtpfastTransport\ndomain = example.com\nexpansion_limit = 2",
    "special": f"search_base = ou=maps,{LDAP_BASE}\nquery_filter = (cn=%s)\n"
               "result_attribute = lmtpfastTransport\nspecial_result_attribute = seeAlso",
    "parts": f"search_base = ou=domains,{LDAP_BASE}\nscope = one\nquery_filter = (cn=%2.%1)\n"
             "result_attribute = lmtpfastTransport",
    "substring": f"search_base = ou=maps,{LDAP_BASE}\nquery_filter = (cn=*@%d)\n"
                 "result_attribute = cn\nexpansion_limit = 30",
}


def _postmap(mapname: str, keys: list[str]) -> dict[str, tuple[str, str | None]]:
    """key -> ("found", value) | ("missing", None) | ("failure", None), from postmap -q."""
    proc = subprocess.run(["postmap", "-q", "-", mapname], input="\n".join(keys) + "\n",
                          capture_output=True, timeout=60, check=False, text=True,
                          encoding="utf-8", errors="surrogateescape")
    if "fatal:" not in proc.stderr:
        out: dict[str, tuple[str, str | None]] = {k: ("missing", None) for k in keys}
        for line in proc.stdout.splitlines():
            k, _, v = line.partition("\t")
            out[k] = ("found", v)
        return out
    # A fatal error stops postmap: ask key by key to see which ones fail.
    result: dict[str, tuple[str, str | None]] = {}
    for k in keys:
        p = subprocess.run(["postmap", "-q", k, mapname], capture_output=True, timeout=60,
                           check=False, text=True, encoding="utf-8", errors="surrogateescape")
        if p.returncode == 0:
            result[k] = ("found", p.stdout.rstrip("\n"))
        elif "fatal:" in p.stderr:
            result[k] = ("failure", None)
        else:
            result[k] = ("missing", None)
    return result


def _ours(mapname: str, keys: list[str]) -> dict[str, tuple[str, str | None]]:
    async def go() -> dict[str, Any]:
        m = open_map(mapname, cache=None)
        try:
            return await m.lookup_many(keys)
        finally:
            await m.aclose()

    got = asyncio.run(go())
    out: dict[str, tuple[str, str | None]] = {}
    for k in keys:
        r = got[k]
        if isinstance(r, MapError):
            out[k] = ("failure", None)
        elif r is None:
            out[k] = ("missing", None)
        else:
            out[k] = ("found", ",".join(r))
    return out


def _compare(mapname: str) -> tuple[int, int, list[str]]:
    theirs = _postmap(mapname, KEYS)
    ours = _ours(mapname, KEYS)
    diffs = [f"{k!r}: postmap {theirs[k]} lmtpfast {ours[k]}" for k in KEYS
             if theirs[k] != ours[k]]
    found = sum(1 for k in KEYS if theirs[k][0] == "found")
    return found, sum(1 for k in KEYS if theirs[k][0] == "failure"), diffs


def _need_postmap(kind: str) -> None:
    if shutil.which("postmap") is None:
        require_peer("postfix")  # fails under CI, skips elsewhere
    so = Path(f"/usr/lib/postfix/postfix-{kind}.so")
    if not so.exists():
        from lmtpfast._testing.fixtures import _unavailable

        _unavailable(f"{so} missing (package postfix-{kind}): run scripts/install-test-deps.sh")


def _sql_rows() -> list[tuple[int, str, str | None]]:
    rows = []
    n = 0
    for k, values in DATA.items():
        for v in values:
            n += 1
            rows.append((n, k, v))
    return rows


def _write_cfs(tmp: Path, kind: str, head: str, bodies: dict[str, str]) -> dict[str, str]:
    out = {}
    for name, body in bodies.items():
        cf = tmp / f"{kind}-{name}.cf"
        cf.write_text(head + body + "\n")
        cf.chmod(0o600)
        out[name] = f"{kind}:{cf}"
    return out


def _report(kind: str, results: dict[str, tuple[int, int, list[str]]]) -> list[str]:
    lines = []
    problems = []
    for name, (found, failed, diffs) in results.items():
        lines.append(f"{kind} {name}: {len(KEYS)} keys, postmap found {found}, failed "
                     f"{failed}; differences: {len(diffs)}")
        problems += [f"{kind} {name}: {d}" for d in diffs]
    print("\n".join(lines))
    return problems


def test_pgsql_matches_postmap(postgres_db: PgDatabase, tmp_path: Path) -> None:
    _need_postmap("pgsql")
    sql = ["CREATE TABLE maps (n int, k text, v text);",
           "CREATE TABLE domains (d text primary key, host text);"]
    for n, k, v in _sql_rows():
        val = "NULL" if v is None else "'" + v.replace("'", "''") + "'"
        sql.append(f"INSERT INTO maps VALUES ({n}, '{k.replace(chr(39), chr(39) * 2)}', {val});")
    for d, h in DOMAINS.items():
        sql.append(f"INSERT INTO domains VALUES ('{d}', '{h}');")
    postgres_db.psql("\n".join(sql))
    head = (f"hosts = inet:127.0.0.1:{postgres_db.server.port}\nuser = {postgres_db.user}\n"
            f"password = {postgres_db.password}\ndbname = {postgres_db.name}\n")
    maps = _write_cfs(tmp_path, "pgsql", head, SQL_QUERIES)
    results = {name: _compare(m) for name, m in maps.items()}
    problems = _report("pgsql", results)
    assert not problems, "\n".join(problems)
    # The corpus exercises every outcome, so the comparison cannot pass vacuously.
    assert sum(r[0] for r in results.values()) >= 25
    assert results["limit"][1] >= 1  # multi@example.com: 3 rows > expansion_limit 2


def test_mysql_matches_postmap(mariadb: TempMariaDB, tmp_path: Path) -> None:
    _need_postmap("mysql")
    db = "maps_" + tmp_path.name[-8:].replace("-", "_")
    mariadb.create_database(db)
    try:
        mariadb.create_user(db, "pw-" + db, grant_on=db)
        stmts = ["CREATE TABLE maps (n INT, k VARCHAR(255) COLLATE utf8mb4_bin, v TEXT);",
                 "CREATE TABLE domains (d VARCHAR(255) PRIMARY KEY, host TEXT);"]

        def q(s: str) -> str:
            return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"

        for n, k, v in _sql_rows():
            stmts.append(f"INSERT INTO maps VALUES ({n}, {q(k)}, {'NULL' if v is None else q(v)});")
        for d, h in DOMAINS.items():
            stmts.append(f"INSERT INTO domains VALUES ({q(d)}, {q(h)});")
        mariadb.sql("\n".join(stmts), database=db)
        head = (f"hosts = unix:{mariadb.socket_path}\nuser = {db}\npassword = pw-{db}\n"
                f"dbname = {db}\n")
        maps = _write_cfs(tmp_path, "mysql", head, SQL_QUERIES)
        results = {name: _compare(m) for name, m in maps.items()}
        problems = _report("mysql", results)
        assert not problems, "\n".join(problems)
        assert sum(r[0] for r in results.values()) >= 25
        assert results["limit"][1] >= 1
    finally:
        mariadb.drop_database(db)
        mariadb.sql(f"DROP USER IF EXISTS '{db}'@'localhost', '{db}'@'127.0.0.1';")


def _dn_value(v: str) -> str:
    out = []
    for c in v:
        out.append(f"\\{ord(c):02X}" if c in ',+"\\<>;=' else c)
    return "".join(out)


def _ldif() -> str:
    parts = [f"dn: {LDAP_BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\n"
             "o: lmtpfast map tests\n",
             f"dn: ou=maps,{LDAP_BASE}\nobjectClass: organizationalUnit\nou: maps\n",
             f"dn: ou=domains,{LDAP_BASE}\nobjectClass: organizationalUnit\nou: domains\n"]
    for k, values in DATA.items():
        attrs = "".join(f"lmtpfastTransport: {v}\n" for v in values if v)
        extra = (f"seeAlso: cn=alice@example.com,ou=maps,{LDAP_BASE}\n"
                 if k == "group@example.com" else "")
        parts.append(f"dn: cn={_dn_value(k)},ou=maps,{LDAP_BASE}\nobjectClass: applicationProcess"
                     f"\nobjectClass: lmtpfastMailRecipient\ncn: {k}\n{attrs}{extra}")
    for d, h in DOMAINS.items():
        parts.append(f"dn: cn={d},ou=domains,{LDAP_BASE}\nobjectClass: applicationProcess\n"
                     f"objectClass: lmtpfastMailRecipient\ncn: {d}\nlmtpfastTransport: {h}\n")
    return "\n".join(parts)


def test_ldap_matches_postmap(slapd_factory: Any, tmp_path: Path) -> None:
    _need_postmap("ldap")
    server: TempSlapd = slapd_factory(dit=_ldif(), loglevel="none")
    head = f"server_host = {server.url}\nversion = 3\nbind = no\n"
    maps = _write_cfs(tmp_path, "ldap", head, LDAP_CF)
    # The ldapi:// form and an anonymous simple bind (bind = yes, no bind_dn) too.
    maps.update(_write_cfs(tmp_path, "ldap", f"server_host = {server.ldapi_url}\n",
                           {"ldapi": LDAP_CF["full"]}))
    results = {name: _compare(m) for name, m in maps.items()}
    problems = _report("ldap", results)
    assert not problems, "\n".join(problems)
    assert sum(r[0] for r in results.values()) >= 25
    assert results["limit"][1] >= 1
    assert results["special"][0] >= 1
