"""What is left queued in a spool directory, whichever layout holds it (tests and benchmarks)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["queued_count"]


def queued_count(path: str | os.PathLike[str]) -> int:
    """Entries still queued in the store ``PATH/queue.db`` and in the directory spool beside it.

    A replay converts a directory spool into the store at the start of a
    pass, so "nothing left" means nothing in either.
    """
    from lmtpfast.spool import Selection, SQLiteStore

    p = Path(path)
    n = sum(len(os.listdir(p / d)) for d in ("incoming", "deferred") if (p / d).exists())
    if (p / "queue.db").exists():
        with SQLiteStore(p) as store:
            n += sum(1 for _ in store.iter_entries(Selection(states=("queued",))))
    return n
