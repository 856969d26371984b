"""The command line as an MTA runs it: exit statuses follow sysexits.

0 all delivered, 75 anything undecided (try again), 65 every undelivered
recipient refused for good, 64 bad usage, 66 unreadable input.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from lmtpfast.server import FaultPlan, Sink

MESSAGE = b"Subject: cli\r\n\r\nhello\r\n"


async def lmtpfast(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lmtpfast", *args, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _faults(*specs: str) -> FaultPlan:
    return FaultPlan.parse(list(specs))


async def test_send_all_delivered(tmp_path: Path) -> None:
    msg = tmp_path / "m.eml"
    msg.write_bytes(MESSAGE)
    async with Sink("127.0.0.1:0") as sink:
        code, out, err = await lmtpfast("send", "--server", sink.destinations[0], "--from",
                                        "a@example.org", "--rcpt", "x@example.com",
                                        "--rcpt", "y@example.com", str(msg))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    # Each line starts with the enhanced status code (what Postfix's pipe(8) reads).
    assert lines[0].startswith("2.0.0 x@example.com: 250 2.0.0")
    assert lines[1].startswith("2.0.0 y@example.com: 250 2.0.0")


async def test_send_mixed_outcomes_exit_statuses() -> None:
    plan = _faults("rcpt:bad@*=550 5.1.1 No such user", "dot:full@*=452 4.2.2 Over quota")
    async with Sink("127.0.0.1:0", faults=plan) as sink:
        dest = sink.destinations[0]
        base = ("send", "--server", dest, "--from", "a@example.org")
        code, out, _ = await lmtpfast(*base, "--rcpt", "ok@x.com", "--rcpt", "bad@x.com",
                                      "-", stdin=MESSAGE)
        assert code == 67  # refused for good as an unknown user (5.1.1): EX_NOUSER
        # The recipient that decided the status comes first, with its code first.
        assert out.splitlines()[0] == "5.1.1 bad@x.com: 550 5.1.1 No such user"
        assert out.splitlines()[1].startswith("2.0.0 ok@x.com: 250")
        code, out, _ = await lmtpfast(*base, "--rcpt", "bad@x.com", "--rcpt", "full@x.com",
                                      "--json", "-", stdin=MESSAGE)
        assert code == 75  # one transient failure: try again later
        results = json.loads(out)
        assert [(r["code"], r["stage"]) for r in results] == [(550, "rcpt"), (452, "final")]


async def test_send_unreachable_is_tempfail(tmp_path: Path) -> None:
    code, _, err = await lmtpfast("send", "--server", f"unix:{tmp_path}/none", "--from", "a@b",
                                  "--rcpt", "c@d", "-", stdin=MESSAGE)
    assert code == 75
    assert "cannot connect" in err and "Traceback" not in err


async def test_send_usage_errors() -> None:
    code, _, err = await lmtpfast("send", "--server", "host:99999", "--from", "a@b",
                                  "--rcpt", "c@d", "-", stdin=MESSAGE)
    assert code == 64 and "out of range" in err
    code, _, err = await lmtpfast("send", "--from", "a@b")
    assert code == 64 and "required" in err
    code, _, err = await lmtpfast("send", "--server", "h", "--from", "a@b", "--rcpt", "c@d",
                                  "/nonexistent/message")
    assert code == 66 and "cannot read" in err


async def test_send_bad_address_and_nul() -> None:
    async with Sink("127.0.0.1:0") as sink:
        dest = sink.destinations[0]
        code, _, err = await lmtpfast("send", "--server", dest, "--from", "a@b",
                                      "--rcpt", "c@d>\r\nRCPT TO:<e@f", "-", stdin=MESSAGE)
        assert code == 64 and "forbidden character" in err
        code, _, err = await lmtpfast("send", "--server", dest, "--from", "a@b",
                                      "--rcpt", "c@d", "-", stdin=b"a\0b\r\n")
        assert code == 65 and "NUL byte at offset 1" in err
        assert sink.stats.transactions == 0


async def test_send_server_drops_connection_is_tempfail() -> None:
    async with Sink("127.0.0.1:0", faults=_faults("dot=disconnect")) as sink:
        code, out, _ = await lmtpfast("send", "--server", sink.destinations[0], "--from", "a@b",
                                      "--rcpt", "c@d", "-", stdin=MESSAGE)
    assert code == 75
    assert "may be delivered more than once" in out


async def test_probe() -> None:
    async with Sink("127.0.0.1:0") as sink:
        code, out, err = await lmtpfast("probe", sink.destinations[0], "--count", "3")
    assert code == 0, err
    assert "greeting:     220" in out
    assert "capability: PIPELINING" in out
    assert "NOOP round trip" in out


async def test_bench_json() -> None:
    async with Sink("127.0.0.1:0") as sink:
        code, out, err = await lmtpfast("bench", "--server", sink.destinations[0], "--messages",
                                        "300", "--connections", "2", "--recipients", "3",
                                        "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["messages"] == 300
    assert report["recipients"] == 900
    assert set(report["outcomes"]) == {"250 2.0.0"}


@pytest.mark.parametrize("args", [["bench", "--server", "h", "--connections", "0"],
                                  ["bench", "--server", "h", "--recipients", "2",
                                   "--recipient-pattern", "fixed@x"]])
async def test_bench_usage(args: list[str]) -> None:
    code, _, err = await lmtpfast(*args)
    assert code == 64, err
    assert "Traceback" not in err


async def test_bench_message_file(tmp_path: Path) -> None:
    msg = tmp_path / "m.eml"
    msg.write_bytes(b"Subject: from file\n\n.dot line\n" * 10)
    async with Sink("127.0.0.1:0", collect=True) as sink:
        code, out, err = await lmtpfast("bench", "--server", sink.destinations[0], "--messages",
                                        "20", "--connections", "1", "--message", str(msg),
                                        "--chunking", "off", "--json")
        assert code == 0, err
        assert json.loads(out)["messages"] == 20
        assert all(m.content == msg.read_bytes().replace(b"\n", b"\r\n")
                   for m in sink.messages)
    code, _, err = await lmtpfast("bench", "--server", "h", "--message", str(tmp_path / "no"))
    assert code == 66 and "cannot read" in err
