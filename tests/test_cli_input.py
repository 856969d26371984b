"""Bad and unbounded input on the command line (issue 10, items 22 and 23).

Each of these once ended in a traceback, a wrong status, a silent partial or
a process that grew without bound; each must end in a clear one-line error
and the documented sysexits status.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmtpfast import ConfigurationError, load_config
from lmtpfast.server import Sink
from lmtpfast.spool import Selection, Spool, SQLiteStore

from .test_spool_full_disk import fill, small_fs

ROOT = Path(__file__).resolve().parent.parent
MSG = b"From: a@example.org\r\nSubject: input\r\nMessage-ID: <in@x>\r\n\r\nhello\r\n"
__all__ = ["small_fs"]  # the fixture, imported for the full-disk case


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


async def lmtpfast(*args: str | bytes, stdin: bytes = b"") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lmtpfast", *args, env=_env(), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    text = err.decode(errors="replace")
    assert "Traceback" not in text, text
    return proc.returncode, out.decode(errors="replace"), text


def queued(spool: Path) -> list[str]:
    """The ids queued in *spool*: in its store (what enqueue writes) and as directory spool
    entries not converted yet (replay converts them at the start of a pass)."""
    ids = []
    if (spool / "queue.db").exists():
        with SQLiteStore(spool) as store:
            ids += [i.id for i in store.iter_entries(Selection(states=("queued",)))]
    for d in ("incoming", "deferred"):
        if (spool / d).exists():
            ids += os.listdir(spool / d)
    return sorted(ids)


# -- configuration -----------------------------------------------------------------------


async def test_non_utf8_config_file_is_a_configuration_error(tmp_path: Path) -> None:
    cfg = tmp_path / "lmtpfast.toml"
    cfg.write_bytes(b'lhlo_name = "mx"\ndefault = "lmtp:unix:/tmp/caf\xe9"\n')
    with pytest.raises(ConfigurationError, match=r"lmtpfast.toml:2: not valid UTF-8"):
        load_config(cfg)
    spool = Spool(tmp_path / "spool", create=True)
    status, _, err = await lmtpfast("replay", str(spool.path), "--config", str(cfg))
    assert status == 78 and "not valid UTF-8" in err


# -- replay --json ------------------------------------------------------------------------


async def test_replay_json_to_a_directory_is_refused_before_delivery(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", create=True)
    spool.enqueue(MSG, "a@example.org", ["b@example.org"])
    (tmp_path / "report").mkdir()
    async with Sink(f"unix:{tmp_path}/lmtp", collect=True) as sink:
        status, _, err = await lmtpfast("replay", str(spool.path), "--server",
                                        sink.destinations[0], "--report", str(tmp_path / "report"))
        assert sink.messages == []
    assert status == 64 and "is a directory" in err
    assert len(queued(spool.path)) == 1
    assert os.listdir(tmp_path / "report") == []


async def test_replay_json_on_a_full_disk(tmp_path: Path, small_fs: Path) -> None:
    """The report cannot be written: deliveries still count, no traceback, no stray file."""
    spool = Spool(tmp_path / "spool", create=True)
    for i in range(30):
        spool.enqueue(MSG, "a@example.org", [f"user{i}@example.org"])
    fill(small_fs)
    report = small_fs / "report.json"
    async with Sink(f"unix:{tmp_path}/lmtp", collect=True) as sink:
        status, _, err = await lmtpfast("replay", str(spool.path), "--server",
                                        sink.destinations[0], "--report", str(report), "-q")
        assert len(sink.messages) == 30
    assert status == 74, err
    assert "report" in err and "No space left on device" in err
    assert [n for n in os.listdir(small_fs) if n != "filler"] == []
    assert queued(spool.path) == []


# -- enqueue -------------------------------------------------------------------------------


async def test_enqueue_non_utf8_address_is_a_usage_error(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    status, _, err = await lmtpfast("enqueue", str(spool), "--from", "a@example.org",
                                    "--rcpt", b"b\xff@example.org", "-", stdin=MSG)
    assert status == 64 and "not valid UTF-8" in err
    assert queued(spool) == []
    status, _, err = await lmtpfast("send", "--server", f"unix:{tmp_path}/none", "--from",
                                    b"\xfe@example.org", "--rcpt", "b@example.org", "-",
                                    stdin=MSG)
    assert status == 64 and "not valid UTF-8" in err


async def test_enqueue_refuses_a_message_with_nul(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    status, _, err = await lmtpfast("enqueue", str(spool), "--from", "a@example.org",
                                    "--rcpt", "b@example.org", "-",
                                    stdin=b"Subject: x\r\n\r\na\0b\r\n")
    assert status == 65 and "NUL byte at offset" in err
    assert queued(spool) == []


async def test_enqueue_checks_every_file_before_queueing_any(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    a, b = tmp_path / "a.eml", tmp_path / "b.eml"
    a.write_bytes(MSG)
    b.write_bytes(MSG)
    status, _, err = await lmtpfast("enqueue", str(spool), "--from", "a@example.org", "--rcpt",
                                    "c@example.org", str(a), str(tmp_path / "missing.eml"), str(b))
    assert status == 66 and "missing.eml" in err and "nothing queued" in err
    assert queued(spool) == []  # a rerun cannot duplicate a.eml
    status, out, err = await lmtpfast("enqueue", str(spool), "--from", "a@example.org", "--rcpt",
                                      "c@example.org", str(a), str(b))
    assert status == 0 and len(queued(spool)) == 2 and "queued 2 message" in out


async def test_enqueue_size_limit(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    status, _, err = await lmtpfast("enqueue", str(spool), "--from", "a@example.org", "--rcpt",
                                    "c@example.org", "--max-size", "1000", "-",
                                    stdin=b"x" * 5000)
    assert status == 65 and "larger than 1000 bytes" in err
    assert queued(spool) == []


# -- send ------------------------------------------------------------------------------------


async def test_send_json_when_the_server_is_unreachable(tmp_path: Path) -> None:
    status, out, err = await lmtpfast("send", "--server", f"unix:{tmp_path}/none", "--from",
                                      "a@example.org", "--rcpt", "b@example.org", "--rcpt",
                                      "c@example.org", "--json", "-", stdin=MSG)
    assert status == 75, err
    results = json.loads(out)
    assert [(r["address"], r["status"], r["stage"]) for r in results] == [
        ("b@example.org", "transient", "connect"), ("c@example.org", "transient", "connect")]


async def _multiline_server(path: str) -> asyncio.Server:
    """An LMTP server whose RCPT refusal and final reply span several lines."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 multi ready\r\n")
        rcpts: list[bytes] = []
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"LHLO":
                writer.write(b"250-multi\r\n250 ENHANCEDSTATUSCODES\r\n")
            elif verb == b"MAIL":
                writer.write(b"250 2.1.0 OK\r\n")
            elif verb == b"RCPT":
                if b"bad@" in line:
                    writer.write(b"550-5.1.1 No such user here\r\n550-5.1.1 see the FAQ\r\n"
                                 b"550 5.1.1 really not\r\n")
                else:
                    rcpts.append(line)
                    writer.write(b"250 2.1.5 OK\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                while await reader.readline() not in (b".\r\n", b""):
                    pass
                for _ in rcpts:
                    writer.write(b"250-2.0.0 stored\r\n250 2.0.0 in two lines\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"250 2.0.0 OK\r\n")
            await writer.drain()
        writer.close()
    return await asyncio.start_unix_server(serve, path)


async def test_send_prints_one_line_per_recipient_for_multiline_replies(tmp_path: Path) -> None:
    server = await _multiline_server(str(tmp_path / "lmtp"))
    async with server:
        status, out, err = await lmtpfast("send", "--server", f"unix:{tmp_path}/lmtp", "--from",
                                          "a@example.org", "--rcpt", "ok@example.org",
                                          "--rcpt", "bad@example.org", "-", stdin=MSG)
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert "No such user here; see the FAQ; really not" in out
    assert "stored; in two lines" in out
    assert status == 67, err


# Runs argv[2:] and writes its peak RSS (KiB) into argv[1], exiting with its status.
_PEAK_RSS = """
import resource, subprocess, sys
status = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(status)
"""


async def test_send_reads_a_bounded_amount_of_input(tmp_path: Path) -> None:
    """`yes | lmtpfast send`: refused once past the limit, memory bounded (default and set)."""
    for extra, limit in (([], 64 * 1024 * 1024), (["--max-size", "1m"], 1024 * 1024)):
        yes = subprocess.Popen(["yes"], stdout=subprocess.PIPE)
        assert yes.stdout is not None
        rss_file = tmp_path / "maxrss"
        proc = subprocess.Popen(
            [sys.executable, "-c", _PEAK_RSS, str(rss_file),
             sys.executable, "-m", "lmtpfast", "send", "--server", f"unix:{tmp_path}/none",
             "--from", "a@example.org", "--rcpt", "b@example.org", *extra, "-"],
            stdin=yes.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
        yes.stdout.close()
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            yes.kill()
            yes.wait()
        assert proc.returncode == 69, err  # refused for good, 5.3.4: EX_UNAVAILABLE
        assert f"larger than {limit} bytes" in err.decode()
        assert out.decode().startswith("5.3.4 "), out
        # The peak RSS of this one child (KiB): the limit plus the interpreter.
        # (RUSAGE_CHILDREN would be the largest of every child this test
        # process ever waited for: servers of other tests included.)
        assert int(rss_file.read_text()) < (limit * 2.2 + 120 * 1024 * 1024) / 1024


async def test_send_and_replay_into_a_closed_pipe(tmp_path: Path) -> None:
    """`lmtpfast ... | head -1`: no traceback, no EPIPE status: the delivery's own status."""
    spool = Spool(tmp_path / "spool", create=True)
    for i in range(200):
        spool.enqueue(MSG, "a@example.org", [f"u{i}@example.org"])
    msg = tmp_path / "m.eml"
    msg.write_bytes(MSG)
    async with Sink(f"unix:{tmp_path}/lmtp") as sink:
        # Enough output to fill the pipe once nobody reads it.
        for args in (["replay", str(spool.path), "--server", sink.destinations[0], "-v",
                      "--no-progress"],
                     ["send", "--server", sink.destinations[0], "--from", "a@example.org",
                      *(a for i in range(900) for a in ("--rcpt", f"r{i}@example.org")),
                      str(msg)]):
            r, w = os.pipe()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lmtpfast", *args, env=_env(),
                stdin=asyncio.subprocess.PIPE, stdout=w, stderr=asyncio.subprocess.PIPE)
            os.close(w)
            with os.fdopen(r, "rb") as head:  # `head -1`: read one line, then go away
                loop = asyncio.get_running_loop()
                assert await asyncio.wait_for(loop.run_in_executor(None, head.readline), 60)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
            text = err.decode()
            assert "Traceback" not in text and "Exception ignored" not in text, text
            assert proc.returncode == 0, (args[0], text)
    assert queued(spool.path) == []


# -- help and docstrings -------------------------------------------------------------------


def _commands() -> Iterator[str]:
    for p in sorted((ROOT / "lmtpfast" / "cli").glob("*.py")):
        if not p.name.startswith("_"):
            yield p.stem.replace("_", "-")  # check_config.py is `check-config`


def test_help_lists_every_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "lmtpfast", "--help"], capture_output=True,
                          env=_env(), timeout=60)
    assert proc.returncode == 0
    text = proc.stdout.decode()
    commands = list(_commands())
    assert len(commands) >= 6
    for name in commands:
        assert re.search(rf"^\s+{name}\s+\S", text, re.M), (name, text)
    # The one-line description names them all too (it once named three).
    description = text.split("\n\n")[1]
    assert all(name in description for name in commands), description


def test_dovecot_stores_a_duplicate_recipient_once_as_its_docstring_says(dovecot) -> None:  # type: ignore[no-untyped-def]
    import lmtpfast
    from lmtpfast._testing import dovecot as dovecot_mod

    async def send() -> list[lmtpfast.RecipientResult]:
        client = await lmtpfast.connect(dovecot.destination_unix)
        try:
            return await client.send("s@example.org", ["alice@example.com",
                                                       "alice@example.com"], MSG)
        finally:
            await client.quit()

    results = asyncio.run(send())
    assert [r.delivered for r in results] == [True, True]
    assert len(dovecot.messages("alice")) == 1
    doc = " ".join((dovecot_mod.__doc__ or "").split())
    assert "A recipient given twice is stored once" in doc
