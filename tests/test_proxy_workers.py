"""``lmtpfast proxy --workers N``: several proxy processes behind the same listeners.

Real processes and real back ends (``smtp-sink -L``): TCP listeners shared
with SO_REUSEPORT and a unix listener bound once before the fork, counters
summed over the workers, SIGHUP reaching every worker, a worker that dies
started again, SIGTERM stopping all of them with exit status 0, and a
configuration that cannot start refused with the one-process status.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lmtpfast import connect
from lmtpfast._testing._procs import wait_for
from lmtpfast._testing.lmtpproxy import TempProxy
from lmtpfast.cli._workers import merge_counters

MSG = b"From: s@example.org\r\nSubject: workers\r\n\r\nOne of several processes.\r\n"


async def _send(dest: str, connections: int, rcpts: list[str]) -> list[str]:
    """``connections`` sessions one after another, one message each: every reply text."""
    replies = []
    for _ in range(connections):
        client = await connect(dest)
        try:
            results = await client.send("s@example.org", rcpts, MSG)
        finally:
            await client.quit()
        assert all(r.delivered for r in results), results
        replies += [r.text for r in results]
    return replies


def _reloads(proxy: TempProxy) -> int:
    return proxy.log_text().count("configuration reloaded")


def test_workers_share_tcp_and_unix_listeners(smtp_sink: Any, lmtp_proxy: Any,
                                              tmp_path: Path) -> None:
    sink = smtp_sink(tcp=True)
    sock = str(tmp_path / "proxy.sock")
    proxy = lmtp_proxy(f'default = "lmtp:{sink.destination}"\n',
                       listen=("127.0.0.1:0", f"unix:{sock}"), extra_args=["--workers", "2"])
    tcp, unix = proxy.destinations
    assert unix == f"unix:{sock}" and not tcp.endswith(":0")
    workers = proxy.worker_pids()
    assert len(workers) == 2
    rcpts = ["a@example.com", "b@example.com"]
    asyncio.run(_send(tcp, 24, rcpts))
    asyncio.run(_send(unix, 6, rcpts))
    stats = proxy.stats()
    assert stats["workers"] == 2
    assert stats["proxy"]["messages"] == 30 and stats["proxy"]["delivered"] == 60
    assert stats["server"]["connections_total"] == 30
    # Each worker has its own back-end pool, and SO_REUSEPORT gave each some connections.
    per = [json.loads(Path(f"{proxy.stats_path}.{i}").read_text()) for i in range(2)]
    assert all(w["server"]["connections_total"] > 0 for w in per), per
    assert sum(w["backends"]["connections_opened"] for w in per) == \
        stats["backends"]["connections_opened"]
    wait_for("the recipient log lines", lambda: len(proxy.recipient_lines()) >= 60,
             time.monotonic() + 10, alive=lambda: proxy.running)
    assert sum("status=sent" in ln for ln in proxy.recipient_lines()) == 60
    assert proxy.stop() == 0
    assert proxy.worker_pids() == [] and not os.path.exists(sock)


def test_workers_reload_restart_and_stop(smtp_sink: Any, lmtp_proxy: Any) -> None:
    first, second = smtp_sink(tcp=True), smtp_sink(tcp=True)
    proxy = lmtp_proxy(f'default = "lmtp:{first.destination}"\n',
                       extra_args=["--workers", "2"])
    dest = proxy.destination
    asyncio.run(_send(dest, 4, ["a@example.com"]))
    # SIGHUP reaches every worker: each reads the file again.
    before = _reloads(proxy)
    proxy.config_path.write_text(f'default = "lmtp:{second.destination}"\n')
    os.kill(proxy.pid, signal.SIGHUP)
    wait_for("both workers to reload", lambda: _reloads(proxy) >= before + 2,
             time.monotonic() + 30, alive=lambda: proxy.running)
    asyncio.run(_send(dest, 8, ["a@example.com"]))

    def relayed(dest: str) -> int:
        return sum(f"relay={dest}" in ln for ln in proxy.recipient_lines())

    # Each worker writes its own lines (buffered for up to 0.25 s).
    wait_for("the log lines", lambda: relayed(first.destination) + relayed(
        second.destination) >= 12, time.monotonic() + 10, alive=lambda: proxy.running)
    assert (relayed(first.destination), relayed(second.destination)) == (4, 8)
    # A worker that dies is started again; the proxy keeps serving meanwhile.
    victim = proxy.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for("a new worker", lambda: len(proxy.worker_pids()) == 2
             and victim not in proxy.worker_pids(), time.monotonic() + 30,
             alive=lambda: proxy.running)
    asyncio.run(_send(dest, 6, ["a@example.com"]))
    assert "exited with status -9: starting it again" in proxy.log_text()
    # SIGTERM while a new worker is still starting: it stops cleanly too.
    victim = proxy.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for("a new worker", lambda: len(proxy.worker_pids()) == 2
             and victim not in proxy.worker_pids(), time.monotonic() + 30,
             alive=lambda: proxy.running)
    assert proxy.stop() == 0, proxy.log_text()[-2000:]
    assert proxy.worker_pids() == []


def test_workers_refuse_what_one_process_refuses(tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text('default = "lmtp:127.0.0.1:24998"\n[proxy]\nlisten = ["127.0.0.1:24998"]\n')
    cmd = [sys.executable, "-m", "lmtpfast", "proxy", "--config", str(cfg)]
    run = subprocess.run([*cmd, "--workers", "2"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 78 and "loop" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    run = subprocess.run([*cmd, "--workers", "0"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 64 and "--workers" in run.stderr
    run = subprocess.run([*cmd, "--workers", "2", "--metrics-listen", "127.0.0.1:0"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 64 and "--metrics-listen" in run.stderr


def test_merge_counters() -> None:
    total: dict[str, Any] = {}
    merge_counters(total, {"a": 1, "peak_b": 3, "c": {"250": 2}, "name": "x"})
    merge_counters(total, {"a": 2, "peak_b": 2, "c": {"250": 1, "451": 1}, "name": "y"})
    assert total == {"a": 3, "peak_b": 3, "c": {"250": 3, "451": 1}, "name": "x"}
