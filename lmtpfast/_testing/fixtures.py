"""pytest plugin: real LMTP peers as fixtures.

Load it from the root ``tests/conftest.py`` with
``pytest_plugins = ["lmtpfast._testing.fixtures"]`` (or ``pytest -p
lmtpfast._testing.fixtures``).

Fixtures:

``dovecot`` (function scope)
    The session's shared :class:`~lmtpfast._testing.dovecot.TempDovecot`
    (users alice, bob, carol, dave; no SSL), with every mailbox emptied before
    the test. One instance per session because stopping Dovecot takes about a
    second; emptying mailboxes between tests is a few file deletions. Do not
    stop it or change its config in a test: use ``dovecot_factory`` for that.
``dovecot_session`` (session scope)
    The same shared instance without the per-test reset.
``dovecot_factory`` (function scope)
    ``dovecot_factory(**kwargs) -> TempDovecot``: a fresh, started instance with
    its own config (``users=``, ``ssl_cert=``/``ssl_key=``, ``extra_config=`` ...;
    see :class:`TempDovecot`), stopped and deleted at teardown.
``lmtp_proxy`` (function scope)
    ``lmtp_proxy(config, **kwargs) -> TempProxy``: a started ``lmtpfast
    proxy`` process (:class:`~lmtpfast._testing.lmtpproxy.TempProxy`) with that
    TOML text, closed at teardown.
``smtp_sink`` (function scope)
    ``smtp_sink(*flags, tcp=False, **kwargs) -> SmtpSink``: a started
    ``smtp-sink -L`` (fault flags passed through, e.g. ``smtp_sink("-q", ".")``),
    stopped at teardown.
``postgres`` (session scope)
    The session's shared :class:`~lmtpfast._testing.postgres.TempPostgres`
    (unix socket + 127.0.0.1; ``dsn``, ``unix_dsn``, ``psql()``). A test may
    ``stop()`` and ``start()`` it, but must leave it running; prefer
    ``postgres_db`` (which restarts it if an earlier test did not) or
    ``postgres_factory`` for a cluster of its own.
``postgres_db`` (function scope)
    A fresh database on the shared cluster, owned by a fresh role with a
    password: a :class:`PgDatabase` (``name``, ``user``, ``password``, ``dsn``,
    ``unix_dsn``, ``server``), dropped at teardown.
``postgres_factory`` (function scope)
    ``postgres_factory(**kwargs) -> TempPostgres``: a fresh, started cluster of
    its own (about 1 s: initdb), deleted at teardown.

``slapd`` (session scope)
    The session's shared :class:`~lmtpfast._testing.slapd.TempSlapd` with
    :data:`~lmtpfast._testing.slapd.MAIL_DIT` loaded (``url``, ``ldapi_url``,
    ``root_dn``, ``root_password``, ``search()``, ``load_ldif()``). A test that
    adds entries removes them again (or uses ``slapd_factory``).
``slapd_factory`` (function scope)
    ``slapd_factory(**kwargs) -> TempSlapd``: a fresh, started slapd (``dit=``).
``mariadb`` (session scope)
    The session's shared :class:`~lmtpfast._testing.mariadb.TempMariaDB`
    (``socket_path``, ``port``, ``sql()``, ``create_database()``,
    ``create_user()``). Tests make their own database in it.
``mariadb_factory`` (function scope)
    ``mariadb_factory(**kwargs) -> TempMariaDB``: a fresh, started server.
``postfix_mta`` (function scope)
    ``postfix_mta(start=True, **kwargs) -> TempPostfix``: a private Postfix MTA
    (about 0.1 s to start). Add transports and routes, then ``reload()`` (or
    pass ``start=False`` and ``start()`` after configuring). Stopped and
    deleted at teardown.
``netns`` (function scope)
    ``netns(names, subnet="10.77.0.0/24") -> NetNamespaces``: private network
    namespaces joined by a bridge (see :mod:`lmtpfast._testing.netns`),
    deleted at teardown with everything still running inside.
``lmtpfast_venv`` (session scope)
    :func:`~lmtpfast._testing.postfix_mta.world_venv`: a venv of
    ``/usr/bin/python3`` with this checkout in it that ``nobody`` can run
    (``VENV/bin/lmtpfast``) for pipe(8) transports; a few seconds, once.

Tests using the Dovecot fixtures get the ``dovecot`` marker, tests using
``smtp_sink`` the ``postfix`` marker, and the PostgreSQL, slapd, MariaDB and
Postfix MTA fixtures the ``postgres``, ``slapd``, ``mariadb``, ``postfix_mta``
markers (``-m "not dovecot"`` deselects them).

A missing peer is a skip on a developer machine but a failure when ``CI`` is set
(any value but empty, ``0``, ``false`` or ``no``): CI must never pass by
silently skipping the real-peer tests. :func:`require_peer` implements that
rule for tests that call peers directly (e.g. ``run_smtp_source``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import pytest

from ._procs import TempPeer
from .cyrus import find_cyrus
from .dovecot import TempDovecot, find_dovecot
from .lmtpproxy import TempProxy
from .mariadb import TempMariaDB, find_mariadb
from .netns import NetNamespaces, find_netns
from .postfix import SmtpSink, smtp_tool
from .postfix_mta import TempPostfix, find_postfix_mta, remove_world_venvs, world_venv
from .postgres import TempPostgres, find_postgres
from .slapd import MAIL_DIT, TempSlapd, find_slapd

__all__ = [
    "DovecotFactory",
    "MariaDBFactory",
    "NetnsFactory",
    "PgDatabase",
    "PostfixFactory",
    "PostgresFactory",
    "ProxyFactory",
    "SlapdFactory",
    "SmtpSinkFactory",
    "dovecot",
    "dovecot_factory",
    "dovecot_session",
    "in_ci",
    "lmtp_proxy",
    "lmtpfast_venv",
    "mariadb",
    "mariadb_factory",
    "netns",
    "postfix_mta",
    "postgres",
    "postgres_db",
    "postgres_factory",
    "postgres_module_db",
    "require_peer",
    "slapd",
    "slapd_factory",
    "smtp_sink",
]

P = TypeVar("P", bound=TempPeer)

_INSTALL_HINT = "run scripts/install-test-deps.sh as root"


class DovecotFactory(Protocol):
    """Type of the ``dovecot_factory`` fixture."""

    def __call__(self, **kwargs: Any) -> TempDovecot: ...


class SmtpSinkFactory(Protocol):
    """Type of the ``smtp_sink`` fixture."""

    def __call__(self, *flags: str, tcp: bool = False, **kwargs: Any) -> SmtpSink: ...


class ProxyFactory(Protocol):
    """Type of the ``lmtp_proxy`` fixture."""

    def __call__(self, config: str, **kwargs: Any) -> TempProxy: ...


class PostgresFactory(Protocol):
    """Type of the ``postgres_factory`` fixture."""

    def __call__(self, **kwargs: Any) -> TempPostgres: ...


class SlapdFactory(Protocol):
    """Type of the ``slapd_factory`` fixture."""

    def __call__(self, **kwargs: Any) -> TempSlapd: ...


class PostfixFactory(Protocol):
    """Type of the ``postfix_mta`` fixture."""

    def __call__(self, *, start: bool = True, **kwargs: Any) -> TempPostfix: ...


class MariaDBFactory(Protocol):
    """Type of the ``mariadb_factory`` fixture."""

    def __call__(self, **kwargs: Any) -> TempMariaDB: ...


@dataclass(frozen=True)
class PgDatabase:
    """A fresh database on the shared cluster (the ``postgres_db`` fixture)."""

    server: TempPostgres
    name: str
    user: str
    password: str = field(repr=False)

    @property
    def dsn(self) -> str:
        """TCP DSN as the owning role (password included)."""
        return self.server.dsn_for(self.user, self.password, self.name)

    @property
    def unix_dsn(self) -> str:
        """Unix-socket DSN as the owning role (trust: no password)."""
        return self.server.dsn_for(self.user, database=self.name, unix=True)

    def psql(self, sql: str, **kwargs: Any) -> str:
        """``server.psql`` in this database as its owner."""
        kwargs.setdefault("user", self.user)
        return self.server.psql(sql, database=self.name, **kwargs)


def in_ci() -> bool:
    """True when the ``CI`` environment variable is set to a true-ish value."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"real peer unavailable under CI (never skipped there): {reason}",
                    pytrace=False)
    pytest.skip(reason)


