"""Fuzz the LHLO capability parser (``Capabilities.from_reply``) through both engines.

The fuzzed bytes are the server's LHLO reply. Oracles:

* parity: the pure-Python and compiled engines parse the same reply into
  the same capabilities, the same pipelining decision and the same state
  (or break the connection with the same error);
* robustness: every ``Capabilities`` property (``size``, ``auth``,
  ``pipelining``...) answers for any advertised text, never raises: a
  server's LHLO line must not crash a delivery;
* sanity: keywords are upper-case and non-empty; ``ignore_keywords`` drops
  exactly what it names.

    python fuzz/fuzz_lhlo.py -max_total_time=120
"""

from __future__ import annotations

import os
from typing import Any

try:
    from ._common import ENGINES, header, run_atheris, splits
except ImportError:
    from _common import ENGINES, header, run_atheris, splits  # type: ignore[no-redef]

from lmtpfast import LMTPError
from lmtpfast.proto import NEED_DATA, Capabilities, CommandReply, ConnectionBroken, Reply

PROPS = ("pipelining", "chunking", "eightbitmime", "smtputf8", "enhancedstatuscodes",
         "starttls", "dsn", "size", "auth")
IGNORE = ((), ("PIPELINING",), ("SIZE", "chunking"))

# Set to go on past the crash already reported (Capabilities.size raises
# ValueError for a non-ASCII digit such as "SIZE \u00b2"), to look for others.
SKIP_KNOWN = os.environ.get("LMTPFAST_FUZZ_SKIP_KNOWN") == "1"


def _props(caps: Capabilities) -> list[Any]:
    out: list[Any] = []
    for name in PROPS:
        try:
            value = getattr(caps, name)
        except Exception as exc:  # the robustness oracle: report, compare, then fail
            if SKIP_KNOWN and name == "size" and isinstance(exc, ValueError) and not (
                    caps.keywords.get("SIZE", "").isascii()):
                out.append((name, "known"))
                continue
            out.append((name, "raised", type(exc).__name__, str(exc)))
        else:
            out.append((name, sorted(value) if isinstance(value, frozenset) else value))
    return out


def _drive(impl: str, pieces: list[bytes], ignore: tuple[str, ...]) -> list[Any]:
    conn = ENGINES[impl].Connection("fuzz.example", ignore_keywords=ignore,
                                    max_line_length=1024, max_reply_lines=64)
    log: list[Any] = []
    conn.receive_data(b"220 fuzz.example ready\r\n")
    assert isinstance(conn.next_event(), CommandReply)
    conn.lhlo()
    log.append(conn.data_to_send())
    for piece in [*pieces, b""]:
        conn.receive_data(piece)
        while (ev := conn.next_event()) is not NEED_DATA:
            if isinstance(ev, CommandReply):
                log.append(("reply", ev.command, ev.reply.code, ev.reply.lines))
            elif isinstance(ev, ConnectionBroken):
                log.append(("broken", type(ev.error).__name__, str(ev.error)))
            else:
                log.append(("event", type(ev).__name__))
    caps = conn.capabilities
    log.append(("caps", sorted(caps.keywords.items()) if caps is not None else None,
                _props(caps) if caps is not None else None, conn.pipelining, conn.usable))
    if caps is not None:
        try:
            conn.start_transaction("a@x.example", ["b@x.example"])
            log.append(("txn", conn.data_to_send()))
        except LMTPError as exc:
            log.append(("txn raised", type(exc).__name__, str(exc)))
    return log


def _check_caps(caps: Capabilities, ignore: tuple[str, ...]) -> None:
    drop = {k.upper() for k in ignore}
    for key in caps.keywords:
        assert key and key == key.upper(), f"keyword {key!r} not upper-case"
        assert key not in drop, f"ignored keyword {key!r} kept"
    for prop in _props(caps):
        assert prop[1] != "raised", f"Capabilities.{prop[0]} raised {prop[2]}: {prop[3]}"


def check(data: bytes) -> None:
    h, body = header(data, 17)
    ignore = IGNORE[h[0] % len(IGNORE)]
    pieces = splits(body, h[1:])
    ref = _drive("python", pieces, ignore)
    for impl in ENGINES:
        got = _drive(impl, pieces, ignore)
        assert got == ref, f"{impl} differs from python:\n{got}\n{ref}"
    # The parser on its own, over any text lines (no reply-line syntax in the way).
    text = body.decode("utf-8", "replace")
    lines = tuple(text.split("\n")) or ("",)
    caps = Capabilities.from_reply(Reply(250, None, ("fuzz.example", *lines)), ignore)
    _check_caps(caps, ignore)
    final = ref[-2] if ref[-1][0] != "caps" else ref[-1]
    if final[0] == "caps" and final[2] is not None:
        for prop in final[2]:
            assert prop[1] != "raised", f"Capabilities.{prop[0]} raised {prop[2]}: {prop[3]}"


if __name__ == "__main__":
    run_atheris(check)
