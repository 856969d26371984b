"""Per-recipient outcomes: the data a delivery returns."""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["DELIVERED", "PERMANENT", "TRANSIENT", "RecipientResult", "Status", "status_of"]

Status = Literal["delivered", "transient", "permanent"]
DELIVERED: Status = "delivered"
TRANSIENT: Status = "transient"
PERMANENT: Status = "permanent"


def status_of(code: int) -> Status:
    """The status a reply code means for a recipient: 2xx delivered, 5xx permanent, else
    transient."""
    if 200 <= code < 300:
        return DELIVERED
    if 500 <= code < 600:
        return PERMANENT
    return TRANSIENT


class RecipientResult(msgspec.Struct, frozen=True, gc=False):
    """What happened to one recipient of one transaction.

    A delivery returns one of these per recipient in RCPT order, duplicates
    included (RFC 2033 gives one reply per accepted RCPT).

    ``stage`` is where the outcome was decided: ``connect``, ``greeting``,
    ``lhlo``, ``starttls``, ``auth``, ``mail``, ``rcpt``, ``data``, ``content``
    or ``final`` (the reply after the final dot), or ``route``/``local`` for
    outcomes decided before any server was asked.

    ``local`` is true when lmtpfast made the reply up (connection lost,
    timeout, protocol error) rather than the server sending it.
    ``possibly_delivered`` is true when the message content was fully sent but
    the connection was lost before this recipient's reply: a retry may deliver
    it twice (Postfix says "may be sent more than once").
    """

    address: str
    status: Status
    code: int
    enhanced: str | None
    text: str
    stage: str
    destination: str | None = None
    local: bool = False
    possibly_delivered: bool = False

    @property
    def delivered(self) -> bool:
        return self.status == DELIVERED

    @property
    def transient(self) -> bool:
        return self.status == TRANSIENT

    @property
    def permanent(self) -> bool:
        return self.status == PERMANENT

    def line(self) -> str:
        """One human-readable line: ``address: code enhanced text``."""
        enh = f" {self.enhanced}" if self.enhanced else ""
        extra = " (may be delivered more than once on retry)" if self.possibly_delivered else ""
        return f"{self.address}: {self.code}{enh} {self.text}{extra}"
