"""The server engine: the compiled twin against the reference, and the handler interface.

* Parity: random command streams, split at random offsets, through the
  pure-Python ``ServerSession`` (the oracle) and the compiled one, with the
  sink's handler (faults, storage) and with a handler that records every
  hook call: the same items per call, counters, hook calls and content.
* The handler interface on both engines: pending RCPT answers (pipelined
  RCPTs asked together, DATA held until all are in, RCPT order kept),
  content back-pressure, final replies that come later and out of order,
  failures in hooks (451, never a traceback), STARTTLS (the sans-IO states,
  then real TLS with ``smtplib.LMTP`` as the client), AUTH exchanges,
  ``auth_required``/``tls_required`` and the junk-command limit.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import smtplib
import ssl
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtpfast.server import (
    CLOSE,
    DEFAULT,
    IMPLEMENTATIONS,
    START_TLS,
    Decision,
    Delay,
    Envelope,
    FaultPlan,
    Handler,
    Pending,
    Server,
    SessionConfig,
    SinkHandler,
    SinkStats,
    _data,
)
from lmtpfast.server._faults import FaultEngine
from tests.test_sink import _TOKENS as SINK_TOKENS

ENGINES = ["python", "c"]


def _need(name: str) -> None:
    if name not in IMPLEMENTATIONS:
        msg = f"the {name} server engine is not built (python setup.py build_ext --inplace)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(params=ENGINES)
def impl(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    _need(name)
    return name


@pytest.fixture
def both() -> None:
    _need("c")


def session(
    impl: str, handler: Handler | None = None, stats: SinkStats | None = None, **cfg: Any
) -> Any:
    return IMPLEMENTATIONS[impl].ServerSession(SessionConfig(**cfg), handler, stats)


def text(items: list[Any]) -> bytes:
    return b"".join(i for i in items if isinstance(i, bytes))


def codes(items: list[Any]) -> list[int]:
    lines = text(items).split(b"\r\n")
    return [int(ln[:3]) for ln in lines if ln[:3].isdigit() and ln[3:4] != b"-"]


def pendings(items: list[Any]) -> list[Pending]:
    return [i for i in items if isinstance(i, Pending)]


# --- parity: the compiled engine against the reference -------------------------

# The sink suite's random-input tokens, and more: parameters, paths, verbs.
_TOKENS = [
    *SINK_TOKENS,
    b"lhlo y\r\n",
    b"MAIL FROM:<> SIZE=5 BODY=8BITMIME\r\n",
    b"MAIL FROM:<s@x> SMTPUTF8\r\n",
    b"mail from:<bob@d> RET=FULL ENVID=e1\r\n",
    b"MAIL FROM:<a@b> FOO=1\r\n",
    b"rcpt to:<c@d> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;c@d\r\n",
    "RCPT TO:<jörg@d>\r\n".encode(),
    b'RCPT TO:<"q > x"@d>\r\n',
    b"RCPT TO:<a b@d>\r\n",
    b"RCPT TO: <Postmaster>\r\n",
    b"DATA x\r\n",
    b"BDAT x\r\n",
    b"NOOP hi\r\n",
    b"VRFY bob\r\n",
    b"HELO x\r\n",
    b"STARTTLS\r\n",
    b"AUTH PLAIN\r\n",
    b"XYZZY\r\n",
]

_FUZZ = str(Path(__file__).resolve().parent.parent / "fuzz")
if _FUZZ not in sys.path:
    sys.path.insert(0, _FUZZ)
from fuzz_server import PLAN as _PLAN  # noqa: E402  (the fuzz harness's fault plan)


class Recorder(Handler):
    """Answers nothing differently; records every hook call (content joined at the end)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.content: list[bytes] = []

    def greeting(self, session: Any, default: bytes) -> None:
        self.calls.append(("greeting", default))

    def lhlo(self, session: Any, name: bytes, default: bytes) -> None:
        self.calls.append(("lhlo", name, default))

    def mail(self, session: Any, sender: bytes, params: list[bytes], default: bytes) -> None:
        self.calls.append(("mail", sender, params, default))

    def rcpt(
        self, session: Any, index: int, rcpt: bytes, params: list[bytes], default: bytes
    ) -> None:
        self.calls.append(("rcpt", index, rcpt, params, default, session.recipients))

    def data(self, session: Any, default: bytes) -> None:
        self.calls.append(("data", default))

    def bdat(self, session: Any, size: int, last: bool, default: bytes | None) -> None:
        self.calls.append(("bdat", size, last, default))

    def content(self, session: Any, chunk: bytes) -> None:
        assert chunk
        self.calls.append(("content", chunk))
        self.content.append(chunk)

    def end_of_content(self, session: Any, env: Envelope) -> None:
        self.calls.append(
            (
                "eoc",
                env.sender,
                env.recipients,
                env.rcpt_ids,
                env.rcpt_params,
                env.mail_params,
                env.size,
                env.too_big,
                env.chunked,
                b"".join(self.content),
            )
        )
        self.content.clear()

    def rset(self, session: Any, default: bytes) -> None:
        self.calls.append(("rset", default))

    def noop(self, session: Any, default: bytes) -> None:
        self.calls.append(("noop", default))

    def quit(self, session: Any, default: bytes) -> None:
        self.calls.append(("quit", default))

    def reset(self, session: Any) -> None:
        self.calls.append(("reset",))
        self.content.clear()

    def closed(self, session: Any) -> None:
        self.calls.append(("closed",))


