"""``lmtpfast proxy`` run as a real process for tests and benchmarks: :class:`TempProxy`.

The proxy is started from its own TOML file in a temp folder, exactly as an
operator runs it (``python -m lmtpfast proxy --config FILE``), with
``--ready-file`` for readiness, ``--log-file`` for the per-recipient lines and
``--stats-json`` for the counters. It inherits ``PYTHONPATH``, so it runs the
checkout under test. Signals are the operator's: :meth:`reload` (SIGHUP),
:meth:`stats` (SIGUSR1, then the JSON file), :meth:`stop` (SIGTERM: graceful).

Also :func:`dovecot_proxy_config`: the extra configuration that turns a
:class:`~lmtpfast._testing.dovecot.TempDovecot` into Dovecot's own LMTP proxy
(``lmtp_proxy = yes``, a passdb that answers ``proxy=y host=... port=...``
per user), the peer the benchmark compares against.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from ._procs import PeerStartError, TempPeer, guarded, session_pids, stop_process, wait_for

__all__ = ["TempProxy", "dovecot_proxy_config"]


class TempProxy(TempPeer):
    """``lmtpfast proxy`` with *config* (the TOML text) listening on *listen*.

    *listen* defaults to ``127.0.0.1:0`` (a free port; :attr:`destinations`
    has the real one once started). *extra_args* go to the command line
    (``--engine python``, ``--quiet``); *files* are written next to the config
    (map files it names by relative path).
    """

    def __init__(
        self,
        config: str,
        *,
        listen: Sequence[str] = ("127.0.0.1:0",),
        extra_args: Sequence[str] = (),
        start_timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
        files: Mapping[str, str] | None = None,
    ) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="lmtpfast-proxy-", dir="/var/tmp"))
        self.base.chmod(0o755)
        self.config_path = self.base / "proxy.toml"
        self.config_path.write_text(config)
        for name, text in (files or {}).items():  # map files, relative to the config
            (self.base / name).write_text(text)
        self.log_path = self.base / "proxy.log"  # stdout/stderr: start-up, warnings
        self.recipient_log = self.base / "recipients.log"
        self.ready_path = self.base / "ready"
        self.stats_path = self.base / "stats.json"
        self.listen = tuple(listen)
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        self.env = dict(env) if env is not None else None
        self.destinations: list[str] = []
        self.returncode: int | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "lmtpfast", "proxy", "--config", str(self.config_path),
               "--ready-file", str(self.ready_path), "--stats-json", str(self.stats_path),
               "--log-file", str(self.recipient_log), *self.extra_args]
        for dest in self.listen:
            cmd += ["--listen", dest]
        return guarded(cmd)[0]

    def start(self) -> Self:
        """Start the proxy and wait until it listens (its ready file appears)."""
        if self.running:
            return self
        self.ready_path.unlink(missing_ok=True)
        env = dict(os.environ) if self.env is None else {**os.environ, **self.env}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                cwd=self.base, start_new_session=True, close_fds=True, env=env)
        deadline = time.monotonic() + self.start_timeout
        try:
            wait_for("the proxy to listen", self.ready_path.exists, deadline,
                     alive=lambda: self.running)
        except (PeerStartError, TimeoutError) as exc:
            self.kill()
            raise PeerStartError(f"lmtpfast proxy did not start: {exc}\n"
                                 f"--- {self.log_path} ---\n{self.log_text()}") from None
        self.destinations = self.ready_path.read_text().split()
        return self

    @property
    def destination(self) -> str:
        """The first listen destination (``127.0.0.1:PORT`` or ``unix:/path``)."""
        return self.destinations[0]

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("not started")
        return self._proc.pid

    def reload(self, config: str | None = None) -> None:
        """Write *config* (if given) and send SIGHUP; wait for the proxy to say it reloaded."""
        if config is not None:
            self.config_path.write_text(config)
        before = self.log_text().count("configuration reloaded") + self.log_text().count(
            "reload refused")
        os.kill(self.pid, signal.SIGHUP)

        def done() -> bool:
            text = self.log_text()
            return text.count("configuration reloaded") + text.count("reload refused") > before

        wait_for("the proxy to reload", done, time.monotonic() + 30, alive=lambda: self.running)

    def stats(self) -> dict[str, Any]:
        """The counters now (SIGUSR1 makes the proxy write them)."""
        old = self.stats_path.stat().st_mtime_ns if self.stats_path.exists() else 0
        os.kill(self.pid, signal.SIGUSR1)
        wait_for("the proxy's counters",
                 lambda: self.stats_path.exists() and self.stats_path.stat().st_mtime_ns != old,
                 time.monotonic() + 30, alive=lambda: self.running)
        data: dict[str, Any] = json.loads(self.stats_path.read_text())
        return data

    def cpu_seconds(self) -> float:
        """User + system CPU time the proxy used so far (its workers' too, ``--workers``:
        live ones and those reaped)."""
        total = 0
        for pid in session_pids(self.pid):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += sum(int(x) for x in fields[11:15 if pid == self.pid else 13])
        return total / os.sysconf("SC_CLK_TCK")

    def worker_pids(self) -> list[int]:
        """The worker processes of ``--workers N`` (the proxy's live children)."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def peak_rss(self) -> int:
        """The proxy's peak resident set size in bytes (VmHWM)."""
        return _status_kib(self.pid, "VmHWM") * 1024

    def rss(self) -> dict[str, int]:
        """Resident memory now, in bytes: total, anonymous and file-backed."""
        return {k: _status_kib(self.pid, f) * 1024 for k, f in
                (("rss", "VmRSS"), ("anon", "RssAnon"), ("file", "RssFile"))}

    def stop(self, *, timeout: float = 60.0) -> int:
        """SIGTERM (graceful shutdown) and wait for the exit status."""
        if self._proc is None:
            return 0
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                stop_process(self._proc)
        self.returncode = self._proc.returncode
        return self.returncode

    def kill(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)

    def close(self) -> None:
        self.kill()
        import shutil

        shutil.rmtree(self.base, ignore_errors=True)

    def recipient_lines(self) -> list[str]:
        """The per-recipient log lines written so far."""
        try:
            return self.recipient_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def dovecot_proxy_config(routes: Mapping[str, str], passdb_path: str | os.PathLike[str],
                         *, extra: Iterable[str] = ()) -> str:
    """Extra config for a TempDovecot that proxies LMTP per user (Dovecot's ``lmtp_proxy``).

    *routes* maps a user (local part, as ``auth_username_format = %Ln``
    makes it) to ``host:port``; the passdb answers ``proxy=y host= port=``
    for it, ``nopassword`` (LMTP has no password). Writes *passdb_path*.
    """
    lines = []
    for user, dest in routes.items():
        host, _, port = dest.rpartition(":")
        # user:password:uid:gid:gecos:home:shell:extra fields
        lines.append(f"{user}:::::::proxy=y host={host} port={port} nopassword=y\n")
    Path(passdb_path).write_text("".join(lines))
    os.chmod(passdb_path, 0o644)
    return "\n".join([
        "lmtp_proxy = yes",
        "passdb {",
        "  driver = passwd-file",
        f"  args = {passdb_path}",
        "}",
        *extra,
    ]) + "\n"
