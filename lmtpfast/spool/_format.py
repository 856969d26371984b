"""The envelope of a queued message: what is stored beside the message, and its checks.

An envelope is one small JSON document (msgspec) per message. It is the only
mutable part of a queue entry: every attempt that changes something writes a
new envelope under a temporary name and renames it over the old one, so a
reader sees either the old or the new one, never a mix.
"""

from __future__ import annotations

import time
from typing import Literal

import msgspec

from ..proto._common import address_problem

__all__ = [
    "FORMAT_VERSION",
    "MAX_ENVELOPE_SIZE",
    "BadEnvelope",
    "Envelope",
    "Reason",
    "Recipient",
    "check_address",
    "decode_envelope",
    "encode_envelope",
    "new_envelope",
]

FORMAT_VERSION = 1
#: An envelope larger than this is treated as corrupt (about 200,000 recipients).
MAX_ENVELOPE_SIZE = 16 * 1024 * 1024



class Reason(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """The last reply that decided (or deferred) a recipient."""

    code: int
    enhanced: str | None = None
    text: str = ""
    stage: str = ""
    #: True when lmtpfast made the reply up (connection lost, timeout, expiry).
    local: bool = False
    destination: str | None = None
    #: Unix time of the attempt.
    at: float = 0.0

    def line(self) -> str:
        enh = f" {self.enhanced}" if self.enhanced else ""
        return f"{self.code}{enh} {self.text}".rstrip()


class Recipient(msgspec.Struct, omit_defaults=True):
    """One recipient still in the envelope.

    Delivered recipients are removed from the envelope; what is left is either
    ``queued`` (to be tried again) or ``failed`` (a permanent outcome, kept for
    the report, the ``failed/`` record and the bounce).
    """

    address: str
    state: Literal["queued", "failed"] = "queued"
    attempts: int = 0
    last: Reason | None = None
    #: A previous attempt sent the whole message but lost the reply: the next
    #: delivery may be a duplicate (Postfix's "may be delivered more than once").
    possibly_delivered: bool = False
    #: DSN NOTIFY (RFC 3461): any of SUCCESS, FAILURE, DELAY, or NEVER alone.
    notify: tuple[str, ...] | None = None
    #: DSN ORCPT (RFC 3461), e.g. ``rfc822;user@example.org``.
    orcpt: str | None = None


class Envelope(msgspec.Struct, omit_defaults=True):
    """Sender, recipients with their state, and the queue bookkeeping of one message."""

    sender: str
    recipients: list[Recipient]
    #: Unix time the message entered the spool. ``None`` (hand-made entries):
    #: the envelope file's modification time in ``incoming/`` counts, and
    #: replay writes it down at the first attempt.
    arrival: float | None = None
    attempts: int = 0
    #: Unix time before which the message is not tried again.
    next_attempt: float = 0.0
    last_attempt: float | None = None
    #: Recipients delivered and removed from this envelope so far.
    delivered: int = 0
    #: DSN RET (RFC 3461): what a bounce carries, ``FULL`` or ``HDRS``.
    ret: Literal["FULL", "HDRS"] | None = None
    #: DSN ENVID (RFC 3461), echoed in a bounce.
    envid: str | None = None
    #: The bounce for the failed recipients is written (it is never written twice).
    bounced: bool = False
    version: int = FORMAT_VERSION

    def queued(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == "queued"]

    def failed(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == "failed"]


class BadEnvelope(ValueError):
    """An envelope that cannot be used: its text says why (for the quarantine record)."""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Envelope)


def check_address(address: object, *, sender: bool = False) -> str:
    """Return *address* if a spool may hold it, else raise :class:`BadEnvelope`.

    The null sender ``""`` is allowed for the sender only. The syntax is the
    engine's (:func:`lmtpfast.proto._common.address_problem`): quoted local
    parts (``"john doe"@example.com``) are fine; control characters,
    unbalanced quotes or brackets, spaces or angle brackets outside quotes are
    refused: they could never be sent, and would mean the envelope was written
    by something broken.
    """
    if not isinstance(address, str):
        raise BadEnvelope(f"address is not a string: {address!r}")
    if not address:
        if sender:
            return address
        raise BadEnvelope("empty recipient address")
    if len(address) > 1024:
        raise BadEnvelope(f"address longer than 1024 characters: {address[:40]!r}...")
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        # Bytes that are not UTF-8 (a command-line argument) arrive as surrogates.
        shown = address.encode("utf-8", "surrogateescape")
        raise BadEnvelope(f"address {shown!r} is not valid UTF-8") from None
    problem = address_problem(address)
    if problem is not None:
        raise BadEnvelope(f"bad address {address!r}: {problem}")
    return address


def _check(env: Envelope) -> Envelope:
    if env.version != FORMAT_VERSION:
        raise BadEnvelope(f"unsupported envelope version {env.version}")
    check_address(env.sender, sender=True)
    if not env.recipients:
        raise BadEnvelope("envelope has no recipients")
    for r in env.recipients:
        check_address(r.address)
    return env


def new_envelope(
    sender: str,
    recipients: list[str],
    *,
    arrival: float | None = None,
    ret: Literal["FULL", "HDRS"] | None = None,
    envid: str | None = None,
    notify: tuple[str, ...] | None = None,
    orcpt: list[str | None] | None = None,
) -> Envelope:
    """A fresh envelope; raises :class:`BadEnvelope` (a ``ValueError``) on a bad address."""
    if isinstance(recipients, str):
        raise BadEnvelope("recipients must be a list of addresses, not one string")
    if orcpt is not None and len(orcpt) != len(recipients):
        raise BadEnvelope("orcpt needs one entry per recipient")
    if notify is not None:
        words = tuple(n.upper() for n in notify)
        if not words or not set(words) <= {"NEVER", "SUCCESS", "FAILURE", "DELAY"} or (
            "NEVER" in words and len(words) > 1
        ):
            raise BadEnvelope(f"bad DSN NOTIFY {notify!r}")
        notify = words
    rcpts = [
        Recipient(address=a, notify=notify, orcpt=None if orcpt is None else orcpt[i])
        for i, a in enumerate(recipients)
    ]
    env = Envelope(sender=sender, recipients=rcpts,
                   arrival=time.time() if arrival is None else arrival, ret=ret, envid=envid)
    return _check(env)


def encode_envelope(env: Envelope) -> bytes:
    return _encoder.encode(env) + b"\n"


def decode_envelope(data: bytes) -> Envelope:
    """Parse and check an envelope; :class:`BadEnvelope` says what is wrong."""
    if len(data) > MAX_ENVELOPE_SIZE:
        raise BadEnvelope(f"envelope of {len(data)} bytes is larger than {MAX_ENVELOPE_SIZE}")
    if not data.strip():
        raise BadEnvelope("empty envelope (truncated?)")
    try:
        env = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise BadEnvelope(f"invalid envelope: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadEnvelope(f"malformed envelope (truncated?): {exc}") from None
    return _check(env)
