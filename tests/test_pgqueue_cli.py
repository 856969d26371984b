"""The CLI over a PostgreSQL queue: queue init, enqueue --queue, queue list/hold/release,
replay --queue (and ``queue =`` in the configuration), queue import SPOOL --queue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lmtpfast._testing.fixtures import PgDatabase
from lmtpfast._testing.postfix import SmtpSink
from lmtpfast.spool import Spool

pytestmark = pytest.mark.peers


def cli(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "lmtpfast", *args], input=input,
                          capture_output=True, timeout=120, check=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode,
                                       proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))


def test_init_enqueue_list_replay(postgres_db: PgDatabase, tmp_path: Path,
                                  smtp_sink: Callable[..., SmtpSink]) -> None:
    url = postgres_db.dsn
    # Before init: a plain error naming the fix, no traceback, no password.
    r = cli("enqueue", "--queue", url, "--from", "a@example.org", "--rcpt", "b@example.com",
            "-", input=b"Subject: x\r\n\r\nhi\r\n")
    assert r.returncode == 66 and "queue init" in r.stderr and "Traceback" not in r.stderr
    assert postgres_db.password not in r.stderr + r.stdout
    r = cli("queue", "init", url)
    assert r.returncode == 0 and "created" in r.stdout, r.stderr
    assert postgres_db.password not in r.stdout
    assert "already current" in cli("queue", "init", "--queue", url).stdout
    msgs = []
    for i in range(3):
        m = tmp_path / f"m{i}.eml"
        m.write_bytes(f"Subject: m{i}\r\nMessage-ID: <m{i}@t>\r\n\r\nbody\r\n".encode())
        msgs.append(str(m))
    r = cli("enqueue", "--queue", url, *msgs, "--from", "a@example.org", "--rcpt",
            "b@example.com")
    assert r.returncode == 0 and "queued 3 message(s)" in r.stdout, r.stderr
    r = cli("queue", "list", url, "--json")
    assert r.returncode == 0, r.stderr
    listed = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert len(listed) == 3
    first = str(listed[0].get("queue_id") or listed[0].get("id"))
    assert cli("queue", "hold", url, first).returncode == 0
    sink = smtp_sink(capture=True)
    config = tmp_path / "lmtpfast.toml"
    config.write_text(f'queue = "{url}"\ndefault = "lmtp:{sink.destination}"\n')
    r = cli("replay", "--config", str(config), "--once")
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(sink.captures()) == 2  # the held one stays
    assert postgres_db.password not in r.stdout + r.stderr
    assert cli("queue", "release", url, first).returncode == 0
    r = cli("replay", "--queue", url, "--server", sink.destination, "--once", "-q")
    assert r.returncode == 0, r.stderr
    assert len(sink.captures()) == 3
    assert cli("queue", "list", url, "--json").stdout.strip() == ""


def test_import_a_spool_into_postgresql(postgres_db: PgDatabase, tmp_path: Path) -> None:
    url = postgres_db.dsn
    assert cli("queue", "init", url).returncode == 0
    spool = Spool(tmp_path / "spool", create=True)
    for i in range(5):
        spool.enqueue(f"Subject: d{i}\r\n\r\nx\r\n".encode(), "a@example.org", [f"d{i}@x.example"])
    # And entries already in the spool's embedded store (a newer lmtpfast wrote them).
    r = cli("enqueue", "sqlite:" + str(spool.path), "--from", "a@example.org", "--rcpt",
            "s@x.example", "-", input=b"Subject: s\r\n\r\ny\r\n")
    assert r.returncode == 0, r.stderr
    r = cli("queue", "import", str(spool.path), "--queue", url)
    assert r.returncode == 0, r.stderr
    assert "imported 6 queued" in r.stdout
    r = cli("queue", "import", str(spool.path), "--queue", url)  # rerun: nothing twice
    assert r.returncode == 0 and "imported 0 queued" in r.stdout, r.stdout + r.stderr
    listed = cli("queue", "list", url, "--json").stdout.splitlines()
    assert len(listed) == 6
    assert not os.listdir(spool.path / "incoming")
