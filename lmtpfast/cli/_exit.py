"""Exit statuses from sysexits.h, and the rule that maps delivery results to one.

An MTA's pipe(8) reads two things from a delivery program: the first
characters of its output and its exit status. Postfix takes the DSN status
from output that starts with an enhanced code (``5.1.1 ...``, ``4.2.2 ...``)
and defers or bounces by that code's class; without one it maps the exit
status (67 -> 5.1.1, 65 -> 5.6.0, 75 -> 4.3.0, ...). So every status here
comes with the enhanced code a reader should see first, and the exit status
is the sysexits code whose Postfix meaning is closest to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmtpfast import RecipientResult

EX_OK = 0
EX_USAGE = 64  # bad command line
EX_DATAERR = 65  # the message cannot be sent as it is (5.6.x: a NUL byte, bad content)
EX_NOINPUT = 66  # input file missing or unreadable
EX_NOUSER = 67  # no such user (5.1.x)
EX_NOHOST = 68  # no such host (5.1.2)
EX_UNAVAILABLE = 69  # refused for good, for another reason (5.3.x, 5.4.x, other 5xx)
EX_SOFTWARE = 70  # a bug in lmtpfast
EX_CANTCREAT = 73  # mailbox full or disabled for good (5.2.x)
EX_IOERR = 74
EX_TEMPFAIL = 75  # try again later: anything not finally decided
EX_PROTOCOL = 76  # the server broke the protocol for good (5.5.x)
EX_NOPERM = 77  # refused by policy (5.7.x)
EX_CONFIG = 78  # bad configuration

#: The enhanced code shown first when a command fails for a reason of its own
#: (bad usage or configuration): class 4, so an MTA defers instead of bouncing
#: mail because of our set-up (X.3.5: system incorrectly configured).
OUR_FAULT = "4.3.5"


def enhanced_of(r: RecipientResult) -> str:
    """The recipient's enhanced status code, or one made from its reply code's class."""
    if r.enhanced:
        return r.enhanced
    return f"{2 if r.delivered else 4 if r.transient else 5}.0.0"


def status_of(r: RecipientResult) -> int:
    """The sysexits status one recipient's outcome means."""
    if r.delivered:
        return EX_OK
    if r.transient:
        return EX_TEMPFAIL
    parts = enhanced_of(r).split(".")
    if parts[1:] == ["1", "2"]:
        return EX_NOHOST
    subject = parts[1] if len(parts) == 3 else ""
    return {"1": EX_NOUSER, "2": EX_CANTCREAT, "5": EX_PROTOCOL, "6": EX_DATAERR,
            "7": EX_NOPERM}.get(subject, EX_UNAVAILABLE)


def deciding(results: Sequence[RecipientResult]) -> int | None:
    """Index of the recipient whose outcome decides the exit status (``None``: all delivered).

    The first recipient not finally decided, else the first refused for good.
    """
    first_permanent = None
    for i, r in enumerate(results):
        if r.transient:
            return i
        if r.permanent and first_permanent is None:
            first_permanent = i
    return first_permanent


def status_for(results: Sequence[RecipientResult]) -> int:
    """0 if all delivered; 75 if any recipient is undecided; else the first refusal's status.

    With several recipients one status covers them all: a non-zero status
    also covers recipients that *were* delivered (which is why an MTA should
    run ``lmtpfast send`` with one recipient per run; see docs/postfix.md).
    """
    i = deciding(results)
    return EX_OK if i is None else status_of(results[i])
