"""Operating lmtpfast as a service (issue 16): the queue commands while a replay runs.

A ``lmtpfast replay --watch`` delivers into Dovecot and ``smtp-sink -L``
(routed by domain) while the operator holds, releases, retries, deletes,
bounces and requeues entries with ``lmtpfast queue``. Whatever the timing,
nothing is lost, nothing is delivered twice, and held entries are untouched.
Waits are on conditions (bounded), never on time.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lmtpfast._testing.dovecot import TempDovecot
from lmtpfast._testing.postfix import SmtpSink, split_capture
from lmtpfast.spool import Reason, new_envelope
from lmtpfast.spool._dirstore import DirQueue
from lmtpfast.spool._queue import NewMessage, Queue
from lmtpfast.spool._sqlite import SQLiteQueue

ROOT = Path(__file__).resolve().parent.parent
MSGID = re.compile(rb"^Message-ID: <([^>]+)>", re.M | re.I)


def message(tag: str) -> bytes:
    return (f"From: s@example.org\r\nSubject: {tag}\r\nMessage-ID: <{tag}@ops.test>\r\n\r\n"
            "hello\r\n").encode()


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def lmtpfast(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "lmtpfast", *args], env=env(), input=stdin,
                       capture_output=True, text=True, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, p.stdout, p.stderr


def wait_for(what: str, cond: Callable[[], bool], *, timeout: float = 60,
             alive: Callable[[], bool] | None = None) -> None:
    """Until *cond* holds (bounded): polls a condition, never sleeps as synchronisation."""
    deadline = time.monotonic() + timeout
    while not cond():
        if alive is not None and not alive():
            raise AssertionError(f"gave up waiting for {what}: the replay ended")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Deliveries:
    """Every (message tag, recipient) delivered, from Dovecot's maildirs and the sink's dumps."""

    def __init__(self, dovecot: TempDovecot, sink: SmtpSink) -> None:
        self.dovecot, self.sink = dovecot, sink

    def count(self) -> Counter[tuple[str, str]]:
        got: Counter[tuple[str, str]] = Counter()
        for user in ("alice", "bob"):
            for data in self.dovecot.messages(user):
                m = MSGID.search(data)
                assert m is not None
                got[(m.group(1).decode().split("@")[0], user)] += 1
        for dump in self.sink.captures():
            # smtp-sink writes a dump as the transaction goes: one still in
            # flight has no header or no Message-ID yet (counted once complete).
            try:
                meta, data = split_capture(dump)
            except ValueError:
                continue
            m = MSGID.search(data)
            if m is None:
                continue
            tag = m.group(1).decode().split("@")[0]
            for rcpt in meta.get("X-Rcpt-Args", []):
                got[(tag, rcpt.strip("<>").split(">")[0].split("@")[0])] += 1
        return got


def config(tmp: Path, dovecot: TempDovecot, sink: SmtpSink) -> Path:
    cfg = tmp / "lmtpfast.toml"
    cfg.write_text(f'default = "lmtp:{dovecot.destination_unix}"\n'
                   '[transport_map]\n"sink.test" = "sink:"\n'
                   f'[transports.sink]\ndestination = "{sink.destination}"\n')
    return cfg


@pytest.mark.parametrize("layout", ["store", "dir"])
def test_queue_actions_while_a_replay_delivers(dovecot: TempDovecot, smtp_sink: Any,
                                               tmp_path: Path, layout: str) -> None:
    sink: SmtpSink = smtp_sink(capture=True)
    spool = tmp_path / "spool"
    later = time.time() + 3600
    tags: dict[str, str] = {}

    async def fill() -> None:
        q: Queue = (SQLiteQueue(spool, create=True) if layout == "store"
                    else DirQueue(spool, create=True))
        async with q:
            news = []
            # 40 due now (alice + a sink recipient), 20 deferred for an hour (bob + sink).
            for i in range(40):
                news.append((f"a{i}", new_envelope("s@example.org",
                                                   ["alice@dove.test", f"a{i}@sink.test"])))
            for i in range(20):
                e = new_envelope("s@example.org", ["bob@dove.test", f"f{i}@sink.test"])
                e.attempts, e.next_attempt = 1, later
                for r in e.recipients:
                    r.attempts, r.last = 1, Reason(451, "4.3.0", "try later", "final")
                news.append((f"f{i}", e))
            ids = await q.enqueue_many([NewMessage(e, message(t)) for t, e in news])
            tags.update({t: id for (t, _), id in zip(news, ids, strict=True)})

    asyncio.run(fill())
    by_id = {v: k for k, v in tags.items()}
    f = [tags[f"f{i}"] for i in range(20)]
    hold, retry, delete, bounce = f[0:5], f[5:10], f[10:15], f[15:20]
    cfg = config(tmp_path, dovecot, sink)
    deliveries = Deliveries(dovecot, sink)
    log = tmp_path / "ops.log"
    logopt = ["--log-target", str(log)]

    replay = subprocess.Popen(
        [sys.executable, "-m", "lmtpfast", "replay",
         str(spool) if layout == "store" else f"dir:{spool}", "--config", str(cfg),
         "--watch", "--interval", "0.1", "--concurrency", "4", "-q"],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        alive: Callable[[], bool] = lambda: replay.poll() is None  # noqa: E731
        # Racing the replay: hold whatever of the due ones is still queued.
        status, out, _ = lmtpfast("queue", "hold", str(spool), "--recipient", "a*@sink.test",
                                  "--younger", "1h", "--json", *logopt)
        assert status in (0, 75), out
        raced = [json.loads(x) for x in out.splitlines()]
        raced_held = {r["id"] for r in raced if r["result"] == "placed on hold"}
        # The deferred ones are not due: each action is certain to apply to them.
        for action, ids in (("hold", hold), ("delete", delete), ("bounce", bounce),
                            ("retry", retry)):
            extra = ["--bounce-dir", str(tmp_path / "bounces")] if action == "bounce" else []
            status, out, err = lmtpfast("queue", action, str(spool), *ids, *extra, *logopt)
            assert status == 0, (action, out, err)
        assert not raced_held & set(f)
        held_now = set(hold) | raced_held

        expected_now = {(f"a{i}", u) for i in range(40) for u in ("alice", f"a{i}")
                        if tags[f"a{i}"] not in raced_held}
        expected_now |= {(by_id[i], u) for i in retry for u in ("bob", by_id[i])}
        wait_for("the due and retried entries", lambda: expected_now <= set(
            deliveries.count()), alive=alive)
        # Held entries are untouched while held: in hold, never delivered.
        status, out, _ = lmtpfast("queue", "list", str(spool), "--json", "--state", "held")
        assert {json.loads(x)["queue_id"] for x in out.splitlines()} == held_now
        got = deliveries.count()
        assert not {k for k in got if tags.get(k[0]) in held_now}
        # Deleted and bounced ones were never delivered; bounces were written.
        assert not {k for k in got if tags.get(k[0]) in set(delete) | set(bounce)}
        assert sorted(os.listdir(tmp_path / "bounces")) == sorted(f"{i}.eml" for i in bounce)

        # Release the held ones, requeue the bounced ones: all delivered, once.
        status, _, err = lmtpfast("queue", "release", str(spool), "--all", *logopt)
        assert status == 0, err
        status, _, err = lmtpfast("queue", "requeue", str(spool), *bounce, *logopt)
        assert status == 0, err
        everything = {(t, u) for t, id in tags.items() if id not in delete
                      for u in (("alice" if t[0] == "a" else "bob"), t)}
        wait_for("everything but the deleted ones", lambda: everything <= set(
            deliveries.count()), alive=alive)
        wait_for("an empty queue", lambda: lmtpfast("queue", "list", str(spool), "--json",
                                                    "--state", "all")[1] == "", alive=alive)
    finally:
        replay.send_signal(signal.SIGTERM)
        _, err = replay.communicate(timeout=60)
    assert "Traceback" not in err.decode(), err.decode()
    assert replay.returncode == 0, err.decode()
    got = deliveries.count()
    assert set(got) == everything
    assert max(got.values()) == 1, [k for k, n in got.items() if n > 1]
    lines = log.read_text().splitlines()
    assert sum("placed on hold by" in x for x in lines) == len(held_now)
    assert sum("released from hold by" in x for x in lines) == len(held_now)
    assert sum("deleted by" in x for x in lines) == len(delete)
    assert sum("bounced by" in x for x in lines) == len(bounce)
