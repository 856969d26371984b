"""Reading a message from a file or standard input, never more than a limit.

``yes | lmtpfast send ...`` must not grow without bound: the input is read in
pieces and refused as soon as it passes ``--max-size``.
"""

from __future__ import annotations

from typing import BinaryIO

__all__ = ["DEFAULT_MAX_SIZE", "TooBig", "parse_size", "read_limited"]

#: Larger than common MTA limits (Postfix's message_size_limit is 10 MB by
#: default, sites raise it to 50 MB), so mail an MTA accepted is not refused.
DEFAULT_MAX_SIZE = 64 * 1024 * 1024
_PIECE = 1024 * 1024


class TooBig(Exception):
    """The input passed the size limit (nothing more was read)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"message larger than {limit} bytes (--max-size {limit})")
        self.limit = limit


def parse_size(text: str) -> int:
    """``1000``, ``64k``, ``10m``, ``1g`` (powers of 1024) -> bytes; ``0`` is no limit.

    Digits, optional spaces, an optional unit, an optional ``b`` right after
    it; spaces around. (Without re and argparse until a size is bad: ``lmtpfast
    send`` parses ``--max-size`` on its fast path.)
    """
    rest = text.strip()
    if rest[-1:] in ("b", "B"):
        rest = rest[:-1]
    unit = rest[-1:].lower()
    if unit in ("k", "m", "g"):
        rest = rest[:-1]
    else:
        unit = ""
    digits = rest.rstrip()
    if not digits.isdecimal():
        import argparse

        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1000, 512k, 64m, 1g; 0: no "
                                         "limit)")
    return int(digits) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]


def read_limited(f: BinaryIO, limit: int) -> bytes:
    """All of *f*, or :class:`TooBig` once more than *limit* bytes came (0: no limit)."""
    pieces: list[bytes] = []
    total = 0
    while piece := f.read(_PIECE):
        total += len(piece)
        if limit and total > limit:
            raise TooBig(limit)
        pieces.append(piece)
    return b"".join(pieces)
