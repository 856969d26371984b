"""Postfix's ``smtp-sink`` (LMTP server) and ``smtp-source`` (LMTP load generator) for tests.

The binaries are ``/usr/sbin/smtp-sink`` and ``/usr/sbin/smtp-source`` from the
Debian ``postfix`` package (installed by ``scripts/install-test-deps.sh``; the
system Postfix instance is never started). With ``$LMTPFAST_PEERS_DIR`` set,
the tools are taken from ``$LMTPFAST_PEERS_DIR/postfix/usr/sbin`` instead (a
package unpacked with ``dpkg -x``, e.g. another Postfix version), with
``LD_LIBRARY_PATH`` pointing at its ``usr/lib/postfix`` for ``libpostfix-*.so``.

Facts checked against Postfix 3.7.11 (Debian 12):

* ``smtp-sink -L`` refuses to run as root without ``-u USER``; with it, it
  binds the socket as root, then drops privileges, which clears a parent-death
  signal. So :class:`SmtpSink` starts it as ``nobody`` directly under
  ``setpriv --pdeathsig KILL`` (no ``-u`` needed then; sockets, ports above 1024
  and the folder it owns need no root) and falls back to ``-u nobody`` only
  without setpriv. It is one event-driven process (no workers). Usage:
  ``smtp-sink [options] [inet:][host]:port backlog`` or ``... unix:/path backlog``.
* Its LHLO reply: PIPELINING, 8BITMIME, AUTH PLAIN LOGIN, XCLIENT, XFORWARD,
  ENHANCEDSTATUSCODES, DSN and then a last line ``250 `` with empty text.
  Replies: ``250 2.1.0 Ok`` (MAIL), ``250 2.1.5 Ok`` (RCPT),
  ``354 End data with <CR><LF>.<CR><LF>``, one ``250 2.2.0 Ok`` per recipient
  after the dot, ``221 Bye``.
* Fault flags: ``-q CMDS`` drop the connection without replying, ``-Q CMDS``
  421 and drop, ``-r CMDS`` / ``-f CMDS`` 4xx / 5xx reject (both turn off
  PIPELINING), ``-w SECS`` delay the DATA reply, ``-W CMD:SECS[:ODDS]`` delay any
  reply, ``-A SECS`` 550 abort after DATA, ``-m N`` max connections,
  ``-n N`` / ``-M N`` exit after N sessions / messages. Commands are names like
  ``connect,lhlo,mail,rcpt,data,.,rset,quit``.
* ``-d DIR/`` dumps each transaction to ``DIR/RANDOMHEX`` (LF line ends):
  ``X-Client-Addr``, ``X-Client-Proto``, ``X-Helo-Args``, ``X-Mail-Args``, one
  ``X-Rcpt-Args`` per RCPT, a 3-line ``Received``, then the message (dot-stuffing
  undone) and one extra empty line. :class:`SmtpSink` ``capture=True`` uses it.
* ``smtp-source -L`` does not pipeline; its default port is 25 even with ``-L``,
  so :func:`run_smtp_source` insists on ``unix:/path`` or ``host:port``. ``-r N``
  numbers the recipients (``1foo@host`` ...), so against Dovecot use ``-r 1``
  with ``-t`` naming an existing user.
* Readiness is read from ``/proc/net/unix`` / ``/proc/net/tcp`` instead of a
  probe connection, which smtp-sink would count as a session (``-n``) and
  answer according to its fault flags.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from ._procs import (
    PeerStartError,
    TempPeer,
    free_tcp_port,
    guarded,
    listening_tcp,
    listening_unix,
    stop_process,
    tail,
    wait_for,
)

__all__ = [
    "PeerStartError",
    "SmtpSink",
    "SourceRun",
    "peers_dir",
    "postfix_env",
    "run_smtp_source",
    "smtp_tool",
    "split_capture",
]


def peers_dir() -> Path | None:
    """``$LMTPFAST_PEERS_DIR`` (an unpacked Postfix in its ``postfix/``), or None."""
    value = os.environ.get("LMTPFAST_PEERS_DIR")
    return Path(value) if value else None


def _sbin() -> Path:
    base = peers_dir()
    return Path("/usr/sbin") if base is None else base / "postfix" / "usr" / "sbin"


def smtp_tool(name: str) -> Path | None:
    """Path of ``smtp-sink`` / ``smtp-source``, or None when missing."""
    path = _sbin() / name
    return path if os.access(path, os.X_OK) else None


def postfix_env() -> dict[str, str]:
    """The environment for the Postfix tools (``LD_LIBRARY_PATH`` for an unpacked copy)."""
    env = dict(os.environ)
    base = peers_dir()
    if base is not None:
        lib = str(base / "postfix" / "usr" / "lib" / "postfix")
        old = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = f"{lib}:{old}" if old else lib
    return env


def _require_tool(name: str) -> Path:
    path = smtp_tool(name)
    if path is None:
        raise PeerStartError(
            f"{name} not found in {_sbin()}: run scripts/install-test-deps.sh "
            "(package postfix) or set LMTPFAST_PEERS_DIR to an unpacked copy"
        )
    return path


def split_capture(dump: bytes) -> tuple[dict[str, list[str]], bytes]:
    """Split one ``smtp-sink -d`` dump into its ``X-*`` records and the message.

    Returns ``({"X-Mail-Args": ["<a@b>"], "X-Rcpt-Args": [...], ...}, message)``
    where *message* is what the client sent after DATA (dot-stuffing undone, LF
    line ends) without smtp-sink's own ``Received`` field and trailing empty line.
    """
    meta: dict[str, list[str]] = {}
    lines = dump.split(b"\n")
    i = 0
    while i < len(lines) and lines[i].startswith(b"X-"):
        name, _, value = lines[i].decode("utf-8", "replace").partition(": ")
        meta.setdefault(name, []).append(value)
        i += 1
    if i >= len(lines) or not lines[i].startswith(b"Received: "):
        raise ValueError(f"not an smtp-sink dump: line {i} is {lines[i:i + 1]!r}")
    i += 1
    while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
        i += 1
    message = b"\n".join(lines[i:])
    # smtp-sink ends every dump with one empty line of its own.
    if message.endswith(b"\n\n"):
        message = message[:-1]
    return meta, message


class SmtpSink(TempPeer):
    """``smtp-sink -L`` on a unix socket (default) or on 127.0.0.1 at a free port.

    *flags* are passed through before the address, e.g. ``SmtpSink("-q", ".")``
    or ``SmtpSink("-r", "rcpt", "-w", "2")`` for fault injection. *backlog* is
    smtp-sink's listen backlog. With *capture* every transaction is dumped
    (``-d``) and :meth:`captures` returns the dumps; capture costs throughput.
    """

    def __init__(
        self,
        *flags: str,
        tcp: bool = False,
        backlog: int = 4096,
        user: str = "nobody",
        capture: bool = False,
        port: int | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.binary = _require_tool("smtp-sink")
        self.flags = tuple(flags)
        self.tcp = tcp
        self.backlog = backlog
        self.user = user
        self.capture = capture
        self.start_timeout = start_timeout
        self._fixed_port = port
        self._port: int | None = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._guarded = guarded(["true"])[1]
        self.base = Path(tempfile.mkdtemp(prefix="lmtpfast-sink-"))
        self.base.chmod(0o755)
        # smtp-sink creates its socket (and dumps) as *user*.
        shutil.chown(self.base, user=user)
        self.log_path = self.base / "smtp-sink.log"
        self.dump_dir = self.base / "dump"
        if capture:
            self.dump_dir.mkdir()
            shutil.chown(self.dump_dir, user=user)

    @property
    def unix_path(self) -> Path:
        """Path of the unix socket (used when ``tcp=False``)."""
        return self.base / "lmtp"

    @property
    def tcp_port(self) -> int:
        """The TCP port on 127.0.0.1 (``tcp=True``, known once started)."""
        if not self.tcp or self._port is None:
            raise RuntimeError("no TCP port: tcp=False or not started")
        return self._port

    @property
    def destination(self) -> str:
        """``"unix:/path"`` or ``"127.0.0.1:PORT"``."""
        return f"127.0.0.1:{self.tcp_port}" if self.tcp else f"unix:{self.unix_path}"

    @property
    def running(self) -> bool:
        """True while smtp-sink runs (it exits by itself with ``-n``/``-M``)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """smtp-sink's exit status once it has ended, else None."""
        return None if self._proc is None else self._proc.poll()

    def command(self) -> list[str]:
        """The smtp-sink command line (address as chosen by :meth:`start`).

        It runs as *user* from the start under ``setpriv --pdeathsig KILL`` (it
        then needs no ``-u``): ``smtp-sink -u`` would drop privileges itself and
        thereby clear the parent-death signal that ends it when the test process
        dies. Without setpriv it falls back to root with ``-u USER``.
        """
        cmd = [str(self.binary), "-L"]
        if not self._guarded:
            cmd += ["-u", self.user]
        if self.capture:
            cmd += ["-d", f"{self.dump_dir}/"]
        cmd += list(self.flags)
        addr = f"127.0.0.1:{self.tcp_port}" if self.tcp else f"unix:{self.unix_path}"
        cmd += [addr, str(self.backlog)]
        if self._guarded:
            cmd, _ = guarded(cmd, on_parent_death="KILL", user=self.user)
        return cmd

    def start(self) -> Self:
        """Start smtp-sink and wait until its socket listens (``start_timeout``)."""
        if self.running:
            return self
        attempts = 1 if (not self.tcp or self._fixed_port is not None) else 3
        for attempt in range(attempts):
            if self.tcp and self._fixed_port is None:
                self._port = free_tcp_port()
            try:
                self._start_once()
                return self
            except PeerStartError:
                # The free port may have been taken before smtp-sink bound it.
                if attempt + 1 < attempts and "in use" in tail(self.log_path, 5):
                    continue
                raise
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=postfix_env(),
                start_new_session=True,
                close_fds=True,
            )
        deadline = time.monotonic() + self.start_timeout

        def listening() -> bool:
            if self.tcp:
                return listening_tcp("127.0.0.1", self.tcp_port)
            return listening_unix(self.unix_path)

        try:
            wait_for("smtp-sink to listen", listening, deadline, alive=lambda: self.running)
        except (PeerStartError, TimeoutError) as exc:
            self.stop()
            raise PeerStartError(
                f"smtp-sink did not start: {exc}\ncommand: {' '.join(self.command())}\n"
                f"--- {self.log_path} ---\n{tail(self.log_path)}"
            ) from None

    def stop(self) -> None:
        """Stop smtp-sink (SIGTERM, then SIGKILL after a grace period); idempotent."""
        if self._proc is not None:
            stop_process(self._proc)

    def close(self) -> None:
        """Stop and delete the temp folder (socket, log, dumps)."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def log_text(self) -> str:
        """What smtp-sink printed (fatal errors, ``-v`` / ``-c`` output)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def captures(self) -> list[bytes]:
        """The transaction dumps (``capture=True``), oldest first; see :func:`split_capture`."""
        if not self.capture:
            raise RuntimeError("SmtpSink(capture=True) is needed for captures()")
        files = [p for p in self.dump_dir.iterdir() if p.is_file()]
        files.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files]

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        where = self.destination if (not self.tcp or self._port) else "tcp:?"
        return f"<SmtpSink {where} {state} flags={self.flags!r}>"


