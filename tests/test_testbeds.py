"""Smoke tests of the real-peer test beds in ``lmtpfast._testing``.

Each bed is started once per session where possible and checked with the
peer's own client tools, so a bed that silently stopped working fails here
first instead of in the tests built on it.
"""

from __future__ import annotations

import secrets
import subprocess

import asyncpg
import pytest

from lmtpfast._testing._procs import PeerStartError
from lmtpfast._testing.fixtures import PgDatabase, PostgresFactory, SlapdFactory
from lmtpfast._testing.mariadb import TempMariaDB
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
