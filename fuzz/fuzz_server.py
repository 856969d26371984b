"""Fuzz the LMTP server engine (``lmtpfast.server.ServerSession``) through both implementations.

The fuzzed bytes are what a client sends, cut into fuzzer-chosen pieces.
Oracles:

* parity: the pure-Python reference and the compiled engine produce the same
  items for every piece (replies, delays, closes), the same counters, the
  same stored messages (the sink's handler with a fault plan and storage)
  and the same hook calls with the same content chunks (a recording
  handler);
* robustness: no exception ever escapes (a client's bytes must not crash a
  server), and EOF always ends the session.

    python fuzz/fuzz_server.py -max_total_time=120
"""

from __future__ import annotations

from typing import Any

try:
    from ._common import header, run_atheris, splits
except ImportError:
    from _common import header, run_atheris, splits  # type: ignore[no-redef]

import msgspec

from lmtpfast.server import (
    IMPLEMENTATIONS,
    FaultPlan,
    Handler,
    SessionConfig,
    SinkHandler,
    SinkStats,
)
from lmtpfast.server._faults import FaultEngine

#: A fault plan that touches every kind of answer (tests/test_server_engine.py uses it too).
PLAN = [
    "rcpt:bob@*=550",
    "mail@nth=3=delay:0.5",
    "dot@nth=2=short:1",
    "dot:c@*=garbage",
    "data@rate=0.5:seed=2=extra",
    "noop=oversize:50",
    "rset@nth=2=421 4.3.2 Bye",
    "bdat@rate=0.3:seed=5=452",
    "lhlo@nth=2=stall",
]
CONFIGS = (
    {},
    {"max_size": 100, "max_line_length": 200, "max_recipients": 3},
    {"extensions": ["PIPELINING", "ENHANCEDSTATUSCODES", "STARTTLS", "AUTH PLAIN"], "max_commands": 5},
)


class Recorder(Handler):
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def mail(self, session: Any, sender: bytes, params: list[bytes], default: bytes) -> None:
        self.calls.append(("mail", sender, params, default))

    def rcpt(self, session: Any, index: int, rcpt: bytes, params: list[bytes], default: bytes) -> None:
        self.calls.append(("rcpt", index, rcpt, params, default))

    def content(self, session: Any, chunk: bytes) -> None:
        self.calls.append(("content", chunk))

    def end_of_content(self, session: Any, env: Any) -> None:
        self.calls.append(("eoc", env.sender, env.recipients, env.size, env.too_big, env.chunked))

    def reset(self, session: Any) -> None:
        self.calls.append(("reset",))


def _norm(items: list[Any]) -> list[Any]:
    return [i if isinstance(i, bytes) else repr(i) for i in items]


def _drive(impl: str, pieces: list[bytes], mode: int, cfg: dict[str, Any]) -> Any:
    stats = SinkStats()
    stored: list[Any] = []
    if mode == 0:
        handler: Handler = Recorder()
    else:

        def deliver(s: bytes, r: Any, c: bytes) -> list[bool]:
            stored.append((s, list(r), c))
            return [not x.startswith(b"c") for x in r]

        handler = SinkHandler(stats, deliver=deliver, faults=FaultEngine(FaultPlan.parse(PLAN)))
    s = IMPLEMENTATIONS[impl].ServerSession(SessionConfig(**cfg), handler, stats)
    out = [_norm(s.start())]
    for p in pieces:
        out.append(_norm(s.receive_data(p)))
    out.append(_norm(s.receive_data(b"")))
    assert s.closed, "EOF did not end the session"
    s.connection_lost()
    calls = handler.calls if isinstance(handler, Recorder) else stored
    return out, msgspec.to_builtins(stats), calls


def check(data: bytes) -> None:
    h, body = header(data, 17)
    mode = h[0] % 2
    cfg = CONFIGS[h[1] % len(CONFIGS)]
    pieces = splits(body, h[2:])
    ref = _drive("python", pieces, mode, cfg)
    for impl in IMPLEMENTATIONS:
        got = _drive(impl, pieces, mode, cfg)
        assert got == ref, f"{impl} differs from python:\n{got}\n{ref}"


if __name__ == "__main__":
    run_atheris(check)
