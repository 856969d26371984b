"""``lmtpfast run``, the daemon: sd_notify, inotify wake-ups, SIGHUP reload, graceful stop,
the delivery log checked against what real servers answered, metrics vs the JSON summary.

Every wait is on an event (a notify datagram, a delivered file, a log line)
with a bound; nothing sleeps to synchronise and no assertion is about time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmtpfast._testing.dovecot import TempDovecot
from lmtpfast._testing.postfix import SmtpSink
from lmtpfast.spool import Reason, Spool, new_envelope
from lmtpfast.spool._dirstore import DirQueue
from lmtpfast.spool._queue import NewMessage

ROOT = Path(__file__).resolve().parent.parent
# Postfix's delivery line, as log tools parse it.
LINE = re.compile(r"^\S+ \S+ lmtpfast/run\[\d+\]: (?P<id>\S+): to=<(?P<to>[^>]*)>, "
                  r"relay=(?P<relay>[^,]+), delay=(?P<delay>[\d.]+), "
                  r"delays=(?P<delays>[\d.]+/[\d.]+/[\d.]+/[\d.]+), dsn=(?P<dsn>\d\.\d+\.\d+), "
                  r"status=(?P<status>sent|deferred|bounced) \((?P<reply>.*)\)$")


def message(tag: str) -> bytes:
    return (f"From: s@example.org\r\nSubject: {tag}\r\nMessage-ID: <{tag}@daemon.test>\r\n\r\n"
            "hello\r\n").encode()


def env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), **extra)


def wait_for(what: str, cond: Callable[[], Any], proc: subprocess.Popen[bytes],
             timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        if proc.poll() is not None:
            raise AssertionError(f"lmtpfast run ended ({proc.returncode}) while waiting for "
                                 f"{what}: {proc.stderr.read().decode() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return got


class NotifyListener:
    """A NOTIFY_SOCKET of our own: what systemd would receive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(60)
        self.seen: list[str] = []

    def expect(self, key: str) -> dict[str, str]:
        """The next datagram carrying *key* (e.g. ``READY=1``), as a dict."""
        while True:
            data = self.sock.recv(4096).decode()
            self.seen.append(data)
            if key in data.split("\n"):
                return dict(line.split("=", 1) for line in data.split("\n") if "=" in line)

    def close(self) -> None:
        self.sock.close()


def enqueue(spool: Path, tag: str, *rcpts: str) -> None:
    Spool(spool, create=True).enqueue(message(tag), "s@example.org", list(rcpts))


