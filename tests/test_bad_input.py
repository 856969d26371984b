"""Bad input everywhere: each row of the "Bad input" table in docs/reliability.md, tested.

Every input a user gives (destinations, addresses, messages, configuration,
maps, spool files, command-line flags) with a bad value must give a clear
error naming the problem (an exception of the documented class, a
per-recipient result, or a sysexits status with a one-line message), never
a traceback. The table and this file are tied by row id both ways: a row
without a test, or a test without a row, fails ``test_every_row_has_a_test``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lmtpfast import (
    Agent,
    ConfigurationError,
    ContentError,
    LocalProtocolError,
    PoolSettings,
    Timeouts,
    TransportMap,
    VirtualMap,
    config_from_dict,
    connect,
    load_config,
    parse_destination,
)
from lmtpfast.cli import main as cli_main
from lmtpfast.server import DEFAULT_EXTENSIONS, Sink
from lmtpfast.spool import Spool

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
ROOT = DOC.parent.parent
MSG = b"Subject: bad input\r\n\r\nbody\r\n"


def doc_rows() -> dict[str, str]:
    """Row id -> the row's "bad value" cell, from the table under ``## Bad input``."""
    lines = DOC.read_text().splitlines()
    start = lines.index("## Bad input")
    rows: dict[str, str] = {}
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        m = re.match(r"\|\s*([A-Z]\d+)\s*\|[^|]*\|([^|]*)\|", line)
        if m:
            rows[m[1]] = m[2].strip()
    return rows


@contextlib.contextmanager
def tmpdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="lmtpbad-", dir="/tmp"))  # short: AF_UNIX path limit
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def cli(*argv: str) -> tuple[int, str]:
    """Run ``lmtpfast ARGV`` in this process: (exit status, stderr). A traceback fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = cli_main(list(argv))
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
    text = err.getvalue()
    assert "Traceback" not in text, text
    return status, text


async def cli_async(*argv: str, stdin: bytes = b"") -> tuple[int, str]:
    """``python -m lmtpfast ARGV`` as a child (for commands that run their own event loop)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lmtpfast", *argv, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    _, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    text = err.decode()
    assert "Traceback" not in text, text
    assert proc.returncode is not None
    return proc.returncode, text


def raises(exc: type[BaseException], match: str, fn: Callable[[], object]) -> None:
    with pytest.raises(exc, match=match):
        fn()


async def deliver_to_sink(recipients: Any, message: Any = MSG, sender: Any = "a@example.org",
                          **sink_kw: Any) -> list[Any]:
    async with Sink("127.0.0.1:0", **sink_kw) as sink:
        agent = Agent.for_server(sink.destinations[0])
        async with agent:
            return await agent.deliver(message, sender=sender, recipients=recipients)


def one(results: list[Any], status: str, code: int, text: str) -> None:
    (r,) = results
    assert (r.status, r.code) == (status, code), r
    assert re.search(text, r.text), r.text


# --- the cases, by row id ---------------------------------------------------------

Case = Callable[[], Awaitable[None] | None]
CASES: dict[str, Case] = {}
XFAIL: dict[str, str] = {}  # K6 and K7 were fixed; a new known bug goes here


def case(rid: str) -> Callable[[Case], Case]:
    def deco(fn: Case) -> Case:
        assert rid not in CASES, rid
        CASES[rid] = fn
        return fn
    return deco


# Destinations
@case("X1")
def _x1() -> None:
    raises(ConfigurationError, "bad destination ''", lambda: parse_destination(""))


@case("X2")
def _x2() -> None:
    raises(ConfigurationError, "empty socket path", lambda: parse_destination("unix:"))


@case("X3")
def _x3() -> None:
    raises(ConfigurationError, "port 99999 out of range", lambda: parse_destination("h:99999"))


@case("X4")
def _x4() -> None:
    raises(ConfigurationError, "unknown service name 'abc'", lambda: parse_destination("h:abc"))


