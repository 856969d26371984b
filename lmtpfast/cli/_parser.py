"""The argparse parser class of the command line (imported only when a parser is built).

``lmtpfast send`` with a plain command line does not build one
(:func:`lmtpfast.cli.send.fast_args`).
"""

from __future__ import annotations

import argparse
import os
import sys

from . import _exit

__all__ = ["Parser"]


def _columns() -> int:
    """``shutil.get_terminal_size().columns``, without importing shutil.

    argparse makes a help formatter for every ``add_argument`` (to check the
    metavar), and the formatter asks shutil for the terminal's width: shutil
    (with bz2, lzma and fnmatch) was a tenth of a one-message ``lmtpfast
    send``'s start-up, for help that is never printed.
    """
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class Parser(argparse.ArgumentParser):
    """argparse that exits with EX_USAGE (64) instead of 2 on a usage error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(_exit.EX_USAGE, f"{self.prog}: error: {message}\n")

    def _get_formatter(self) -> argparse.HelpFormatter:
        # The width argparse's formatter would take from shutil (less 2, as it does).
        return self.formatter_class(prog=self.prog, width=_columns() - 2)  # type: ignore[call-arg]
