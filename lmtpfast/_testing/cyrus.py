"""A private Cyrus lmtpd that requires SASL over TCP, for tests: :class:`TempCyrus`.

Each instance writes its own ``imapd.conf`` and ``cyrus.conf`` into a fresh
folder under ``/var/tmp`` and runs ``/usr/lib/cyrus/bin/master -C imapd.conf
-M cyrus.conf`` as a child of the test process (as the ``cyrus`` user, under
``setpriv --pdeathsig`` so it dies with the test process); the Debian
cyrus-imapd service is never involved (see ``scripts/install-test-deps.sh``).

Facts checked against cyrus-imapd 3.6.1 (Debian 12, libsasl2 2.1.28):

* ``master`` does not hand ``-C`` to the services it starts: every ``cmd=`` in
  ``cyrus.conf`` carries its own ``-C BASE/imapd.conf``, or the service reads
  ``/etc/imapd.conf``. The folders named in ``imapd.conf`` (``db``, ``socket``,
  ``proc``, ``lock``, the partition) must exist, owned by ``cyrus:mail``.
* Cyrus logs only to syslog; a machine without ``/dev/log`` loses every
  diagnostic. :func:`capture_syslog` (opt-in, machine-wide while it runs)
  binds ``/dev/log`` and appends what arrives to a file.
* SASL users come from a sasldb (``sasl_pwcheck_method: auxprop``,
  ``sasl_auxprop_plugin: sasldb``). The SASL realm is the ``servername``
  (default: the host name), so users are created with ``saslpasswd2 -u
  SERVERNAME`` and log in with the bare user name; ``user@other`` is refused
  as a cross-realm login. Only users in ``lmtp_admins`` (or ``admins``) may
  authenticate to lmtpd.
* LHLO over TCP: ``8BITMIME``, ``ENHANCEDSTATUSCODES``, ``PIPELINING``,
  ``SIZE``, ``AUTH SCRAM-SHA-512 SCRAM-SHA-384 SCRAM-SHA-256 SCRAM-SHA-224
  SCRAM-SHA-1 DIGEST-MD5 CRAM-MD5 NTLM PLAIN LOGIN``, ``IGNOREQUOTA``, last
  line ``250 Ok SESSIONID=<...>``. MAIL before AUTH: ``430 Authentication
  required``. AUTH: ``235 Authenticated!``; a wrong password with any
  mechanism ``501 5.5.4 undefined error!``; AUTH again ``503 5.5.0 already
  authenticated``. The unix socket accepts delivery without AUTH.
* With ``tls_server_cert``/``tls_server_key`` and ``allowplaintext: no``,
  LHLO adds ``STARTTLS`` and AUTH lists no PLAIN/LOGIN before TLS; after
  STARTTLS (TLS 1.3) it lists ``SCRAM-SHA-512-PLUS SCRAM-SHA-512 ...
  SCRAM-SHA-1-PLUS SCRAM-SHA-1 DIGEST-MD5 CRAM-MD5 NTLM PLAIN LOGIN``. The
  certificate and key are copied into the instance folder (Cyrus reads them
  as the cyrus user).
* A valid user who is not in ``lmtp_admins`` also gets ``501 5.5.4 undefined
  error!`` (syslog: ``only admins may authenticate``).
* Replies: ``250 2.1.0 ok`` (MAIL), ``250 2.1.5 ok`` (RCPT), an unknown
  mailbox is a three-line ``550`` whose enhanced code ``5.1.1`` is only on
  the *last* line, ``354 go ahead``, per recipient after the dot ``250 2.1.5
  Success SESSIONID=<...>``.
* Mailboxes must exist before delivery (``autocreate_post`` would create one
  for any name): they are made over IMAP by an admin user with a random
  password, who also reads the delivered mail back (``user/NAME`` with
  ``unixhierarchysep: yes``).
* Start-up to a TCP greeting takes about 0.1-0.3 s (``ctl_cyrusdb -r`` runs
  first).
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Self

from ._procs import PeerStartError, TempPeer, free_tcp_port, guarded, stop_process, tail, wait_for

__all__ = [
    "CYRUS_MASTER",
    "DEFAULT_MAILBOXES",
    "PeerStartError",
    "TempCyrus",
    "capture_syslog",
    "find_cyrus",
]

CYRUS_BIN = "/usr/lib/cyrus/bin"
CYRUS_MASTER = f"{CYRUS_BIN}/master"
DEFAULT_MAILBOXES: tuple[str, ...] = ("alice", "bob")
SERVERNAME = "lmtpfast-cyrus"


def find_cyrus() -> str | None:
    """Why a :class:`TempCyrus` cannot run here, or ``None`` when it can."""
    for path in (CYRUS_MASTER, f"{CYRUS_BIN}/lmtpd", f"{CYRUS_BIN}/imapd"):
        if not os.access(path, os.X_OK):
            return f"{path} missing (cyrus-imapd, cyrus-common)"
    if shutil.which("saslpasswd2") is None:
        return "saslpasswd2 missing (sasl2-bin)"
    try:
        pwd.getpwnam("cyrus")
    except KeyError:
        return "no 'cyrus' user (cyrus-common creates it)"
    if os.geteuid() != 0:
        return "TempCyrus needs root (files owned by the cyrus user)"
    return None


@contextlib.contextmanager
def capture_syslog(path: str | os.PathLike[str]) -> Iterator[bool]:
    """Append syslog datagrams sent to ``/dev/log`` to ``path`` while the block runs.

    Machine-wide: only when no ``/dev/log`` exists (yields False and does
    nothing otherwise), and the socket is removed afterwards. For debugging
    Cyrus, which logs nowhere else.
    """
    if os.path.exists("/dev/log"):
        yield False
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("/dev/log")
    os.chmod("/dev/log", 0o666)
    sock.settimeout(0.2)
    stop = threading.Event()

    def pump() -> None:
        with open(path, "ab") as out:
            while not stop.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                out.write(data.rstrip(b"\0\n") + b"\n")
                out.flush()

    thread = threading.Thread(target=pump, name="lmtpfast-syslog", daemon=True)
    thread.start()
    try:
        yield True
    finally:
        stop.set()
        thread.join(2.0)
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink("/dev/log")


class TempCyrus(TempPeer):
    """A private Cyrus lmtpd on 127.0.0.1:PORT (SASL required) and on a unix socket.

    *sasl_users* maps SASL user names to passwords (created in the sasldb);
    those in *lmtp_admins* (default: all of them) may authenticate to lmtpd.
    *mailboxes* are created before the first delivery (``NAME@any.domain``
    is delivered to ``user/NAME``). *allowplaintext* is Cyrus's option of that
    name (PLAIN and LOGIN offered without TLS). *ssl_cert*/*ssl_key* switch on
    STARTTLS. *extra_config* is appended to ``imapd.conf``. With *syslog*,
    Cyrus's syslog lines are captured to :attr:`log_path` (see
    :func:`capture_syslog`).
    """

    def __init__(
        self,
        sasl_users: Mapping[str, str],
        *,
        lmtp_admins: tuple[str, ...] | None = None,
        mailboxes: tuple[str, ...] = DEFAULT_MAILBOXES,
        allowplaintext: bool = True,
        ssl_cert: str | os.PathLike[str] | None = None,
        ssl_key: str | os.PathLike[str] | None = None,
        extra_config: str = "",
        syslog: bool = False,
        start_timeout: float = 20.0,
    ) -> None:
        why = find_cyrus()
        if why is not None:
            raise PeerStartError(f"cannot run Cyrus: {why}; run scripts/install-test-deps.sh")
        if (ssl_cert is None) != (ssl_key is None):
            raise ValueError("ssl_cert and ssl_key go together")
        for name in (*sasl_users, *mailboxes):
            if not re.fullmatch(r"[a-z0-9._-]+", name):
                raise ValueError(f"unsupported test user name {name!r}")
        self.sasl_users = dict(sasl_users)
        self.lmtp_admins = tuple(sasl_users) if lmtp_admins is None else tuple(lmtp_admins)
        self.mailboxes = tuple(mailboxes)
        self.allowplaintext = allowplaintext
        self.extra_config = extra_config
        self.syslog = syslog
        self.start_timeout = start_timeout
        self.servername = SERVERNAME
        # The IMAP admin that makes mailboxes and reads mail back; never used for LMTP.
        self._admin = "lmtpfast-admin"
        self._admin_password = secrets.token_urlsafe(18)
        self._proc: subprocess.Popen[bytes] | None = None
        self._syslog_cm: contextlib.AbstractContextManager[bool] | None = None
        self._lmtp_port: int | None = None
        self._imap_port: int | None = None
        self.base = Path(tempfile.mkdtemp(prefix="lmtpfast-cyrus-", dir="/var/tmp"))
        self.base.chmod(0o755)
        self.conf_dir = self.base / "conf"
        self.spool = self.base / "spool"
        self.config_path = self.base / "imapd.conf"
        self.cyrus_conf_path = self.base / "cyrus.conf"
        self.sasldb = self.conf_dir / "sasldb2"
        self.log_path = self.base / "syslog.txt"
        self.stderr_path = self.base / "master.stderr"
        self.pid_path = self.base / "master.pid"
        self.ssl_cert = None if ssl_cert is None else self._copy_key_material(ssl_cert, "cert.pem")
        self.ssl_key = None if ssl_key is None else self._copy_key_material(ssl_key, "key.pem")

    def _copy_key_material(self, src: str | os.PathLike[str], name: str) -> Path:
        # Cyrus (running as cyrus) must read them; the test's files may be private.
        dst = self.base / name
        shutil.copyfile(src, dst)
        return dst

    # -- configuration -------------------------------------------------------

    def _imapd_conf(self) -> str:
        c = self.conf_dir
        admins = " ".join(self.lmtp_admins)
        tls = ""
        if self.ssl_cert is not None:
            tls = f"tls_server_cert: {self.ssl_cert}\ntls_server_key: {self.ssl_key}\n"
        return f"""\
# Written by lmtpfast._testing.cyrus.TempCyrus; private test instance.
servername: {self.servername}
configdirectory: {c}
partition-default: {self.spool}
defaultpartition: default
sievedir: {c}/sieve
lmtpsocket: {c}/socket/lmtp
idlesocket: {c}/socket/idle
notifysocket: {c}/socket/notify
mboxname_lockpath: {c}/lock
proc_path: {c}/proc
unixhierarchysep: yes
lmtp_downcase_rcpt: yes
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: {self.sasldb}
admins: {self._admin}
lmtp_admins: {admins}
allowplaintext: {"yes" if self.allowplaintext else "no"}
syslog_prefix: {self.servername}
{tls}{self.extra_config}
"""

    def _cyrus_conf(self) -> str:
        conf = self.config_path
        bin_ = CYRUS_BIN
        return f"""\
# Written by lmtpfast._testing.cyrus.TempCyrus. master does not pass -C on:
# every service gets its own.
START {{
  recover cmd="{bin_}/ctl_cyrusdb -C {conf} -r"
}}
SERVICES {{
  imap cmd="{bin_}/imapd -C {conf}" listen="127.0.0.1:{self._imap_port}" prefork=0 maxchild=4
  lmtp cmd="{bin_}/lmtpd -C {conf}" listen="127.0.0.1:{self._lmtp_port}" prefork=0 maxchild=20
  lmtpunix cmd="{bin_}/lmtpd -C {conf}" listen="{self.unix_path}" prefork=0 maxchild=20
}}
EVENTS {{
}}
"""

    def _write_files(self) -> None:
        for sub in ("db", "socket", "proc", "lock", "sieve", "log"):
            (self.conf_dir / sub).mkdir(parents=True, exist_ok=True)
        self.spool.mkdir(exist_ok=True)
        self.config_path.write_text(self._imapd_conf())
        self.cyrus_conf_path.write_text(self._cyrus_conf())
        users = dict(self.sasl_users)
        users[self._admin] = self._admin_password
        for user, password in users.items():
            # The password goes through a pipe, never the command line.
            subprocess.run(
                ["saslpasswd2", "-p", "-c", "-f", str(self.sasldb), "-u", self.servername, user],
                input=password.encode(), check=True, capture_output=True, timeout=30)
        pw = pwd.getpwnam("cyrus")
        for path in (self.conf_dir, self.spool, self.base / "cert.pem", self.base / "key.pem"):
            if not path.exists():
                continue
            os.chown(path, pw.pw_uid, pw.pw_gid)
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)
        # master writes its pid file as cyrus.
        os.chown(self.base, pw.pw_uid, pw.pw_gid)

    # -- lifecycle --------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start master, wait for both TCP greetings, create the mailboxes."""
        if self.running:
            return self
        if self.syslog and self._syslog_cm is None:
            self._syslog_cm = capture_syslog(self.log_path)
            self._syslog_cm.__enter__()
        self._lmtp_port = free_tcp_port()
        self._imap_port = free_tcp_port()
        self._write_files()
        cmd, _ = guarded([CYRUS_MASTER, "-C", str(self.config_path), "-M",
                          str(self.cyrus_conf_path), "-p", str(self.pid_path)], user="cyrus")
        with open(self.stderr_path, "ab") as err:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                          start_new_session=True, close_fds=True)
        deadline = time.monotonic() + self.start_timeout
        try:
            for port, greeting in ((self._lmtp_port, b"220 "), (self._imap_port, b"* OK")):
                wait_for(f"a greeting on Cyrus's port {port}",
                         lambda p=port, g=greeting: self._greets(p, g),  # type: ignore[misc]
                         deadline, alive=lambda: self.running)
            self._create_mailboxes()
        except (PeerStartError, TimeoutError, OSError, imaplib.IMAP4.error) as exc:
            self.stop()
            raise PeerStartError(f"Cyrus did not start: {exc}\n{self._diagnostics()}") from None
        return self

    def _greets(self, port: int, greeting: bytes) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
                line = s.makefile("rb").readline()
                with contextlib.suppress(OSError):
                    s.sendall(b"QUIT\r\n" if greeting == b"220 " else b"a LOGOUT\r\n")
                return line.startswith(greeting)
        except OSError:
            return False

    @contextlib.contextmanager
    def _imap(self) -> Iterator[imaplib.IMAP4]:
        imap = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=30)
        try:
            # CRAM-MD5 works whether or not plaintext logins are allowed.
            imap.login_cram_md5(self._admin, self._admin_password)
            yield imap
        finally:
            with contextlib.suppress(Exception):
                imap.logout()

    def _create_mailboxes(self) -> None:
        with self._imap() as imap:
            for name in self.mailboxes:
                typ, data = imap.create(f"user/{name}")
                if typ != "OK":
                    raise PeerStartError(f"IMAP CREATE user/{name}: {data!r}")
                imap.setacl(f"user/{name}", self._admin, "lrswipkxtecda")

    def messages(self, user: str) -> list[bytes]:
        """The messages in ``user/NAME`` (``NAME`` or ``NAME@domain``), oldest first."""
        name = user.partition("@")[0].lower()
        out: list[bytes] = []
        with self._imap() as imap:
            typ, _ = imap.select(f"user/{name}", readonly=True)
            if typ != "OK":
                raise KeyError(f"no mailbox user/{name}")
            typ, data = imap.uid("SEARCH", "ALL")
            uids = data[0].split() if data and data[0] else []
            for uid in uids:
                typ, parts = imap.uid("FETCH", uid, "(BODY.PEEK[])")
                for part in parts:
                    if isinstance(part, tuple):
                        out.append(part[1])
        return out

    def _diagnostics(self) -> str:
        parts = [f"--- {self.stderr_path} ---", tail(self.stderr_path)]
        if self.syslog:
            parts += [f"--- {self.log_path} ---", tail(self.log_path)]
        return "\n".join(parts)

    def log_text(self) -> str:
        """Captured syslog lines (only with ``syslog=True``)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Stop master and every process it forked; idempotent."""
        if self._proc is not None:
            stop_process(self._proc)
        if self._syslog_cm is not None:
            cm, self._syslog_cm = self._syslog_cm, None
            cm.__exit__(None, None, None)

    def close(self) -> None:
        """Stop and delete the instance's folder."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<TempCyrus {state} {self.base}>"

    # -- addresses -----------------------------------------------------------------

    @property
    def unix_path(self) -> Path:
        return self.conf_dir / "socket" / "lmtp"

    @property
    def lmtp_port(self) -> int:
        if self._lmtp_port is None:
            raise RuntimeError("the port is chosen by start()")
        return self._lmtp_port

    @property
    def imap_port(self) -> int:
        if self._imap_port is None:
            raise RuntimeError("the port is chosen by start()")
        return self._imap_port

    @property
    def destination_tcp(self) -> str:
        return f"127.0.0.1:{self.lmtp_port}"

    @property
    def destination_unix(self) -> str:
        return f"unix:{self.unix_path}"
