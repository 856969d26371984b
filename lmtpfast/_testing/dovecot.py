"""A private Dovecot LMTP server for tests: :class:`TempDovecot`.

Each instance writes its own ``dovecot.conf`` into a fresh folder made with
``mkdtemp`` under ``/var/tmp`` and runs ``dovecot -F -c CONF`` as a child of the
test process; the Debian system service is never involved (see
``scripts/install-test-deps.sh``).

Facts checked against Dovecot 2.3.19.1 (Debian 12):

* The whole instance must live outside ``/root``: Dovecot's unprivileged auth
  and lmtp processes must read the users file and write the mail folder, or
  lookups fail with ``451 4.3.0 Temporary internal error``. The base folder is
  therefore mode 0755.
* Mail user: when run as root, every test user maps to ``nobody:nogroup``
  (65534:65534), which exists on every Debian system; ``BASE/mail`` is created
  owned by it and ``first_valid_uid``/``last_valid_uid`` (and the gid pair) are
  set to exactly that id. Stored files belong to that user; root (the tests)
  reads them. Dovecot refuses uid 0 for mail, so root itself cannot be used.
  Running as a non-root user is not supported (Dovecot would need its internal
  and login users remapped): :class:`TempDovecot` raises at construction.
* ``auth_username_format = %Ln`` maps ``Alice@Example.com`` to user ``alice``;
  unknown local parts get ``550 5.1.1 <x@y> User doesn't exist: x@y`` at RCPT.
* LHLO (no SSL): ``8BITMIME``, ``CHUNKING``, ``ENHANCEDSTATUSCODES``,
  ``PIPELINING``; with ``ssl_cert``/``ssl_key`` also ``STARTTLS``.
* Stored files (``mail_save_crlf = yes``, set here so stored bytes can be
  compared with what was sent): line ends are CRLF; a bare LF in the input is
  stored as CRLF, a bare CR is kept; dot-stuffing is undone. Dovecot prepends
  these header fields, in this order (see :func:`body_as_sent`)::

      Return-Path: <sender@example.org>          (<> for a null sender)
      Delivered-To: Alice@Example.com            (the RCPT address, case kept)
      Received: from HELO ([127.0.0.1])          ("from HELO" only, over unix)
      \tby HOSTNAME with LMTP
      \tid SESSIONID
      \t(envelope-from <sender@example.org>)
      \tfor <Alice@Example.com>; Fri, 27 Nov 2026 12:14:45 +0000

  ``Delivered-To`` and the ``for <...>`` clause appear only when the
  transaction has exactly one accepted recipient; with several, every copy gets
  just ``Return-Path`` and ``Received`` ending in ``(envelope-from <...>); DATE``.
  A recipient given twice is stored once (Dovecot 2.3.19 answers 250 for
  both RCPTs and both final replies, and saves one copy). Post-DATA replies read
  ``250 2.0.0 <rcpt> SESSIONID Saved``, then ``SESSIONID:R2`` ... for the
  following recipients.
* Maildir file names are ``SECS.MUSECSPPID.HOST,S=SIZE,W=VSIZE`` in ``new/``
  (``:2,FLAGS`` appended once moved to ``cur/``); :meth:`TempDovecot.messages`
  sorts by (SECS, USECS), i.e. delivery time.
* Start-up takes about 15 ms until the sockets accept (the master binds them
  before forking workers). Shutdown: ``dovecot -c CONF stop`` takes about 3 s
  (the command polls the master once a second) and SIGTERM to the master alone
  1.1 s, sometimes 6 s. :meth:`TempDovecot.stop` sends SIGTERM to the whole
  process group (master and workers at once: a few ms) and SIGKILLs whatever is
  left after 2 s. The master runs under ``setpriv --pdeathsig TERM`` so that it
  also ends when the test process dies without running its teardown.
* The ``stats`` worker can outlive the master by a moment and is reparented to
  PID 1, showing briefly as ``[stats] <defunct>`` until PID 1 reaps it.
* Deleting a user's ``Maildir`` while the server runs is safe: the next
  delivery recreates it (used by :meth:`TempDovecot.reset_mail`).
"""

