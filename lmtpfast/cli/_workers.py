"""``lmtpfast proxy --workers N``: N proxy processes behind the same listeners.

One proxy process is one event loop on one core. With ``--workers N`` the
parent binds the listeners and forks N workers, each a whole proxy
(``proxy.serve_one``: its own agent, back-end pools, per-recipient log
lines, counters); back-end connections are per worker, so a back end sees up
to N times the pool's ``max_connections``.

* A **unix** listener is bound and listening before the fork: the workers
  share the one socket (and its backlog); the parent owns the path and
  removes it at the end.
* A **TCP** listener's port is held by a placeholder socket the parent binds
  with ``SO_REUSEPORT`` and never listens on (it fixes port 0 to a real
  port and keeps it while a worker restarts); each worker binds its own
  listening socket there with ``SO_REUSEPORT``, and the kernel spreads new
  connections over the workers.

The parent forwards SIGTERM/SIGINT (each worker stops gracefully: open
transactions finish within ``shutdown_timeout``), SIGHUP (each worker reloads
the file; one that cannot keeps its old configuration and says so) and
SIGUSR1 (each worker writes ``--stats-json FILE.<i>``; the parent then writes
their sum to ``FILE``, ``peak_*`` counters as the largest). ``--ready-file``
and systemd's ``READY=1`` come once every worker listens. A worker that dies
is started again (after a second if it lived less than one). Exit status:
that of a worker that could not start (78 configuration, 71 cannot listen),
else 0 when every worker stopped cleanly, else the first worker's non-zero
status (70 for a worker killed by a signal).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import signal
import socket
import stat
import sys
import time
import traceback
from typing import Any

from lmtpfast import ConfigurationError
from lmtpfast.server import load_proxy_config, parse_listen

from . import _exit
from ._systemd import Notifier

__all__ = ["SIGNALS", "merge_counters", "supervise"]

EX_OSERR = 71
#: What the parent handles (blocked, read with sigtimedwait) and forwards.
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)
# Beyond shutdown_timeout, what a worker gets to finish its graceful stop.
_STOP_SLACK = 15.0
_START_TIMEOUT = 120.0


def _say(message: str) -> None:
    print(f"lmtpfast proxy: {message}", file=sys.stderr, flush=True)


def merge_counters(into: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """Add one worker's counters to ``into``: numbers summed, ``peak_*`` the largest."""
    for key, value in more.items():
        if isinstance(value, dict):
            merge_counters(into.setdefault(key, {}), value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            old = into.get(key, 0)
            into[key] = max(old, value) if key.startswith("peak_") else old + value
        else:
            into.setdefault(key, value)
    return into


def _unix_listener(path: str, mode: int | None) -> socket.socket:
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)  # a stale socket of an earlier run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        if mode is not None:
            os.chmod(path, mode)
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _port_holder(host: str, port: int) -> tuple[socket.socket, int]:
    """A bound, never listening SO_REUSEPORT socket on (host, port): the real port."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock, int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # A worker whose parent is killed (SIGKILL) stops gracefully too.
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Supervisor:
    def __init__(self, args: argparse.Namespace, n: int, listen: list[str],
                 unix: dict[str, socket.socket], holders: list[socket.socket],
                 shutdown_timeout: float) -> None:
        self.args = args
        self.n = n
        self.listen = listen
        self.unix = unix
        self.holders = holders
        self.shutdown_timeout = shutdown_timeout
        self.pids: dict[int, int] = {}  # pid -> worker index
        self.started: dict[int, float] = {}  # worker index -> when it was (re)started
        self.respawn: dict[int, float] = {}  # worker index -> when to start it again
        self.ready_r, self.ready_w = os.pipe()
        os.set_blocking(self.ready_r, False)

    def stats_path(self, index: int) -> str | None:
        path = self.args.stats_json
        return f"{path}.{index}" if path else None

    def spawn(self, index: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            self.pids[pid] = index
            self.started[index] = time.monotonic()
            return
        status = _exit.EX_SOFTWARE
        try:
            # The signals stay blocked (as in the parent) until the worker's own
            # handlers are in place (proxy._serve unblocks them): a SIGTERM that
            # comes while it starts waits for them, then stops it gracefully.
            _die_with_parent()
            for sock in self.holders:
                sock.close()
            os.close(self.ready_r)
            os.environ.pop("NOTIFY_SOCKET", None)  # the parent speaks to systemd
            wargs = copy.copy(self.args)
            wargs.workers = 1
            wargs.ready_file = None
            wargs.stats_json = self.stats_path(index)
            from .proxy import serve_one

            ready_w = self.ready_w

            def listening() -> None:
                os.write(ready_w, b"R")

            status = serve_one(wargs, listen=self.listen, listen_sockets=self.unix,
                               reuse_port=True, on_ready=listening)
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)

    def signal_all(self, sig: int) -> None:
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def reap(self) -> list[tuple[int, int, int]]:
        """Workers that exited: (pid, index, exit status; negative: killed by that signal)."""
        out = []
        for pid in list(self.pids):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                out.append((pid, self.pids.pop(pid), os.waitstatus_to_exitcode(status)))
        return out

    def write_stats(self, *, wait: bool) -> None:
        path = self.args.stats_json
        if not path:
            return
        paths = [p for p in (self.stats_path(i) for i in range(self.n)) if p]
        if wait:
            before = {p: _mtime(p) for p in paths}
            self.signal_all(signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(
                    _mtime(p) == before[p] for p in paths if self._alive_for(p)):
                time.sleep(0.01)
        total: dict[str, Any] = {}
        for p in paths:
            with contextlib.suppress(OSError, ValueError), open(p, "rb") as f:
                merge_counters(total, json.loads(f.read()))
        total["workers"] = self.n
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps(total) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            _say(f"cannot write {path}: {exc}")

    def _alive_for(self, path: str) -> bool:
        index = int(path.rsplit(".", 1)[1])
        return index in self.pids.values()

    def run(self) -> int:
        notify = Notifier()
        for i in range(self.n):
            self.spawn(i)
        ready = 0  # workers that said they listen (restarted ones too)
        all_ready = False
        start_deadline = time.monotonic() + _START_TIMEOUT
        stopping = False
        stop_deadline = 0.0
        status = 0
        while self.pids or (not stopping and self.respawn):
            try:
                got = signal.sigtimedwait(SIGNALS, 0.2)
            except InterruptedError:
                got = None
            sig = got.si_signo if got is not None else None
            with contextlib.suppress(BlockingIOError):
                ready += len(os.read(self.ready_r, 4096))
            if ready >= self.n and not all_ready:
                all_ready = True  # every worker listens: say so once
                self.write_ready()
                notify.ready(f"proxying ({self.n} workers)")
            if sig in (signal.SIGTERM, signal.SIGINT) and not stopping:
                stopping = True
                stop_deadline = time.monotonic() + self.shutdown_timeout + _STOP_SLACK
                self.respawn.clear()
                notify.stopping("stopping")
                self.signal_all(signal.SIGTERM)
            elif sig == signal.SIGHUP and not stopping:
                notify.reloading()
                self.signal_all(signal.SIGHUP)
                notify.ready(f"proxying ({self.n} workers, reloaded)")
            elif sig == signal.SIGUSR1:
                self.write_stats(wait=True)
            for pid, index, code in self.reap():
                if stopping:
                    if code and not status:
                        status = code if code > 0 else _exit.EX_SOFTWARE
                    continue
                if not all_ready:
                    # A worker that cannot start (configuration, listen): nobody can.
                    _say(f"worker {index} (pid {pid}) exited with status {code} while "
                         "starting: stopping")
                    stopping = True
                    stop_deadline = time.monotonic() + _STOP_SLACK
                    status = code if code > 0 else _exit.EX_SOFTWARE
                    self.signal_all(signal.SIGTERM)
                    continue
                lived = time.monotonic() - self.started.get(index, 0.0)
                _say(f"worker {index} (pid {pid}) exited with status {code}: starting it again")
                self.respawn[index] = time.monotonic() + (1.0 if lived < 1.0 else 0.0)
            if not stopping:
                now = time.monotonic()
                for index, when in list(self.respawn.items()):
                    if when <= now:
                        del self.respawn[index]
                        self.spawn(index)
                if not all_ready and now > start_deadline:
                    _say(f"the workers did not all start within {_START_TIMEOUT:.0f} s")
                    stopping, status = True, _exit.EX_SOFTWARE
                    stop_deadline = now + _STOP_SLACK
                    self.signal_all(signal.SIGTERM)
            elif self.pids and time.monotonic() > stop_deadline:
                _say("workers still running after the shutdown deadline: killing them")
                self.signal_all(signal.SIGKILL)
                stop_deadline = time.monotonic() + 3600
        self.write_stats(wait=False)
        notify.close()
        return status

    def write_ready(self) -> None:
        path = self.args.ready_file
        if not path:
            return
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write("".join(d + "\n" for d in self.listen))
        os.replace(tmp, path)

    def close(self) -> None:
        for sock in self.holders:
            sock.close()
        for path, sock in self.unix.items():
            sock.close()
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.unlink(path)
        os.close(self.ready_r)
        os.close(self.ready_w)


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def supervise(args: argparse.Namespace) -> int:
    """Bind the listeners, fork ``args.workers`` proxies, supervise them; the exit status."""
    try:
        settings, _config = load_proxy_config(args.config)
    except ConfigurationError as exc:
        _say(str(exc))
        return _exit.EX_CONFIG
    dests = list(args.listen or settings.listen or ["127.0.0.1:2424"])
    listen: list[str] = []
    unix: dict[str, socket.socket] = {}
    holders: list[socket.socket] = []
    try:
        for dest in dests:
            kind, where, port = parse_listen(dest)
            if kind == "unix":
                unix[where] = _unix_listener(where, settings.unix_mode)
                listen.append(f"unix:{where}")
            else:
                sock, real = _port_holder(where, port)
                holders.append(sock)
                listen.append(f"[{where}]:{real}" if ":" in where else f"{where}:{real}")
    except ConfigurationError as exc:
        _say(str(exc))
        code = _exit.EX_CONFIG
    except OSError as exc:
        _say(f"cannot listen: {exc}")
        code = EX_OSERR
    else:
        code = -1
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    sup = _Supervisor(args, args.workers, listen, unix, holders,
                      float(settings.shutdown_timeout or 30))
    try:
        if code >= 0:
            return code
        return sup.run()
    finally:
        sup.close()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