@case("X5")
def _x5() -> None:
    raises(ConfigurationError, r"missing '\]'", lambda: parse_destination("[::1"))


@case("X6")
def _x6() -> None:
    raises(ConfigurationError, "must be a string", lambda: parse_destination(123))  # type: ignore[arg-type]


@case("X7")
async def _x7() -> None:
    with tmpdir() as d:
        async with Agent.for_server(f"unix:{d}/none") as agent:
            r = await agent.deliver(MSG, sender="a@example.org", recipients=["b@example.org"])
        one(r, "transient", 451, "cannot connect")
        assert r[0].stage == "connect" and r[0].local
        with pytest.raises(ConnectionError, match="cannot connect"):
            await connect(f"unix:{d}/none")


@case("X8")
def _x8() -> None:
    status, err = cli("send", "--server", "h:99999", "--from", "a@b", "--rcpt", "c@d",
                      os.devnull)
    assert status == 64 and "--server: port 99999 out of range" in err


# Addresses
@case("A1")
async def _a1() -> None:
    with pytest.raises(LocalProtocolError, match="bad sender address"):
        await deliver_to_sink(["b@example.org"], sender="a@b\r\nRCPT TO:<x@y>")


@case("A2")
async def _a2() -> None:
    one(await deliver_to_sink(["b@example.org\r\nDATA"]), "permanent", 501,
        "bad recipient address syntax")


@case("A3")
async def _a3() -> None:
    one(await deliver_to_sink([""]), "permanent", 501, "bad recipient address syntax")


@case("A4")
async def _a4() -> None:
    with pytest.raises(TypeError, match="not one string"):
        await deliver_to_sink("b@example.org")


@case("A5")
async def _a5() -> None:
    with pytest.raises(TypeError, match="recipient must be str, not NoneType"):
        await deliver_to_sink([None])


@case("A6")
async def _a6() -> None:
    try:
        results = await deliver_to_sink([])
    except (LocalProtocolError, TypeError) as exc:
        assert "recipient" in str(exc)
    else:
        assert results == []


@case("A7")
async def _a7() -> None:
    no_utf8 = [e for e in DEFAULT_EXTENSIONS if e != "SMTPUTF8"]
    r = await deliver_to_sink(["jörg@example.org", "b@example.org"], extensions=no_utf8)
    assert (r[0].status, r[0].code, r[0].enhanced, r[0].local) == ("permanent", 553, "5.6.7", True)
    assert r[1].delivered


@case("A8")
def _a8() -> None:
    # The address is checked before anything is sent (here: before connecting).
    with tmpdir() as d:
        status, err = cli("send", "--server", f"unix:{d}/none", "--from", "a@b", "--rcpt",
                          "x<y@z", os.devnull)
    assert status in (64, 75), err
    assert status == 64 or "cannot connect" in err


@case("A9")
async def _a9() -> None:
    with pytest.raises(LocalProtocolError, match="bad sender address None"):
        await deliver_to_sink(["b@example.org"], sender=None)


# Messages
@case("M1")
async def _m1() -> None:
    with pytest.raises(ContentError, match="NUL byte at offset 1"):
        await deliver_to_sink(["b@example.org"], message=b"a\0b")


@case("M2")
async def _m2() -> None:
    with pytest.raises(TypeError, match=r"message must be bytes, str or email\.message\.Message"):
        await deliver_to_sink(["b@example.org"], message=5)


@case("M3")
async def _m3() -> None:
    r = await deliver_to_sink(["b@example.org"], message=b"x" * 5000, max_size=1000)
    one(r, "permanent", 552, "exceeds the server's size limit of 1000")
    assert r[0].local


@case("M4")
async def _m4() -> None:
    async with Sink("127.0.0.1:0", collect=True) as sink:
        async with Agent.for_server(sink.destinations[0]) as agent:
            r = await agent.deliver(b"a\nb\rc\r\n.d", sender="a@x.org", recipients=["b@x.org"])
        assert r[0].delivered and sink.messages[0].content == b"a\r\nb\r\nc\r\n.d\r\n"