_FINDERS = {"postgres": find_postgres, "slapd": find_slapd, "mariadb": find_mariadb,
            "postfix-mta": find_postfix_mta, "netns": find_netns,
            "cyrus": find_cyrus}  # fmt: skip


def require_peer(name: str) -> None:
    """Skip the calling test (fail it under CI) unless peer *name* can run.

    *name*: ``"dovecot"``, ``"smtp-sink"``, ``"smtp-source"``, ``"postfix"``
    (both Postfix tools), ``"postgres"``, ``"slapd"``, ``"mariadb"``,
    ``"postfix-mta"`` (the whole Postfix MTA), ``"netns"`` or ``"cyrus"``
    (:class:`~lmtpfast._testing.cyrus.TempCyrus`).
    """
    if name == "dovecot":
        if find_dovecot() is None or not os.access("/usr/lib/dovecot/lmtp", os.X_OK):
            _unavailable("Dovecot LMTP (dovecot-core, dovecot-lmtpd) not installed: "
                         f"{_INSTALL_HINT}")
        if os.geteuid() != 0:
            _unavailable("TempDovecot needs root")
    elif name in ("smtp-sink", "smtp-source", "postfix"):
        tools = ("smtp-sink", "smtp-source") if name == "postfix" else (name,)
        for tool in tools:
            if smtp_tool(tool) is None:
                _unavailable(f"Postfix {tool} not installed (package postfix): {_INSTALL_HINT}")
        if "smtp-sink" in tools and os.geteuid() != 0:
            # smtp-sink -u only works for root; as another user it would need no -u.
            _unavailable("SmtpSink needs root (smtp-sink -u nobody)")
    elif name in _FINDERS:
        why = _FINDERS[name]()
        if why is not None:
            _unavailable(f"{name}: {why}: {_INSTALL_HINT}")
    else:
        raise ValueError(f"unknown peer {name!r}")


