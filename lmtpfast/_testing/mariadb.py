"""A private MariaDB server for tests: :class:`TempMariaDB`.

Use the session fixture ``mariadb`` (see :mod:`lmtpfast._testing.fixtures`)
or the class directly::

    with TempMariaDB() as db:
        db.create_database("maps")
        db.create_user("postfix", "s3cret", grant_on="maps")
        db.sql("CREATE TABLE maps.t (k VARCHAR(255) PRIMARY KEY, v TEXT)")
        db.sql("SELECT v FROM maps.t WHERE k = 'a'")   # -> tab-separated rows
        db.socket_path, db.port                        # unix socket, 127.0.0.1:PORT
        db.stop(); db.start()                          # same port, same data

Each instance runs ``mariadb-install-db`` into a fresh folder under
``/var/tmp`` and then ``mariadbd --no-defaults`` in the foreground as a child of
the test process, as the ``mysql`` user from the start (under ``setpriv
--pdeathsig``, so it ends with the test process). ``--no-defaults`` keeps
``/etc/mysql`` out; the Debian mariadb service is never involved.

Facts checked against MariaDB 10.11 (Debian 12):

* ``mariadb-install-db --no-defaults --datadir=D
  --auth-root-authentication-method=socket --skip-test-db`` makes
  ``root@localhost`` authenticate by unix socket credentials: the OS user root
  (the tests) connects over the socket without a password; over TCP root has
  no usable password. It takes about 1.2 s here.
* Without ``--log-error`` mariadbd logs to stderr (here :attr:`log_path`).
* Readiness: the unix socket and 127.0.0.1:PORT listening in ``/proc``
  (mariadbd binds them after InnoDB has started). SIGTERM is a clean shutdown.
* ``innodb_flush_log_at_trx_commit = 0`` and no binary log (defaults here):
  faster, and only a machine crash would lose a committed write.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Self

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

__all__ = ["MARIADBD", "PeerStartError", "TempMariaDB", "ToolError", "find_mariadb"]

MARIADBD = "/usr/sbin/mariadbd"
INSTALL_DB = "/usr/bin/mariadb-install-db"
CLIENT = "/usr/bin/mariadb"


def find_mariadb() -> str | None:
    """Why a :class:`TempMariaDB` cannot run here, or ``None`` when it can."""
    for path, pkg in ((MARIADBD, "mariadb-server"), (INSTALL_DB, "mariadb-server"),
                      (CLIENT, "mariadb-client")):  # fmt: skip
        if not os.access(path, os.X_OK):
            return f"{path} missing (package {pkg})"
    if os.geteuid() != 0:
        return "TempMariaDB needs root (server as the mysql user, root over the socket)"
    try:
        pwd.getpwnam("mysql")
    except KeyError:
        return "no 'mysql' user (the mariadb-server package creates it)"
    return None


def _quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _quote_literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class TempMariaDB(TempPeer):
    """A private mariadbd on a unix socket and 127.0.0.1:PORT; root over the socket.

    *settings* are extra server options (``{"max_connections": "50"}`` becomes
    ``--max_connections=50``). *port* fixes the TCP port.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        why = find_mariadb()
        if why is not None:
            raise PeerStartError(f"cannot run MariaDB: {why}; run scripts/install-test-deps.sh")
        self.settings = dict(settings or {})
        self.start_timeout = start_timeout
        self._fixed_port = port
        self._port: int | None = port
        self._initialised = False
        self.base = Path(tempfile.mkdtemp(prefix="lmtpfast-mariadb-", dir="/var/tmp"))
        self.base.chmod(0o755)
        self.data_dir = self.base / "data"
        self.run_dir = self.base / "run"
        self.log_path = self.base / "mariadbd.log"
        pw = pwd.getpwnam("mysql")
        for d in (self.data_dir, self.run_dir):
            d.mkdir(mode=0o755)
            os.chown(d, pw.pw_uid, pw.pw_gid)

    def _install_db(self) -> None:
        cmd, _ = guarded(
            [INSTALL_DB, "--no-defaults", f"--datadir={self.data_dir}",
             "--auth-root-authentication-method=socket", "--skip-test-db",
             "--skip-name-resolve"],
            user="mysql",
        )  # fmt: skip
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=120, check=False, cwd=self.base)  # fmt: skip
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).decode("utf-8", "replace")
            raise PeerStartError(f"mariadb-install-db failed ({proc.returncode}):\n{out[-3000:]}")
        self._initialised = True

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> Self:
        """Start mariadbd (``mariadb-install-db`` the first time) and wait for its sockets."""
        if self.running:
            return self
        if not self._initialised:
            self._install_db()
        self._start_on_port(self._start_once, self._fixed_port)
        return self

    def command(self) -> list[str]:
        """The mariadbd command line (without the setpriv prefix)."""
        cmd = [
            MARIADBD, "--no-defaults", f"--datadir={self.data_dir}",
            f"--socket={self.socket_path}", f"--port={self.port}", "--bind-address=127.0.0.1",
            f"--pid-file={self.run_dir / 'mariadbd.pid'}", "--skip-name-resolve",
            "--skip-log-bin", "--innodb-buffer-pool-size=32M",
            "--innodb-flush-log-at-trx-commit=0", "--character-set-server=utf8mb4",
        ]  # fmt: skip
        cmd += [f"--{k}={v}" for k, v in self.settings.items()]
        return cmd

    def _start_once(self) -> None:
        cmd, _ = guarded(self.command(), user="mysql")
        self._spawn(cmd, self._ready, what="MariaDB")

    def _ready(self) -> bool:
        return listening_unix(self.socket_path) and listening_tcp("127.0.0.1", self.port)

    def stop(self, *, timeout: float = 30.0) -> None:
        """Stop mariadbd (SIGTERM: clean shutdown; SIGKILL after *timeout*); idempotent."""
        if self._proc is not None:
            stop_process(self._proc, grace=timeout)

    def kill(self) -> None:
        """SIGKILL mariadbd (a crash: InnoDB recovers at the next start)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        self.stop()

    def close(self) -> None:
        """Stop mariadbd and delete its folder (data, socket, log)."""
        try:
            self.kill()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- addresses --------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        """The server's unix socket."""
        return self.run_dir / "mysql.sock"

    # -- SQL -----------------------------------------------------------------------

    def sql(
        self, statements: str, *, database: str | None = None, timeout: float = 60.0,
        check: bool = True,
    ) -> str:  # fmt: skip
        """Run *statements* as root over the socket (``mariadb --batch --skip-column-names``).

        Returns the client's output: one row per line, tab between columns,
        NULL as ``NULL``. Raises :class:`ToolError` (a ``CalledProcessError``; the error
        text in ``stderr``) on failure when *check*.
        """
        cmd = [CLIENT, "--no-defaults", f"--socket={self.socket_path}", "--user=root",
               "--batch", "--skip-column-names", "--connect-timeout=10"]  # fmt: skip
        if database is not None:
            cmd.append(f"--database={database}")
        return run_tool(cmd, input=statements, timeout=timeout, check=check).stdout

    def create_database(self, name: str) -> None:
        """``CREATE DATABASE name`` (utf8mb4)."""
        self.sql(f"CREATE DATABASE {_quote_ident(name)} CHARACTER SET utf8mb4;")

    def drop_database(self, name: str) -> None:
        """``DROP DATABASE IF EXISTS name``."""
        self.sql(f"DROP DATABASE IF EXISTS {_quote_ident(name)};")

    def create_user(
        self, name: str, password: str, *, grant_on: str | None = None,
        privileges: str = "ALL PRIVILEGES",
    ) -> None:  # fmt: skip
        """Create *name* with *password* for ``localhost`` (socket) and ``127.0.0.1`` (TCP).

        With *grant_on* (a database name) grant *privileges* on it.
        """
        stmts = []
        for host in ("localhost", "127.0.0.1"):
            account = f"{_quote_literal(name)}@{_quote_literal(host)}"
            stmts.append(f"CREATE USER {account} IDENTIFIED BY {_quote_literal(password)};")
            if grant_on is not None:
                stmts.append(f"GRANT {privileges} ON {_quote_ident(grant_on)}.* TO {account};")
        self.sql("\n".join(stmts))
