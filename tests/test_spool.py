"""The spool format: atomic enqueue, lazy scan, claims, final moves, quarantine, importers."""

from __future__ import annotations

import email
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from lmtpfast.cli import main as cli_main
from lmtpfast.spool import (
    BadEnvelope,
    Quarantined,
    Reason,
    Spool,
    decode_envelope,
    encode_envelope,
    enqueue,
    envelope_from_headers,
    import_messages,
    iter_eml_dir,
    iter_maildir,
    iter_mbox,
    new_envelope,
)
from lmtpfast.spool._bounce import build_bounce, write_bounce
from lmtpfast.spool._importers import Source

MSG = b"From: a@example.org\r\nSubject: hi\r\nMessage-ID: <1@x>\r\n\r\nhello\r\n"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", create=True)


def entries(spool: Spool, folder: str) -> list[str]:
    return sorted(os.listdir(spool.path / folder))


# -- enqueue and scan ----------------------------------------------------------------


def test_enqueue_writes_message_then_envelope(spool: Spool) -> None:
    before = time.time()
    id = spool.enqueue(MSG, "a@example.org", ["b@example.org", "c@example.org"])
    assert entries(spool, "incoming") == [id]
    assert entries(spool, "msg") == [id]
    assert entries(spool, "tmp") == []
    assert (spool.path / "msg" / id).read_bytes() == MSG
    env = decode_envelope((spool.path / "incoming" / id).read_bytes())
    assert env.sender == "a@example.org"
    assert [r.address for r in env.recipients] == ["b@example.org", "c@example.org"]
    assert all(r.state == "queued" for r in env.recipients)
    assert env.arrival is not None and before <= env.arrival <= time.time()
    # incoming/ mtime is the arrival time
    assert abs((spool.path / "incoming" / id).stat().st_mtime - env.arrival) < 1e-3


def test_module_enqueue_into_a_directory_spool_keeps_it_one(tmp_path: Path) -> None:
    Spool(tmp_path / "d", create=True).enqueue(b"x", "a@x.org", ["b@x.org"])
    id = enqueue(tmp_path / "d", b"Subject: y\n\ny\n", sender="a@x.org", recipients=["c@x.org"])
    assert (tmp_path / "d" / "incoming" / id).exists()  # not converted behind a replay's back
    assert not (tmp_path / "d" / "queue.db").exists()
    id = enqueue(f"dir:{tmp_path / 'e'}", b"x", sender="a@x.org", recipients=["c@x.org"])
    assert (tmp_path / "e" / "incoming" / id).exists()


def test_module_enqueue_creates_spool_and_accepts_str(tmp_path: Path) -> None:
    from lmtpfast.spool import SQLiteStore

    id = enqueue(tmp_path / "s", "Subject: x\n\nbody\n", sender="", recipients=["b@x.org"],
                 ret="HDRS", envid="E1", notify=("failure", "delay"))
    with SQLiteStore(tmp_path / "s") as store:  # a new spool: its store
        info = store.show(id)
        assert info is not None and store.content(id) == b"Subject: x\n\nbody\n"
    env = info.envelope
    assert env is not None
    assert env.sender == "" and env.ret == "HDRS" and env.envid == "E1"
    assert env.recipients[0].notify == ("FAILURE", "DELAY")


@pytest.mark.parametrize("sender, rcpts", [
    ("a b@x.org", ["b@x.org"]),
    ("a@x.org", ["b@x.org\r\nRCPT TO:<evil@x.org>"]),
    ("a@x.org", [""]),
    ("a@x.org", []),
    ("<a@x.org>", ["b@x.org"]),
])
def test_enqueue_refuses_bad_envelope(spool: Spool, sender: str, rcpts: list[str]) -> None:
    with pytest.raises(BadEnvelope):
        spool.enqueue(MSG, sender, rcpts)
    assert entries(spool, "incoming") == [] and entries(spool, "msg") == []
    assert entries(spool, "tmp") == []