@pytest.fixture(scope="session")
def dovecot_session() -> Iterator[TempDovecot]:
    """One Dovecot instance shared by the whole test session."""
    require_peer("dovecot")
    with TempDovecot() as dv:
        yield dv


@pytest.fixture
def dovecot(dovecot_session: TempDovecot) -> TempDovecot:
    """The shared Dovecot instance with all mailboxes emptied for this test."""
    if not dovecot_session.running:
        pytest.fail(f"the shared Dovecot died:\n{dovecot_session.log_text()[-3000:]}")
    dovecot_session.reset_mail()
    return dovecot_session


@pytest.fixture
def dovecot_factory() -> Iterator[DovecotFactory]:
    """Factory of fresh Dovecot instances, each stopped and deleted at teardown."""
    require_peer("dovecot")
    yield from _factory(TempDovecot)


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSinkFactory]:
    """Factory of started ``smtp-sink -L`` servers, stopped at teardown."""
    require_peer("smtp-sink")
    made: list[SmtpSink] = []

    def make(*flags: str, tcp: bool = False, **kwargs: Any) -> SmtpSink:
        sink = SmtpSink(*flags, tcp=tcp, **kwargs)
        made.append(sink)
        return sink.start()

    yield make
    _close_all(made)


@pytest.fixture
def lmtp_proxy() -> Iterator[ProxyFactory]:
    """Factory of started ``lmtpfast proxy`` processes, closed at teardown."""
    made: list[TempProxy] = []

    def make(config: str, **kwargs: Any) -> TempProxy:
        proxy = TempProxy(config, **kwargs)
        made.append(proxy)
        return proxy.start()

    yield make
    for proxy in made:
        proxy.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[TempPostgres]:
    """One PostgreSQL cluster shared by the whole test session."""
    require_peer("postgres")
    with TempPostgres() as pg:
        yield pg


@pytest.fixture
def postgres_db(postgres: TempPostgres) -> Iterator[PgDatabase]:
    """A fresh database and owning role on the shared cluster, dropped afterwards."""
    yield from _pg_database(postgres)


@pytest.fixture(scope="module")
def postgres_module_db(postgres: TempPostgres) -> Iterator[PgDatabase]:
    """One database and role for a whole test module (making one costs more than most
    tests): each test empties what it uses, e.g. ``DROP SCHEMA ... CASCADE``."""
    yield from _pg_database(postgres)


def _pg_database(postgres: TempPostgres) -> Iterator[PgDatabase]:
    if not postgres.running:
        # An earlier test stopped it and did not start it again.
        postgres.start()
    tag = secrets.token_hex(4)
    db = PgDatabase(postgres, f"t_{tag}", f"u_{tag}", secrets.token_urlsafe(12))
    postgres.create_user(db.user, db.password)
    postgres.create_database(db.name, owner=db.user)
    yield db
    if not postgres.running:
        postgres.start()
    postgres.drop_database(db.name)
    postgres.psql(f'DROP ROLE IF EXISTS "{db.user}";')


def _factory(peer: type[P]) -> Iterator[Any]:
    """Body of a ``*_factory`` fixture: ``make(**kwargs)`` starts a *peer*; all closed after."""
    made: list[P] = []

    def make(**kwargs: Any) -> P:
        instance = peer(**kwargs)
        made.append(instance)
        return instance.start()

    yield make
    _close_all(made)


@pytest.fixture
def postgres_factory() -> Iterator[PostgresFactory]:
    """Factory of fresh PostgreSQL clusters, each stopped and deleted at teardown."""
    require_peer("postgres")
    yield from _factory(TempPostgres)


@pytest.fixture(scope="session")
def slapd() -> Iterator[TempSlapd]:
    """One slapd with :data:`MAIL_DIT` loaded, shared by the whole test session."""
    require_peer("slapd")
    with TempSlapd(dit=MAIL_DIT) as server:
        yield server


