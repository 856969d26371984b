"""Fuzz the content encoder (both implementations) against the sink's DATA decoder.

Oracles, for any message bytes cut into any chunks:

* parity: ``_pycontent`` and ``_ccontent`` give the same bytes (whole, and
  chunk by chunk through ``ContentEncoder``), the same ``bytes_in``,
  ``bytes_out`` and ``saw_8bit``, or the same ``ContentError`` at the same offset;
* chunking invariance: the streamed output equals the whole-message output;
* smuggling: the DATA encoding followed by ``.\\r\\n`` decodes (with the
  strict server decoder ``lmtpfast.server._data.DotDecoder``, fed in chunks)
  to exactly the normalised message, and the end of data is found exactly at
  the end, never earlier; the BDAT encoding (no dot-stuffing) is exactly the
  normalised message. "Normalised": every CRLF, bare CR and bare LF is one
  CRLF, and non-empty content ends with CRLF.

    python fuzz/fuzz_content.py -max_total_time=120
"""

from __future__ import annotations

import re

try:
    from ._common import CONTENT, header, run_atheris, splits
except ImportError:
    from _common import CONTENT, header, run_atheris, splits  # type: ignore[no-redef]

from lmtpfast import ContentError
from lmtpfast.server._data import DotDecoder

_EOL = re.compile(rb"\r\n|\r|\n")


def normalise(data: bytes) -> bytes:
    """The reference: what the server must get back (written independently of the encoders)."""
    out = _EOL.sub(b"\r\n", data)
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


def _encode(impl: str, pieces: list[bytes], dot_stuff: bool) -> tuple[object, ...]:
    mod = CONTENT[impl]
    enc = mod.ContentEncoder(dot_stuff=dot_stuff)
    out = []
    try:
        for p in pieces:
            out.append(enc.encode(p))
        out.append(enc.finish())
    except ContentError as exc:
        return ("error", str(exc), getattr(exc, "offset", None), b"".join(out),
                enc.bytes_in, enc.bytes_out)
    return ("ok", b"".join(out), enc.bytes_in, enc.bytes_out, enc.saw_8bit)


def _whole(impl: str, data: bytes, dot_stuff: bool) -> tuple[object, ...]:
    try:
        return ("ok", CONTENT[impl].encode_content(data, dot_stuff=dot_stuff))
    except ContentError as exc:
        return ("error", str(exc), getattr(exc, "offset", None))


def _decode(wire: bytes, seed: bytes, keep: bool) -> tuple[bytes, int, int]:
    """(content, size, index just after the end-of-data line or -1) over a chunked feed."""
    dec = DotDecoder(keep=keep)
    consumed = 0
    for piece in splits(wire, seed) or [wire]:
        end = dec.feed(piece)
        if end >= 0:
            return dec.content(), dec.size, consumed + end
        consumed += len(piece)
    return dec.content(), dec.size, -1


def check(data: bytes) -> None:
    h, body = header(data, 33)
    pieces = splits(body, h[1:17]) or [body]
    for dot_stuff in (True, False):
        ref = _encode("python", pieces, dot_stuff)
        whole = _whole("python", body, dot_stuff)
        for impl in CONTENT:
            got = _encode(impl, pieces, dot_stuff)
            assert got == ref, f"{impl} streamed encoding differs from python:\n{got!r}\n{ref!r}"
            w = _whole(impl, body, dot_stuff)
            assert w == whole, f"{impl} whole encoding differs from python:\n{w!r}\n{whole!r}"
        if b"\0" in body:
            nul = body.index(b"\0")
            assert ref[0] == "error" and ref[2] == nul, f"NUL at {nul} not refused: {ref!r}"
            assert whole[0] == "error" and whole[2] == nul
            continue
        assert ref[0] == "ok" and whole[0] == "ok", (ref, whole)
        encoded = ref[1]
        assert isinstance(encoded, bytes)
        assert encoded == whole[1], "chunked encoding differs from the whole-message one"
        assert ref[2] == len(body) and ref[3] == len(encoded), "bytes_in/bytes_out wrong"
        assert ref[4] == (not body.isascii()), "saw_8bit wrong"
        expect = normalise(body)
        if not dot_stuff:
            assert encoded == expect, "BDAT encoding is not the normalised message"
            continue
        wire = encoded + b".\r\n"
        for keep in (True, False):
            content, size, end = _decode(wire, h[17:], keep)
            assert end == len(wire), (
                f"SMUGGLING: the server saw the end of data at {end} of {len(wire)} bytes")
            assert size == len(expect), f"decoded size {size} != {len(expect)}"
            if keep:
                assert content == expect, "decoded content differs from the normalised message"


if __name__ == "__main__":
    run_atheris(check)
