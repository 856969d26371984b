"""Exit statuses from sysexits.h, and the rule that maps delivery results to one."""

from __future__ import annotations

from collections.abc import Iterable

from lmtpfast import RecipientResult

EX_OK = 0
EX_USAGE = 64  # bad command line
EX_DATAERR = 65  # every undelivered recipient was refused for good
EX_NOINPUT = 66  # input file missing or unreadable
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70  # a bug in lmtpfast
EX_IOERR = 74
EX_TEMPFAIL = 75  # try again later: anything not finally decided
EX_CONFIG = 78  # bad configuration


def status_for(results: Iterable[RecipientResult]) -> int:
    """0 if all delivered; 75 if any recipient is undecided; else 65 (all refusals permanent)."""
    status = EX_OK
    for r in results:
        if r.transient:
            return EX_TEMPFAIL
        if r.permanent:
            status = EX_DATAERR
    return status