def test_bad_notify_refused() -> None:
    with pytest.raises(BadEnvelope):
        new_envelope("a@x.org", ["b@x.org"], notify=("NEVER", "FAILURE"))
    with pytest.raises(BadEnvelope):
        new_envelope("a@x.org", ["b@x.org"], notify=("SOMETIMES",))


def test_half_written_entries_are_invisible(spool: Spool) -> None:
    # A writer that crashed after its message but before its envelope, and
    # files still being written in tmp/: the scan sees neither.
    (spool.path / "msg" / "orphan").write_bytes(MSG)
    (spool.path / "tmp" / ".partial").write_bytes(b'{"sender":')
    (spool.path / "incoming" / ".hidden").write_bytes(b"")
    id = spool.enqueue(MSG, "a@x.org", ["b@x.org"])
    assert [i for _, i in spool.scan()] == [id]


def test_scan_skips_deferred_not_due_and_flush_takes_them(spool: Spool) -> None:
    a = spool.enqueue(MSG, "a@x.org", ["b@x.org"])
    b = spool.enqueue(MSG, "a@x.org", ["c@x.org"])
    claim = spool.claim("incoming", b)
    assert claim is not None
    later = time.time() + 3600
    claim.save(next_attempt=later)
    claim.release()
    assert entries(spool, "deferred") == [b]
    assert abs((spool.path / "deferred" / b).stat().st_mtime - later) < 1e-3
    scan = spool.scan()
    assert [i for _, i in scan] == [a]
    assert scan.not_due == 1 and scan.next_due is not None
    assert abs(scan.next_due - later) < 1e-3
    assert sorted(i for _, i in spool.scan(flush=True)) == sorted([a, b])
    assert sorted(i for _, i in spool.scan(due=later + 1)) == sorted([a, b])


def test_scan_is_lazy(spool: Spool) -> None:
    for _ in range(50):
        spool.enqueue(MSG, "a@x.org", ["b@x.org"], fsync=False)
    it = iter(spool.scan())
    first = next(it)
    assert first[0] == "incoming"
    assert sum(1 for _ in it) == 49


# -- claims ----------------------------------------------------------------------------


def test_claim_excludes_a_second_claim_until_released(spool: Spool) -> None:
    id = spool.enqueue(MSG, "a@x.org", ["b@x.org"])
    first = spool.claim("incoming", id)
    assert first is not None
    assert first.read_message() == MSG
    assert spool.claim("incoming", id) is None
    first.release()
    again = spool.claim("incoming", id)
    assert again is not None
    again.release()