def start(spool: Path, cfg: Path, *args: str, notify: Path | None = None
          ) -> subprocess.Popen[bytes]:
    extra = {"NOTIFY_SOCKET": str(notify)} if notify else {}
    return subprocess.Popen(
        [sys.executable, "-m", "lmtpfast", "run", str(spool), "--config", str(cfg), *args],
        env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err.decode(), err.decode()
    return proc.returncode, err.decode()


def sink_tags(sink: SmtpSink) -> list[str]:
    out = []
    for dump in sink.captures():
        m = re.search(rb"Message-ID: <([^@>]+)@", dump)
        if m is not None:  # else smtp-sink is still writing this dump
            out.append(m.group(1).decode())
    return out


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_daemon_notify_wake_reload_metrics_and_stop(smtp_sink: Any, tmp_path: Path) -> None:
    s1: SmtpSink = smtp_sink(capture=True)
    s2: SmtpSink = smtp_sink(capture=True)
    spool = tmp_path / "spool"
    Spool(spool, create=True)
    cfg = tmp_path / "lmtpfast.toml"

    def route_to(sink: SmtpSink) -> None:
        tmp = cfg.with_suffix(".new")
        tmp.write_text('[transport_map]\n"x.test" = "lmtp:"\n'
                       f'[transports.lmtp]\ndestination = "{sink.destination}"\n')
        tmp.replace(cfg)

    route_to(s1)
    listener = NotifyListener(tmp_path / "notify")
    log = tmp_path / "maillog"
    report = tmp_path / "report.json"
    # --interval 1h: only a notification can make it deliver within the test's bounds.
    proc = start(spool, cfg, "--interval", "1h", "--metrics-listen", "127.0.0.1:0",
                 "--log-target", str(log), "--report", str(report), notify=listener.path)
    try:
        ready = listener.expect("READY=1")
        assert ready["MAINPID"] == str(proc.pid)
        started = wait_for("the start line", lambda: re.search(
            r"metrics at (http://\S+)", log.read_text() if log.exists() else ""), proc)
        url = started.group(1)

        enqueue(spool, "m1", "a@x.test")
        wait_for("m1 in sink 1", lambda: sink_tags(s1) == ["m1"], proc)

        route_to(s2)  # a changed transport map, then SIGHUP
        proc.send_signal(signal.SIGHUP)
        listener.expect("RELOADING=1")
        assert listener.expect("READY=1")["STATUS"] == "delivering (reloaded)"
        enqueue(spool, "m2", "b@x.test")
        enqueue(spool, "m3", "c@x.test", "d@x.test")
        wait_for("m2, m3 in sink 2", lambda: sorted(sink_tags(s2)) == ["m2", "m3"], proc)

        cfg.write_text("this is = not [toml\n")  # a broken file: kept running as it was
        proc.send_signal(signal.SIGHUP)
        assert listener.expect("READY=1")["STATUS"] == "delivering (reload failed)"
        enqueue(spool, "m4", "e@x.test")
        wait_for("m4 in sink 2", lambda: "m4" in sink_tags(s2), proc)
        assert sink_tags(s1) == ["m1"]

        # A deferred entry (not due) stays queued: the stop exits 75 then.
        async def defer() -> None:
            async with DirQueue(spool) as q:
                e = new_envelope("s@example.org", ["later@x.test"])
                e.attempts, e.next_attempt = 1, time.time() + 3600
                e.recipients[0].last = Reason(451, "4.3.0", "try later", "final")
                await q.enqueue_many([NewMessage(e, message("m5"))])
        import asyncio

        asyncio.run(defer())
        samples = scrape(url)
    finally:
        status, err = stop(proc)
    listener.expect("STOPPING=1")
    listener.close()
    assert status == 75, err

    def sample(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)
    def sent(dest: str) -> float:  # whatever 2.X.X smtp-sink says
        return sum(v for (name, labels), v in samples.items()
                   if name == "lmtpfast_deliveries_total"
                   and dict(labels)["destination"] == dest and dict(labels)["status"] == "sent"
                   and dict(labels)["dsn"].startswith("2"))
    d1, d2 = s1.destination, s2.destination
    assert sent(d1) == 1
    assert sent(d2) == 4
    assert sample("lmtpfast_reloads_total", result="ok") == 1
    assert sample("lmtpfast_reloads_total", result="failed") == 1
    assert sample("lmtpfast_stage_seconds_count", destination=d2, stage="delivery") == 3
    # Per protocol stage, from the session and protocol layers: one of each
    # per transaction (smtp-sink has no CHUNKING: DATA), set-up per connection.
    for stage in ("mail", "rcpt", "data", "dot"):
        assert sample("lmtpfast_stage_seconds_count", destination=d2, stage=stage) == 3, stage
    opened = sample("lmtpfast_pool_connections_opened_total", destination=d2)
    for stage in ("connect", "greeting", "lhlo"):
        assert sample("lmtpfast_stage_seconds_count", destination=d2, stage=stage) == opened
    assert sample("lmtpfast_pool_transactions_total", destination=d2) >= 3

    # The JSON summary carries the same counters under the same names.
    rep = json.loads(report.read_text())
    assert rep["exit_status"] == 75
    metrics = rep["summary"]["metrics"]
    for d in metrics["deliveries"]:
        assert sample("lmtpfast_deliveries_total", destination=d["destination"],
                      status=d["status"], dsn=d["dsn"]) == d["value"]
    for dest, n in metrics["bytes_sent"].items():
        assert sample("lmtpfast_bytes_sent_total", destination=dest) == n
    for lat in metrics["latency"]:
        labels = {"destination": lat["destination"], "stage": lat["stage"]}
        assert sample("lmtpfast_stage_seconds_count", **labels) == lat["count"]
        for le, n in lat["buckets"].items():
            assert sample("lmtpfast_stage_seconds_bucket", le=le, **labels) == n
    assert {k: v for k, v in metrics["reloads"].items()} == {"ok": 1, "failed": 1}
    assert len(rep["outcomes"]) == 5

    # One Postfix-shaped line per recipient, relay = where it went.
    lines = [m for x in log.read_text().splitlines() if (m := LINE.match(x))]
    assert sorted((m["to"], m["relay"], m["status"], m["dsn"][0]) for m in lines) == sorted(
        [("a@x.test", d1, "sent", "2")]
        + [(r, d2, "sent", "2") for r in ("b@x.test", "c@x.test", "d@x.test", "e@x.test")])
    text = log.read_text()
    assert "reloaded" in text and "keeping the running configuration" in text


def test_log_lines_carry_the_servers_replies(dovecot: TempDovecot, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    cfg = tmp_path / "lmtpfast.toml"
    cfg.write_text(f'default = "lmtp:{dovecot.destination_unix}"\n')
    enqueue(spool, "d1", "alice@d.test", "nosuchuser@d.test")
    log, jlog = tmp_path / "maillog", tmp_path / "maillog.json"
    def logged(path: Path, marker: str, n: int) -> bool:
        return path.exists() and path.read_text().count(marker) >= n

    for fmt, target, marker, n in (("postfix", log, " to=<", 2), ("json", jlog, '"to":', 1)):
        if fmt == "json":
            enqueue(spool, "d2", "bob@d.test")
        proc = start(spool, cfg, "--log-target", str(target), "--log-format", fmt)
        wait_for("the deliveries", lambda t=target, m=marker, k=n: logged(t, m, k), proc)
        status, err = stop(proc)
        assert status == 0, err

    lines = {m["to"]: m for x in log.read_text().splitlines() if (m := LINE.match(x))}
    ok, bad = lines["alice@d.test"], lines["nosuchuser@d.test"]
    assert (ok["status"], ok["dsn"], ok["relay"]) == ("sent", "2.0.0",
                                                      dovecot.destination_unix)
    # Dovecot's own reply, tied to the stored copy by its session id.
    m = re.fullmatch(r"250 2\.0\.0 <alice@d\.test> (\S+) Saved", ok["reply"])
    assert m is not None, ok["reply"]
    (stored,) = dovecot.messages("alice")
    assert f"id {m.group(1)}".encode() in stored
    assert (bad["status"], bad["dsn"]) == ("bounced", "5.1.1")
    assert bad["reply"] == ("550 5.1.1 <nosuchuser@d.test> User doesn't exist: "
                            "nosuchuser@d.test")
    assert ok["id"] == bad["id"]

    rows = [json.loads(x) for x in jlog.read_text().splitlines()]
    (row,) = [r for r in rows if r.get("to") == "bob@d.test"]
    assert row["status"] == "sent" and row["dsn"] == "2.0.0"
    assert row["relay"] == dovecot.destination_unix
    assert re.fullmatch(r"250 2\.0\.0 <bob@d\.test> \S+ Saved", row["reply"])
    assert len(row["delays"]) == 4 and row["delay"] >= 0 and row["program"] == "lmtpfast/run"


def test_run_refuses_a_bad_configuration_before_starting(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[transports.x]\nnope = 1\n")
    p = subprocess.run([sys.executable, "-m", "lmtpfast", "run", str(tmp_path / "s"),
                        "--config", str(cfg)], env=env(), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode in (66, 78), p.stderr
    Spool(tmp_path / "s", create=True)
    p = subprocess.run([sys.executable, "-m", "lmtpfast", "run", str(tmp_path / "s"),
                        "--config", str(cfg)], env=env(), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 78 and "Traceback" not in p.stderr, p.stderr


@pytest.mark.parametrize("fmt", ["postfix", "json"])
def test_nothing_secret_and_no_forged_lines(fmt: str) -> None:
    from lmtpfast.cli._log import open_log

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"lmtpfast-log-{os.getpid()}-{fmt}"
    try:
        log = open_log({"log_target": str(path), "log_format": fmt}, "lmtpfast/run")
        log.delivery("ID1", "a@b.test", "deferred", code=451, enhanced="4.3.0",
                     text="boom\r\nID2: to=<x@y>, status=sent (250 forged)", relay="unix:/x",
                     delay=1.0)
        log.close()
        text = path.read_text()
    finally:
        path.unlink(missing_ok=True)
    assert len(text.splitlines()) == 1
    if fmt == "json":
        assert json.loads(text)["reply"].startswith("451 4.3.0 boom\r\nID2:")
    else:
        assert "boom\\x0d\\x0aID2: to=<x@y>" in text


def test_dead_destination_in_the_log_and_the_metrics(smtp_sink: Any, tmp_path: Path) -> None:
    """A back end stopped: marked dead, its mail deferred (never bounced), probed, revived."""
    sink: SmtpSink = smtp_sink(capture=True)
    sink.stop()
    spool = tmp_path / "spool"
    cfg = tmp_path / "lmtpfast.toml"
    cfg.write_text('default = "lmtp:"\n[transports.lmtp]\n'
                   f'destination = "{sink.destination}"\npool = {{ connect_backoff = 0 }}\n'
                   'shaping = { dead_after = 2, dead_time = 0.3 }\n')
    for i in range(4):
        enqueue(spool, f"x{i}", f"u{i}@x.test")
    log = tmp_path / "maillog"
    proc = start(spool, cfg, "--concurrency", "1", "--min-backoff", "0.2", "--interval", "0.2",
                 "--metrics-listen", "127.0.0.1:0", "--log-target", str(log))

    def text() -> str:
        return log.read_text() if log.exists() else ""
    try:
        url = wait_for("the start line", lambda: re.search(r"metrics at (http://\S+)", text()),
                       proc).group(1)
        wait_for("marked dead", lambda: "marked dead" in text(), proc)
        wait_for("a deferral without connecting",
                 lambda: re.search(r"status=deferred \(451 4\.4\.1 delivery temporarily "
                                   r"suspended: .* marked dead after 2", text()), proc)
        sink.start()
        wait_for("every message delivered",
                 lambda: sorted(sink_tags(sink)) == [f"x{i}" for i in range(4)], proc)
        wait_for("revived", lambda: "revived" in text(), proc)
        samples = scrape(url)
    finally:
        status, err = stop(proc)
    assert status == 0, err
    dest = sink.destination

    def events(event: str) -> float:
        return samples.get(("lmtpfast_shaping_events_total",
                            (("destination", dest), ("event", event))), 0.0)
    assert events("marked_dead") >= 1 and events("deferred_dead") >= 1
    assert events("probe") >= 1 and events("revived") == 1
    lines = [m for x in text().splitlines() if (m := LINE.match(x))]
    assert {m["status"] for m in lines} == {"deferred", "sent"}  # nothing bounced
    assert sorted(m["to"] for m in lines if m["status"] == "sent") == [
        f"u{i}@x.test" for i in range(4)]
    assert re.search(r"warning: destination \S+: marked dead \(window unlimited\): 2 failed "
                     r"session set-ups in a row", text())