def normalise(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    for i in items:
        if isinstance(i, bytes):
            if out and isinstance(out[-1], bytes):
                out[-1] += i
            else:
                out.append(i)
        else:
            out.append(repr(i))
    return out


def run_both(data: bytes, bounds: list[int], make: Any, **cfg: Any) -> None:
    results = []
    for name in ENGINES:
        stats = SinkStats()
        handler, extra = make(stats)
        s = session(name, handler, stats, **cfg)
        calls = [normalise(s.start())]
        for a, b in itertools.pairwise(bounds):
            calls.append(normalise(s.receive_data(data[a:b])))
        calls.append(normalise(s.receive_data(b"")))
        s.connection_lost()
        results.append((calls, msgspec.to_builtins(stats), extra(), s.closed))
    assert results[0] == results[1]


@settings(
    max_examples=int(os.environ.get("LMTPFAST_PARITY_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    tokens=st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=50),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=10),
    mode=st.sampled_from(["plain", "store", "faults", "store+faults", "recorder"]),
    small=st.booleans(),
)
def test_parity_with_the_reference(
    both: None, tokens: list[bytes], cuts: list[int], mode: str, small: bool
) -> None:
    data = b"".join(tokens)
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    cfg: dict[str, Any] = {"max_size": 100, "max_line_length": 200} if small else {}
    cfg["max_recipients"] = 4 if small else 1000

    if mode == "recorder":

        def make(stats: SinkStats) -> Any:
            r = Recorder()
            return r, lambda: r.calls

    else:

        def make(stats: SinkStats) -> Any:
            got: list[tuple[bytes, list[bytes], bytes]] = []

            def deliver(s: bytes, r: Any, c: bytes) -> list[bool]:
                got.append((s, list(r), c))
                return [not x.startswith(b"c") for x in r]

            faults = FaultEngine(FaultPlan.parse(_PLAN)) if "faults" in mode else None
            h = SinkHandler(stats, deliver=deliver if "store" in mode else None, faults=faults)
            return h, lambda: got

    run_both(data, bounds, make, **cfg)


_line = st.binary(max_size=40)


@settings(
    max_examples=int(os.environ.get("LMTPFAST_PARITY_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    wire=st.lists(
        st.one_of(_line, st.sampled_from([b".", b"..", b"\r\n", b"\r\n.\r\n", b"\n.", b"\r"])),
        max_size=30,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
    keep=st.booleans(),
    limit=st.sampled_from([0, 5, 50]),
)
def test_decoder_parity(
    both: None, wire: list[bytes], cuts: list[int], keep: bool, limit: int
) -> None:
    data = b"".join(wire) + b"\r\n.\r\nNEXT"
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    out = []
    for cls in (_data.DotDecoder, IMPLEMENTATIONS["c"].DotDecoder):
        dec = cls(keep=keep, limit=limit)
        end = -1
        taken = []
        for a, b in itertools.pairwise(bounds):
            end = dec.feed(data[a:b])
            taken.append(dec.take())
            if end >= 0:
                end += a
                break
        out.append((end, dec.size, dec.overflow, taken))
    assert out[0] == out[1]  # the same chunks, not only the same content


# --- the handler interface ----------------------------------------------------------


class Token:
    """An awaitable stand-in: the sans-IO tests resolve it themselves."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __await__(self) -> Iterator[Any]:  # pragma: no cover - never awaited here
        yield None

    def __repr__(self) -> str:
        return f"Token({self.name})"


def by_token(items: list[Any]) -> dict[str, Pending]:
    return {p.awaitable.name: p for p in pendings(items)}


class Lookup(Handler):
    """RCPT answers come later; final replies too."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, bytes]] = []
        self.envelopes: list[Envelope] = []
        self.final: list[Any] | None = None

    def rcpt(
        self, session: Any, index: int, rcpt: bytes, params: list[bytes], default: bytes
    ) -> Any:
        self.asked.append((index, rcpt))
        if rcpt.startswith(b"now"):
            return None
        return Token(rcpt.decode())

    def end_of_content(self, session: Any, env: Envelope) -> Any:
        self.envelopes.append(env)
        return self.final


def test_pending_rcpts_are_asked_together_and_keep_order(impl: str) -> None:
    h = Lookup()
    s = session(impl, h)
    s.start()
    s.receive_data(b"LHLO c\r\n")
    out = s.receive_data(
        b"MAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nRCPT TO:<now@x>\r\nRCPT TO:<b@x>\r\n"
        b"DATA\r\nhello\r\n.\r\nNOOP\r\n"
    )
    # Every RCPT was asked before any answer came; nothing after the first
    # pending one is written; DATA waits.
    assert h.asked == [(0, b"a@x"), (1, b"now@x"), (2, b"b@x")]
    assert text(out) == b"250 2.1.0 Sender <s@x> OK\r\n"
    assert s.blocked
    tokens = by_token(out)
    assert set(tokens) == {"a@x", "b@x"}
    out = s.resolve(tokens["b@x"], b"550 5.1.1 <b@x> unknown\r\n")
    assert text(out) == b""  # a@x's answer is still owed first
    out = s.resolve(tokens["a@x"], None)
    assert codes(out) == [250, 250, 550, 354, 250, 250, 250]  # ..., the finals, NOOP
    assert b"<a@x> Accepted" in text(out)
    (env,) = h.envelopes
    assert env.recipients == [b"a@x", b"now@x"] and env.rcpt_ids == [0, 1]
    assert not s.blocked


def test_pending_rcpt_limit_counts_pending(impl: str) -> None:
    h = Lookup()
    s = session(impl, h, max_recipients=2)
    s.start()
    out = s.receive_data(
        b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nRCPT TO:<now@x>\r\n"
    )
    tokens = by_token(out)
    out = s.resolve(tokens["a@x"], None) + s.resolve(tokens["b@x"], None)
    # The third was refused while two were pending: a transient refusal is safe.
    assert codes(out) == [250, 250, 452]


def test_final_replies_later_and_out_of_order(impl: str) -> None:
    h = Lookup()
    h.final = [Token("f1"), b"451 4.2.0 <now2@x> later\r\n", Token("f3")]
    stats = SinkStats()
    s = session(impl, h, stats)
    s.start()
    s.receive_data(b"LHLO c\r\n")
    out = s.receive_data(
        b"MAIL FROM:<s@x>\r\nRCPT TO:<now1@x>\r\nRCPT TO:<now2@x>\r\nRCPT TO:<now3@x>\r\nDATA\r\n"
    )
    assert codes(out) == [250, 250, 250, 250, 354]
    # The end of this message and the next transaction, pipelined.
    out = s.receive_data(b"x\r\n.\r\nMAIL FROM:<t@x>\r\nRCPT TO:<now4@x>\r\nDATA\r\n")
    assert text(out) == b""
    assert not s.blocked  # the next transaction is read meanwhile
    assert len(h.asked) == 4  # ... and its RCPT already asked
    tokens = by_token(out)
    out = s.resolve(tokens["f3"], Decision(250, [b"250 2.0.0 <now3@x> third\r\n"]))
    assert text(out) == b""
    out = s.resolve(tokens["f1"], None)
    assert codes(out) == [250, 451, 250, 250, 250, 354]
    assert stats.final_replies == {250: 2, 451: 1}
    assert stats.transactions == 1


def test_final_reply_that_closes_drops_what_follows(impl: str) -> None:
    h = Lookup()
    h.final = [Token("f1"), None]
    s = session(impl, h)
    s.start()
    s.receive_data(b"LHLO c\r\n")
    s.receive_data(b"MAIL FROM:<s@x>\r\nRCPT TO:<now1@x>\r\nRCPT TO:<now2@x>\r\nDATA\r\n")
    out = s.receive_data(b"x\r\n.\r\nNOOP\r\n")
    out = s.resolve(by_token(out)["f1"], Decision(421, [b"421 4.3.2 going away\r\n"]))
    assert codes(out) == [421]
    assert out[-1] is CLOSE and s.closed


def test_pending_answer_that_fails_is_451(impl: str) -> None:
    h = Lookup()
    s = session(impl, h)
    s.start()
    out = s.receive_data(b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nDATA\r\n")
    out = s.resolve(by_token(out)["a@x"], None, RuntimeError("map down"))
    assert codes(out) == [451, 503]  # no accepted recipient: DATA refused
    assert b"451 4.3.0" in text(out)


class Broken(Handler):
    def mail(self, session: Any, sender: bytes, params: list[bytes], default: bytes) -> Any:
        raise RuntimeError("bug")

    def noop(self, session: Any, default: bytes) -> Any:
        return Token("not allowed here")


def test_hook_failures_are_transient_replies(impl: str) -> None:
    s = session(impl, Broken())
    s.start()
    out = s.receive_data(b"LHLO c\r\nMAIL FROM:<s@x>\r\nNOOP\r\nMAIL FROM:<s@x>\r\n")
    assert codes(out) == [250, 451, 451, 451]


class Slow(Handler):
    """Content back-pressure: every chunk must be acknowledged."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def content(self, session: Any, chunk: bytes) -> Any:
        self.chunks.append(chunk)
        return Token(f"c{len(self.chunks)}")

    def end_of_content(self, session: Any, env: Envelope) -> Any:
        return [b"250 2.0.0 <%s> got %d\r\n" % (r, env.size) for r in env.recipients]


@pytest.mark.parametrize("via", ["data", "bdat"])
def test_content_back_pressure(impl: str, via: str) -> None:
    h = Slow()
    s = session(impl, h)
    s.start()
    s.receive_data(b"LHLO c\r\n")
    if via == "data":
        out = s.receive_data(b"MAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nDATA\r\n")
        assert codes(out) == [250, 250, 354]
        first, second = b"part one\r\n", b"..two\r\n.\r\nNOOP\r\n"
    else:
        out = s.receive_data(b"MAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\n")
        first, second = b"BDAT 10\r\npart one\r\n", b"BDAT 6 LAST\r\n.two\r\nNOOP\r\n"
    out = s.receive_data(first)
    assert s.blocked
    out += s.receive_data(second)  # an I/O layer that read on: buffered, not processed
    ps = pendings(out)
    assert len(ps) == 1 and len(h.chunks) == 1
    out = s.resolve(ps[0], None)
    ps = pendings(out)
    assert len(ps) == 1 and s.blocked
    out = s.resolve(ps[0], None)
    assert not s.blocked
    assert b"".join(h.chunks) == b"part one\r\n.two\r\n"
    assert codes(out)[-2:] == [250, 250] and b"got 16" in text(out)


class Faulty(Handler):
    """Decision items: a delay before, an extra line after, a close."""

    def rcpt(
        self, session: Any, index: int, rcpt: bytes, params: list[bytes], default: bytes
    ) -> Any:
        if rcpt == b"slow@x":
            return Decision(250, [Delay(0.1), DEFAULT])
        if rcpt == b"gone@x":
            return Decision(0, [CLOSE])
        return None


def test_decision_items(impl: str) -> None:
    s = session(impl, Faulty())
    s.start()
    out = s.receive_data(
        b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<slow@x>\r\nRCPT TO:<gone@x>\r\nNOOP\r\n"
    )
    kinds = [type(i).__name__ if not isinstance(i, bytes) else "bytes" for i in out]
    assert kinds == ["bytes", "Delay", "bytes", "_Instruction"]
    assert out[-1] is CLOSE and s.closed
    assert out[2].startswith(b"250 2.1.5 Recipient <slow@x>")


def test_junk_command_limit(impl: str) -> None:
    s = session(impl, max_commands=3)
    s.start()
    out = s.receive_data(b"LHLO c\r\nNOOP\r\nRSET\r\nVRFY x\r\nNOOP\r\nNOOP\r\n")
    assert codes(out) == [250, 250, 250, 252, 421]
    assert out[-1] is CLOSE
    # A completed transaction resets the count.
    s = session(impl, max_commands=2)
    s.start()
    out = s.receive_data(
        b"LHLO c\r\nNOOP\r\nNOOP\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nDATA\r\nx\r\n.\r\n"
        b"NOOP\r\nNOOP\r\n"
    )
    assert 421 not in codes(out)


class Auth(Handler):
    """AUTH PLAIN with an initial response; LOGIN in two steps, the password checked later."""

    def auth(self, session: Any, mech: bytes, initial: bytes | None, default: bytes) -> Any:
        if mech == b"PLAIN" and initial == b"AGFsaWNlAHNlY3JldA==":
            return b"235 2.7.0 Authentication successful\r\n"
        if mech == b"LOGIN":
            session.context = "user"
            return b"334 VXNlcm5hbWU6\r\n"
        return b"535 5.7.8 Authentication credentials invalid\r\n"

    def auth_line(self, session: Any, line: bytes, default: bytes) -> Any:
        if session.context == "user":
            session.context = "password"
            return b"334 UGFzc3dvcmQ6\r\n"
        return Token("check")


def test_auth_exchanges(impl: str) -> None:
    cfg = {
        "extensions": ["PIPELINING", "ENHANCEDSTATUSCODES", "AUTH PLAIN LOGIN"],
        "auth_required": True,
    }
    s = session(impl, Auth(), **cfg)
    s.start()
    out = s.receive_data(b"MAIL FROM:<s@x>\r\nAUTH PLAIN x\r\nLHLO c\r\n")
    assert codes(out) == [503, 503, 250]
    assert b"250 AUTH PLAIN LOGIN\r\n" in text(out)
    out = s.receive_data(b"MAIL FROM:<s@x>\r\nAUTH PLAIN bad\r\nAUTH LOGIN\r\n*\r\n")
    assert codes(out) == [530, 535, 334, 501]
    out = s.receive_data(b"AUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\nMAIL FROM:<s@x>\r\n")
    assert codes(out) == [334, 334]
    assert s.blocked
    out = s.resolve(pendings(out)[0], b"235 2.7.0 ok\r\n")
    assert codes(out) == [235, 250] and s.authenticated
    out = s.receive_data(b"AUTH PLAIN x\r\n")
    assert codes(out) == [503]
    s = session(impl, Auth(), **cfg)
    s.start()
    out = s.receive_data(b"LHLO c\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<s@x>\r\n")
    assert codes(out) == [250, 235, 250]
    # Not offered: 502, as before.
    s = session(impl, Auth())
    s.start()
    assert codes(s.receive_data(b"LHLO c\r\nAUTH PLAIN x\r\n")) == [250, 502]


def test_starttls_states(impl: str) -> None:
    exts = ["PIPELINING", "ENHANCEDSTATUSCODES", "STARTTLS"]
    s = session(impl, extensions=exts, tls_required=True)
    s.start()
    out = s.receive_data(b"LHLO c\r\n")
    assert text(out).endswith(b"250 STARTTLS\r\n")
    # Anything pipelined after STARTTLS is dropped (RFC 3207 6).
    out = s.receive_data(b"MAIL FROM:<s@x>\r\nSTARTTLS\r\nMAIL FROM:<evil@x>\r\n")
    assert codes(out) == [530, 220] and out[-1] is START_TLS
    assert s.blocked
    assert s.receive_data(b"RCPT TO:<evil@x>\r\n") == []
    assert s.tls_started() == []
    assert not s.blocked and s.tls
    out = s.receive_data(b"MAIL FROM:<s@x>\r\nLHLO c\r\nSTARTTLS\r\nMAIL FROM:<s@x>\r\n")
    assert codes(out) == [503, 250, 503, 250]  # LHLO again first; no STARTTLS twice
    assert b"STARTTLS" not in text(out)


# --- the handler interface over asyncio, with real TLS --------------------------------

LOOPS = [pytest.param(None, id="asyncio")]
try:
    import uvloop

    LOOPS.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(params=LOOPS)
def runner(request: pytest.FixtureRequest) -> Iterator[asyncio.Runner]:
    with asyncio.Runner(loop_factory=request.param) as r:
        yield r


class AsyncDirectory(Handler):
    """Recipients looked up by coroutines; final replies from futures set later."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[bytes], bytes]] = []
        self.parts: list[bytes] = []

    def rcpt(
        self, session: Any, index: int, rcpt: bytes, params: list[bytes], default: bytes
    ) -> Any:
        async def look() -> bytes | None:
            await asyncio.sleep(0.01 if rcpt.startswith(b"slow") else 0)
            return b"550 5.1.1 <%s> unknown\r\n" % rcpt if rcpt.startswith(b"x") else None

        return look()

    def content(self, session: Any, chunk: bytes) -> Any:
        self.parts.append(chunk)
        return asyncio.sleep(0)  # back-pressure, briefly

    def end_of_content(self, session: Any, env: Envelope) -> Any:
        self.messages.append((env.recipients, b"".join(self.parts)))
        self.parts.clear()
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in env.recipients]
        for i, f in reversed(list(enumerate(futs))):  # the last one is known first
            loop.call_later(0.005 * (len(futs) - i), f.set_result, None)
        return futs


def test_async_handler_over_asyncio(impl: str, runner: asyncio.Runner) -> None:
    async def main() -> None:
        d = tempfile.mkdtemp(prefix="lmtpe-", dir="/tmp")
        h = AsyncDirectory()
        async with Server(f"unix:{d}/s", h, SessionConfig(), engine=impl) as server:
            r, w = await asyncio.open_unix_connection(server.destinations[0][5:])
            w.write(
                b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<slow1@x>\r\nRCPT TO:<x@x>\r\n"
                b"RCPT TO:<b@x>\r\nDATA\r\n" + b"line\r\n" * 2000 + b".\r\n"
                b"MAIL FROM:<s@x>\r\nRCPT TO:<c@x>\r\nBDAT 4 LAST\r\nabcdQUIT\r\n"
            )
            data = await asyncio.wait_for(r.read(), 10)
            lines = [ln for ln in data.split(b"\r\n") if ln and ln[3:4] != b"-"]
            assert [ln[:3] for ln in lines] == [
                b"220",
                b"250",
                b"250",
                b"250",
                b"550",
                b"250",
                b"354",
                b"250",
                b"250",
                b"250",
                b"250",
                b"250",
                b"221",
            ]
            assert b"<slow1@x>" in lines[7] and b"<b@x>" in lines[8]
            w.close()
        assert h.messages == [([b"slow1@x", b"b@x"], b"line\r\n" * 2000), ([b"c@x"], b"abcd")]
        assert server.stats.transactions == 2 and server.stats.final_replies == {250: 3}

    runner.run(asyncio.wait_for(main(), 60))


def test_starttls_with_a_real_tls_client(impl: str, runner: asyncio.Runner, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    class Collect(Handler):
        def __init__(self) -> None:
            self.got: list[tuple[bool, bytes]] = []
            self.parts: list[bytes] = []

        def content(self, session: Any, chunk: bytes) -> None:
            self.parts.append(chunk)

        def end_of_content(self, session: Any, env: Envelope) -> None:
            self.got.append((session.tls, b"".join(self.parts)))
            self.parts.clear()

    async def main() -> None:
        h = Collect()
        cfg = SessionConfig(
            extensions=["PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "STARTTLS"],
            tls_required=True,
        )
        async with Server("127.0.0.1:0", h, cfg, ssl_context=server_ctx, engine=impl) as server:
            host, _, port = server.destinations[0].rpartition(":")

            def send() -> tuple[dict[str, Any], dict[str, Any]]:
                with smtplib.LMTP(host, int(port), timeout=10) as c:
                    try:
                        c.sendmail("s@x", ["a@x"], b"no TLS\r\n")
                    except smtplib.SMTPSenderRefused as exc:
                        refused = {"code": exc.smtp_code}
                    c.starttls(context=client_ctx)
                    return refused, c.sendmail("s@x", ["a@x"], b"Subject: tls\r\n\r\nhi\r\n")

            refused, result = await asyncio.wait_for(asyncio.to_thread(send), 30)
            assert refused == {"code": 530}
            assert result == {}
        assert h.got == [(True, b"Subject: tls\r\n\r\nhi\r\n")]

    runner.run(asyncio.wait_for(main(), 60))


def test_first_command_under_tls_is_not_lost(impl: str, runner: asyncio.Runner) -> None:
    """A client that says LHLO as soon as its side of the handshake is done (lmtpfast's
    does): the TLS layer may hand that LHLO over before start_tls() returns."""
    trustme = pytest.importorskip("trustme")
    from lmtpfast import TLSPolicy, connect

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    ca_file = tempfile.NamedTemporaryFile(suffix=".pem", delete=False)  # noqa: SIM115
    ca.cert_pem.write_to_path(ca_file.name)

    async def main() -> None:
        cfg = SessionConfig(extensions=["PIPELINING", "ENHANCEDSTATUSCODES", "STARTTLS"],
                            tls_required=True)
        async with Server("127.0.0.1:0", Handler(), cfg, ssl_context=server_ctx, engine=impl,
                          tls_timeout=30) as server:
            policy = TLSPolicy(level="verify", ca_file=ca_file.name, server_hostname="localhost")
            for _ in range(5):
                async with await asyncio.wait_for(
                        connect(server.destinations[0], tls=policy), 20) as c:
                    assert c.tls is not None
                    results = await c.send("s@x", ["a@x"], b"Subject: tls\r\n\r\nhi\r\n")
                    assert results[0].delivered
            assert server.stats.transactions == 5

    try:
        runner.run(asyncio.wait_for(main(), 120))
    finally:
        os.unlink(ca_file.name)


def test_idle_property(impl: str) -> None:
    s = session(impl)
    s.start()
    assert s.idle
    s.receive_data(b"LHLO c\r\nMAIL FROM:<s@x>\r\n")
    assert not s.idle and s.in_transaction
    s.receive_data(b"RCPT TO:<a@x>\r\nDATA\r\nx\r\n.\r\nNOOP")
    assert not s.idle  # an unfinished command line is buffered
    s.receive_data(b"\r\n")
    assert s.idle


def test_graceful_shutdown(impl: str, runner: asyncio.Runner) -> None:
    class Seen(Handler):
        def __init__(self) -> None:
            self.peers: list[tuple[Any, Any]] = []

        def greeting(self, session: Any, default: bytes) -> None:
            self.peers.append((session.peer, session.local))

    async def main() -> None:
        h = Seen()
        async with Server("127.0.0.1:0", h, SessionConfig(hostname="mx.test"), engine=impl) as srv:
            host, _, port = srv.destinations[0].rpartition(":")
            ra, wa = await asyncio.open_connection(host, int(port))
            rb, wb = await asyncio.open_connection(host, int(port))
            for r, w in ((ra, wa), (rb, wb)):
                await r.readline()
                w.write(b"LHLO c\r\n")
                while not (await r.readline()).startswith(b"250 "):
                    pass
            wa.write(b"MAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nDATA\r\n")
            for _ in range(3):
                await ra.readline()
            task = asyncio.ensure_future(srv.shutdown(grace=20))
            # The idle connection is told at once; the busy one may finish.
            shutting_down = b"421 4.3.2 mx.test Service shutting down\r\n"
            assert await asyncio.wait_for(rb.read(), 10) == shutting_down
            assert not task.done()
            wa.write(b"hello\r\n.\r\n")
            rest = await asyncio.wait_for(ra.read(), 10)
            assert rest.startswith(b"250 2.0.0 <a@x>")
            assert rest.endswith(b"421 4.3.2 mx.test Service shutting down\r\n")
            await asyncio.wait_for(task, 10)
            assert not srv.listening
            assert [p[1][0] for p in h.peers] == ["127.0.0.1", "127.0.0.1"]
            assert all(p[0][0] == "127.0.0.1" for p in h.peers)
            wa.close()
            wb.close()

    runner.run(asyncio.wait_for(main(), 60))


def test_idle_timeout(impl: str, runner: asyncio.Runner) -> None:
    async def main() -> None:
        d = tempfile.mkdtemp(prefix="lmtpe-", dir="/tmp")
        cfg = SessionConfig(hostname="mx.test")
        async with Server(f"unix:{d}/s", Handler(), cfg, engine=impl, idle_timeout=0.2) as srv:
            r, w = await asyncio.open_unix_connection(srv.destinations[0][5:])
            await r.readline()
            w.write(b"LHLO c\r\nMAIL FROM:<s@x>\r\n")
            rest = await asyncio.wait_for(r.read(), 10)  # bounded: the timeout closes it
            assert rest.endswith(b"250 2.1.0 Sender <s@x> OK\r\n"
                                 b"421 4.4.2 mx.test Error: timeout exceeded\r\n")
            w.close()

    runner.run(asyncio.wait_for(main(), 60))


# -- what the command deadline reads; replies that come later, written together -------------

def test_commands_and_in_content_say_whose_turn_it_is(impl: str) -> None:
    s = session(impl)
    s.start()
    s.receive_data(b"LHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n")
    assert s.commands == 3 and not s.in_content
    s.receive_data(b"DATA\r\nSubject: x\r\n")
    assert s.in_content and s.commands == 4
    s.receive_data(b"\r\nbody\r\n.\r\nRCPT TO")  # a command not finished yet
    assert not s.in_content and s.commands == 4
    s2 = session(impl)
    s2.start()
    s2.receive_data(b"LHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nBDAT 10\r\nabc")
    assert s2.in_content  # inside a chunk
    s2.receive_data(b"defghij")
    assert not s2.in_content


class _LaterFinals(Handler):
    def end_of_content(self, session: Any, env: Envelope) -> Any:
        # Answers that all come in one loop iteration, the last one first.
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in env.recipients]
        for f in reversed(futs):
            loop.call_soon(f.set_result, None)
        return futs


def test_late_answers_keep_rcpt_order_and_deadline_stops_slow_loris(
        impl: str, runner: asyncio.Runner, tmp_path: Path) -> None:
    async def main() -> None:
        sock = tmp_path / "s"
        async with Server(f"unix:{sock}", _LaterFinals(), SessionConfig(hostname="mx.test"),
                          engine=impl, command_timeout=0.3, unix_mode=0o666):
            assert os.stat(sock).st_mode & 0o777 == 0o666
            r, w = await asyncio.open_unix_connection(str(sock))
            w.write(b"LHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\n"
                    b"RCPT TO:<c@x>\r\nDATA\r\nhi\r\n.\r\n")
            finals = []
            while len(finals) < 3:
                line = await asyncio.wait_for(r.readline(), 10)
                if line.startswith(b"250 2.0.0 <"):
                    finals.append(line.split(b">")[0])
            assert finals == [b"250 2.0.0 <a@x", b"250 2.0.0 <b@x", b"250 2.0.0 <c@x"]
            # Now a slow-loris client: a byte at a time, never a whole command.
            reading = asyncio.ensure_future(r.read())
            for byte in b"MAIL FROM:<x@y" * 50:
                try:
                    w.write(bytes([byte]))
                    await w.drain()
                except (ConnectionError, RuntimeError):  # uvloop: "the handler is closed"
                    break
                if reading.done():
                    break
                await asyncio.sleep(0.02)  # the client's pace, not a synchronisation
            else:
                pytest.fail("the trickling client was never timed out")
            got = await asyncio.wait_for(reading, 10)
            assert got == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"
            w.close()

    runner.run(asyncio.wait_for(main(), 60))