@pytest.fixture
def slapd_factory() -> Iterator[SlapdFactory]:
    """Factory of fresh slapd servers, each stopped and deleted at teardown."""
    require_peer("slapd")
    yield from _factory(TempSlapd)


@pytest.fixture(scope="session")
def mariadb() -> Iterator[TempMariaDB]:
    """One MariaDB server shared by the whole test session."""
    require_peer("mariadb")
    with TempMariaDB() as server:
        yield server


@pytest.fixture
def mariadb_factory() -> Iterator[MariaDBFactory]:
    """Factory of fresh MariaDB servers, each stopped and deleted at teardown."""
    require_peer("mariadb")
    yield from _factory(TempMariaDB)


@pytest.fixture
def postfix_mta() -> Iterator[PostfixFactory]:
    """Factory of private Postfix MTAs (started unless ``start=False``), closed at teardown."""
    require_peer("postfix-mta")
    made: list[TempPostfix] = []

    def make(*, start: bool = True, **kwargs: Any) -> TempPostfix:
        mta = TempPostfix(**kwargs)
        made.append(mta)
        return mta.start() if start else mta

    yield make
    _close_all(made)


class NetnsFactory(Protocol):
    """Type of the ``netns`` fixture."""

    def __call__(self, names: Sequence[str], **kwargs: Any) -> NetNamespaces: ...


@pytest.fixture
def netns() -> Iterator[NetnsFactory]:
    """Factory of private network namespaces, deleted at teardown."""
    require_peer("netns")
    made: list[NetNamespaces] = []

    def make(names: Sequence[str], **kwargs: Any) -> NetNamespaces:
        net = NetNamespaces(names, **kwargs)
        made.append(net)
        return net

    yield make
    for net in reversed(made):
        net.close()


@pytest.fixture(scope="session")
def lmtpfast_venv() -> Iterator[Path]:
    """A venv with this checkout that unprivileged users (pipe(8)'s ``user=``) can run."""
    require_peer("postfix-mta")
    try:
        yield world_venv()
    finally:
        remove_world_venvs()


def _close_all(peers: Sequence[TempPeer]) -> None:
    # Close every peer even if one of them fails to stop; report the first error.
    errors: list[BaseException] = []
    for peer in reversed(peers):
        try:
            peer.close()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


_MARKERS: dict[str, str] = {
    "dovecot": "dovecot",
    "dovecot_session": "dovecot",
    "dovecot_factory": "dovecot",
    "smtp_sink": "postfix",
    "postgres": "postgres",
    "postgres_db": "postgres",
    "postgres_factory": "postgres",
    "slapd": "slapd",
    "slapd_factory": "slapd",
    "mariadb": "mariadb",
    "mariadb_factory": "mariadb",
    "postfix_mta": "postfix_mta",
    "lmtpfast_venv": "postfix_mta",
    "netns": "netns",
}


#: Markers that mean "talks to a real server": each such test is also marked ``peers``,
#: so ``pytest -m "not peers"`` runs the unit rings alone (no root, no apt).
PEER_MARKERS = frozenset({"dovecot", "postfix", "postgres", "slapd", "mariadb", "postfix_mta",
                          "netns", "maps", "cyrus"})
#: Fixtures of test modules that start a real server (the module's own ones).
PEER_FIXTURES = frozenset({"cyrus", "cyrus_tls", "dv"})


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers this plugin applies (harmless if pyproject has them too)."""
    config.addinivalue_line("markers", "peers: talks to a real server (any of the others)")
    config.addinivalue_line("markers", "cyrus: needs a private Cyrus lmtpd")
    config.addinivalue_line("markers", "dovecot: needs Dovecot's LMTP server")
    config.addinivalue_line("markers", "postfix: needs Postfix's smtp-sink/smtp-source")
    config.addinivalue_line("markers", "postgres: needs a private PostgreSQL cluster")
    config.addinivalue_line("markers", "slapd: needs a private OpenLDAP slapd")
    config.addinivalue_line("markers", "mariadb: needs a private MariaDB server")
    config.addinivalue_line("markers", "postfix_mta: needs a private Postfix MTA")
    config.addinivalue_line("markers", "netns: needs network namespaces (root, iproute2)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the peer fixtures they use, so ``-m`` can select them."""
    for item in items:
        fixturenames: list[str] = getattr(item, "fixturenames", [])
        for fixture, marker in _MARKERS.items():
            if fixture in fixturenames and marker not in item.keywords:
                item.add_marker(marker)
        if "peers" not in item.keywords and (
                PEER_FIXTURES.intersection(fixturenames)
                or any(m in item.keywords for m in PEER_MARKERS)):
            item.add_marker("peers")
