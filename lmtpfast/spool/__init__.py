"""The lmtpfast spool: a directory of queued messages that replay delivers.

>>> from lmtpfast.spool import enqueue                                 # doctest: +SKIP
>>> enqueue("/var/spool/lmtpfast", raw, sender="a@example.org", recipients=["b@example.org"])

The format is described in ``docs/spool.md``: one immutable message file per
entry in ``msg/``, one small JSON envelope (msgspec) in ``incoming/`` or
``deferred/``; the lock on the message file is the claim of the replay that
delivers it.
"""

from ._format import (
    FORMAT_VERSION,
    BadEnvelope,
    Envelope,
    Reason,
    Recipient,
    check_address,
    decode_envelope,
    encode_envelope,
    new_envelope,
)
from ._store import Claim, Quarantined, Scan, Spool, SpoolError, enqueue
from .importers import (
    ImportStats,
    Source,
    envelope_from_headers,
    import_messages,
    iter_eml_dir,
    iter_maildir,
    iter_mbox,
)

__all__ = [
    "FORMAT_VERSION",
    "BadEnvelope",
    "Claim",
    "Envelope",
    "ImportStats",
    "Quarantined",
    "Reason",
    "Recipient",
    "Scan",
    "Source",
    "Spool",
    "SpoolError",
    "check_address",
    "decode_envelope",
    "encode_envelope",
    "enqueue",
    "envelope_from_headers",
    "import_messages",
    "iter_eml_dir",
    "iter_maildir",
    "iter_mbox",
    "new_envelope",
]
