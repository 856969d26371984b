"""The delivery log's file target: written in batches, the same lines as the logging path,
reopened after rotation, flushed by warnings and on close (cli/_log.py)."""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path

import pytest

from lmtpfast.cli._log import _Stamp, open_log

from .test_daemon import LINE


def _deliver(log: object, n: int, first: int = 0) -> None:
    for i in range(first, first + n):
        log.delivery(f"ID{i}", f"u{i}@example.org", "delivered", code=250,  # type: ignore[attr-defined]
                     enhanced="2.0.0", text="Saved", relay="unix:/run/dovecot/lmtp",
                     delay=0.5, delays=(0.1, 0.1, 0.1, 0.2), attempts=1)


def test_the_stamp_is_isoformat() -> None:
    stamp = _Stamp()
    for t in (1764629974.164751, 1764629974.999999, 1764629975.0, 1700000000.5):
        want = datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="microseconds")
        assert stamp(t) == want


@pytest.mark.parametrize("fmt", ["postfix", "json"])
def test_buffered_until_flushed_then_the_same_lines(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "maillog"
    log = open_log({"log_target": str(path), "log_format": fmt}, "lmtpfast/run")
    log._direct.interval = 3600.0  # type: ignore[union-attr]  # no timed flush in this test
    _deliver(log, 3)
    assert path.read_text() == ""  # buffered: nothing written per line
    log.flush()
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    if fmt == "postfix":
        m = LINE.match(lines[0])
        assert m is not None, lines[0]
        assert (m["id"], m["to"], m["status"], m["delays"]) == ("ID0", "u0@example.org", "sent",
                                                                 "0.1/0.1/0.1/0.2")
    else:
        row = json.loads(lines[0])
        assert (row["id"], row["to"], row["status"], row["program"], row["level"]) == (
            "ID0", "u0@example.org", "sent", "lmtpfast/run", "info")
    log.message("a warning", level=logging.WARNING)  # warnings go out at once, in order
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and "a warning" in lines[3]
    log.close()


def test_a_full_batch_goes_out_by_itself_and_close_flushes(tmp_path: Path) -> None:
    path = tmp_path / "maillog"
    log = open_log({"log_target": str(path)}, "lmtpfast/run")
    _deliver(log, 256)
    assert len(path.read_text().splitlines()) == 256
    _deliver(log, 5, 256)
    log.close()
    lines = path.read_text().splitlines()
    assert [LINE.match(x)["id"] for x in lines] == [f"ID{i}" for i in range(261)]  # type: ignore[index]


def test_reopened_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "maillog"
    log = open_log({"log_target": str(path)}, "lmtpfast/run")
    _deliver(log, 2)
    log.flush()
    path.rename(tmp_path / "maillog.1")  # logrotate without copytruncate
    _deliver(log, 2, 2)
    log.close()
    assert len((tmp_path / "maillog.1").read_text().splitlines()) == 2
    assert [LINE.match(x)["id"] for x in path.read_text().splitlines()] == [  # type: ignore[index]
        "ID2", "ID3"]
