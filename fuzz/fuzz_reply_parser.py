"""Fuzz the reply parser and the client engine: both implementations must agree.

Two oracles over arbitrary server bytes, cut at fuzzer-chosen offsets:

* ``check_parser``: ``ReplyParser`` (pure Python and compiled) gives the same
  replies, or the same error at the same point, whatever the limits; and the
  same as the Python parser fed the whole input at once (split invariance).
* ``check_engine``: a whole client ``Connection`` (both engines) driven by a
  fixed script (LHLO, two pipelined transactions, the content when 354 comes,
  QUIT) over the fuzzed reply stream emits the same events, results and
  bytes to send, and ends in the same state.

    python fuzz/fuzz_reply_parser.py -max_total_time=120 -rss_limit_mb=2048
"""

from __future__ import annotations

import sys
from typing import Any

try:
    from ._common import ENGINES, header, run_atheris, splits
except ImportError:
    from _common import ENGINES, header, run_atheris, splits  # type: ignore[no-redef]

from lmtpfast import LMTPError
from lmtpfast.proto import (
    NEED_DATA,
    CommandReply,
    ConnectionBroken,
    ReadyForData,
    TransactionDone,
)

LINE_LIMITS = (4, 8, 16, 64, 512, 8192)
LINE_COUNTS = (1, 2, 3, 5, 200)


def _reply(r: Any) -> tuple[Any, ...]:
    return (r.code, r.enhanced, tuple(r.lines), r.text)


def _parse(impl: str, pieces: list[bytes], max_len: int, max_lines: int) -> list[Any]:
    parser = ENGINES[impl].ReplyParser(max_len, max_lines)
    out: list[Any] = []
    try:
        for piece in pieces:
            parser.feed(piece)
            while (r := parser.next_reply()) is not None:
                out.append(_reply(r))
    except LMTPError as exc:
        out.append(("error", type(exc).__name__, str(exc)))
        return out
    out.append(("end", parser.buffered, parser.in_reply))
    return out


def check_parser(data: bytes) -> None:
    h, body = header(data, 18)
    max_len = LINE_LIMITS[h[0] % len(LINE_LIMITS)]
    max_lines = LINE_COUNTS[h[1] % len(LINE_COUNTS)]
    pieces = splits(body, h[2:])
    ref = _parse("python", pieces, max_len, max_lines)
    for impl in ENGINES:
        got = _parse(impl, pieces, max_len, max_lines)
        assert got == ref, f"{impl} parser differs from python:\n{got}\n{ref}"
    whole = _parse("python", [body], max_len, max_lines)
    # Split invariance: the same replies and the same final verdict. (The
    # length error may be found on a later feed when the input is cut, so
    # only its kind is compared.)
    assert whole[:-1] == ref[:-1], f"split changed the replies:\n{whole}\n{ref}"
    assert whole[-1][:2] == ref[-1][:2] or (whole[-1][0] == ref[-1][0] == "end"), \
        f"split changed the verdict: {whole[-1]} vs {ref[-1]}"


# --- the whole engine ---------------------------------------------------------


def _event(ev: object) -> tuple[Any, ...]:
    if isinstance(ev, CommandReply):
        return ("reply", ev.command, _reply(ev.reply))
    if isinstance(ev, ReadyForData):
        return ("ready", ev.transaction.id)
    if isinstance(ev, TransactionDone):
        return ("done", ev.transaction.id, _results(ev.transaction))
    if isinstance(ev, ConnectionBroken):
        return ("broken", type(ev.error).__name__, str(ev.error),
                tuple((t.id, _results(t)) for t in ev.transactions))
    return ("?", repr(ev))


def _results(txn: Any) -> tuple[Any, ...]:
    return tuple((r.address, r.status, r.code, r.enhanced, r.text, r.stage, r.local,
                  r.possibly_delivered) for r in txn.results)


def _drive(impl: str, pieces: list[bytes], max_len: int, max_lines: int,
           pipelining: bool) -> list[Any]:
    conn = ENGINES[impl].Connection("fuzz.example", pipelining=pipelining,
                                    max_line_length=max_len, max_reply_lines=max_lines)
    log: list[Any] = []
    txns: list[Any] = []

    def act(what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except LMTPError as exc:
            log.append(("raised", what, type(exc).__name__, str(exc)))
            return None

    for piece in [*pieces, b""]:
        conn.receive_data(piece)
        while (ev := conn.next_event()) is not NEED_DATA:
            log.append(_event(ev))
            if isinstance(ev, CommandReply) and ev.command == "greeting":
                act("lhlo", conn.lhlo)
            elif isinstance(ev, CommandReply) and ev.command == "LHLO" and ev.reply.code < 300:
                for rcpts in (["a@x.example", "b@x.example", "a@x.example"], ["c@y.example"]):
                    t = act("txn", conn.start_transaction, "s@x.example", rcpts,
                            mail_params=["BODY=8BITMIME"])
                    if t is not None:
                        txns.append(t)
            elif isinstance(ev, ReadyForData):
                act("end_data", conn.end_data, ev.transaction)
            elif isinstance(ev, TransactionDone) and txns and ev.transaction is txns[-1]:
                act("quit", conn.command, "QUIT")
        log.append(("send", conn.data_to_send()))
    caps = conn.capabilities
    log.append(("state", conn.usable, conn.closed, conn.idle, conn.pipelining,
                conn.waiting_for, type(conn.error).__name__ if conn.error else None,
                str(conn.error) if conn.error else None,
                sorted(caps.keywords.items()) if caps is not None else None,
                [(t.id, t.done, _results(t) if t.done else None) for t in txns]))
    return log


GREETING_LHLO = (b"220 fuzz.example LMTP\r\n250-fuzz.example\r\n250-PIPELINING\r\n"
                 b"250 ENHANCEDSTATUSCODES\r\n")


def check_engine(data: bytes) -> None:
    h, body = header(data, 19)
    max_len = LINE_LIMITS[2 + h[0] % (len(LINE_LIMITS) - 2)]  # room for a greeting
    max_lines = LINE_COUNTS[1 + h[1] % (len(LINE_COUNTS) - 1)]
    pipelining = bool(h[2] & 1)
    if h[2] & 2:  # a sane session start, so the fuzz bytes reach the transactions
        body = GREETING_LHLO + body
        max_len, max_lines = max(max_len, 64), max(max_lines, 3)
    pieces = splits(body, h[3:])
    ref = _drive("python", pieces, max_len, max_lines, pipelining)
    for impl in ENGINES:
        got = _drive(impl, pieces, max_len, max_lines, pipelining)
        assert got == ref, f"{impl} engine differs from python:\n{got}\n{ref}"


def check(data: bytes) -> None:
    """The atheris entry point: one byte picks the oracle."""
    if not data:
        return
    if data[0] & 1:
        check_engine(data[1:])
    else:
        check_parser(data[1:])


if __name__ == "__main__":
    sys.setrecursionlimit(10000)
    run_atheris(check)
