"""Process and socket helpers shared by the real-peer test beds (private).

Peers are started with ``start_new_session=True`` so that every process they
fork (Dovecot's master forks anvil, log, config, auth, stats, lmtp ...) shares
the session id of the process we started; teardown then finds stragglers by
that session id in ``/proc`` instead of by name, and never touches anything
else on the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "PeerStartError",
    "ToolError",
    "free_tcp_port",
    "guarded",
    "kill_session",
    "listening_tcp",
    "listening_unix",
    "run_tool",
    "session_pids",
    "stop_process",
    "tail",
    "wait_for",
]


class PeerStartError(RuntimeError):
    """A real peer (Dovecot, smtp-sink) did not come up; the message has its log tail."""


class ToolError(subprocess.CalledProcessError):
    """A peer's client tool (psql, ldapsearch, mariadb, postqueue ...) failed.

    A :class:`subprocess.CalledProcessError` whose message ends with what the
    tool printed on stderr, so a failing test shows the tool's own words.
    """

    def __str__(self) -> str:
        err = self.stderr
        if isinstance(err, bytes):
            err = err.decode("utf-8", "replace")
        return f"{super().__str__()}\n{(err or '').strip()[-2000:]}"


def run_tool(
    cmd: list[str], *, input: str | None = None, timeout: float = 60.0, check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run a client tool with text I/O and a timeout; :class:`ToolError` on failure if *check*."""
    stdin = None if input is not None else subprocess.DEVNULL
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout,
                          check=False, env=env, stdin=stdin)  # fmt: skip
    if check and proc.returncode != 0:
        raise ToolError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on *host* a moment ago (callers retry on a race)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(
    what: str, check: Callable[[], bool], deadline: float, *, alive: Callable[[], bool]
) -> None:
    """Poll *check* until true; raise TimeoutError at the monotonic *deadline*.

    *alive* is polled too so that a peer that died is reported at once instead of
    after the whole timeout.
    """
    delay = 0.002
    while True:
        if check():
            return
        if not alive():
            raise PeerStartError(f"peer exited while waiting for {what}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _proc_net(pid: int | None) -> str:
    # /proc/net is the reader's network namespace; /proc/PID/net is PID's.
    return "/proc/net" if pid is None else f"/proc/{pid}/net"


def listening_unix(path: str | os.PathLike[str], *, pid: int | None = None) -> bool:
    """True when a listening unix socket is bound at *path* (read from /proc/net/unix).

    Reading /proc avoids a probe connection, which smtp-sink would count as a
    session (``-n``) and answer according to its fault options. With *pid*,
    the table of that process's network namespace is read.
    """
    want = os.fsencode(os.fspath(path))
    try:
        data = Path(_proc_net(pid), "unix").read_bytes()
    except OSError:
        return False
    for line in data.splitlines()[1:]:
        # Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = __SO_ACCEPTCON.
        parts = line.split(None, 7)
        if len(parts) == 8 and parts[7] == want and int(parts[3], 16) & 0x10000:
            return True
    return False


def listening_tcp(host: str, port: int, *, pid: int | None = None) -> bool:
    """True when a TCP socket listens on *host*:*port* (IPv4 or IPv6 literal, from /proc).

    With *pid*, the table of that process's network namespace is read.
    """
    import ipaddress

    addr = ipaddress.ip_address(host)
    if addr.version == 4:
        table = f"{_proc_net(pid)}/tcp"
        # /proc prints the address as the native-endian u32: little-endian hex here.
        want_addr = addr.packed[::-1].hex().upper()
    else:
        table = f"{_proc_net(pid)}/tcp6"
        p = addr.packed
        want_addr = "".join(p[i : i + 4][::-1].hex() for i in range(0, 16, 4)).upper()
    want = f"{want_addr}:{port:04X}"
    try:
        lines = Path(table).read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        parts = line.split()
        # sl local rem st ...; st 0A = LISTEN
        if len(parts) > 3 and parts[1] == want and parts[3] == "0A":
            return True
    return False


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is *sid*."""
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The comm field may contain spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        state, session = fields[0], int(fields[3])
        if session == sid and state not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def kill_session(sid: int, *, grace: float = 2.0) -> list[int]:
    """End every live process of session *sid*: SIGTERM, *grace* seconds, SIGKILL.

    Returns the pids that had to be SIGKILLed (empty when SIGTERM was enough).
    """
    pids = session_pids(sid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        time.sleep(0.02)
        pids = session_pids(sid)
    killed = session_pids(sid)
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return killed


def stop_process(proc: subprocess.Popen[bytes], *, grace: float = 2.0) -> int:
    """Stop *proc*, a session leader we started, and everything in its session.

    SIGTERM goes to its whole process group at once (Dovecot's master alone can
    take 1-6 s to shut its workers down; all together they exit in milliseconds);
    whatever still runs after *grace* seconds gets SIGKILL. Returns the exit code.
    """
    if proc.poll() is None:
        # Not yet reaped, so proc.pid still names our process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5.0)
    kill_session(proc.pid, grace=grace)
    rc = proc.returncode
    assert rc is not None
    return rc


def guarded(
    cmd: list[str], *, on_parent_death: str = "TERM", user: str | None = None
) -> tuple[list[str], bool]:
    """Prefix *cmd* with ``setpriv --pdeathsig`` so it dies with the test process.

    Teardown code does not run when pytest is SIGKILLed or times out hard; the
    kernel's parent-death signal still reaches the peer then. With *user* the
    command also runs as that user (and its primary group), which keeps the
    signal: a program that drops privileges itself (``smtp-sink -u``) would
    clear it. Returns (command, guarded); guarded is False when setpriv (util-
    linux, always on Debian) is missing and *cmd* is returned unchanged. The
    signal fires when the *thread* that started the peer exits: start peers
    from the main thread.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return cmd, False
    prefix = [setpriv, "--pdeathsig", on_parent_death]
    if user is not None:
        import pwd

        pw = pwd.getpwnam(user)
        prefix += ["--reuid", str(pw.pw_uid), "--regid", str(pw.pw_gid), "--clear-groups"]
    return [*prefix, *cmd], True


def tail(path: str | os.PathLike[str], lines: int = 30) -> str:
    """Last *lines* lines of a text file, or a note when it cannot be read."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"<{path}: {exc.strerror}>"
    return "\n".join(text.splitlines()[-lines:])


class TempPeer:
    """A server started for tests in a temp folder: ``with Peer(...) as peer:``.

    Subclasses provide ``start()`` (returns self) and ``close()`` (stops the
    server and removes its folder), and set ``log_path`` to the server's log.
    """

    log_path: Path
    base: Path
    #: Seconds :meth:`_spawn` waits for the server to be ready.
    start_timeout: float = 20.0
    #: The TCP port, once chosen (subclasses that listen on one).
    _port: int | None = None
    #: The server process we started (a session leader), if any.
    _proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        """True while the server process we started is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1 (chosen by start(), kept over a restart)."""
        if self._port is None:
            raise RuntimeError("the port is chosen by start()")
        return self._port

    def _spawn(self, cmd: list[str], ready: Callable[[], bool], *, what: str) -> None:
        """Start *cmd* (output appended to ``log_path``) and wait until *ready*.

        The process is a session leader (see :func:`stop_process`). On a
        timeout or an early exit it is stopped and :class:`PeerStartError`
        carries the command and the log tail.
        """
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.base,
                start_new_session=True, close_fds=True,
            )  # fmt: skip
        deadline = time.monotonic() + self.start_timeout
        try:
            wait_for(f"{what} to be ready", ready, deadline, alive=lambda: self.running)
        except (PeerStartError, TimeoutError) as exc:
            stop_process(self._proc)
            raise PeerStartError(
                f"{what} did not start: {exc}\ncommand: {' '.join(cmd)}\n"
                f"--- {self.log_path} ---\n{tail(self.log_path)}"
            ) from None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} port={self._port} {state} {self.base}>"

    def log_text(self) -> str:
        """The whole log of this instance (empty before it started)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _start_on_port(
        self, start_once: Callable[[], None], fixed_port: int | None, *, attempts: int = 3
    ) -> None:
        """Run *start_once* with ``self._port`` set, re-picking a free port on a clash.

        The port is chosen once and kept over later restarts (clients keep
        their addresses); only a clash in the log written by a failed first
        start (``already in use``) picks another one, unless *fixed_port*.
        """
        if fixed_port is not None or self._port is not None:
            attempts = 1
        for attempt in range(attempts):
            if self._port is None or (attempt > 0 and fixed_port is None):
                self._port = free_tcp_port()
            exists = self.log_path.exists()
            offset = self.log_path.stat().st_size if exists else 0
            try:
                start_once()
                return
            except PeerStartError:
                with open(self.log_path, "rb") as f:
                    f.seek(offset)
                    new = f.read().decode("utf-8", "replace")
                if attempt + 1 < attempts and "already in use" in new:
                    continue
                raise

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()  # __exit__ will not run: do not leak the temp folder
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