from __future__ import annotations

import contextlib
import functools
import grp
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Self

from ._procs import PeerStartError, TempPeer, free_tcp_port, guarded, stop_process, tail, wait_for

__all__ = ["DEFAULT_USERS", "PeerStartError", "TempDovecot", "body_as_sent", "find_dovecot"]

DEFAULT_USERS: tuple[str, ...] = ("alice", "bob", "carol", "dave")

# The header fields Dovecot's LMTP prepends, in order (see the module docstring).
_PREPENDED = ((b"Return-Path:", True), (b"Delivered-To:", False), (b"Received:", True))
_MAILDIR_NAME = re.compile(r"^(\d+)\.M(\d+)P")


def find_dovecot() -> str | None:
    """Path of the ``dovecot`` master binary, or None when it is not installed."""
    found = shutil.which("dovecot")
    if found:
        return found
    for candidate in ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def body_as_sent(stored: bytes) -> bytes:
    """Strip the header fields Dovecot's LMTP prepends to a stored message.

    Removes from the top ``Return-Path``, then ``Delivered-To`` if present (only
    single-recipient transactions get it), then ``Received`` with its folded
    continuation lines, and returns the rest: the message as the client sent it,
    dot-stuffing undone, with CRLF line ends. Raises ValueError when *stored*
    does not start that way, so a change in Dovecot's behaviour fails clearly.
    """
    pos = 0
    for name, required in _PREPENDED:
        if stored[pos : pos + len(name)].lower() != name.lower():
            if not required:
                continue
            raise ValueError(
                f"stored message lacks Dovecot's {name.decode()!r} field "
                f"at offset {pos}: {stored[pos : pos + 60]!r}"
            )
        end = stored.find(b"\n", pos)
        while end >= 0 and stored[end + 1 : end + 2] in (b" ", b"\t"):  # folded lines
            end = stored.find(b"\n", end + 1)
        if end < 0:
            raise ValueError(f"stored message ends inside Dovecot's {name.decode()!r} field")
        pos = end + 1
    return stored[pos:]