def test_claim_of_a_killed_process_is_free_at_once(spool: Spool) -> None:
    id = spool.enqueue(MSG, "a@x.org", ["b@x.org"])
    code = (
        "import sys, time\n"
        "from lmtpfast.spool import Spool\n"
        f"c = Spool({str(spool.path)!r}).claim('incoming', {id!r})\n"
        "assert c is not None\n"
        "print('claimed', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"claimed"
        assert spool.claim("incoming", id) is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    claim = spool.claim("incoming", id)
    assert claim is not None
    claim.release()


def test_claim_of_finished_entry_is_none(spool: Spool) -> None:
    id = spool.enqueue(MSG, "a@x.org", ["b@x.org"])
    claim = spool.claim("incoming", id)
    assert claim is not None
    claim.delivered()
    assert spool.claim("incoming", id) is None
    assert entries(spool, "msg") == [] and entries(spool, "incoming") == []
    assert entries(spool, "quarantine") == []


def test_save_moves_to_deferred_atomically(spool: Spool) -> None:
    id = spool.enqueue(MSG, "a@x.org", ["b@x.org", "c@x.org"])
    claim = spool.claim("incoming", id)
    assert claim is not None
    env = claim.envelope
    env.recipients = env.recipients[1:]
    env.delivered = 1
    env.recipients[0].last = Reason(code=451, enhanced="4.2.0", text="later")
    claim.save(next_attempt=time.time())
    claim.release()
    assert entries(spool, "incoming") == [] and entries(spool, "deferred") == [id]
    assert entries(spool, "tmp") == []
    saved = decode_envelope((spool.path / "deferred" / id).read_bytes())
    assert [r.address for r in saved.recipients] == ["c@x.org"]
    assert saved.delivered == 1 and saved.recipients[0].last is not None


def test_failed_moves_message_and_reasons(spool: Spool) -> None:
    id = spool.enqueue(MSG, "a@x.org", ["b@x.org"])
    claim = spool.claim("incoming", id)
    assert claim is not None
    claim.envelope.recipients[0].state = "failed"
    claim.envelope.recipients[0].last = Reason(code=550, enhanced="5.1.1", text="no such user")
    claim.failed("<b@x.org>: 550 5.1.1 no such user\n")
    assert entries(spool, "incoming") == [] and entries(spool, "msg") == []
    assert entries(spool, "failed") == sorted([f"{id}.eml", f"{id}.json", f"{id}.txt"])
    assert (spool.path / "failed" / f"{id}.eml").read_bytes() == MSG
    assert "5.1.1" in (spool.path / "failed" / f"{id}.txt").read_text()
    rec = decode_envelope((spool.path / "failed" / f"{id}.json").read_bytes())
    assert rec.recipients[0].state == "failed"


def test_spool_errors(tmp_path: Path) -> None:
    from lmtpfast.spool import SpoolError

    with pytest.raises(SpoolError):
        Spool(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(SpoolError):
        Spool(tmp_path / "plain")
    # a hand-made spool with only incoming/ gets the other folders
    (tmp_path / "hand" / "incoming").mkdir(parents=True)
    assert (Spool(tmp_path / "hand").path / "failed").is_dir()


def test_sweep_removes_old_leftovers_only(spool: Spool) -> None:
    old = time.time() - 2 * 86400
    (spool.path / "msg" / "orphan-old").write_bytes(MSG)
    os.utime(spool.path / "msg" / "orphan-old", (old, old))
    (spool.path / "msg" / "orphan-new").write_bytes(MSG)
    (spool.path / "tmp" / ".old").write_bytes(b"x")
    os.utime(spool.path / "tmp" / ".old", (old, old))
    id = spool.enqueue(MSG, "a@x.org", ["b@x.org"])
    os.utime(spool.path / "msg" / id, (old, old))
    assert spool.sweep() == 2
    assert entries(spool, "msg") == sorted(["orphan-new", id])
    assert entries(spool, "tmp") == []


# -- quarantine -------------------------------------------------------------------------


def _corrupt(spool: Spool, kind: str) -> str:
    id = spool.enqueue(MSG, "a@x.org", ["b@x.org"])
    env_path = spool.path / "incoming" / id
    msg_path = spool.path / "msg" / id
    good = env_path.read_bytes()
    if kind == "truncated":
        env_path.write_bytes(good[: len(good) // 2])
    elif kind == "empty":
        env_path.write_bytes(b"")
    elif kind == "garbage":
        env_path.write_bytes(b"\x00\xff not json")
    elif kind == "wrong-type":
        env_path.write_bytes(b'{"sender": 5, "recipients": []}')
    elif kind == "bad-address":
        env_path.write_bytes(good.replace(b"b@x.org", b"b x@x.org"))
    elif kind == "crlf-address":
        env_path.write_bytes(good.replace(b"b@x.org", b"b@x.org\\r\\nDATA"))
    elif kind == "no-recipients":
        env = decode_envelope(good)
        env.recipients = []
        env_path.write_bytes(msgspec.json.encode(env))
    elif kind == "version":
        env_path.write_bytes(good.replace(b'"sender"', b'"version":99,"sender"'))
    elif kind == "message-missing":
        msg_path.unlink()
    elif kind == "message-dir":
        msg_path.unlink()
        msg_path.mkdir()
    elif kind == "envelope-dir":
        env_path.unlink()
        env_path.mkdir()
    elif kind == "envelope-fifo":
        env_path.unlink()
        os.mkfifo(env_path)
    else:
        raise AssertionError(kind)
    return id


@pytest.mark.parametrize("kind, words", [
    ("truncated", "truncated"),
    ("empty", "empty envelope"),
    ("garbage", "malformed"),
    ("wrong-type", "invalid envelope"),
    ("bad-address", "bad address"),
    ("crlf-address", "bad address"),
    ("no-recipients", "no recipients"),
    ("version", "version 99"),
    ("message-missing", "message file is missing"),
    ("message-dir", "message file"),
    ("envelope-dir", "not a regular file"),
    ("envelope-fifo", "not a regular file"),
])
def test_corrupt_entries_go_to_quarantine_with_reason(spool: Spool, kind: str, words: str) -> None:
    bad = _corrupt(spool, kind)
    good = spool.enqueue(MSG, "a@x.org", ["b@x.org"])
    seen = []
    for queue, id in spool.scan():
        try:
            claim = spool.claim(queue, id)
        except Quarantined as q:
            assert q.id == bad
            assert words in q.reason
            continue
        assert claim is not None
        seen.append(id)
        claim.delivered()
    assert seen == [good]
    assert entries(spool, "incoming") == [] and entries(spool, "msg") == []
    reason = (spool.path / "quarantine" / f"{bad}.txt").read_text()
    assert words in reason
    if kind not in ("message-missing", "message-dir"):
        assert (spool.path / "quarantine" / f"{bad}.eml").read_bytes() == MSG


# -- importers ---------------------------------------------------------------------------


def test_maildir_import(tmp_path: Path, spool: Spool) -> None:
    md = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (md / sub).mkdir(parents=True)
    (md / "cur" / "1.a:2,S").write_bytes(b"Subject: one\n\n1\n")
    (md / "new" / "2.b").write_bytes(b"Subject: two\n\n2\n")
    (md / "tmp" / "3.c").write_bytes(b"Subject: half\n")
    stats = import_messages(spool, iter_maildir(md), sender="", recipients=["alice@x.org"])
    assert stats.queued == 2 and stats.skipped == 0
    bodies = sorted((spool.path / "msg" / i).read_bytes() for i in entries(spool, "msg"))
    assert bodies == [b"Subject: one\n\n1\n", b"Subject: two\n\n2\n"]
    with pytest.raises(FileNotFoundError):
        list(iter_maildir(tmp_path))


def test_mbox_import_unescapes_and_reads_from_line(tmp_path: Path) -> None:
    mbox = tmp_path / "box"
    mbox.write_bytes(
        b"From alice@x.org Mon Jan  1 00:00:00 2024\n"
        b"Subject: one\n\nbody\n>From the start\n>>From quoted\n\n"
        b"From MAILER-DAEMON Mon Jan  1 00:00:01 2024\n"
        b"Subject: two\n\nsecond\n"
    )
    msgs = list(iter_mbox(mbox))
    assert [m.data for m in msgs] == [
        b"Subject: one\n\nbody\nFrom the start\n>From quoted\n",
        b"Subject: two\n\nsecond\n",
    ]
    assert [m.from_line_sender for m in msgs] == ["alice@x.org", ""]
    bad = tmp_path / "notmbox"
    bad.write_bytes(b"Subject: x\n\n")
    with pytest.raises(ValueError):
        list(iter_mbox(bad))


def test_envelope_from_headers() -> None:
    src = Source("x", b"Return-Path: <>\r\nDelivered-To: bob@x.org\r\nDelivered-To: list@x.org\r\n"
                      b"X-Original-To: other@x.org\r\nSubject: s\r\n\r\nbody\r\n")
    assert envelope_from_headers(src) == ("", ["bob@x.org"])
    src = Source("x", b"Return-Path: <a@x.org>\nX-Original-To: c@x.org, d@x.org\n\nbody\n")
    assert envelope_from_headers(src) == ("a@x.org", ["c@x.org", "d@x.org"])
    src = Source("x", b"Subject: none\n\n", from_line_sender="f@x.org")
    assert envelope_from_headers(src) == ("f@x.org", [])


def test_eml_dir_import_from_headers_skips_what_has_no_envelope(tmp_path: Path,
                                                                spool: Spool) -> None:
    d = tmp_path / "eml"
    (d / "sub").mkdir(parents=True)
    (d / "a.eml").write_bytes(b"Return-Path: <a@x.org>\nDelivered-To: bob@x.org\n\n1\n")
    (d / "b.eml").write_bytes(b"Subject: no envelope\n\n2\n")
    (d / "sub" / "c.eml").write_bytes(b"Return-Path: <c@x.org>\nX-Original-To: dave@x.org\n\n3\n")
    (d / "ignored.txt").write_bytes(b"x")
    stats = import_messages(spool, iter_eml_dir(d), from_headers=True, fsync=False)
    assert stats.queued == 1 and stats.skipped == 1
    assert "b.eml" in stats.problems[0]
    stats = import_messages(spool, iter_eml_dir(d, recursive=True), from_headers=True,
                            recipients=["fallback@x.org"], sender="s@x.org")
    assert stats.queued == 3
    rcpts = sorted(
        decode_envelope((spool.path / "incoming" / i).read_bytes()).recipients[0].address
        for i in entries(spool, "incoming")
    )
    assert rcpts == ["bob@x.org", "bob@x.org", "dave@x.org", "fallback@x.org"]


@pytest.mark.parametrize("layout", ["store", "dir"])
def test_cli_enqueue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     capsys: pytest.CaptureFixture[str], layout: str) -> None:
    """`lmtpfast enqueue` writes the spool's store by default, a directory spool with dir:."""
    from lmtpfast.spool import SQLiteStore

    msg = tmp_path / "m.eml"
    msg.write_bytes(MSG)
    path = tmp_path / "sp"
    sp = str(path) if layout == "store" else f"dir:{path}"

    def queued() -> int:
        if layout == "dir":
            return len(os.listdir(path / "incoming"))
        with SQLiteStore(path) as store:
            return store.status().queued

    assert cli_main(["enqueue", sp, "--from", "a@x.org", "--rcpt", "b@x.org",
                     "--rcpt", "c@x.org", str(msg), str(msg)]) == 0
    assert queued() == 2
    assert (path / "queue.db").exists() == (layout == "store")
    assert cli_main(["enqueue", sp, str(msg)]) == 64  # no envelope
    assert cli_main(["enqueue", sp, "--from", "a@x.org", "--rcpt", "b@x.org",
                     "--maildir", str(tmp_path / "nope")]) == 66
    assert cli_main(["enqueue", sp, "--from", "a@x.org", "--rcpt", "b x", str(msg)]) == 64
    mbox = tmp_path / "box"
    mbox.write_bytes(b"From x@y Mon Jan  1 00:00:00 2024\nSubject: 1\n\n1\n\n"
                     b"From x@y Mon Jan  1 00:00:00 2024\nSubject: 2\n\n2\n")
    assert cli_main(["enqueue", sp, "--rcpt", "b@x.org", "--from-headers", "--mbox",
                     str(mbox), "--no-fsync"]) == 0
    assert queued() == 4
    # --from-headers with a message that has none: skipped, status 65
    assert cli_main(["enqueue", sp, "--from-headers", str(msg)]) == 65
    out = capsys.readouterr()
    assert "skipped" in out.err


# -- bounces -----------------------------------------------------------------------------


def _failed_env() -> tuple[bytes, object]:
    env = new_envelope("a@x.org", ["b@x.org", "c@x.org", "d@x.org"], envid="ENV1",
                       orcpt=["rfc822;B@x.org", None, None])
    env.recipients[0].state = "failed"
    env.recipients[0].last = Reason(code=550, enhanced="5.1.1", text="<b@x.org> no such user",
                                    stage="rcpt", destination="unix:/run/lmtp", at=time.time())
    env.recipients[1].state = "failed"
    env.recipients[1].notify = ("NEVER",)
    return MSG, env


def test_bounce_is_an_rfc3464_report(tmp_path: Path) -> None:
    message, env = _failed_env()
    path = write_bounce(tmp_path / "b", "ID1", env, message)  # type: ignore[arg-type]
    assert path is not None and path.name == "ID1.eml"
    parsed = email.message_from_bytes(path.read_bytes())
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    assert parsed["To"] == "<a@x.org>"
    parts = parsed.get_payload()
    assert isinstance(parts, list)
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "message/rfc822"]
    status = parts[1].get_payload()
    blocks = [dict(b.items()) for b in status]
    assert blocks[0]["Original-Envelope-Id"] == "ENV1"
    assert len(blocks) == 2  # c@ said NOTIFY=NEVER; d@ is not failed
    assert blocks[1]["Final-Recipient"] == "rfc822; b@x.org"
    assert blocks[1]["Original-Recipient"] == "rfc822;B@x.org"
    assert blocks[1]["Action"] == "failed" and blocks[1]["Status"] == "5.1.1"
    assert "550 5.1.1" in blocks[1]["Diagnostic-Code"]


def test_no_bounce_for_null_sender_or_hdrs_only(tmp_path: Path) -> None:
    message, env = _failed_env()
    env.ret = "HDRS"  # type: ignore[attr-defined]
    data = build_bounce("ID", env, message)  # type: ignore[arg-type]
    assert data is not None and b"text/rfc822-headers" in data and b"hello" not in data
    env.sender = ""  # type: ignore[attr-defined]
    assert build_bounce("ID", env, message) is None  # type: ignore[arg-type]


def test_bounce_of_a_large_message_returns_its_header_only(tmp_path: Path) -> None:
    from lmtpfast.spool._bounce import BOUNCE_SIZE_LIMIT

    message, env = _failed_env()
    big = message + b"y" * (BOUNCE_SIZE_LIMIT + 10)
    # Given only the start of the message and its real size, as replay does.
    data = build_bounce("ID", env, big[:BOUNCE_SIZE_LIMIT + 1],  # type: ignore[arg-type]
                        message_size=200 * 1024 * 1024)
    assert data is not None and len(data) < BOUNCE_SIZE_LIMIT
    assert b"text/rfc822-headers" in data and b"Subject: hi" in data and b"yyyy" not in data
    assert b"larger than 50000 bytes (209715200)" in data
    small = build_bounce("ID", env, message)  # type: ignore[arg-type]
    assert small is not None and b"message/rfc822" in small and b"hello" in small


def test_envelope_roundtrip() -> None:
    env = new_envelope("a@x.org", ["b@x.org"])
    assert decode_envelope(encode_envelope(env)) == env


def test_a_claim_that_finds_the_envelope_gone_keeps_no_lock(tmp_path: Path) -> None:
    """The entry moved away between the scan and the claim (queue hold, another replay):
    the claim gives up, and the message file's lock must go with it, or nobody could ever
    claim the entry again while this process lives."""
    spool = Spool(tmp_path / "sp", create=True)
    id = spool.enqueue(MSG, "a@x.org", ["b@x.org"])
    (spool.path / "hold").mkdir()
    os.rename(spool.path / "incoming" / id, spool.path / "hold" / id)
    assert spool.claim("incoming", id) is None
    os.rename(spool.path / "hold" / id, spool.path / "deferred" / id)
    claim = spool.claim("deferred", id)
    assert claim is not None
    claim.release()
