"""The lmtpfast spool: queued messages, and the replay that delivers them.

>>> from lmtpfast.spool import enqueue                                 # doctest: +SKIP
>>> enqueue("/var/spool/lmtpfast", raw, sender="a@example.org", recipients=["b@example.org"])

The format is described in ``docs/spool.md``: one immutable message file per
entry in ``msg/``, one small JSON envelope (msgspec) in ``incoming/`` or
``deferred/``; the lock on the message file is the claim of the replay that
delivers it. :class:`Replayer` delivers a spool's due entries through an
:class:`~lmtpfast.Agent` (one :class:`~lmtpfast.Delivery` per entry, DSN included).

Names are imported on first use: ``lmtpfast enqueue`` never loads the
delivery side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "FORMAT_VERSION": "_format",
    "BadEnvelope": "_format",
    "Envelope": "_format",
    "Reason": "_format",
    "Recipient": "_format",
    "check_address": "_format",
    "decode_envelope": "_format",
    "encode_envelope": "_format",
    "new_envelope": "_format",
    "Claim": "_store",
    "Quarantined": "_store",
    "Scan": "_store",
    "Spool": "_store",
    "SpoolError": "_store",
    "enqueue": "_queue",
    "BadSource": "_importers",
    "ImportStats": "_importers",
    "Source": "_importers",
    "envelope_from_headers": "_importers",
    "import_messages": "_importers",
    "iter_eml_dir": "_importers",
    "iter_maildir": "_importers",
    "iter_mbox": "_importers",
    "Observer": "_replay",
    "Outcome": "_replay",
    "Replayer": "_replay",
    "RetryPolicy": "_replay",
    "Totals": "_replay",
    "delivery_for": "_replay",
    "exit_status": "_replay",
    "build_bounce": "_bounce",
    "write_bounce": "_bounce",
    "PgQueue": "_pgqueue",
    "PgWriter": "_pgqueue",
    "PgShapingState": "_pgqueue",
    "ActionResult": "_queue",
    "ClaimBatch": "_queue",
    "Entry": "_queue",
    "EntryInfo": "_queue",
    "NewMessage": "_queue",
    "Queue": "_queue",
    "QueueCorrupt": "_queue",
    "QueueError": "_queue",
    "QueueStatus": "_queue",
    "QueueWriteError": "_queue",
    "Selection": "_queue",
    "Update": "_queue",
    "open_queue": "_queue",
    "open_spool": "_queue",
    "SQLiteQueue": "_sqlite",
    "SQLiteStore": "_sqlite",
    "DirQueue": "_dirstore",
}

__all__ = [
    "FORMAT_VERSION",
    "ActionResult",
    "BadEnvelope",
    "BadSource",
    "Claim",
    "ClaimBatch",
    "DirQueue",
    "Entry",
    "EntryInfo",
    "Envelope",
    "ImportStats",
    "NewMessage",
    "Observer",
    "Outcome",
    "PgQueue",
    "PgShapingState",
    "PgWriter",
    "Quarantined",
    "Queue",
    "QueueCorrupt",
    "QueueError",
    "QueueStatus",
    "QueueWriteError",
    "Reason",
    "Recipient",
    "Replayer",
    "RetryPolicy",
    "SQLiteQueue",
    "SQLiteStore",
    "Scan",
    "Selection",
    "Source",
    "Spool",
    "SpoolError",
    "Totals",
    "Update",
    "build_bounce",
    "check_address",
    "decode_envelope",
    "delivery_for",
    "encode_envelope",
    "enqueue",
    "envelope_from_headers",
    "exit_status",
    "import_messages",
    "iter_eml_dir",
    "iter_maildir",
    "iter_mbox",
    "new_envelope",
    "open_queue",
    "open_spool",
    "write_bounce",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from ._bounce import build_bounce, write_bounce
    from ._dirstore import DirQueue
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
    from ._importers import (
        BadSource,
        ImportStats,
        Source,
        envelope_from_headers,
        import_messages,
        iter_eml_dir,
        iter_maildir,
        iter_mbox,
    )
    from ._pgqueue import PgQueue, PgShapingState, PgWriter
    from ._queue import (
        ActionResult,
        ClaimBatch,
        Entry,
        EntryInfo,
        NewMessage,
        Queue,
        QueueCorrupt,
        QueueError,
        QueueStatus,
        QueueWriteError,
        Selection,
        Update,
        enqueue,
        open_queue,
        open_spool,
    )
    from ._replay import (
        Observer,
        Outcome,
        Replayer,
        RetryPolicy,
        Totals,
        delivery_for,
        exit_status,
    )
    from ._sqlite import SQLiteQueue, SQLiteStore
    from ._store import Claim, Quarantined, Scan, Spool, SpoolError
