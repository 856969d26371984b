"""Delivery Status Notification parameters (RFC 3461) for MAIL and RCPT.

Passed through only when the server advertises DSN; otherwise dropped, as
Postfix does (RFC 3461 4.1 lets a client drop them when relaying on to a
server without DSN, notifying "relayed" itself if success was asked for —
that is the caller's business here, and :meth:`DSN.dropped` says it happened).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import msgspec

from ._errors import LocalProtocolError

__all__ = ["DSN", "xtext"]

Notify = Literal["NEVER", "SUCCESS", "FAILURE", "DELAY"]


def xtext(value: str) -> str:
    """RFC 3461 4 xtext: printable ASCII except ``+`` and ``=``; the rest as ``+HH``."""
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise LocalProtocolError(f"cannot encode {value!r} as xtext") from exc
    return "".join(
        chr(b) if 33 <= b <= 126 and b not in (43, 61) else f"+{b:02X}" for b in raw
    )


class DSN(msgspec.Struct, frozen=True, kw_only=True):
    """DSN requests for one transaction.

    ``ret``: FULL or HDRS (MAIL RET=); ``envid``: the envelope id (MAIL ENVID=);
    ``notify``: NEVER, or any of SUCCESS/FAILURE/DELAY (RCPT NOTIFY=), for every
    recipient; ``notify_each``: the same per recipient (``()`` or ``None``
    for none), instead of ``notify``, as a spool records it; ``orcpt``: the
    original recipient per recipient, the address alone (written
    ``rfc822;addr``; a value that has its ``type;`` already is kept), or
    ``None`` to leave it out (RCPT ORCPT=).
    """

    ret: Literal["FULL", "HDRS"] | None = None
    envid: str | None = None
    notify: tuple[Notify, ...] = ()
    orcpt: tuple[str | None, ...] | None = None
    notify_each: tuple[tuple[Notify, ...] | None, ...] | None = None

    def __post_init__(self) -> None:
        for words in (self.notify, *(self.notify_each or ())):
            if words and "NEVER" in words and len(words) > 1:
                raise LocalProtocolError("NOTIFY=NEVER cannot be combined with other values")
            for w in words or ():
                if w not in ("NEVER", "SUCCESS", "FAILURE", "DELAY"):
                    raise LocalProtocolError(f"unknown DSN NOTIFY value {w!r}")
        if self.notify and self.notify_each is not None:
            raise LocalProtocolError("give notify or notify_each, not both")
        if self.envid is not None and len(self.envid) > 100:
            raise LocalProtocolError("ENVID longer than 100 characters (RFC 3461 4.4)")

    def mail_params(self) -> list[str]:
        params = []
        if self.ret:
            params.append(f"RET={self.ret}")
        if self.envid is not None:
            params.append(f"ENVID={xtext(self.envid)}")
        return params

    def rcpt_params(self, recipients: Sequence[str]) -> list[list[str]]:
        """NOTIFY= and ORCPT= for each recipient, in order."""
        n = len(recipients)
        if self.orcpt is not None and len(self.orcpt) != n:
            raise LocalProtocolError("DSN orcpt must have one entry per recipient")
        if self.notify_each is not None and len(self.notify_each) != n:
            raise LocalProtocolError("DSN notify_each must have one entry per recipient")
        notify = [f"NOTIFY={','.join(self.notify)}"] if self.notify else []
        out = []
        for i in range(n):
            params = list(notify)
            if self.notify_each is not None and self.notify_each[i]:
                params.append(f"NOTIFY={','.join(self.notify_each[i] or ())}")
            if self.orcpt is not None and self.orcpt[i] is not None:
                params.append(_orcpt(self.orcpt[i] or ""))
            out.append(params)
        return out


def _orcpt(value: str) -> str:
    """``ORCPT=rfc822;xtext`` for an address, or for ``type;address`` as a spool keeps it."""
    kind, sep, addr = value.partition(";")
    if sep and kind and kind.isascii() and kind.replace("-", "").isalnum() and "@" not in kind:
        return f"ORCPT={kind};{xtext(addr)}"
    return f"ORCPT=rfc822;{xtext(value)}"
