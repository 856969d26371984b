"""The spool is private and reads only its own files (issue 10, items 18 and 19).

Item 18: replay must never deliver a file the spool does not own: spool
files are opened with ``O_NOFOLLOW`` and must be regular files owned by the
spool's owner, with no hard link from outside the spool; anything else is
quarantined (and its content is not copied into ``quarantine/``).

Item 19: folders 0700 and files 0600 whatever the umask, for every file the
spool, replay and enqueue write: the queue, ``failed/``, ``quarantine/``,
the bounces and the JSON report.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmtpfast.server import FaultPlan, Sink
from lmtpfast.spool import Quarantined, Spool

ROOT = Path(__file__).resolve().parent.parent
MSG = b"From: a@example.org\r\nSubject: private\r\nMessage-ID: <p@x>\r\n\r\nhello\r\n"
SECRET = b"root:$y$j9T$secret-hash:19000:0:99999:7:::\n"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmtpfast", *args]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _claim_all(spool: Spool) -> tuple[list[str], list[Quarantined]]:
    """Claim every due entry: ids claimed (and delivered), and the quarantines."""
    claimed: list[str] = []
    quarantined: list[Quarantined] = []
    for queue, id in spool.scan():
        try:
            claim = spool.claim(queue, id)
        except Quarantined as q:
            quarantined.append(q)
            continue
        if claim is not None:
            claimed.append(id)
            claim.delivered()
    return claimed, quarantined


# -- item 18: symlinks, foreign files, hard links ---------------------------------------


def test_message_symlink_to_a_secret_is_quarantined_never_read(tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_bytes(SECRET)
    spool = Spool(tmp_path / "spool", create=True)
    id = spool.enqueue(MSG, "a@x.org", ["b@x.org"])
    msg = spool.path / "msg" / id
    msg.unlink()
    msg.symlink_to(secret)
    good = spool.enqueue(MSG, "a@x.org", ["c@x.org"])
    claimed, quarantined = _claim_all(spool)
    assert claimed == [good]
    assert [q.id for q in quarantined] == [id]
    assert "symbolic link" in quarantined[0].reason
    q = spool.path / "quarantine"
    assert not (q / f"{id}.eml").exists()  # the secret is not copied
    assert all(SECRET not in p.read_bytes() for p in q.iterdir() if p.is_file()
               and not p.is_symlink())
    assert secret.read_bytes() == SECRET  # and not touched


def test_envelope_symlink_is_quarantined(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", create=True)
    id = spool.enqueue(MSG, "a@x.org", ["b@x.org"])
    env = spool.path / "incoming" / id
    outside = tmp_path / "env.json"
    outside.write_bytes(env.read_bytes())
    env.unlink()
    env.symlink_to(outside)
    claimed, quarantined = _claim_all(spool)
    assert claimed == [] and [q.id for q in quarantined] == [id]
    assert "symbolic link" in quarantined[0].reason
    assert outside.exists()


def test_message_hard_linked_from_outside_is_quarantined(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", create=True)
    id = spool.enqueue(MSG, "a@x.org", ["b@x.org"])
    outside = tmp_path / "outside.eml"
    os.link(spool.path / "msg" / id, outside)
    claimed, quarantined = _claim_all(spool)
    assert claimed == [] and [q.id for q in quarantined] == [id]
    assert "hard link" in quarantined[0].reason
    assert not (spool.path / "quarantine" / f"{id}.eml").exists()


def test_own_failed_link_left_by_a_crash_is_not_foreign(tmp_path: Path) -> None:
    # A crash inside Claim.failed() after failed/ID.eml was linked: msg/ID has
    # two links, both inside the spool. That entry is still ours.
    spool = Spool(tmp_path / "spool", create=True)
    id = spool.enqueue(MSG, "a@x.org", ["b@x.org"])
    os.link(spool.path / "msg" / id, spool.path / "failed" / f"{id}.eml")
    claimed, quarantined = _claim_all(spool)
    assert claimed == [id] and quarantined == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_files_of_another_owner_are_quarantined(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", create=True)
    id = spool.enqueue(MSG, "a@x.org", ["b@x.org"])
    os.chown(spool.path / "msg" / id, 65534, 65534)  # nobody
    env_id = spool.enqueue(MSG, "a@x.org", ["c@x.org"])
    os.chown(spool.path / "incoming" / env_id, 65534, 65534)
    claimed, quarantined = _claim_all(spool)
    assert claimed == []
    reasons = {q.id: q.reason for q in quarantined}
    assert set(reasons) == {id, env_id}
    assert "owned by uid 65534" in reasons[id] and "owned by uid 65534" in reasons[env_id]


def test_a_spool_folder_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    from lmtpfast.spool import SpoolError

    Spool(tmp_path / "spool", create=True)
    (tmp_path / "spool" / "msg").rmdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "spool" / "msg").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SpoolError, match="msg/ is a symbolic link"):
        Spool(tmp_path / "spool")


async def test_replay_never_delivers_a_symlinked_message(tmp_path: Path) -> None:
    """End to end: `lmtpfast replay` into a sink that keeps what it gets."""
    secret = tmp_path / "shadow"
    secret.write_bytes(SECRET)
    spool = Spool(tmp_path / "spool", create=True)
    id = spool.enqueue(MSG, "a@x.org", ["b@x.org"])
    (spool.path / "msg" / id).unlink()
    (spool.path / "msg" / id).symlink_to(secret)
    async with Sink(f"unix:{tmp_path}/lmtp", collect=True) as sink:
        proc = await asyncio.create_subprocess_exec(
            *_cli("replay", str(spool.path), "--server", sink.destinations[0], "-q"),
            env=_env(), stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 65, err
        assert sink.messages == []
    assert "symbolic link" in (spool.path / "quarantine" / f"{id}.txt").read_text()


# -- item 19: private whatever the umask ----------------------------------------------------


def _modes(root: Path) -> dict[str, str]:
    """Every folder and file under *root* whose mode is not 0700 / 0600."""
    wrong: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = Path(dirpath) / name
            mode = stat.S_IMODE(p.lstat().st_mode)
            if mode != 0o700:
                wrong[str(p.relative_to(root))] = oct(mode)
        for name in filenames:
            p = Path(dirpath) / name
            mode = stat.S_IMODE(p.lstat().st_mode)
            if mode != 0o600:
                wrong[str(p.relative_to(root))] = oct(mode)
    return wrong


@pytest.mark.parametrize("layout", ["store", "dir"])
@pytest.mark.parametrize("mask", [0o022, 0o000])
async def test_everything_written_is_private_whatever_the_umask(tmp_path: Path, mask: int,
                                                               layout: str) -> None:
    import sqlite3

    from lmtpfast.spool import SQLiteStore

    work = tmp_path / "w"
    with umask(mask):
        work.mkdir()
        spool_dir = work / "spool"
        where = str(spool_dir) if layout == "store" else f"dir:{spool_dir}"
        msg = work / "m.eml"
        msg.write_bytes(MSG)
        # enqueue (CLI) creates the spool; the API adds more.
        proc = await asyncio.create_subprocess_exec(
            *_cli("enqueue", where, "--from", "s@example.org", "--rcpt",
                  "alice@example.com", "--rcpt", "nobody@example.com", str(msg), "-q"),
            env=_env())
        assert await proc.wait() == 0
        if layout == "dir":
            spool = Spool(spool_dir)
            spool.enqueue(MSG, "s@example.org", ["carol@example.com"])
            spool.enqueue(MSG, "s@example.org", ["dave@example.com"])
            broken = spool.enqueue(MSG, "s@example.org", ["eve@example.com"])
            (spool.path / "incoming" / broken).write_text("not json{")
        else:
            with SQLiteStore(spool_dir) as store:
                store.enqueue(MSG, "s@example.org", ["carol@example.com"])
                store.enqueue(MSG, "s@example.org", ["dave@example.com"])
                store.enqueue(b"Subject: big\r\n\r\n" + b"y" * 300_000, "s@example.org",
                              ["dave@example.com"])  # a data file
                broken = store.enqueue(MSG, "s@example.org", ["eve@example.com"])
            db = sqlite3.connect(spool_dir / "queue.db")
            db.execute("UPDATE msg SET rcpts = x'7b' WHERE id = ?", (int(broken),))
            db.commit()
            db.close()
        plan = FaultPlan.parse(["rcpt:nobody@*=550 5.1.1 User unknown",
                                "dot:carol@*=452 4.2.2 Mailbox full"])
        async with Sink(f"unix:{tmp_path}/lmtp", faults=plan) as sink:
            proc = await asyncio.create_subprocess_exec(
                *_cli("replay", where, "--server", sink.destinations[0], "-q",
                      "--report", str(work / "report.json"),
                      "--bounce-dir", str(work / "bounces")),
                env=_env(), stderr=asyncio.subprocess.PIPE)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 75, err
    # Something of each kind was written.
    if layout == "dir":
        assert os.listdir(spool_dir / "deferred") and os.listdir(spool_dir / "failed")
        assert os.listdir(spool_dir / "quarantine")
    else:
        with SQLiteStore(spool_dir) as store:
            st = store.status()
        assert (st.queued, st.failed, st.quarantined) == (1, 1, 1)
    assert os.listdir(work / "bounces")
    assert (work / "report.json").exists()
    bounces = {f"bounces/{k}": v for k, v in _modes(work / "bounces").items()}
    wrong = {**_modes(spool_dir), **bounces}
    assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((work / "bounces").stat().st_mode) == 0o700
    assert stat.S_IMODE((work / "report.json").stat().st_mode) == 0o600
    assert wrong == {}


def test_opening_an_old_world_readable_spool_makes_it_private(tmp_path: Path) -> None:
    root = tmp_path / "old"
    for d in ("tmp", "msg", "incoming", "deferred", "failed", "quarantine"):
        (root / d).mkdir(parents=True)
    for p in (root, *root.iterdir()):
        p.chmod(0o755)
    Spool(root)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in (root, *root.iterdir())} == {
        p.name: "0o700" for p in (root, *root.iterdir())}


def test_sync_api_under_umask_000(tmp_path: Path) -> None:
    from lmtpfast.spool import enqueue

    with umask(0):
        enqueue(tmp_path / "s", MSG, sender="a@x.org", recipients=["b@x.org"])
    assert _modes(tmp_path / "s") == {}
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o700
