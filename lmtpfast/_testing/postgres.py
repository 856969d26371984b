"""A private PostgreSQL 15 cluster for tests: :class:`TempPostgres`.

Use the session fixture ``postgres`` (see :mod:`lmtpfast._testing.fixtures`) or
the class directly::

    with TempPostgres() as pg:
        pg.create_user("queue", "s3cret")
        pg.create_database("queue", owner="queue")
        conn = await asyncpg.connect(pg.dsn_for("queue", "s3cret", "queue"))
        pg.psql("SELECT 1")              # -> "1\\n" (psql -At output)
        pg.stop()                        # fast shutdown: clients see the loss
        pg.start()                       # same socket, port and data

Each instance runs ``initdb`` into a fresh folder under ``/var/tmp`` and then
``postgres -D DATA`` in the foreground as a child of the test process (under
``setpriv --pdeathsig``, so it also ends when the test process dies without
running its teardown). The Debian ``main`` cluster is never involved.

Facts checked against PostgreSQL 15.18 (Debian 12):

* PostgreSQL refuses to run as root (``initdb: error: cannot be run as root``):
  the cluster runs as the ``postgres`` system user the package creates (falling
  back to ``nobody``), or as the calling user when that is not root. Its folder
  lives outside ``/root`` (0700 there) so that user can reach it; the data
  folder itself must be 0700 and owned by that user.
* Addresses: a unix socket in ``BASE/sock`` (``.s.PGSQL.PORT``) and, unless
  ``tcp=False``, 127.0.0.1:PORT, the same port number for both. The port is
  kept across :meth:`TempPostgres.stop` / :meth:`TempPostgres.start`, so DSNs
  stay valid over a restart.
* Authentication (``pg_hba.conf``): ``trust`` over the unix socket (any role,
  no password: :attr:`TempPostgres.unix_dsn`), ``scram-sha-256`` over TCP
  (:attr:`TempPostgres.dsn` carries the superuser's random password). A role
  made with :meth:`TempPostgres.create_user` logs in over TCP with its password.
* Readiness: the postmaster writes ``ready`` as the 8th line of
  ``DATA/postmaster.pid`` once it accepts connections (``starting`` during
  crash recovery); :meth:`TempPostgres.start` waits for that and for the
  listening sockets in ``/proc``.
* Stopping: SIGINT to the postmaster is PostgreSQL's "fast" shutdown (open
  sessions are ended with ``FATAL: terminating connection due to administrator
  command``, asyncpg raises ``AdminShutdown``/``ConnectionDoesNotExistError``),
  SIGQUIT "immediate" (no shutdown checkpoint; crash recovery at the next
  start), SIGTERM "smart" (waits for clients to leave). :meth:`stop` takes
  ``mode=``.
* ``fsync = off`` (default here, ``fsync=True`` to change) only matters for a
  machine crash; a killed postmaster loses nothing that was committed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Self

from ._procs import (
    PeerStartError,
    TempPeer,
    ToolError,
    guarded,
    listening_tcp,
    listening_unix,
    run_tool,
    stop_process,
)

__all__ = ["PG_BIN", "PeerStartError", "TempPostgres", "ToolError", "find_postgres"]

PG_BIN = Path("/usr/lib/postgresql/15/bin")
_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
StopMode = Literal["smart", "fast", "immediate"]


def find_postgres() -> str | None:
    """Why a :class:`TempPostgres` cannot run here, or ``None`` when it can."""
    for name in ("initdb", "postgres", "psql"):
        if not os.access(PG_BIN / name, os.X_OK):
            return f"{PG_BIN / name} missing (package postgresql-15)"
    if os.geteuid() == 0 and _run_user() is None:
        return "no unprivileged user (postgres or nobody) to run PostgreSQL as"
    return None


def _run_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    return None


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class TempPostgres(TempPeer):
    """A private PostgreSQL cluster on a unix socket and (by default) 127.0.0.1:PORT.

    *superuser* is the bootstrap role (a random password, used over TCP).
    *settings* are extra ``postgresql.conf`` lines (``{"max_connections": "50"}``);
    *fsync* keeps PostgreSQL's durability settings (default off: faster, and a
    test never survives a machine crash anyway). *port* fixes the port.
    *host* is the TCP listen address; with *netns* (a namespace name, see
    :mod:`lmtpfast._testing.netns`) the server runs inside that network
    namespace, e.g. on its ``eth0`` address, and accepts password logins from
    its subnet (``samenet``). The unix socket works from anywhere.
    """

    def __init__(
        self,
        *,
        tcp: bool = True,
        port: int | None = None,
        superuser: str = "postgres",
        settings: Mapping[str, str] | None = None,
        fsync: bool = False,
        host: str = "127.0.0.1",
        netns: str | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        why = find_postgres()
        if why is not None:
            raise PeerStartError(f"cannot run PostgreSQL: {why}; run scripts/install-test-deps.sh")
        user = _run_user()
        assert user is not None
        self.run_as = user
        self.tcp = tcp
        self.host = host
        self.netns = netns
        self.superuser = superuser
        self.settings = dict(settings or {})
        self.fsync = fsync
        self.start_timeout = start_timeout
        self._fixed_port = port
        self._port: int | None = port
        self._password = secrets.token_urlsafe(18)
        self._initialised = False
        self.base = Path(tempfile.mkdtemp(prefix="lmtpfast-pg-", dir="/var/tmp"))
        self.base.chmod(0o755)
        self.data_dir = self.base / "data"
        self.socket_dir = self.base / "sock"
        self.log_path = self.base / "postgres.log"
        self.socket_dir.mkdir(mode=0o755)
        self.data_dir.mkdir(mode=0o700)
        if os.geteuid() == 0:
            for d in (self.socket_dir, self.data_dir):
                os.chown(d, user.pw_uid, user.pw_gid)

    # -- set-up ----------------------------------------------------------------

    def _demote(self) -> dict[str, object]:
        """subprocess keyword arguments that run a command as :attr:`run_as`."""
        if os.geteuid() != 0:
            return {}
        return {"user": self.run_as.pw_uid, "group": self.run_as.pw_gid, "extra_groups": []}

    def _initdb(self) -> None:
        pwfile = self.base / "pwfile"
        pwfile.write_text(self._password + "\n")
        pwfile.chmod(0o600)
        if os.geteuid() == 0:
            os.chown(pwfile, self.run_as.pw_uid, self.run_as.pw_gid)
        try:
            proc = subprocess.run(
                [str(PG_BIN / "initdb"), "-D", str(self.data_dir), "-U", self.superuser,
                 f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                 "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=False,
                cwd=self.base, **self._demote(),  # type: ignore[call-overload]
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).decode("utf-8", "replace")
            raise PeerStartError(f"initdb failed ({proc.returncode}):\n{out[-3000:]}")
        conf = [
            "# Written by lmtpfast._testing.postgres.TempPostgres; private test instance.",
            f"unix_socket_directories = {_quote_literal(str(self.socket_dir))}",
            "unix_socket_permissions = 0777",
            "logging_collector = off",
            "log_line_prefix = '%m [%p] %q%u@%d '",
            "log_connections = off",
            "max_connections = 100",
            "shared_buffers = 32MB",
        ]
        if not self.fsync:
            conf += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        conf += [f"{k} = {v}" for k, v in self.settings.items()]
        with open(self.data_dir / "postgresql.conf", "a") as f:
            f.write("\n".join(conf) + "\n")
        if self.host not in ("127.0.0.1", "::1", "localhost"):
            with open(self.data_dir / "pg_hba.conf", "a") as f:
                f.write("host all all samenet scram-sha-256\n")
        self._initialised = True

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> Self:
        """Start the cluster (``initdb`` the first time) and wait until it accepts connections.

        Raises :class:`PeerStartError` with the log tail when it does not come
        up within ``start_timeout`` seconds.
        """
        if self.running:
            return self
        if not self._initialised:
            self._initdb()
        self._start_on_port(self._start_once, self._fixed_port)
        return self

    def _start_once(self) -> None:
        listen = self.host if self.tcp else ""
        cmd = [str(PG_BIN / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
               "-c", f"listen_addresses={listen}"]  # fmt: skip
        user = self.run_as.pw_name if os.geteuid() == 0 else None
        cmd, _ = guarded(cmd, user=user)
        if self.netns is not None:
            # ip netns exec execs (no fork): the pid we start stays the postmaster.
            cmd = ["/usr/sbin/ip", "netns", "exec", self.netns, *cmd]
        self._spawn(cmd, self._ready, what="PostgreSQL")

    def _ready(self) -> bool:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        if len(lines) < 8 or lines[7].strip() != "ready":
            return False
        pid = None if self.netns is None or self._proc is None else self._proc.pid
        if not listening_unix(self.socket_path, pid=pid):
            return False
        return not self.tcp or listening_tcp(self.host, self.port, pid=pid)

    def stop(self, mode: StopMode = "fast", *, timeout: float = 30.0) -> None:
        """Shut the cluster down (*mode* as ``pg_ctl stop -m``); idempotent.

        ``"fast"`` (default) ends open sessions and checkpoints; ``"immediate"``
        is a crash as far as the data is concerned (recovery at the next start);
        ``"smart"`` waits for clients to disconnect. Whatever still runs after
        *timeout* seconds is killed.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, _SIGNALS[mode])
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        stop_process(proc)  # SIGKILL leftovers of its session, if any

    def close(self) -> None:
        """Stop the cluster and delete its folder (data, sockets, log)."""
        try:
            self.stop("immediate", timeout=10.0)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- addresses -----------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        """The unix socket itself: ``BASE/sock/.s.PGSQL.PORT``."""
        return self.socket_dir / f".s.PGSQL.{self.port}"

    @property
    def password(self) -> str:
        """The superuser's password (needed over TCP only)."""
        return self._password

    def dsn_for(
        self, user: str, password: str | None = None, database: str = "postgres", *,
        unix: bool = False,
    ) -> str:  # fmt: skip
        """A ``postgresql://`` DSN for asyncpg and psql (over TCP unless *unix*)."""
        q = urllib.parse.quote
        db = q(database, safe="")
        if unix:
            host = q(str(self.socket_dir), safe="")
            return f"postgresql://{q(user, safe='')}@/{db}?host={host}&port={self.port}"
        if not self.tcp:
            raise RuntimeError("this instance has no TCP listener (tcp=False)")
        auth = q(user, safe="") + (f":{q(password, safe='')}" if password is not None else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://{auth}@{host}:{self.port}/{db}"

    @property
    def dsn(self) -> str:
        """Superuser DSN over TCP (``postgresql://postgres:PASSWORD@HOST:PORT/postgres``)."""
        return self.dsn_for(self.superuser, self._password)

    @property
    def unix_dsn(self) -> str:
        """Superuser DSN over the unix socket (trust: no password)."""
        return self.dsn_for(self.superuser, unix=True)

    # -- SQL -------------------------------------------------------------------------

    def psql(
        self, sql: str, *, database: str = "postgres", user: str | None = None,
        timeout: float = 60.0, check: bool = True,
    ) -> str:  # fmt: skip
        """Run *sql* with ``psql -X -At -v ON_ERROR_STOP=1`` over the unix socket.

        Returns psql's output (unaligned, tuples only: one row per line, ``|``
        between columns). Raises :class:`ToolError` (a ``CalledProcessError``; with
        psql's error text in ``stderr``) on failure when *check*.
        """
        cmd = [str(PG_BIN / "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-q",
               "-h", str(self.socket_dir), "-p", str(self.port),
               "-U", user or self.superuser, "-d", database, "-f", "-"]  # fmt: skip
        env = {**os.environ, "PGCONNECT_TIMEOUT": "10"}
        return run_tool(cmd, input=sql, timeout=timeout, check=check, env=env).stdout

    def create_user(self, name: str, password: str | None = None, *,
                    superuser: bool = False) -> str:
        """Create a login role (with *password* for TCP logins); returns its TCP DSN."""
        opts = " SUPERUSER" if superuser else ""
        if password is not None:
            opts += f" PASSWORD {_quote_literal(password)}"
        self.psql(f"CREATE ROLE {_quote_ident(name)} LOGIN{opts};")
        return self.dsn_for(name, password) if self.tcp else self.dsn_for(name, unix=True)

    def create_database(self, name: str, *, owner: str | None = None) -> None:
        """``CREATE DATABASE name [OWNER owner]``."""
        extra = f" OWNER {_quote_ident(owner)}" if owner else ""
        self.psql(f"CREATE DATABASE {_quote_ident(name)}{extra};")

    def drop_database(self, name: str) -> None:
        """``DROP DATABASE IF EXISTS name WITH (FORCE)`` (ends its sessions first)."""
        self.psql(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE);")
