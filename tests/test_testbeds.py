"""Smoke tests of the real-peer test beds in ``lmtpfast._testing``.

Each bed is started once per session where possible and checked with the
peer's own client tools, so a bed that silently stopped working fails here
first instead of in the tests built on it.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from lmtpfast._testing._procs import PeerStartError, ToolError, free_tcp_port
from lmtpfast._testing.fixtures import (
    NetnsFactory,
    PgDatabase,
    PostfixFactory,
    PostgresFactory,
    SlapdFactory,
    require_peer,
)
from lmtpfast._testing.mariadb import TempMariaDB
from lmtpfast._testing.netns import NetNamespaces, namespaces_alive
from lmtpfast._testing.postfix import split_capture
from lmtpfast._testing.postfix_mta import (
    ldap_map_settings,
    mysql_map_settings,
    pgsql_map_settings,
    postmap_query,
    write_map_cf,
)
from lmtpfast._testing.postgres import PG_BIN, TempPostgres
from lmtpfast._testing.slapd import BASE_DN, TempSlapd

# -- PostgreSQL ---------------------------------------------------------------


def test_postgres_psql_query_and_restart(postgres: TempPostgres, postgres_db: PgDatabase) -> None:
    assert postgres.psql("SELECT 6 * 7") == "42\n"
    postgres_db.psql("CREATE TABLE q (id int PRIMARY KEY, v text); INSERT INTO q VALUES (1, 'a');")
    # psql over TCP with the role's password: the DSN works outside our helper too.
    out = subprocess.run(
        [str(PG_BIN / "psql"), "-X", "-At", "-c", "SELECT v FROM q", postgres_db.dsn],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert out.stdout == "a\n"
    port = postgres.port
    postgres.stop()
    assert not postgres.running
    with pytest.raises(subprocess.CalledProcessError):
        postgres.psql("SELECT 1", timeout=30)
    postgres.start()
    assert postgres.port == port  # DSNs stay valid over a restart
    assert postgres_db.psql("SELECT count(*) FROM q") == "1\n"


async def test_postgres_asyncpg_sees_the_restart(
    postgres: TempPostgres, postgres_db: PgDatabase
) -> None:
    conn = await asyncpg.connect(postgres_db.dsn, timeout=10)
    try:
        assert await conn.fetchval("SELECT current_user") == postgres_db.user
        postgres.stop()
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await conn.fetchval("SELECT 1")
    finally:
        await conn.close(timeout=5)
        postgres.start()
    for dsn in (postgres_db.dsn, postgres_db.unix_dsn, postgres.dsn, postgres.unix_dsn):
        again = await asyncpg.connect(dsn, timeout=10)
        try:
            assert await again.fetchval("SELECT 1") == 1
        finally:
            await again.close(timeout=5)


async def test_postgres_wrong_password_is_refused(postgres_db: PgDatabase) -> None:
    bad = postgres_db.server.dsn_for(postgres_db.user, "not-the-password", postgres_db.name)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(bad, timeout=10)


def test_postgres_factory_unix_only(postgres_factory: PostgresFactory) -> None:
    pg = postgres_factory(tcp=False)
    assert pg.psql("SHOW listen_addresses") == "\n"
    assert pg.socket_path.is_socket()
    with pytest.raises(RuntimeError, match="TCP"):
        _ = pg.dsn
    base = pg.base
    pg.close()
    assert not base.exists()


# -- OpenLDAP slapd -----------------------------------------------------------


def test_slapd_ldapsearch_over_tcp_finds_the_dit(slapd: TempSlapd) -> None:
    # ldapsearch on its own (not our helper), anonymous, over TCP.
    out = subprocess.run(
        ["ldapsearch", "-x", "-LLL", "-H", slapd.url, "-b", BASE_DN,
         "(mailLocalAddress=a.example@example.com)", "mailRoutingAddress", "mailHost"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert out.splitlines()[:3] == [
        f"dn: uid=alice,ou=people,{BASE_DN}",
        "mailRoutingAddress: alice@mail1.example.com",
        "mailHost: mail1.example.com",
    ]
    bob = slapd.search("(uid=bob)", "lmtpfastMaildrop")
    assert bob.count("lmtpfastMaildrop: ") == 2


def test_slapd_load_ldif_bind_and_restart(slapd_factory: SlapdFactory) -> None:
    ldap = slapd_factory()  # empty: no DIT
    assert ldap.search(base="", scope="base", filter="(objectClass=*)").startswith("dn:")
    ldap.load_ldif(
        f"dn: {BASE_DN}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\n"
        "o: t\n\n"
        f"dn: uid=zed,{BASE_DN}\nobjectClass: account\nobjectClass: inetLocalMailRecipient\n"
        "uid: zed\nmailLocalAddress: zed@example.com\n"
    )
    wrong = subprocess.run(
        ["ldapwhoami", "-x", "-H", ldap.url, "-D", ldap.root_dn, "-w", "wrong"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert wrong.returncode == 49, wrong.stderr  # invalidCredentials
    port = ldap.port
    ldap.stop()
    assert not ldap.running
    with pytest.raises(subprocess.CalledProcessError):
        ldap.search("(uid=zed)")
    ldap.start()
    assert ldap.port == port
    assert "mailLocalAddress: zed@example.com" in ldap.search("(uid=zed)", bind=True)


# -- MariaDB --------------------------------------------------------------------


def test_mariadb_client_query_and_restart(mariadb: TempMariaDB) -> None:
    name = "t_" + secrets.token_hex(4)
    password = secrets.token_urlsafe(12)
    mariadb.create_database(name)
    try:
        mariadb.create_user(name, password, grant_on=name)
        mariadb.sql("CREATE TABLE m (k VARCHAR(64) PRIMARY KEY, v TEXT);"
                    "INSERT INTO m VALUES ('alice@example.com', 'lmtp:unix:/x');", database=name)
        # The mariadb client on its own, over TCP as the new user.
        out = subprocess.run(
            ["mariadb", "--no-defaults", "-h", "127.0.0.1", "-P", str(mariadb.port), "-u", name,
             f"--password={password}", "-BN", name, "-e", "SELECT v FROM m"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        assert out == "lmtp:unix:/x\n"
        mariadb.stop()
        assert not mariadb.running
        with pytest.raises(subprocess.CalledProcessError):
            mariadb.sql("SELECT 1", timeout=30)
        mariadb.start()
        assert mariadb.sql("SELECT count(*) FROM m", database=name) == "1\n"
    finally:
        if not mariadb.running:
            mariadb.start()
        mariadb.drop_database(name)
        mariadb.sql(f"DROP USER '{name}'@'localhost', '{name}'@'127.0.0.1';")


def test_a_bed_that_cannot_start_says_why(slapd_factory: SlapdFactory) -> None:
    # slapd exits at once on a bad config line: the error carries its log tail.
    with pytest.raises(PeerStartError, match=r"(?s)slapd did not start.*no-such-directive"):
        slapd_factory(extra_config="no-such-directive yes\n")


# -- Postfix MTA ------------------------------------------------------------------


def _recorder(tmp: Path, name: str, exit_status: int = 0) -> tuple[Path, Path]:
    """A shell script for pipe(8) that records its argv and stdin in a folder nobody can write."""
    out = tmp / f"{name}-out"
    out.mkdir()
    shutil.chown(out, user="nobody")
    script = tmp / f"{name}.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > {out}/argv.$$\n'
        f"cat > {out}/stdin.$$\n"
        f"exit {exit_status}\n"
    )
    script.chmod(0o755)
    return script, out


def test_postfix_mta_lmtp_into_smtp_sink(postfix_mta: PostfixFactory, smtp_sink: Any) -> None:
    sink = smtp_sink(capture=True)
    mta = postfix_mta()
    mta.add_lmtp_transport("tolmtp")
    mta.route("example.com", f"tolmtp:{sink.destination}")
    mta.reload()
    qid = mta.sendmail(b"Subject: lmtp\r\n\r\nhello over lmtp\r\n", "s@example.org",
                       ["a@example.com", "b@example.com"])  # fmt: skip
    mta.wait_until_empty()
    [dump] = sink.captures()
    meta, message = split_capture(dump)
    assert meta["X-Mail-Args"] == ["<s@example.org>"]
    assert meta["X-Rcpt-Args"] == ["<a@example.com> ORCPT=rfc822;a@example.com",
                                   "<b@example.com> ORCPT=rfc822;b@example.com"]  # fmt: skip
    assert b"hello over lmtp" in message
    log = mta.log_text()
    for rcpt in ("a@example.com", "b@example.com"):
        assert re.search(rf"{qid}: to=<{rcpt}>, relay=.*status=sent \(250 2\.2\.0 Ok\)", log)


def test_postfix_mta_pipe_records_argv_and_stdin(
    postfix_mta: PostfixFactory, tmp_path: Path
) -> None:
    tmp = Path(tempfile.mkdtemp(dir="/var/tmp"))  # tmp_path is under /root: nobody cannot run it
    try:
        ok, ok_out = _recorder(tmp, "ok")
        soft, _ = _recorder(tmp, "soft", exit_status=75)
        tmp.chmod(0o755)
        mta = postfix_mta(start=False)
        mta.add_pipe_transport("rec", [str(ok), "${sender}", "${recipient}"], user="nobody")
        mta.add_pipe_transport("soft", [str(soft), "${recipient}"], user="nobody")
        mta.route("pipe.example", "rec:")
        mta.route("soft.example", "soft:")
        mta.start()
        qid = mta.sendmail(b"Subject: piped\r\n\r\nbody line\r\n", "s@example.org",
                           ["x@pipe.example", "y@pipe.example", "z@soft.example"])  # fmt: skip
        mta.wait_until_empty(include_deferred=False)
        argvs = sorted(p.read_text() for p in ok_out.glob("argv.*"))
        # recipient_limit=1: one run per recipient.
        assert argvs == ["s@example.org\nx@pipe.example\n", "s@example.org\ny@pipe.example\n"]
        for stdin in ok_out.glob("stdin.*"):
            text = stdin.read_text()
            assert text.startswith("Return-Path: <s@example.org>\n")  # flags=R
            assert "Subject: piped\n" in text and text.endswith("body line\n")
        [queued] = mta.queue()
        assert queued["queue_id"] == qid and queued["queue_name"] == "deferred"
        assert [r["address"] for r in queued["recipients"]] == ["z@soft.example"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_postfix_mta_pipe_runs_lmtpfast_send_from_the_world_venv(
    postfix_mta: PostfixFactory, smtp_sink: Any, lmtpfast_venv: Path
) -> None:
    sink = smtp_sink(capture=True)
    mta = postfix_mta()
    mta.add_pipe_transport(
        "lmtpfast",
        [str(lmtpfast_venv / "bin" / "lmtpfast"), "send", "--server", sink.destination,
         "--from", "${sender}", "--rcpt", "${recipient}", "-"],
        user="nobody",
    )  # fmt: skip
    mta.route("example.net", "lmtpfast:")
    mta.reload()
    qid = mta.sendmail(b"Subject: via send\r\n\r\npiped to lmtpfast send\r\n", "s@example.org",
                       ["v@example.net"])  # fmt: skip
    mta.wait_until_empty()
    [dump] = sink.captures()
    meta, message = split_capture(dump)
    assert meta["X-Rcpt-Args"] == ["<v@example.net>"]
    assert b"piped to lmtpfast send" in message
    assert re.search(rf"{qid}: to=<v@example.net>, relay=lmtpfast, .*status=sent", mta.log_text())


def test_postmap_queries_pgsql_ldap_mysql_maps_on_the_beds(
    postgres: TempPostgres, postgres_db: PgDatabase, slapd: TempSlapd, mariadb: TempMariaDB,
    tmp_path: Path,
) -> None:  # fmt: skip
    postgres_db.psql("CREATE TABLE transport (domain text PRIMARY KEY, transport text);"
                     "INSERT INTO transport VALUES ('example.com', 'lmtp:unix:/run/pg');")
    pg_cf = write_map_cf(tmp_path / "pgsql.cf", pgsql_map_settings(
        postgres, user=postgres_db.user, password=postgres_db.password, dbname=postgres_db.name,
        query="SELECT transport FROM transport WHERE domain = '%s'"))  # fmt: skip
    assert postmap_query("example.com", f"pgsql:{pg_cf}") == "lmtp:unix:/run/pg"
    assert postmap_query("example.org", f"pgsql:{pg_cf}") is None

    ldap_cf = write_map_cf(tmp_path / "ldap.cf", ldap_map_settings(
        slapd, query_filter="(mailLocalAddress=%s)",
        result_attribute="mailRoutingAddress"))  # fmt: skip
    assert postmap_query("a.example@example.com", f"ldap:{ldap_cf}") == "alice@mail1.example.com"
    assert postmap_query("nobody@example.com", f"ldap:{ldap_cf}") is None
    drops_cf = write_map_cf(tmp_path / "drops.cf", ldap_map_settings(
        slapd, query_filter="(mail=%s)", result_attribute="lmtpfastMaildrop",
        bind=True))  # fmt: skip
    drops = postmap_query("bob@example.com", f"ldap:{drops_cf}")
    assert drops is not None
    assert sorted(drops.split(",")) == ["bob-archive@mail2.example.com", "bob@mail2.example.com"]

    name = "m_" + secrets.token_hex(4)
    password = secrets.token_urlsafe(12)
    mariadb.create_database(name)
    try:
        mariadb.create_user(name, password, grant_on=name, privileges="SELECT")
        mariadb.sql("CREATE TABLE transport (domain VARCHAR(255) PRIMARY KEY, transport TEXT);"
                    "INSERT INTO transport VALUES ('example.com', 'lmtp:inet:127.0.0.1:24');",
                    database=name)  # fmt: skip
        for unix in (False, True):
            my_cf = write_map_cf(tmp_path / f"mysql-{unix}.cf", mysql_map_settings(
                mariadb, user=name, password=password, dbname=name, unix=unix,
                query="SELECT transport FROM transport WHERE domain = '%s'"))  # fmt: skip
            assert postmap_query("example.com", f"mysql:{my_cf}") == "lmtp:inet:127.0.0.1:24"
            assert postmap_query("example.org", f"mysql:{my_cf}") is None
    finally:
        mariadb.drop_database(name)
        mariadb.sql(f"DROP USER '{name}'@'localhost', '{name}'@'127.0.0.1';")


def test_postmap_reports_a_map_that_is_down(tmp_path: Path) -> None:
    require_peer("postfix-mta")
    port = free_tcp_port()  # nothing listens there
    cf = write_map_cf(tmp_path / "down.cf", {
        "server_host": f"ldap://127.0.0.1:{port}/", "search_base": "dc=example,dc=com",
        "query_filter": "(mail=%s)", "result_attribute": "mail", "version": "3"})  # fmt: skip
    with pytest.raises(ToolError) as info:
        postmap_query("a@example.com", f"ldap:{cf}")
    assert info.value.returncode != 0 and "ldap" in info.value.stderr.lower()


# -- network namespaces ---------------------------------------------------------


def test_netns_two_hosts_reach_postgres_in_a_third(netns: NetnsFactory) -> None:
    net = netns(["db", "a", "b"])
    with TempPostgres(host=net.address("db"), netns=net.namespace("db")) as pg:
        pg.create_user("u", "pw")
        for host in ("a", "b"):
            out = net.run(host, [str(PG_BIN / "psql"), "-XAt", "-c",
                                 "SELECT host(inet_client_addr())",
                                 pg.dsn_for("u", "pw")])  # fmt: skip
            assert out.stdout == f"{net.address(host)}\n"
        # Loopback inside "a" is a's own: the server is not there.
        refused = net.run("a", [str(PG_BIN / "psql"), "-XAt", "-c", "SELECT 1",
                                f"postgresql://u:pw@127.0.0.1:{pg.port}/postgres"],
                          check=False)  # fmt: skip
        assert refused.returncode != 0 and "refused" in refused.stderr
        # The host itself has no route into the namespaces' subnet.
        assert net.address("db") not in subprocess.run(
            ["ip", "-br", "addr"], capture_output=True, text=True, check=True).stdout


def test_netns_close_kills_what_runs_inside_and_removes_everything() -> None:
    require_peer("netns")
    net = NetNamespaces(["x"], subnet="10.78.0.0/24")
    try:
        sleeper = net.popen("x", ["sleep", "300"])
        assert namespaces_alive(net.tag)  # hub and x
    finally:
        net.close()
    assert sleeper.wait(10) == -9
    assert namespaces_alive(net.tag) == []
    net.close()  # idempotent
