"""A private Postfix MTA for tests: :class:`TempPostfix`, and :func:`world_venv`.

Use the ``postfix_mta`` factory fixture (see :mod:`lmtpfast._testing.fixtures`)
or the class directly. Configure first, then start (changes made while it runs
take effect through :meth:`TempPostfix.reload`)::

    mta = postfix_mta()                                  # not started yet
    mta.add_lmtp_transport("tolmtp")                     # lmtp(8) as "tolmtp"
    mta.route("example.com", f"tolmtp:{sink.destination}")   # texthash transport_maps
    mta.add_pipe_transport("rec", [str(script), "${sender}", "${recipient}"],
                           user="nobody", recipient_limit=1)
    mta.route("pipe.example", "rec:")
    mta.start()
    qid = mta.sendmail(b"Subject: hi\\r\\n\\r\\nbody\\r\\n", "s@example.org", ["a@example.com"])
    mta.wait_until_empty()          # TimeoutError with queue listing and log tail
    mta.log_text()                  # BASE/log/maillog (postlogd)
    mta.queue()                     # postqueue -j, one dict per queued message

Each instance has its own config folder (``main.cf``, ``master.cf``), queue,
data folder and log under a fresh folder in ``/var/tmp``; the system Postfix
(``/etc/postfix``, ``/var/spool/postfix``) is never started or touched, but its
``meta_directory`` (``/etc/postfix/dynamicmaps.cf``) supplies the map types.

Facts checked against Postfix 3.7.11 (Debian 12):

* ``postfix -c DIR start-fg`` runs ``master -s`` as a *child* of
  postfix-script, and master always calls ``setsid()`` (only ``-i``, allowed
  for PID 1 only, avoids it): a parent-death signal on the command we start
  would not reach master. :class:`TempPostfix` therefore creates the queue
  folders itself (owners and modes as ``postfix check`` makes them; that
  command takes about 2 s here, mostly checking the installation) and runs
  ``master -c DIR -s`` under ``setpriv --pdeathsig TERM``: master's pid is
  the pid we started and its session id, so teardown finds every daemon by
  session. SIGTERM to master stops all its children.
* Readiness: master binds every master.cf listener, then logs ``daemon
  started``. The unix ones are bound by *relative* paths (``public/qmgr``,
  as ``/proc/net/unix`` shows them), so only the log line and smtpd's TCP
  port are checked.
* Postfix does not trust a config or map file modified in the current
  second: it re-reads ``main.cf`` every 0.3 s until its mtime is in the past,
  which made every start take 1-1.5 s. Files written here are dated 2 s back.
* No syslog on this machine: ``maillog_file`` with ``maillog_file_prefixes``
  allowing its folder and the ``postlog unix-dgram`` service in master.cf;
  master's own early errors go to stderr (``BASE/master.log``).
* Every service has ``chroot n``; smtpd listens on ``127.0.0.1:PORT`` only
  (``inet_interfaces = loopback-only``, ``inet_protocols = ipv4``);
  ``mydestination`` is empty and mail that matches no ``transport_maps`` entry
  goes to ``default_transport = retry:...``: it is *deferred*, never bounced
  and never sent to the internet.
* As root, ``-c DIR`` needs no ``alternate_config_directories``;
  ``sendmail -C DIR`` (root) posts through postdrop into ``maildrop`` and
  pickup gets it at once (the ``public/pickup`` fifo). ``sendmail`` prints
  nothing: the queue id is found in the maillog (``pickup`` line with the
  message's unique ``Message-ID``).
* pipe(8) runs its command as ``user=`` (not root). The program and
  everything it loads must be readable and executable by that user: a venv
  under ``/root`` (0700) is not (Postfix defers with "Permission denied"), see
  :func:`world_venv`. One exit status covers all recipients of one run:
  ``recipient_limit=1`` sets ``TRANSPORT_destination_recipient_limit = 1``.
* lmtp(8) runs as user ``postfix``: a unix socket it connects to must be
  writable by it (mode 0666, as :class:`~lmtpfast._testing.postfix.SmtpSink`
  and Dovecot's ``unix_listener mode = 0666`` make them). Nexthop forms:
  ``unix:/path``, ``inet:127.0.0.1:PORT``, ``[127.0.0.1]:PORT``.
* ``postfix -c DIR reload`` is ``postfix check`` plus SIGHUP to master, and
  asynchronous: master logs ``reload -- version ..., configuration DIR``
  once it has re-read its files. :meth:`TempPostfix.reload` sends SIGHUP
  itself and waits for that line.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from ._procs import (
    PeerStartError,
    TempPeer,
    ToolError,
    guarded,
    listening_tcp,
    run_tool,
    stop_process,
    tail,
)

if TYPE_CHECKING:
    from .mariadb import TempMariaDB
    from .postgres import TempPostgres
    from .slapd import TempSlapd

__all__ = [
    "PeerStartError",
    "TempPostfix",
    "ToolError",
    "backdate",
    "find_postfix_mta",
    "ldap_map_settings",
    "mysql_map_settings",
    "pgsql_map_settings",
    "postmap_query",
    "remove_world_venvs",
    "world_venv",
    "write_map_cf",
]

SBIN = Path("/usr/sbin")
DAEMON_DIR = Path("/usr/lib/postfix/sbin")
_QUEUES_BUSY = ("maildrop", "incoming", "active")
_QUEUES_ALL = (*_QUEUES_BUSY, "deferred", "hold")
# (folder, mode, group: None = root, else postdrop) as postfix-files has them.
_QUEUE_LAYOUT: tuple[tuple[str, int, str | None], ...] = (
    *((q, 0o700, None) for q in ("active", "bounce", "corrupt", "defer", "deferred", "flush",
                                 "hold", "incoming", "private", "saved", "trace")),
    ("maildrop", 0o730, "postdrop"),
    ("public", 0o710, "postdrop"),
    ("pid", 0o755, None),
)

# master.cf lines every instance has (chroot n everywhere; no local(8)).
_BASE_SERVICES = """\
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
proxywrite unix  -       -       n       -       1       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
lmtp       unix  -       -       n       -       -       lmtp
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
"""


def find_postfix_mta() -> str | None:
    """Why a :class:`TempPostfix` cannot run here, or ``None`` when it can."""
    for path in (SBIN / "postfix", SBIN / "sendmail", SBIN / "postqueue", SBIN / "postsuper",
                 DAEMON_DIR / "master", DAEMON_DIR / "postlogd", DAEMON_DIR / "pipe"):  # fmt: skip
        if not os.access(path, os.X_OK):
            return f"{path} missing (package postfix)"
    if os.geteuid() != 0:
        return "TempPostfix needs root (master, postdrop, pipe user=)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "no 'postfix' user (the postfix package creates it)"
    return None


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
        raise ValueError(f"bad master.cf service name {name!r}")
    return name


def _check_value(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError(f"newline in a Postfix setting: {value!r}")
    return value


class TempPostfix(TempPeer):
    """A private Postfix MTA: smtpd on 127.0.0.1:PORT, sendmail, queue, maillog.

    *main* adds or overrides ``main.cf`` settings (``{"lmtp_pipelining": "no"}``).
    Transports and routes are added with :meth:`add_lmtp_transport`,
    :meth:`add_pipe_transport`, :meth:`add_service` and :meth:`route` before
    :meth:`start` (or followed by :meth:`reload`).
    """

    def __init__(
        self,
        *,
        main: Mapping[str, str] | None = None,
        port: int | None = None,
        hostname: str = "lmtpfast-mta.test",
        start_timeout: float = 30.0,
    ) -> None:
        why = find_postfix_mta()
        if why is not None:
            raise PeerStartError(f"cannot run Postfix: {why}; run scripts/install-test-deps.sh")
        self.hostname = hostname
        self.start_timeout = start_timeout
        self._fixed_port = port
        self._port = port
        self._main: dict[str, str] = {}
        self._services: dict[str, str] = {}
        self._routes: dict[str, str] = {}
        self._starts_logged = 0
        self.base = Path(tempfile.mkdtemp(prefix="lmtpfast-postfix-", dir="/var/tmp"))
        self.base.chmod(0o755)
        self.tag = self.base.name.rsplit("-", 1)[-1]
        self.config_dir = self.base / "etc"
        self.queue_dir = self.base / "queue"
        self.data_dir = self.base / "data"
        self.log_dir = self.base / "log"
        self.maillog_path = self.log_dir / "maillog"
        self.log_path = self.base / "master.log"
        self.transport_path = self.config_dir / "transport"
        for d in (self.config_dir, self.queue_dir, self.data_dir, self.log_dir):
            d.mkdir(mode=0o755)
        pf = pwd.getpwnam("postfix")
        os.chown(self.data_dir, pf.pw_uid, pf.pw_gid)
        # postlogd (user postfix) writes the maillog.
        os.chown(self.log_dir, pf.pw_uid, pf.pw_gid)
        self._main.update(self._default_main())
        for key, value in (main or {}).items():
            self.set_main(key, value)

    # -- configuration ------------------------------------------------------------

    def _default_main(self) -> dict[str, str]:
        return {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": str(self.log_dir),
            "syslog_name": f"postfix-{self.tag}",
            "myhostname": self.hostname,
            "mydomain": "test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": "",
            "relayhost": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "append_dot_mydomain": "no",
            "biff": "no",
            "transport_maps": f"texthash:{self.transport_path}",
            "default_transport": "retry:4.3.5 no transport_maps entry in this test MTA",
            # Quick retries: a deferred message is tried again within seconds.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "delay_warning_time": "0",
        }

    def set_main(self, key: str, value: str) -> None:
        """Set one ``main.cf`` parameter (written at start/reload)."""
        if not re.fullmatch(r"[A-Za-z0-9_]+", key):
            raise ValueError(f"bad main.cf parameter name {key!r}")
        self._main[key] = _check_value(value)
        self._write_config()

    def add_service(self, line: str, *options: str) -> None:
        """Add a raw ``master.cf`` entry; *options* become ``-o key=value`` lines."""
        name = _check_name(line.split()[0])
        self._services[name] = _check_value(line) + "".join(
            f"\n  -o {_check_value(o)}" for o in options
        )
        self._write_config()

    def add_lmtp_transport(
        self, name: str, *, options: Mapping[str, str] | None = None,
        recipient_limit: int | None = None, concurrency: int | None = None,
    ) -> None:  # fmt: skip
        """An lmtp(8) service called *name* (route to it with ``route(x, "NAME:unix:/path")``).

        *options* are per-service ``-o`` overrides (e.g. ``{"lmtp_pipelining": "no"}``).
        """
        self.add_service(
            f"{_check_name(name)} unix - - n - {concurrency or '-'} lmtp",
            *(f"{k}={v}" for k, v in (options or {}).items()),
        )
        if recipient_limit is not None:
            self.set_main(f"{name}_destination_recipient_limit", str(recipient_limit))

    def add_pipe_transport(
        self, name: str, argv: Sequence[str], *, user: str = "nobody", flags: str = "Rq",
        recipient_limit: int | None = 1, size_limit: int | None = None,
        concurrency: int | None = None,
    ) -> None:  # fmt: skip
        """A pipe(8) service called *name* running *argv* as *user*.

        *argv* may use pipe(8)'s macros (``${sender}``, ``${recipient}``,
        ``${nexthop}`` ...); the message arrives on stdin. *flags* are pipe(8)'s
        (``R`` prepends Return-Path, ``q`` quotes addresses; ``D`` Delivered-To,
        ``O`` X-Original-To). With *recipient_limit* (default 1: one exit status
        per recipient) ``NAME_destination_recipient_limit`` is set.
        """
        if not argv or not os.path.isabs(argv[0]):
            raise ValueError("argv[0] must be an absolute path")
        parts = " ".join(_check_value(a) for a in argv)
        line = f"{_check_name(name)} unix - n n - {concurrency or '-'} pipe"
        opts = f"flags={flags} user={_check_value(user)}"
        if size_limit is not None:
            opts += f" size={size_limit}"
        self._services[name] = f"{line}\n  {opts} argv={parts}"
        self._write_config()
        if recipient_limit is not None:
            self.set_main(f"{name}_destination_recipient_limit", str(recipient_limit))

    def route(self, pattern: str, transport: str) -> None:
        """Add ``PATTERN TRANSPORT:NEXTHOP`` to the texthash ``transport_maps``.

        *pattern*: ``user@domain``, ``domain``, ``.domain`` or ``*``, as
        transport(5) reads them.
        """
        if not pattern or any(c.isspace() for c in pattern):
            raise ValueError(f"bad transport_maps key {pattern!r}")
        self._routes[pattern] = _check_value(transport)
        self._write_config()

    def _write_config(self) -> None:
        if not hasattr(self, "_routes"):
            return  # still in __init__
        main = "".join(f"{k} = {v}\n" for k, v in self._main.items())
        smtpd = f"127.0.0.1:{self._port} inet n - n - - smtpd\n" if self._port else ""
        services = "".join(v + "\n" for v in self._services.values())
        files = {
            self.config_dir / "main.cf":
                "# Written by lmtpfast._testing.postfix_mta.TempPostfix; private test instance.\n"
                + main,
            self.config_dir / "master.cf": smtpd + _BASE_SERVICES + services,
            self.transport_path: "".join(f"{k} {v}\n" for k, v in self._routes.items()),
        }  # fmt: skip
        # Postfix re-reads a file whose mtime is not yet in the past (in 0.3 s
        # steps, seconds in all): date every file we write 2 s back.
        for path, text in files.items():
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
                backdate(path)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Self:
        """``postfix check``, then master; waits for smtpd, pickup and qmgr."""
        if self.running:
            return self
        self._start_on_port(self._start_once, self._fixed_port)
        return self

    def _make_queue(self) -> None:
        # What ``postfix check`` (post-install create-missing) would create,
        # without its 2 s of checking the whole installation.
        pf = pwd.getpwnam("postfix")
        postdrop = grp.getgrnam("postdrop").gr_gid
        for name, mode, gid in _QUEUE_LAYOUT:
            d = self.queue_dir / name
            d.mkdir(mode=mode, exist_ok=True)
            os.chown(d, pf.pw_uid if name != "pid" else 0, 0 if gid is None else postdrop)
            d.chmod(mode)

    def _start_once(self) -> None:
        self._write_config()
        self._make_queue()
        self._starts_logged = self.log_text().count("daemon started")
        cmd, _ = guarded([str(DAEMON_DIR / "master"), "-c", str(self.config_dir), "-s"])
        self._spawn(cmd, self._ready, what="Postfix master")

    def _ready(self) -> bool:
        # master creates every master.cf listener before it logs "daemon
        # started"; the unix ones are bound by relative paths (public/qmgr),
        # which /proc/net/unix cannot tell apart between instances.
        return (
            self.log_text().count("daemon started") > self._starts_logged
            and listening_tcp("127.0.0.1", self.port)
        )

    def postfix(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``postfix -c DIR ARGS`` (``check``, ``flush``, ``reload`` ...)."""
        return run_tool([str(SBIN / "postfix"), "-c", str(self.config_dir), *args],
                        timeout=timeout).stdout  # fmt: skip

    def reload(self, *, timeout: float = 30.0) -> None:
        """Rewrite the config and reload; waits for master's ``reload`` line.

        SIGHUP to master is what ``postfix reload`` does after ``postfix
        check`` (skipped: 2 s).
        """
        self._write_config()
        if self._proc is None or not self.running:
            return
        before = self.log_text().count("reload -- version")
        os.kill(self._proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.log_text().count("reload -- version") <= before:
            if time.monotonic() >= deadline or not self.running:
                raise TimeoutError(f"Postfix did not reload:\n{self._diagnostics()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        """master's pid: the session id of every daemon of this instance (0 when not started)."""
        return 0 if self._proc is None else self._proc.pid

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop master and every daemon (SIGTERM to the session, SIGKILL after *timeout*)."""
        if self._proc is not None:
            stop_process(self._proc, grace=timeout)

    def close(self) -> None:
        """Stop and delete the instance's folder (config, queue, log)."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def log_text(self) -> str:
        """The maillog written by postlogd (every daemon's lines)."""
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _diagnostics(self) -> str:
        queue = "(not running)"
        if self.running:
            queue = run_tool([str(SBIN / "postqueue"), "-c", str(self.config_dir), "-p"],
                             check=False, timeout=30).stdout
        return (f"--- postqueue -p ---\n{queue}\n--- {self.maillog_path} ---\n"
                f"{tail(self.maillog_path, 40)}\n"
                f"--- {self.log_path} ---\n{tail(self.log_path, 10)}")

    # -- mail in ------------------------------------------------------------------------

    def sendmail(
        self, message: bytes, sender: str, recipients: Iterable[str], *,
        args: Sequence[str] = (), timeout: float = 30.0,
    ) -> str:  # fmt: skip
        """Submit *message* with ``sendmail -C DIR -i -f SENDER -- RCPTS``; returns the queue id.

        A ``Message-ID`` is added when *message* has none, to find the queue
        id in the log (sendmail prints nothing). *args* go before ``--``
        (e.g. ``("-N", "success,delay,failure", "-V", "envid")``).
        """
        rcpts = list(recipients)
        if not rcpts:
            raise ValueError("no recipients")
        mid = re.search(rb"(?im)^message-id:[ \t]*(<[^>\r\n]*>)", message.split(b"\n\n", 1)[0])
        if mid is None:
            msgid = f"<{secrets.token_hex(8)}@lmtpfast.test>".encode()
            message = b"Message-ID: " + msgid + b"\r\n" + message
        else:
            msgid = mid.group(1)
        cmd = [str(SBIN / "sendmail"), "-C", str(self.config_dir), "-i", "-f", sender,
               *args, "--", *rcpts]  # fmt: skip
        proc = subprocess.run(cmd, input=message, capture_output=True, timeout=timeout,
                              check=False)  # fmt: skip
        if proc.returncode != 0:
            raise ToolError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return self.queue_id_of(msgid.decode("utf-8", "replace"), timeout=timeout)

    def queue_id_of(self, message_id: str, *, timeout: float = 30.0) -> str:
        """The queue id that cleanup logged for *message_id* (``<...>``), waiting for it."""
        pattern = re.compile(r"\]: ([0-9A-F]{6,}|[0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-z]{10,}): "
                             r"message-id=" + re.escape(message_id))  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(self.log_text())
            if m is not None:
                return m.group(1)
            if time.monotonic() >= deadline or not self.running:
                raise TimeoutError(f"no queue id logged for {message_id}:\n{self._diagnostics()}")
            time.sleep(0.01)

    # -- queue ----------------------------------------------------------------------------

    def queue(self) -> list[dict[str, Any]]:
        """``postqueue -j``: one dict per queued message (queue_name, queue_id, recipients ...)."""
        out = run_tool([str(SBIN / "postqueue"), "-c", str(self.config_dir), "-j"],
                       timeout=30).stdout  # fmt: skip
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def queue_files(self, queues: Iterable[str] = _QUEUES_ALL) -> dict[str, list[str]]:
        """Queue file names per queue folder (read directly: cheaper than postqueue)."""
        found: dict[str, list[str]] = {}
        for q in queues:
            names: list[str] = []
            for _, _, files in os.walk(self.queue_dir / q):
                names.extend(files)
            found[q] = sorted(names)
        return found

    def wait_until_empty(self, *, timeout: float = 30.0, include_deferred: bool = True) -> None:
        """Wait until no message is queued (all delivered or bounced).

        With ``include_deferred=False`` it returns once nothing is in flight
        (``maildrop``/``incoming``/``active`` empty: every message delivered,
        bounced or deferred). Raises TimeoutError with ``postqueue -p`` and
        the maillog tail.
        """
        queues = _QUEUES_ALL if include_deferred else _QUEUES_BUSY
        deadline = time.monotonic() + timeout
        while any(self.queue_files(queues).values()):
            if time.monotonic() >= deadline or not self.running:
                state = "timed out" if self.running else "master died"
                raise TimeoutError(f"Postfix queue not empty ({state}):\n{self._diagnostics()}")
            time.sleep(0.02)

    def flush(self) -> None:
        """``postqueue -f``: try every deferred message now."""
        run_tool([str(SBIN / "postqueue"), "-c", str(self.config_dir), "-f"], timeout=30)

    def postsuper(self, *args: str) -> str:
        """``postsuper -c DIR ARGS`` (``-d ALL``, ``-h ID``, ``-H ID``, ``-r ALL`` ...)."""
        return run_tool([str(SBIN / "postsuper"), "-c", str(self.config_dir), *args],
                        timeout=60).stdout  # fmt: skip

    def postcat(self, queue_id: str, *args: str) -> str:
        """``postcat -c DIR ARGS -q ID`` (e.g. ``"-bh"`` for header and body)."""
        return run_tool([str(SBIN / "postcat"), "-c", str(self.config_dir), *args, "-q",
                         queue_id], timeout=30).stdout  # fmt: skip

    def postmap_query(self, key: str, map_name: str) -> str | None:
        """:func:`postmap_query` with this instance's ``main.cf``."""
        return postmap_query(key, map_name, config_dir=self.config_dir)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<TempPostfix port={self._port} {state} {self.base}>"


# -- postmap and map files for the database beds ------------------------------------


def postmap_query(
    key: str, map_name: str, *, config_dir: str | os.PathLike[str] | None = None
) -> str | None:
    """``postmap [-c DIR] -q KEY TYPE:NAME``: the value, or None when not found.

    Not found is postmap's exit status 1 with nothing on stderr; a map error
    (database down, bad .cf) raises :class:`ToolError` with postmap's message.
    """
    cmd = [str(SBIN / "postmap")]
    if config_dir is not None:
        cmd += ["-c", os.fspath(config_dir)]
    proc = run_tool([*cmd, "-q", key, map_name], timeout=60, check=False)
    if proc.returncode == 1 and not proc.stderr.strip():
        return None
    if proc.returncode != 0:
        raise ToolError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc.stdout.rstrip("\n")


def write_map_cf(path: str | os.PathLike[str], settings: Mapping[str, str]) -> str:
    """Write a Postfix ``.cf`` map file (0600); returns its path for ``TYPE:PATH``."""
    text = "".join(f"{k} = {_check_value(v)}\n" for k, v in settings.items())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    backdate(path)
    return os.fspath(path)


def backdate(path: str | os.PathLike[str], seconds: float = 2.0) -> None:
    """Set *path*'s mtime *seconds* back: Postfix waits ~1 s on a file modified this second.

    Postfix (``postmap``, the daemons, ``main.cf`` readers) re-reads a file
    whose mtime is not yet in the past, every 0.3 s, until it is: a map file
    written just before ``postmap -q`` costs a second or two otherwise.
    """
    past = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(past, past))


def pgsql_map_settings(
    server: TempPostgres, *, user: str, password: str, dbname: str, query: str
) -> dict[str, str]:
    """pgsql_table(5) settings reaching *server* over TCP (``hosts = inet:127.0.0.1:PORT``)."""
    return {"hosts": f"inet:127.0.0.1:{server.port}", "user": user, "password": password,
            "dbname": dbname, "query": query}  # fmt: skip


def mysql_map_settings(
    server: TempMariaDB, *, user: str, password: str, dbname: str, query: str,
    unix: bool = False,
) -> dict[str, str]:  # fmt: skip
    """mysql_table(5) settings reaching *server* over TCP or (*unix*) its socket."""
    host = f"unix:{server.socket_path}" if unix else f"inet:127.0.0.1:{server.port}"
    return {"hosts": host, "user": user, "password": password, "dbname": dbname,
            "query": query}  # fmt: skip


def ldap_map_settings(
    server: TempSlapd, *, query_filter: str, result_attribute: str,
    search_base: str | None = None, bind: bool = False,
) -> dict[str, str]:  # fmt: skip
    """ldap_table(5) settings for *server* over TCP (anonymous unless *bind*)."""
    settings = {
        "server_host": f"{server.url}/",
        "version": "3",
        "search_base": search_base or server.suffix,
        "query_filter": query_filter,
        "result_attribute": result_attribute,
        "bind": "yes" if bind else "no",
    }
    if bind:
        settings |= {"bind_dn": server.root_dn, "bind_pw": server.root_password}
    return settings


# -- a venv that pipe(8)'s user can run ------------------------------------------------

_VENVS: dict[Path, Path] = {}


def world_venv(root: str | os.PathLike[str] | None = None, *, user: str = "nobody") -> Path:
    """A venv of ``/usr/bin/python3`` that *user* can run, with this checkout in it.

    Cached per process (one per *root*): the first call takes a few seconds.
    Returns the venv folder; its ``bin/lmtpfast`` runs the CLI. How: ``python3
    -m venv --without-pip`` in a 0755 folder under ``/var/tmp``; the project's
    runtime dependencies from ``pyproject.toml`` are installed into it with
    this interpreter's pip (``pip --python VENV/bin/python``); the ``lmtpfast``
    package folder of *root* (default: the one this module belongs to) is
    copied in (compiled modules included: same CPython minor version), and the
    ``[project.scripts]`` entry points get small wrappers. It is checked by
    importing lmtpfast as *user*. Removed by :func:`remove_world_venvs`.
    """
    src = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    src = src.resolve()
    if src in _VENVS and _VENVS[src].exists():
        return _VENVS[src]
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        raise PeerStartError("/usr/bin/python3 missing (package python3)")
    here = sys.version_info[:2]
    proc = run_tool([python, "-c", "import sys; print(sys.version_info[:2])"], timeout=30)
    if proc.stdout.strip() != str(tuple(here)):
        raise PeerStartError(f"/usr/bin/python3 is {proc.stdout.strip()}, this is {here}: "
                             "compiled modules would not load")  # fmt: skip
    venv = Path(tempfile.mkdtemp(prefix="lmtpfast-venv-", dir="/var/tmp"))
    try:
        venv.chmod(0o755)
        run_tool([python, "-m", "venv", "--without-pip", str(venv)], timeout=120)
        meta = tomllib.loads((src / "pyproject.toml").read_text())["project"]
        deps: list[str] = list(meta.get("dependencies", []))
        if deps:
            run_tool([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                      "install", "--quiet", "--disable-pip-version-check", *deps],
                     timeout=600)  # fmt: skip
        site = run_tool([str(venv / "bin" / "python"), "-c",
                         "import sysconfig; print(sysconfig.get_path('purelib'))"],
                        timeout=30).stdout.strip()  # fmt: skip
        shutil.copytree(src / "lmtpfast", Path(site) / "lmtpfast",
                        ignore=shutil.ignore_patterns("__pycache__", "*.c", "*.o"))  # fmt: skip
        for name, target in meta.get("scripts", {}).items():
            module, _, func = target.partition(":")
            script = venv / "bin" / name
            script.write_text(f"#!{venv}/bin/python\nimport sys\nfrom {module} import {func}\n"
                              f"sys.exit({func}())\n")  # fmt: skip
            script.chmod(0o755)
        # Readable (and folders searchable) by everyone, whatever the umask.
        for dirpath, dirnames, filenames in os.walk(venv):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                if not os.path.islink(p):
                    mode = os.stat(p).st_mode
                    os.chmod(p, mode | (0o555 if name in dirnames else 0o444))
        check, _ = guarded([str(venv / "bin" / "python"), "-c", "import lmtpfast.cli"],
                           user=user if os.geteuid() == 0 else None)  # fmt: skip
        run_tool(check, timeout=60)
    except BaseException:
        shutil.rmtree(venv, ignore_errors=True)
        raise
    _VENVS[src] = venv
    return venv


def remove_world_venvs() -> None:
    """Delete every venv :func:`world_venv` made in this process."""
    while _VENVS:
        _, venv = _VENVS.popitem()
        shutil.rmtree(venv, ignore_errors=True)
