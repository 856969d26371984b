"""Output that survives a reader who goes away (``lmtpfast replay -v | head``).

When standard output is a pipe whose reader has exited, a write raises
``BrokenPipeError``. The command's work (deliveries, queue updates) must not
stop, nor its exit status change, because nobody reads the report any more:
standard output is pointed at ``/dev/null`` and the command goes on.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TextIO

__all__ = ["print_line", "stdout_gone"]

_gone = False


def stdout_gone() -> bool:
    """True once a write to standard output found the reader gone."""
    return _gone


def _silence_stdout() -> None:
    global _gone
    _gone = True
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def print_line(text: str, *, file: TextIO | None = None, flush: bool = False) -> None:
    """``print(text)`` to standard output (or *file*), ignoring a reader that went away."""
    out = sys.stdout if file is None else file
    try:
        out.write(text + "\n")
        if flush:
            out.flush()
    except BrokenPipeError:
        if out is sys.stdout:
            _silence_stdout()
            # What was buffered for the gone reader goes to /dev/null now.
            with contextlib.suppress(OSError, ValueError):
                out.flush()