@case("M5")
async def _m5() -> None:
    with tmpdir() as d:
        async with Sink(f"unix:{d}/s") as sink:
            status, err = await cli_async("send", "--server", sink.destinations[0], "--from",
                                          "a@b", "--rcpt", "c@d", str(d / "missing.eml"))
            assert status == 66 and "cannot read" in err
            status, err = await cli_async("send", "--server", sink.destinations[0], "--from",
                                          "a@b", "--rcpt", "c@d", str(d))
            assert status == 66 and "Is a directory" in err
            (d / "nul.eml").write_bytes(b"a\0b")
            status, err = await cli_async("send", "--server", sink.destinations[0], "--from",
                                          "a@b", "--rcpt", "c@d", str(d / "nul.eml"))
            assert status == 65 and "NUL byte" in err


# Configuration
def _toml(d: Path, text: str) -> Path:
    p = d / "lmtpfast.toml"
    p.write_text(text)
    return p


@case("C1")
def _c1() -> None:
    raises(ConfigurationError, "/nonexistent.toml: cannot read config file",
           lambda: load_config("/nonexistent.toml"))


@case("C2")
def _c2() -> None:
    with tmpdir() as d:
        raises(ConfigurationError, r"lmtpfast.toml:1: TOML syntax: .*column",
               lambda: load_config(_toml(d, "[transports\n")))


@case("C3")
def _c3() -> None:
    with tmpdir() as d:
        raises(ConfigurationError, r"\[bogus\]: unknown key",
               lambda: load_config(_toml(d, "bogus = 1\n")))


@case("C4")
def _c4() -> None:
    with tmpdir() as d:
        raises(ConfigurationError, r"\[transports.lmtp1.recipient_limit\]: Expected `int`",
               lambda: load_config(_toml(d, "[transports.lmtp1]\nrecipient_limit = 'x'\n")))


@case("C5")
def _c5() -> None:
    with tmpdir() as d:
        text = ("[transports.lmtp1]\ndestination = 'unix:/x'\n[transports.lmtp1.timeouts]\n"
                "mail = -1\n")
        raises(ConfigurationError, r"\[transports.lmtp1.timeouts.mail\]",
               lambda: load_config(_toml(d, text)))


@case("C6")
def _c6() -> None:
    with tmpdir() as d:
        raises(ConfigurationError, "names transport 'nosuch', which is not declared",
               lambda: load_config(_toml(d, "transport_map = { 'a.org' = 'nosuch:' }\n")))


@case("C7")
def _c7() -> None:
    raises(ConfigurationError, r"\[transports.t.destination\]: port 99999 out of range",
           lambda: config_from_dict({"transports": {"t": {"destination": "h:99999"}}}))


@case("C8")
def _c8() -> None:
    raises(ConfigurationError, "mail", lambda: Timeouts(mail=math.nan))


@case("C9")
def _c9() -> None:
    raises(ConfigurationError, "max_connections: must be an integer >= 1",
           lambda: PoolSettings(max_connections=0))


@case("C11")
def _c11() -> None:
    with tmpdir() as d:
        cfg = d / "lmtpfast.toml"
        cfg.write_bytes(b'lhlo_name = "mx"\ndefault = "lmtp:unix:/tmp/caf\xe9"\n')
        raises(ConfigurationError, r"lmtpfast.toml:2: not valid UTF-8 \(byte 0xe9 at column 30\)",
               lambda: load_config(cfg))
        Spool(d / "spool", create=True)
        status, err = cli("replay", str(d / "spool"), "--config", str(cfg))
    assert status == 78 and "not valid UTF-8" in err