def _maildir_key(path: Path) -> tuple[int, int, str]:
    m = _MAILDIR_NAME.match(path.name)
    if m is None:  # not a Dovecot-made name: order by mtime, after the named ones
        st = path.stat()
        return (st.st_mtime_ns // 1_000_000_000, (st.st_mtime_ns // 1000) % 1_000_000, path.name)
    return (int(m.group(1)), int(m.group(2)), path.name)


def _local_user(user: str) -> str:
    # Mirrors auth_username_format = %Ln: local part, lower-cased.
    return user.partition("@")[0].lower()


class TempDovecot(TempPeer):
    """A private Dovecot LMTP server on a unix socket and on 127.0.0.1:PORT.

    Usable as a context manager (``with TempDovecot() as dv: ...``). Recipients
    ``USER@any.domain`` are delivered to ``BASE/mail/USER/Maildir`` for each name
    in *users*; every other local part is rejected at RCPT with ``550 5.1.1``.

    *ssl_cert* and *ssl_key* (PEM file paths) switch on ``ssl = yes`` so that
    LHLO offers STARTTLS on both listeners. *extra_config* is appended verbatim
    to the generated config (later settings win). *port* fixes the TCP port
    (default: a free one, re-picked if it is taken by the time Dovecot binds).
    """

    def __init__(
        self,
        users: Iterable[str] = DEFAULT_USERS,
        *,
        ssl_cert: str | os.PathLike[str] | None = None,
        ssl_key: str | os.PathLike[str] | None = None,
        port: int | None = None,
        hostname: str = "lmtpfast-dovecot",
        postmaster_address: str = "postmaster@example.com",
        extra_config: str = "",
        start_timeout: float = 20.0,
    ) -> None:
        if (ssl_cert is None) != (ssl_key is None):
            raise ValueError("ssl_cert and ssl_key go together")
        if os.geteuid() != 0:
            raise PeerStartError("TempDovecot needs root (Dovecot switches to the mail uid)")
        binary = find_dovecot()
        if binary is None:
            raise PeerStartError(
                "dovecot not found: run scripts/install-test-deps.sh (dovecot-core, dovecot-lmtpd)"
            )
        self.binary = binary
        self.users = tuple(_local_user(u) for u in users)
        for u in self.users:
            if not re.fullmatch(r"[a-z0-9._-]+", u):
                raise ValueError(f"unsupported test user name {u!r}")
        self.ssl_cert = None if ssl_cert is None else os.path.abspath(ssl_cert)
        self.ssl_key = None if ssl_key is None else os.path.abspath(ssl_key)
        self.hostname = hostname
        self.postmaster_address = postmaster_address
        self.extra_config = extra_config
        self.start_timeout = start_timeout
        self._fixed_port = port
        self._port: int | None = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr_path: Path | None = None
        # The mail uid/gid: see the module docstring for why nobody:nogroup.
        pw = pwd.getpwnam("nobody")
        self.uid = pw.pw_uid
        try:
            self.gid = grp.getgrnam("nogroup").gr_gid
        except KeyError:
            self.gid = pw.pw_gid

        self.base = Path(tempfile.mkdtemp(prefix="lmtpfast-dovecot-", dir="/var/tmp"))
        # mkdtemp makes 0700; Dovecot's unprivileged processes must traverse it.
        self.base.chmod(0o755)
        self.instance_name = "lmtpfast-" + self.base.name.rsplit("-", 1)[-1]
        self.run_dir = self.base / "run"
        self.state_dir = self.base / "state"
        self.mail_root = self.base / "mail"
        self.log_path = self.base / "dovecot.log"
        self.config_path = self.base / "dovecot.conf"
        self.users_path = self.base / "users"
        for d in (self.run_dir, self.state_dir, self.mail_root):
            d.mkdir(mode=0o755)
        os.chown(self.mail_root, self.uid, self.gid)
        self._write_users()

    # -- configuration -----------------------------------------------------

    def _write_users(self) -> None:
        lines = [
            f"{u}:{{PLAIN}}secret:{self.uid}:{self.gid}::{self.mail_root / u}::\n"
            for u in self.users
        ]
        self.users_path.write_text("".join(lines))
        self.users_path.chmod(0o644)

    def _config_text(self, port: int) -> str:
        ssl = (
            f"ssl = yes\nssl_cert = <{self.ssl_cert}\nssl_key = <{self.ssl_key}\n"
            if self.ssl_cert
            else "ssl = no\n"
        )
        return f"""\
# Written by lmtpfast._testing.dovecot.TempDovecot; private test instance.
instance_name = {self.instance_name}
base_dir = {self.run_dir}
state_dir = {self.state_dir}
log_path = {self.log_path}
hostname = {self.hostname}
protocols = lmtp
listen = 127.0.0.1
{ssl}first_valid_uid = {self.uid}
last_valid_uid = {self.uid}
first_valid_gid = {self.gid}
last_valid_gid = {self.gid}
auth_username_format = %Ln
mail_location = maildir:{self.mail_root}/%n/Maildir
mail_fsync = optimized
# Keep CRLF in stored files so they compare byte for byte with what was sent.
mail_save_crlf = yes
passdb {{
  driver = passwd-file
  args = {self.users_path}
}}
userdb {{
  driver = passwd-file
  args = {self.users_path}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
protocol lmtp {{
  postmaster_address = {self.postmaster_address}
}}
{self.extra_config}
"""

    # -- lifecycle ---------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the Dovecot master process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start Dovecot and wait until both listeners answer with a 220 greeting.

        Raises :class:`PeerStartError` (with the tail of Dovecot's log) when it
        does not come up within ``start_timeout`` seconds.
        """
        if self.running:
            return self
        attempts = 1 if self._fixed_port is not None else 3
        for attempt in range(attempts):
            port = self._fixed_port if self._fixed_port is not None else free_tcp_port()
            self._port = port
            self.config_path.write_text(self._config_text(port))
            log_offset = len(self.log_text())
            try:
                self._start_once()
                return self
            except PeerStartError:
                # Another process may have taken the free port between our probe
                # and Dovecot's bind: pick another one.
                new_log = self.log_text()[log_offset:]
                if attempt + 1 < attempts and "Address already in use" in new_log:
                    continue
                raise
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        self._stderr_path = self.base / "dovecot.stderr"
        with open(self._stderr_path, "ab") as err:
            cmd, _ = guarded([self.binary, "-F", "-c", str(self.config_path)])
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,  # all its workers share this session id
                close_fds=True,
            )
        deadline = time.monotonic() + self.start_timeout
        try:
            for family, what in ((socket.AF_UNIX, "unix"), (socket.AF_INET, "TCP")):
                wait_for(
                    f"a 220 greeting on Dovecot's {what} listener",
                    functools.partial(self._greets, family),
                    deadline,
                    alive=lambda: self.running,
                )
        except (PeerStartError, TimeoutError) as exc:
            self._kill()
            raise PeerStartError(f"Dovecot did not start: {exc}\n{self._diagnostics()}") from None

    def _greets(self, family: socket.AddressFamily) -> bool:
        """Connect, expect ``220 ``, say QUIT: proves an lmtp worker really serves."""
        addr: str | tuple[str, int] = (
            str(self.unix_path) if family == socket.AF_UNIX else ("127.0.0.1", self.tcp_port)
        )
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(2.0)
                s.connect(addr)
                line = s.makefile("rb").readline()
                with contextlib.suppress(OSError):
                    s.sendall(b"QUIT\r\n")
                return line.startswith(b"220 ")
        except OSError:
            return False

    def _diagnostics(self) -> str:
        parts = [f"--- tail of {self.log_path} ---", tail(self.log_path)]
        if self._stderr_path is not None and self._stderr_path.exists():
            parts += [f"--- {self._stderr_path} ---", tail(self._stderr_path)]
        return "\n".join(parts)

    def _kill(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)

    def stop(self) -> None:
        """Stop the instance and every process it forked; idempotent.

        SIGTERM to the master and its workers at once (``dovecot -c CONF stop``
        signals only the master and then polls for seconds), SIGKILL for whatever
        of the instance's session is still there after 2 s.
        """
        self._kill()

    def close(self) -> None:
        """Stop the instance and delete its folder (config, sockets, mail, log)."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<TempDovecot {self.instance_name} {state} {self.base}>"

    # -- addresses ---------------------------------------------------------

    @property
    def unix_path(self) -> Path:
        """Path of the LMTP unix socket (mode 0666)."""
        return self.run_dir / "lmtp"

    @property
    def tcp_port(self) -> int:
        """The TCP port on 127.0.0.1 (known once :meth:`start` has picked it)."""
        if self._port is None:
            raise RuntimeError("the TCP port is chosen by start()")
        return self._port

    @property
    def destination_unix(self) -> str:
        """``"unix:/path/to/lmtp"``."""
        return f"unix:{self.unix_path}"

    @property
    def destination_tcp(self) -> str:
        """``"127.0.0.1:PORT"``."""
        return f"127.0.0.1:{self.tcp_port}"

    # -- inspection --------------------------------------------------------

    def maildir(self, user: str) -> Path:
        """The Maildir of *user* (``alice`` or ``alice@example.com``)."""
        return self.mail_root / _local_user(user) / "Maildir"

    def message_paths(self, user: str) -> list[Path]:
        """Files in the INBOX ``new/`` and ``cur/`` of *user*, in delivery order."""
        md = self.maildir(user)
        files = [p for sub in ("new", "cur") if (md / sub).is_dir() for p in (md / sub).iterdir()]
        return sorted((p for p in files if p.is_file()), key=_maildir_key)

    def messages(self, user: str) -> list[bytes]:
        """The stored messages of *user*, in delivery order, as Dovecot wrote them."""
        return [p.read_bytes() for p in self.message_paths(user)]

    def reset_mail(self) -> None:
        """Delete every user's mail (Dovecot recreates the Maildir on the next delivery)."""
        for child in self.mail_root.iterdir():
            shutil.rmtree(child, ignore_errors=True)

    def log_text(self) -> str:
        """The whole Dovecot log of this instance (empty before it started)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
