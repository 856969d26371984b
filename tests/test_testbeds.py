"""Smoke tests of the real-peer test beds in ``lmtpfast._testing``.

Each bed is started once per session where possible and checked with the
peer's own client tools, so a bed that silently stopped working fails here
first instead of in the tests built on it.
"""

from __future__ import annotations

import subprocess

import asyncpg
import pytest

from lmtpfast._testing.fixtures import PgDatabase, PostgresFactory
from lmtpfast._testing.postgres import PG_BIN, TempPostgres

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