@case("C12")
def _c12() -> None:
    with tmpdir() as d:
        spool = d / "spool"
        assert cli("enqueue", str(spool), "--from", "a@b", "--rcpt", "c@d", os.devnull)[0] == 0
        for text in ("", '[transports.t]\ndestination = "unix:/x"\n'):
            cfg = _toml(d, text)
            with pytest.raises(ConfigurationError, match="routes nothing"):
                Agent.from_config(cfg)
            status, err = cli("replay", str(spool), "--config", str(cfg))
            assert status == 78 and "routes nothing" in err
        assert _queued(spool) == 1


@case("C10")
def _c10() -> None:
    with tmpdir() as d:
        spool = d / "spool"
        assert cli("enqueue", str(spool), "--from", "a@b", "--rcpt", "c@d", os.devnull)[0] == 0
        status, err = cli("replay", str(spool), "--config", str(_toml(d, "[transports\n")))
        assert status == 78 and "TOML syntax" in err


# Maps
@case("P1")
def _p1() -> None:
    raises(ConfigurationError, r"<string>:1: expected 'key value'",
           lambda: TransportMap.parse("example.com\n"))


@case("P2")
def _p2() -> None:
    raises(ConfigurationError, r":2: duplicate key 'a.org' \(first on line 1\)",
           lambda: TransportMap.parse("a.org lmtp:x\na.org lmtp:y\n"))


@case("P3")
def _p3() -> None:
    raises(ConfigurationError, r":1: bad next hop in route",
           lambda: TransportMap.parse("a.org lmtp:h:99999\n"))


@case("P4")
def _p4() -> None:
    raises(ConfigurationError, "cannot read map file",
           lambda: TransportMap.from_file("/nonexistent/transport"))


@case("P5")
def _p5() -> None:
    with tmpdir() as d:
        (d / "map").write_bytes(b"a.org lmtp:\xff\xfe\n")
        raises(ConfigurationError, r"map:1: not valid UTF-8",
               lambda: TransportMap.from_file(d / "map"))


@case("P6")
async def _p6() -> None:
    vmap = VirtualMap.parse("a@x.org b@x.org\nb@x.org a@x.org\n")
    async with Sink("127.0.0.1:0") as sink:
        agent = Agent(transports={"lmtp": {"destination": sink.destinations[0]}},
                      virtual_map=vmap, default="lmtp:")
        async with agent:
            r = await agent.deliver(MSG, sender="s@x.org", recipients=["a@x.org", "c@x.org"])
    assert (r[0].status, r[0].code, r[0].enhanced) == ("permanent", 554, "5.4.6")
    assert "loop" in r[0].text and r[1].delivered


def _queued(spool: Path) -> int:
    """Entries queued in *spool*, whichever layout it has (store or directory spool)."""
    from lmtpfast.spool import SQLiteStore

    if (spool / "queue.db").exists():
        with SQLiteStore(spool) as store:
            return store.status().queued
    return len(os.listdir(spool / "incoming")) if (spool / "incoming").exists() else 0


# Spool files
async def _replay_broken(mangle: Callable[[Path, str], object], reason: str) -> None:
    with tmpdir() as d:
        spool = d / "spool"
        # A directory spool (its files are what is mangled); the replay of the plain
        # path converts it into the store, quarantining on the way.
        assert cli("enqueue", f"dir:{spool}", "--from", "a@b", "--rcpt", "c@d",
                   os.devnull)[0] == 0
        (qid,) = os.listdir(spool / "incoming")
        mangle(spool, qid)
        async with Sink(f"unix:{d}/s") as sink:
            status, err = await cli_async("replay", str(spool), "--server", sink.destinations[0],
                                          "--no-progress", "-q")
        assert status == 65, err
        text = "".join(p.read_text() for p in (spool / "quarantine").glob("*.txt"))
        assert reason in text, text
        assert not os.listdir(spool / "incoming")


@case("S1")
async def _s1() -> None:
    await _replay_broken(lambda s, q: (s / "incoming" / q).write_text("not json{"),
                         "malformed envelope")


@case("S2")
async def _s2() -> None:
    await _replay_broken(lambda s, q: (s / "incoming" / q).write_text(
        '{"sender": 5, "recipients": []}'), "invalid envelope")


