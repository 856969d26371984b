"""A short fuzzing run in CI: the oracles of fuzz/ over hypothesis-made input.

The harnesses in ``fuzz/`` are plain ``check(data)`` functions; atheris
drives them in the long runs (``fuzz/README.md``). Here hypothesis drives the
same functions for a few hundred inputs each (atheris is not a test
dependency), the seed corpus is replayed, and, when atheris is installed, each
harness also runs briefly under atheris itself. Crashes found so far are
regression tests at the bottom.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtpfast.proto import IMPLEMENTATIONS, Capabilities, Reply

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
HARNESSES = ("reply_parser", "lhlo", "content", "server")
EXAMPLES = int(os.environ.get("LMTPFAST_FUZZ_EXAMPLES", "1000"))


def _harness(name: str) -> ModuleType:
    if str(FUZZ) not in sys.path:
        sys.path.insert(0, str(FUZZ))
    return importlib.import_module(f"fuzz_{name}")


@pytest.fixture(autouse=True)
def _both_implementations() -> None:
    if "c" not in IMPLEMENTATIONS:
        msg = "the compiled core is not built: parity has nothing to compare"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


# Inputs made of the tokens that matter (reply codes, line ends, dots, dashes,
# digits, non-ASCII), mixed with arbitrary bytes.
_TOKENS = [b"250", b"220", b"354", b"421", b"452", b"550", b"-", b" ", b"\r\n", b"\n", b"\r",
           b".", b"2.0.0", b"4.3.2", b"PIPELINING", b"SIZE", b"AUTH", b"CHUNKING", b"x",
           b"\x00", b"\xff", "\u00b2".encode(), b"0", b"9"]
_data = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(st.sampled_from(_TOKENS), st.binary(max_size=4)), max_size=80).map(
        b"".join),
)
_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=list(HealthCheck))


@_SETTINGS
@given(head=st.binary(min_size=20, max_size=20), body=_data)
def test_reply_parser_parity(head: bytes, body: bytes) -> None:
    _harness("reply_parser").check_parser(head + body)


@_SETTINGS
@given(head=st.binary(min_size=20, max_size=20), body=_data, sane_start=st.booleans())
def test_engine_parity(head: bytes, body: bytes, sane_start: bool) -> None:
    mode = bytes([head[2] | 2]) if sane_start else head[2:3]
    _harness("reply_parser").check_engine(head[:2] + mode + head[3:] + body)


@_SETTINGS
@given(head=st.binary(min_size=17, max_size=17), body=_data)
def test_lhlo_parity_and_robustness(head: bytes, body: bytes, monkeypatch_known: None) -> None:
    _harness("lhlo").check(head + b"250-fuzz.example\r\n250-" + body)


_content = st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n.\r\n", b"\r\n", b"\xe9",
                                     b"\x00", b"..", b"\n.\n"]), max_size=60).map(b"".join)


@_SETTINGS
@given(head=st.binary(min_size=33, max_size=33), body=st.one_of(_content, st.binary(max_size=200)))
def test_content_parity_and_no_smuggling(head: bytes, body: bytes) -> None:
    _harness("content").check(head + body)


# Client bytes for the server engine: commands, line ends, dots, BDAT sizes.
_client = st.lists(
    st.one_of(
        st.sampled_from([b"LHLO c\r\n", b"MAIL FROM:<s@x>\r\n", b"RCPT TO:<bob@x>\r\n",
                         b"RCPT TO:<c@x>\r\n", b"DATA\r\n", b"BDAT 3\r\n", b"BDAT 2 LAST\r\n",
                         b"RSET\r\n", b"NOOP\r\n", b"STARTTLS\r\n", b"AUTH PLAIN x\r\n",
                         b"QUIT\r\n", b".\r\n", b"\r\n", b"\r", b"\n", b".", b" SIZE=9"]),
        st.binary(max_size=6),
    ),
    max_size=50,
).map(b"".join)


@_SETTINGS
@given(head=st.binary(min_size=17, max_size=17), body=_client)
def test_server_engine_parity(head: bytes, body: bytes) -> None:
    _harness("server").check(head + body)


@pytest.fixture
def monkeypatch_known(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hypothesis LHLO run tolerates the known SIZE crash (it has its own test below)."""
    monkeypatch.setattr(_harness("lhlo"), "SKIP_KNOWN", True)


@pytest.mark.parametrize("name", HARNESSES)
def test_seed_corpus(name: str) -> None:
    mod = _harness(name)
    seeds = sorted((FUZZ / "corpus" / name).iterdir())
    assert seeds
    for seed in seeds:
        mod.check(seed.read_bytes())


@pytest.mark.parametrize("name", HARNESSES)
def test_atheris_short_run(name: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    if os.environ.get("LD_PRELOAD"):
        pytest.skip("atheris under an LD_PRELOADed sanitizer runtime is not supported")
    env = dict(os.environ, LMTPFAST_FUZZ_SKIP_KNOWN="1")
    proc = subprocess.run(
        [sys.executable, str(FUZZ / f"fuzz_{name}.py"), str(tmp_path),
         str(FUZZ / "corpus" / name), f"-dict={FUZZ / 'lmtp.dict'}", "-runs=2000",
         f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


# --- crashes found by fuzzing ------------------------------------------------


def test_size_with_a_non_ascii_digit_does_not_raise() -> None:
    caps = Capabilities.from_reply(Reply(250, None, ("mx.example", "SIZE \u00b2")))
    assert caps.size in (0, None)


async def test_send_survives_a_non_ascii_size(engine: str) -> None:
    from lmtpfast import connect

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mx.example\r\n")
        await reader.readline()
        writer.write("250-mx.example\r\n250-PIPELINING\r\n250 SIZE \u00b2\r\n".encode())
        await reader.read(65536)
        writer.write(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 go\r\n")
        await reader.read(65536)
        writer.write(b"250 2.0.0 saved\r\n")
        await reader.read(65536)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await connect(f"127.0.0.1:{port}")
        try:
            (r,) = await client.send("a@example.org", ["b@example.org"], b"Subject: x\r\n\r\nx\r\n")
        finally:
            client.abort()
        assert r.delivered
    finally:
        server.close()
