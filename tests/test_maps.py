"""TYPE:NAME maps: names, file maps, % expansion, the cache, the router, the agent with a pgsql map.

The network backends' answers are checked against Postfix's postmap in
test_maps_postmap.py; here: lmtpfast's own machinery (cache TTLs, serve-stale,
single-flight, Postfix's search order over several maps, batching, failures
that defer) with an injectable clock and counting maps, plus the agent routing
through a real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from lmtpfast import Agent, CacheSettings, ConfigurationError, Map, MapError, Router, open_map
from lmtpfast._maps import CachedMap, LookupResult
from lmtpfast._maps._expand import Expander, parse_template
from lmtpfast._testing.fixtures import PgDatabase
from lmtpfast.cli import main as cli

MSG = b"Subject: maps\r\n\r\nhello\r\n"


class FakeMap(Map):
    """A network-like map over a dict that counts backend calls; can be made to fail."""

    type = "fake"

    def __init__(self, data: dict[str, str], *, fixed: bool = True) -> None:
        super().__init__("test")
        self.data = dict(data)
        self.fixed = fixed
        self.calls: list[list[str]] = []
        self.down = False
        self.gate: asyncio.Event | None = None

    async def lookup_many(self, keys: Sequence[str]) -> dict[str, LookupResult]:
        self.calls.append(list(keys))
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            return dict.fromkeys(keys, MapError(self.mapname, "database down"))
        return {k: ([self.data[k]] if k in self.data else None) for k in keys}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- names and files -------------------------------------------------------------------

def test_map_names_and_types(tmp_path: Path) -> None:
    f = tmp_path / "transport"
    f.write_text("Example.COM  lmtp:host1\n# comment\nfoo.org lmtp:unix:/x\n")
    for name in (f"texthash:{f}", f"hash:{f}", str(f), f"proxy:texthash:{f}"):
        m = open_map(name)
        assert m.static and m.lookup_cached("example.com") == ["lmtp:host1"]
    assert open_map("static:{some value}").lookup_cached("x") == ["some value"]
    inline = open_map("inline:{a@x=one, { b@x = two words }}")
    assert inline.lookup_cached("B@X") == ["two words"] and inline.lookup_cached("c") is None
    with pytest.raises(ConfigurationError, match="unknown map type 'nosuch'"):
        open_map("nosuch:/x")
    with pytest.raises(ConfigurationError, match="not supported by lmtpfast"):
        open_map("regexp:/etc/postfix/x")
    with pytest.raises(ConfigurationError, match="cannot read"):
        open_map(f"texthash:{tmp_path / 'missing'}")


def test_file_maps_match_postmap(tmp_path: Path) -> None:
    src = tmp_path / "t"
    src.write_text("Foo@Example.com lmtp:unix:/x\nexample.com   lmtp:host\n"
                   "multi value  with  spaces  \n  continued\ndup one\ndup two\nnovalue\n")
    keys = ["foo@example.com", "FOO@EXAMPLE.COM", "example.com", "multi", "dup", "none"]
    for mtype in ("texthash", "cdb", "lmdb"):
        if mtype != "texthash":
            subprocess.run(["postmap", f"{mtype}:{src}"], check=True, capture_output=True)
        m = open_map(f"{mtype}:{src}")
        for k in keys:
            p = subprocess.run(["postmap", "-q", k, f"{mtype}:{src}"], capture_output=True,
                               text=True, check=False)
            want = p.stdout.rstrip("\n") if p.returncode == 0 else None
            got = m.lookup_cached(k)
            assert (got[0] if isinstance(got, list) else got) == want, (mtype, k)
    warnings = [str(w) for w in open_map(f"texthash:{src}").warnings]
    assert any("duplicate entry: 'dup'" in w and ":6:" in w for w in warnings)
    assert any("ignoring this line" in w and ":7:" in w for w in warnings)


def test_cf_unknown_keys_warn_and_check_exits_78(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cf = tmp_path / "pg.cf"
    cf.write_text("hosts = localhost\nuser = u\npassword = s3cret\ndbname = d\n"
                  "query = SELECT v FROM t WHERE k='%s'\nexpansion_limt = 1\n")
    m = open_map(f"pgsql:{cf}")
    assert [(w.line, "expansion_limt" in w.problem, "expansion_limit" in w.problem)
            for w in m.warnings] == [(6, True, True)]
    assert cli(["map", "check", f"pgsql:{cf}"]) == 78
    out = capsys.readouterr().out
    assert "pg.cf:6" in out and "did you mean 'expansion_limit'" in out and "s3cret" not in out
    cf.write_text("hosts = localhost\ndbname = d\nquery = SELECT v FROM t WHERE k='%s'\n"
                  "expansion_limit = many\n")
    assert cli(["map", "check", f"pgsql:{cf}"]) == 78
    assert "bad numerical value for expansion_limit" in capsys.readouterr().out
    cf.write_text("hosts = localhost\ndbname = d\nquery = SELECT v FROM t WHERE k='%x'\n")
    assert cli(["map", "check", f"pgsql:{cf}"]) == 78
    assert "unknown expansion '%x'" in capsys.readouterr().out
    cf.write_text("hosts = localhost\ndbname = d\nquery = SELECT v FROM t WHERE k='%s'\n")
    assert cli(["map", "check", f"pgsql:{cf}"]) == 0


def test_expansions_and_skip_rules() -> None:
    q = parse_template("k='%u' d='%d' top='%1' two='%2' all='%s' pct=%%", query=True)
    e = Expander(q)
    v = e.key_vars("user@mail.example.com")
    assert v is not None
    assert e.expand(q, v) == ("k='user' d='mail.example.com' top='com' two='example' "
                              "all='user@mail.example.com' pct=%")
    assert e.key_vars("user") is None          # %d: no domain
    assert e.key_vars("@example.com") is None  # %u: empty local part
    assert e.key_vars("user@") is None         # empty domain
    assert e.partial
    three = Expander(parse_template("%3", query=True))
    assert three.key_vars("u@example.com") is None and three.key_vars("u@a.example.com")
    full = Expander(parse_template("'%s'", query=True), parse_template("%U", query=False))
    assert full.partial and full.key_vars("@x") is None  # %U in result_format skips too
    rf = parse_template("%u at %d for %U", query=False)
    e2 = Expander(parse_template("'%s'", query=True), rf)
    kv = e2.key_vars("k@x.org")
    assert kv is not None
    assert e2.result(rf, "a@b.example", kv) == "a at b.example for k"
    assert e2.result(rf, "nodomain", kv) is None and e2.result(rf, "", kv) is None


# -- the cache -------------------------------------------------------------------------

async def test_cache_ttl_negative_ttl_size_and_serve_stale() -> None:
    clock = Clock()
    inner = FakeMap({"a": "A", "b": "B"})
    m = CachedMap(inner, CacheSettings(ttl=100, negative_ttl=10, size=1000, stale=50),
                  clock=clock)
    assert await m.lookup_many(["a", "x", "a"]) == {"a": ["A"], "x": None}
    assert inner.calls == [["a", "x"]]
    assert m.lookup_cached("a") == ["A"] and m.lookup_cached("x") is None
    clock.now += 11  # the negative answer expired, the positive one did not
    assert m.lookup_cached("x").__class__.__name__ == "NotCached"
    await m.lookup_many(["a", "x"])
    assert inner.calls[-1] == ["x"]
    clock.now += 120  # both expired; the database goes down
    inner.down = True
    got = await m.lookup_many(["a", "b"])
    assert got["a"] == ["A"]  # 20 s past expiry, within stale=50: served stale
    assert isinstance(got["b"], MapError)  # never seen: a failure, not a guess
    assert m.stats.stale_served == 1 and m.stats.backend_failures == 2
    clock.now += 100  # now too old even for serve-stale
    assert isinstance((await m.lookup_many(["a"]))["a"], MapError)
    inner.down = False
    assert await m.lookup_many(["a"]) == {"a": ["A"]}  # failures are never cached
    small = CachedMap(FakeMap({str(i): str(i) for i in range(100)}),
                      CacheSettings(size=16), clock=clock)
    await small.lookup_many([str(i) for i in range(100)])
    assert len(small._entries) <= 16 and small.stats.evictions >= 84


async def test_single_flight_shares_one_query() -> None:
    inner = FakeMap({"k": "v"})
    inner.gate = asyncio.Event()
    m = CachedMap(inner, CacheSettings())
    tasks = [asyncio.ensure_future(m.lookup_many(["k"])) for _ in range(50)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    inner.gate.set()
    results = await asyncio.gather(*tasks)
    assert all(r == {"k": ["v"]} for r in results)
    assert inner.calls == [["k"]] and m.stats.shared == 49


# -- the router --------------------------------------------------------------------------

def _router(**kw: object) -> Router:
    kw.setdefault("destinations", {"lmtp": None, "lmtp1": None})
    return Router(**kw)  # type: ignore[arg-type]


async def test_router_search_order_batches_and_pattern_maps() -> None:
    transport = FakeMap({"user@example.com": "lmtp1:unix:/u", "example.com": "lmtp:inet:h1:24",
                         ".example.com": "lmtp:inet:sub:24", "*": "lmtp:inet:star:24"})
    r = _router(transport_maps=[transport], delimiter="+")
    got = await r.route_many(["User+Ext@Example.com", "x@example.com", "x@a.b.example.com",
                              "x@other.org"])
    assert [(g.key, str(g.destination)) for g in got] == [
        ("user@example.com", "unix:/u"), ("example.com", "h1:24"),
        (".example.com", "sub:24"), ("*", "star:24")]
    assert len(transport.calls) == 1  # one batched round for every recipient
    # A pattern map (tcp:, socketmap:, %u-queries) is asked the full address only.
    pattern = FakeMap({"example.com": "lmtp:inet:never:24", "a@example.com": "lmtp:inet:a:24"},
                      fixed=False)
    r2 = _router(transport_maps=[pattern], default=None)
    a, b = await r2.route_many(["a@example.com", "b@example.com"])
    assert str(a.destination) == "a:24"
    assert b.failure is not None and b.failure.code == 451  # no route defers (issue 10 item 20)
    assert pattern.calls == [["a@example.com", "b@example.com"]]


async def test_router_failures_defer_unknown_recipients_refused() -> None:
    recipients = FakeMap({"alice@example.com": "ok", "@catchall.org": "ok"})
    virtual = FakeMap({"sales@example.com": "alice@example.com"})
    transport = FakeMap({"example.com": "lmtp:inet:h:24", "catchall.org": "lmtp:inet:c:24"})
    r = _router(transport_maps=[transport], virtual_maps=[virtual], recipient_maps=[recipients])
    ok, alias, catch, unknown = await r.route_many(
        ["alice@example.com", "sales@example.com", "x@catchall.org", "bob@example.com"])
    assert ok.failure is None and alias.address == "alice@example.com" and catch.failure is None
    assert unknown.failure is not None
    assert (unknown.failure.code, unknown.failure.enhanced) == (550, "5.1.1")
    transport.down = True
    (down,) = await r.route_many(["alice@example.com"])
    assert down.failure is not None and down.failure.transient
    assert (down.failure.code, down.failure.enhanced) == (451, "4.3.0")
    assert "fake:test" in down.failure.text and "database down" in down.failure.text
    recipients.down, transport.down = True, False
    (rdown,) = await r.route_many(["alice@example.com"])
    assert rdown.failure is not None and rdown.failure.code == 451  # never a 550 on an outage


# -- the agent over a real PostgreSQL ----------------------------------------------------------

def _pg_cf(db: PgDatabase, path: Path, query: str) -> str:
    path.write_text(f"hosts = inet:127.0.0.1:{db.server.port}\nuser = {db.user}\n"
                    f"password = {db.password}\ndbname = {db.name}\nquery = {query}\n")
    path.chmod(0o600)
    return f"pgsql:{path}"


async def test_agent_routes_through_pgsql_and_defers_when_it_is_down(
    postgres_db: PgDatabase, tmp_path: Path,
) -> None:
    from lmtpfast.server import Sink

    async with Sink("127.0.0.1:0") as sink:
        dest = sink.destinations[0]
        postgres_db.psql("CREATE TABLE transport (k text primary key, v text);"
                         "CREATE TABLE users (k text primary key);"
                         f"INSERT INTO transport VALUES ('example.com', 'lmtp:inet:{dest}');"
                         + "".join(f"INSERT INTO users VALUES ('u{i}@example.com');"
                                   for i in range(1000)))
        tmap = _pg_cf(postgres_db, tmp_path / "t.cf", "SELECT v FROM transport WHERE k='%s'")
        rmap = _pg_cf(postgres_db, tmp_path / "r.cf", "SELECT 'ok' FROM users WHERE k='%s'")
        agent = Agent(transport_map=tmap, recipient_map=rmap)
        async with agent:
            rcpts = [f"u{i}@example.com" for i in range(1000)] + ["stranger@example.com"]
            results = await agent.deliver(MSG, sender="s@example.org", recipients=rcpts)
            assert all(r.delivered for r in results[:1000])
            assert (results[-1].code, results[-1].enhanced) == (550, "5.1.1")
            assert sink.stats.transactions == 20  # 1,000 recipients, 50 per transaction
            # A few batched queries for 1,000 recipients, not thousands.
            inner = agent._router.transport_maps[0]
            assert isinstance(inner, CachedMap) and inner.stats.backend_calls == 1
            assert inner.inner.queries <= 3  # type: ignore[attr-defined]  # 500 keys each
            postgres_db.server.stop()
            try:
                fresh = [f"new{i}@example.com" for i in range(3)]
                results = await agent.deliver(MSG, sender="s@example.org",
                                              recipients=["u1@example.com", *fresh])
                # u1 is cached: delivered; the others need the database: deferred, not bounced.
                assert results[0].delivered
                assert all(r.transient and r.code == 451 and r.enhanced == "4.3.0"
                           for r in results[1:])
            finally:
                postgres_db.server.start()
            results = await agent.deliver(MSG, sender="s@example.org",
                                          recipients=["u2@example.com"])
            assert results[0].delivered


def test_map_query_cli_statuses(postgres_db: PgDatabase, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    postgres_db.psql("CREATE TABLE t (k text, v text); INSERT INTO t VALUES ('a@x', 'one'), "
                     "('a@x', 'two');")
    m = _pg_cf(postgres_db, tmp_path / "q.cf", "SELECT v FROM t WHERE k='%s'")
    assert cli(["map", "query", m, "A@X"]) == 0
    assert capsys.readouterr().out == "one,two\n"
    assert cli(["map", "query", m, "nobody@x"]) == 1
    assert cli(["map", "query", m, "a@x", "b@x"]) == 0
    assert capsys.readouterr().out == "a@x\tone,two\n"
    bad = tmp_path / "bad.cf"
    bad.write_text("hosts = inet:127.0.0.1:1\ndbname = x\nquery = SELECT 1 WHERE 'k'='%s'\n"
                   "lmtpfast_connect_timeout = 2\n")
    assert cli(["map", "query", f"pgsql:{bad}", "a@x"]) == 75
    assert "lookup failure" in capsys.readouterr().err
    assert cli(["map", "query", f"pgsql:{tmp_path / 'missing.cf'}", "a"]) == 78


def test_password_maps_take_type_names(tmp_path: Path) -> None:
    from lmtpfast import config_from_dict

    pw = tmp_path / "sasl_passwd"
    pw.write_text("backend.example.org:24 front:s3cret\n")
    pw.chmod(0o600)
    for name in ("sasl_passwd", "hash:sasl_passwd", "texthash:sasl_passwd"):
        cfg = config_from_dict({"transports": {"lmtp": {"sasl_password_maps": name}}},
                               base_dir=tmp_path)
        creds = cfg.transports["lmtp"].sasl_password_maps[0].lookup("backend.example.org:24")
        assert creds is not None and creds.username == "front"
    with pytest.raises(ConfigurationError, match="not supported"):
        config_from_dict({"transports": {"lmtp": {"sasl_password_maps": "pgsql:x.cf"}}},
                         base_dir=tmp_path)