@case("S3")
async def _s3() -> None:
    def drop_message(s: Path, q: str) -> None:
        for p in (s / "msg").glob(f"{q}*"):
            p.unlink()
    await _replay_broken(drop_message, "message file is missing")


@case("S4")
def _s4() -> None:
    status, err = cli("replay", "/nonexistent-spool", "--server", "unix:/x")
    assert status == 66 and "spool directory not found" in err


@case("S5")
def _s5() -> None:
    with tmpdir() as d:
        status, err = cli("replay", str(d), "--server", "unix:/x")
    assert status == 66 and "not a spool" in err


@case("S6")
async def _s6() -> None:
    def link_secret(s: Path, q: str) -> None:
        secret = s.parent / "shadow"
        secret.write_bytes(b"root:$y$secret:::\n")
        (s / "msg" / q).unlink()
        (s / "msg" / q).symlink_to(secret)
    await _replay_broken(link_secret, "message file is a symbolic link (not read)")


@case("S7")
async def _s7() -> None:
    await _replay_broken(lambda s, q: os.link(s / "msg" / q, s.parent / "outside.eml"),
                         "hard link(s) outside the spool")


@case("S8")
def _s8() -> None:
    with tmpdir() as d:
        assert cli("enqueue", f"dir:{d / 'spool'}", "--from", "a@b", "--rcpt", "c@d",
                   os.devnull)[0] == 0
        (d / "elsewhere").mkdir()
        shutil.rmtree(d / "spool" / "msg")
        (d / "spool" / "msg").symlink_to(d / "elsewhere")
        status, err = cli("replay", str(d / "spool"), "--server", "unix:/x")
    assert status == 66 and "spool folder msg/ is a symbolic link" in err


# Command-line flags
@case("F1")
def _f1() -> None:
    status, err = cli("send", "--server", "unix:/x", "--from", "a@b", os.devnull)
    assert status == 64 and "required: --rcpt" in err


@case("F2")
def _f2() -> None:
    status, err = cli("send", "--server", "unix:/x", "--from", "a@b", "--rcpt", "c@d",
                      "--timeout-scale", "-1", os.devnull)
    assert status == 64 and "timeout must be a positive number" in err


@case("F3")
def _f3() -> None:
    with tmpdir() as d:
        status, err = cli("send", "--server", f"unix:{d}/none", "--from", "a@b", "--rcpt", "c@d",
                          "--timeout-scale", "nan", os.devnull)
    assert status == 64 and "timeout" in err


@case("F4")
def _f4() -> None:
    status, err = cli("send", "--server", "unix:/x", "--from", "a@b", "--rcpt", "c@d",
                      "--timeout-scale", "abc", os.devnull)
    assert status == 64 and "invalid float value: 'abc'" in err


@case("F5")
def _f5() -> None:
    status, err = cli("replay", "/tmp", "--server", "unix:/x", "--concurrency", "0")
    assert status == 64 and "--concurrency: must be 1 or more" in err


@case("F6")
def _f6() -> None:
    status, err = cli("replay", "/tmp", "--server", "unix:/x", "--max-backoff", "abc")
    assert status == 64 and "bad duration 'abc'" in err


@case("F7")
def _f7() -> None:
    status, err = cli("bench", "--server", "unix:/x", "--messages", "-5")
    assert status == 64 and "--messages: must be 1 or more, got -5" in err


@case("F8")
def _f8() -> None:
    status, err = cli("sink", "--fault", "bogus=1")
    assert status == 64 and "unknown command 'bogus'" in err


@case("F9")
def _f9() -> None:
    status, err = cli("probe", "unix:/x", "--count", "-1")
    assert status == 64 and "--count must not be negative" in err


@case("F10")
def _f10() -> None:
    status, err = cli("send", "--bogus")
    assert status == 64 and "error:" in err


