"""``lmtpfast queue``: list/show/hold/release/retry/delete/bounce/requeue on every backend.

The fast tests here run the command in-process on the embedded store and on
the directory spool; ``tests/test_operations.py`` runs each action while a
replay delivers into smtp-sink and Dovecot.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

import pytest

from lmtpfast.cli import main
from lmtpfast.spool import Reason, new_envelope
from lmtpfast.spool._dirstore import DirQueue
from lmtpfast.spool._queue import NewMessage, Queue, Update
from lmtpfast.spool._sqlite import SQLiteQueue

BACKENDS = ["sqlite", "dir"]


def msg(i: int) -> bytes:
    return (f"From: s@example.org\r\nSubject: m{i}\r\nMessage-ID: <m{i}@test>\r\n\r\n"
            "hello\r\n").encode()


def location(kind: str, path: Path) -> str:
    return f"dir:{path}" if kind == "dir" else str(path)


def open_q(kind: str, path: Path) -> Queue:
    return SQLiteQueue(path, create=True) if kind == "sqlite" else DirQueue(path, create=True)


def fill(kind: str, path: Path) -> dict[str, str]:
    """Five entries: two due, one deferred with a 452, one failed, one held; name -> id."""
    async def go() -> dict[str, str]:
        async with open_q(kind, path) as q:
            envs = [new_envelope("a@example.org", ["u1@one.test", "u2@two.test"]),
                    new_envelope("b@example.org", ["u3@two.test"]),
                    new_envelope("c@other.org", ["carol@one.test"]),
                    new_envelope("d@example.org", ["zed@one.test"]),
                    new_envelope("e@example.org", ["held@one.test"])]
            envs[2].attempts = 1
            envs[2].next_attempt = time.time() + 3600
            envs[2].recipients[0].attempts = 1
            envs[2].recipients[0].last = Reason(452, "4.2.2", "Mailbox full", "final",
                                                destination="unix:/x", at=time.time())
            ids = await q.enqueue_many([NewMessage(e, msg(i)) for i, e in enumerate(envs)])
            names = dict(zip(["due1", "due2", "deferred", "failed", "held"], ids, strict=True))
            # "failed": claim it and fail its recipient; "held": hold it.
            due = time.time()
            await q.begin_pass(due=due)
            while True:
                batch = await q.claim(10, due=due)
                ups = []
                for e in batch.entries:
                    if e.id == names["failed"]:
                        e.envelope.recipients[0].state = "failed"
                        e.envelope.recipients[0].last = Reason(550, "5.1.1", "User unknown",
                                                               "rcpt")
                        ups.append(Update(e, "failed"))
                    else:
                        ups.append(Update(e, "release"))
                await q.record(ups)
                if batch.exhausted:
                    break
            await q.hold(_sel(names["held"]))
            return names
    return asyncio.run(go())


def _sel(*ids: str):  # type: ignore[no-untyped-def]
    from lmtpfast.spool import Selection

    return Selection(ids=ids)


def states(kind: str, path: Path) -> dict[str, str]:
    async def go() -> dict[str, str]:
        async with open_q(kind, path) as q:
            return {i.id: i.state async for i in q.entries()}
    return asyncio.run(go())


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_list_shows_what_mailq_shows(kind: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    names = fill(kind, tmp_path / "q")
    loc = location(kind, tmp_path / "q")
    status, out, _ = cli(capsys, "queue", "list", loc, "--log-target", "none")
    assert status == 0
    assert out.startswith("-Queue ID-")
    # Default: queued and held (as mailq); the held one is marked "!".
    firsts = {line.split()[0] for line in out.splitlines()[1:] if line and line[0] != " "}
    assert f"{names['held']}!" in firsts
    assert {names[n] for n in ("due1", "due2", "deferred")} <= firsts
    assert not {names["failed"], f"{names['failed']}#"} & firsts
    assert "(452 4.2.2 Mailbox full)" in out
    assert "in 4 Requests." in out

    status, out, _ = cli(capsys, "queue", "list", loc, "--json", "--state", "all")
    rows = [json.loads(line) for line in out.splitlines()]
    by_id = {r["queue_id"]: r for r in rows}
    assert set(by_id) == set(names.values())
    assert by_id[names["failed"]]["state"] == "failed"
    assert by_id[names["held"]]["queue_name"] == "hold"
    deferred = by_id[names["deferred"]]
    assert deferred["recipients"][0]["delay_reason"] == "452 4.2.2 Mailbox full"
    assert deferred["recipients"][0]["last"]["code"] == 452
    assert deferred["sender"] == "c@other.org" and deferred["message_size"] == len(msg(2))

    # Filters: sender pattern, domain, reply code, age.
    _, out, _ = cli(capsys, "queue", "list", loc, "--json", "--domain", "two.test")
    assert {json.loads(x)["queue_id"] for x in out.splitlines()} == {names["due1"],
                                                                   names["due2"]}
    _, out, _ = cli(capsys, "queue", "list", loc, "--json", "--sender", "*@OTHER.org")
    assert [json.loads(x)["queue_id"] for x in out.splitlines()] == [names["deferred"]]
    _, out, _ = cli(capsys, "queue", "list", loc, "--json", "--code", "4.2", "--state", "all")
    assert [json.loads(x)["queue_id"] for x in out.splitlines()] == [names["deferred"]]
    _, out, _ = cli(capsys, "queue", "list", loc, "--json", "--code", "550", "--state",
                    "failed")
    assert [json.loads(x)["queue_id"] for x in out.splitlines()] == [names["failed"]]
    _, out, _ = cli(capsys, "queue", "list", loc, "--json", "--older", "1h")
    assert out == ""
    status, _, err = cli(capsys, "queue", "list", loc, "--state", "bogus")
    assert status == 64 and "unknown state" in err


def test_show_prints_envelope_replies_and_headers(kind: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    names = fill(kind, tmp_path / "q")
    loc = location(kind, tmp_path / "q")
    status, out, _ = cli(capsys, "queue", "show", loc, names["deferred"])
    assert status == 0
    assert "sender:" in out and "<c@other.org>" in out
    assert "<carol@one.test> queued, 1 attempt" in out
    assert "last: 452 4.2.2 Mailbox full [final] from unix:/x" in out
    assert "Subject: m2" in out
    status, out, _ = cli(capsys, "queue", "show", loc, names["deferred"], "--json", "--body")
    obj = json.loads(out)
    assert ["Subject", "m2"] in obj["headers"]
    assert obj["body"] == msg(2).decode()
    status, _, err = cli(capsys, "queue", "show", loc, "nonesuch")
    assert status == 66 and "no such entry" in err


def test_actions_change_exactly_what_they_say(kind: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "q"
    names = fill(kind, path)
    loc = location(kind, path)
    logf = tmp_path / "ops.log"
    log = ["--log-target", str(logf)]
    # Without a selection nothing happens.
    status, _, err = cli(capsys, "queue", "delete", loc, *log)
    assert status == 64 and "--all" in err

    # A dry run changes nothing and lists what would change.
    before = states(kind, path)
    status, out, _ = cli(capsys, "queue", "delete", loc, "--domain", "one.test", "-n", *log)
    assert status == 0
    assert before == states(kind, path)
    assert {line.split(":")[0] for line in out.splitlines()} == {
        names["due1"], names["deferred"], names["failed"], names["held"]}

    status, out, _ = cli(capsys, "queue", "hold", loc, names["due1"], names["due2"], *log)
    assert status == 0 and out.count("placed on hold") == 2
    assert states(kind, path)[names["due1"]] == "held"
    status, out, _ = cli(capsys, "queue", "release", loc, names["due1"], *log)
    assert status == 0 and states(kind, path)[names["due1"]] == "queued"
    status, out, _ = cli(capsys, "queue", "retry", loc, names["deferred"], *log)
    assert status == 0

    async def next_attempt() -> float:
        async with open_q(kind, path) as q:
            info = await q.show(names["deferred"])
            assert info is not None and info.envelope is not None
            return info.envelope.next_attempt
    # Due now (the directory spool keeps the time in the file, not the envelope).
    if kind == "sqlite":
        assert asyncio.run(next_attempt()) <= time.time()
    else:
        assert os.stat(path / "deferred" / names["deferred"]).st_mtime <= time.time()

    # Unknown ids: 66, the known ones still done.
    status, out, _ = cli(capsys, "queue", "hold", loc, names["due1"], "999999", "--json", *log)
    assert status == 66
    results = {json.loads(x)["id"]: json.loads(x)["result"] for x in out.splitlines()}
    assert results[names["due1"]] == "placed on hold"
    assert results["999999"].startswith("not found")

    # Bounce: recipients fail, the entry becomes failed, the bounce is written.
    bounces = tmp_path / "bounces"
    status, out, _ = cli(capsys, "queue", "bounce", loc, names["due2"], "--bounce-dir",
                         str(bounces), *log)
    assert status == 0, out
    assert states(kind, path)[names["due2"]] == "failed"
    bounce = (bounces / f"{names['due2']}.eml").read_bytes()
    assert b"To: <b@example.org>" in bounce
    assert b"5.0.0" in bounce

    # Requeue the failed ones (via ids from stdin), then delete by filter.
    import io
    import sys

    old = sys.stdin
    sys.stdin = io.StringIO(f"{names['failed']}\n{names['due2']}\n")
    try:
        status, out, _ = cli(capsys, "queue", "requeue", loc, "-", *log)
    finally:
        sys.stdin = old
    assert status == 0 and out.count("requeued") == 2
    st = states(kind, path)
    assert st[names["failed"]] == st[names["due2"]] == "queued"
    status, out, _ = cli(capsys, "queue", "delete", loc, "--sender", "c@*", *log)
    assert status == 0 and names["deferred"] not in states(kind, path)
    status, out, _ = cli(capsys, "queue", "delete", loc, "--all", *log)
    assert states(kind, path) == {}

    # Every change was logged, one Postfix-shaped line per entry.
    lines = logf.read_text().splitlines()
    assert all(" lmtpfast/queue[" in x for x in lines)
    held = [x for x in lines if x.endswith("(lmtpfast queue hold)")]
    assert len(held) == 3 and all("placed on hold by " in x for x in held)
    assert sum("deleted by" in x for x in lines) == 5
    assert sum("requeued by" in x for x in lines) == 2
    assert any(f"{names['due2']}: sender non-delivery notification" in x for x in lines)


def test_a_busy_entry_is_left_alone_and_says_so(kind: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "q"
    names = fill(kind, path)
    loc = location(kind, path)

    async def claim_and_act() -> list[tuple[int, str]]:
        async with open_q(kind, path) as worker:
            due = time.time()
            await worker.begin_pass(due=due)
            batch = await worker.claim(10, due=due)
            ids = {e.id for e in batch.entries}
            assert names["due1"] in ids
            # The operator's commands, while the worker holds the entries: the
            # list marks them being delivered, and hold, retry and bounce leave
            # them alone on every backend. (delete differs: the store removes
            # one being delivered, its worker finds it gone.)
            got = []
            for action in ("list", "hold", "retry", "bounce"):
                args = [] if action == "list" else [names["due1"], "--log-target", "none"]
                status, out, _ = await asyncio.to_thread(cli, capsys, "queue", action, loc,
                                                         *args)
                got.append((status, out))
            await worker.record([Update(e, "release") for e in batch.entries])
            return got
    (_, listed), *acted = asyncio.run(claim_and_act())
    row = next(x for x in listed.splitlines() if x.startswith(names["due1"]))
    assert row.split()[0].endswith("*"), listed  # mailq's mark of an entry being delivered
    for status, out in acted:
        assert status == 75 and "busy" in out
    assert states(kind, path)[names["due1"]] == "queued"


def test_actions_log_to_a_syslog_socket(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "q"
    names = fill("sqlite", path)
    sock_path = tmp_path / "log"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(10)
    try:
        status, _, _ = cli(capsys, "queue", "hold", str(path), names["due1"],
                           "--log-target", f"syslog:{sock_path}")
        assert status == 0
        data = listener.recv(65536).decode()
    finally:
        listener.close()
    # <PRI> with facility mail (2) and level info (6): 2*8+6 = 22.
    assert data.startswith("<22>lmtpfast/queue[")
    assert f"]: {names['due1']}: placed on hold by " in data
    status, _, err = cli(capsys, "queue", "hold", str(path), names["due1"],
                         "--log-target", f"syslog:{tmp_path / 'missing'}")
    assert status == 64 and "no syslog socket" in err


def test_queue_list_never_creates_a_store(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from lmtpfast.spool import Spool

    spool = Spool(tmp_path / "s", create=True)
    spool.enqueue(msg(1), "s@example.org", ["u@example.com"])
    status, out, _ = cli(capsys, "queue", "list", str(spool.path))
    assert status == 0 and "in 1 Request." in out
    assert not (spool.path / "queue.db").exists()
    status, _, err = cli(capsys, "queue", "list", str(tmp_path / "missing"))
    assert status == 66 and "no queue" in err