@dataclass(frozen=True)
class SourceRun:
    """Outcome of one :func:`run_smtp_source` run."""

    #: The command that ran.
    command: tuple[str, ...]
    #: Wall-clock seconds from start to exit.
    elapsed: float
    #: CPU seconds of smtp-source itself: user + system (from wait4's rusage).
    cpu: float
    #: User-mode CPU seconds.
    cpu_user: float
    #: Kernel-mode CPU seconds.
    cpu_system: float
    #: Exit status (negative: killed by that signal, as in subprocess).
    returncode: int
    #: What it printed (stdout and stderr merged).
    output: str
    #: True when the run was killed at the timeout.
    timed_out: bool

    @property
    def ok(self) -> bool:
        """Exit status 0 and not timed out."""
        return self.returncode == 0 and not self.timed_out


def _check_destination(destination: str) -> None:
    if destination.startswith("unix:"):
        if len(destination) <= len("unix:"):
            raise ValueError("empty unix socket path")
        return
    host, sep, port = destination.removeprefix("inet:").rpartition(":")
    if not sep or not host or not port.isdigit():
        # smtp-source would silently fall back to port 25.
        raise ValueError(f"destination must be 'unix:/path' or 'host:port', got {destination!r}")


def run_smtp_source(
    destination: str,
    *,
    messages: int,
    sessions: int = 1,
    recipients: int = 1,
    size: int = 1024,
    extra_args: Sequence[str] = (),
    timeout: float = 120.0,
) -> SourceRun:
    """Run ``smtp-source -L -d`` against *destination* and measure it.

    Sends *messages* messages in total over *sessions* parallel connections
    (``-d``: many messages per connection), each with *recipients* recipients
    and *size* bytes of payload. *extra_args* go before the destination (e.g.
    ``("-t", "alice@example.com", "-f", "s@example.org")``). The run is killed
    after *timeout* seconds (``timed_out`` is then set). CPU time is the child's
    own, from ``os.wait4``.
    """
    _check_destination(destination)
    binary = _require_tool("smtp-source")
    cmd = (
        str(binary), "-L", "-d",
        "-s", str(sessions), "-m", str(messages), "-r", str(recipients), "-l", str(size),
        *extra_args, destination,
    )  # fmt: skip
    # setpriv adds an exec, not a process: wait4's rusage is still smtp-source's.
    argv, _ = guarded(list(cmd), on_parent_death="KILL")
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=postfix_env(),
            start_new_session=True,
            close_fds=True,
        )
        start = time.perf_counter()
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        try:
            # wait4 (not Popen.wait) to get the child's own resource usage.
            _, status, usage = os.wait4(proc.pid, 0)
            elapsed = time.perf_counter() - start
        except BaseException:  # e.g. KeyboardInterrupt: never leave it running
            kill()
            os.wait4(proc.pid, 0)
            proc.returncode = -signal.SIGKILL
            raise
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        output = out.read().decode("utf-8", "replace")
    return SourceRun(
        command=cmd,
        elapsed=elapsed,
        cpu=usage.ru_utime + usage.ru_stime,
        cpu_user=usage.ru_utime,
        cpu_system=usage.ru_stime,
        returncode=proc.returncode,
        output=output,
        timed_out=timed_out.is_set(),
    )