@case("F11")
def _f11() -> None:
    with tmpdir() as d:
        status, err = cli("enqueue", str(d / "spool"), "--from", "a@b", "--rcpt", "c@d",
                          "--notify", "BOGUS", os.devnull)
    assert status == 65 and "bad DSN NOTIFY" in err


@case("F12")
def _f12() -> None:
    status, err = cli("sink", "--listen", "h:99999")
    assert status == 64 and "99999" in err


@case("F13")
def _f13() -> None:
    with tmpdir() as d:
        assert cli("enqueue", str(d / "spool"), "--from", "a@b", "--rcpt", "c@d",
                   os.devnull)[0] == 0
        status, err = cli("replay", str(d / "spool"), "--server", "unix:/x", "--report", str(d))
        assert _queued(d / "spool") == 1
    assert status == 64 and "is a directory" in err


@case("F14")
def _f14() -> None:
    with tmpdir() as d:
        # os.fsdecode(b"b\xff@x"): how Python hands such an argument over.
        status, err = cli("enqueue", str(d / "spool"), "--from", "a@b", "--rcpt", "b\udcff@x",
                          os.devnull)
        assert not (d / "spool" / "incoming").exists() or not os.listdir(d / "spool" / "incoming")
    assert status == 64 and "is not valid UTF-8" in err


@case("F15")
def _f15() -> None:
    with tmpdir() as d:
        (d / "nul.eml").write_bytes(b"a\0b\r\n")
        status, err = cli("enqueue", str(d / "spool"), "--from", "a@b", "--rcpt", "c@d",
                          str(d / "nul.eml"))
        assert _queued(d / "spool") == 0
    assert status == 65 and "NUL byte at offset 1" in err


@case("F16")
def _f16() -> None:
    with tmpdir() as d:
        for n in ("a", "b"):
            (d / f"{n}.eml").write_bytes(MSG)
        status, err = cli("enqueue", str(d / "spool"), "--from", "a@b", "--rcpt", "c@d",
                          str(d / "a.eml"), str(d / "missing.eml"), str(d / "b.eml"))
        assert not (d / "spool" / "incoming").exists() or not os.listdir(d / "spool" / "incoming")
    assert status == 66 and "missing.eml: No such file or directory; nothing queued" in err


@case("F17")
async def _f17() -> None:
    with tmpdir() as d:
        status, err = await cli_async("send", "--server", f"unix:{d}/none", "--from", "a@b",
                                      "--rcpt", "c@d", "--max-size", "1m", "-",
                                      stdin=b"y\n" * (1 << 20))
    assert status == 69 and "message larger than 1048576 bytes" in err


@case("F18")
def _f18() -> None:
    status, err = cli("send", "--server", "unix:/x", "--from", "\udcfe@x", "--rcpt", "c@d",
                      os.devnull)
    assert status == 64 and "is not valid UTF-8" in err and err.startswith("4.3.5 ")


@case("F19")
def _f19() -> None:
    status, err = cli("send", "--server", "unix:/x", "--from", "a@b", "--rcpt", "c@d",
                      "--max-size", "abc", os.devnull)
    assert status == 64 and "bad size 'abc'" in err


# --- the tests --------------------------------------------------------------------


def test_every_row_has_a_test() -> None:
    rows = doc_rows()
    assert rows, f"no '## Bad input' table in {DOC}"
    assert sorted(rows) == sorted(CASES), (
        f"rows without a test: {sorted(set(rows) - set(CASES))}; "
        f"tests without a row: {sorted(set(CASES) - set(rows))}")


def _param(rid: str) -> object:
    marks = [pytest.mark.xfail(strict=True, reason=XFAIL[rid])] if rid in XFAIL else []
    return pytest.param(rid, id=rid, marks=marks)


@pytest.mark.parametrize("rid", [_param(r) for r in CASES])
def test_bad_input(rid: str) -> None:
    result = CASES[rid]()
    if asyncio.iscoroutine(result):
        asyncio.run(asyncio.wait_for(result, 60))
