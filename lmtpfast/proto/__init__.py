"""The sans-IO LMTP engine: no sockets, no event loop below this package.

The compiled engine (``_cproto``, Cython over ``csrc/``) is used when it is
built, unless ``LMTPFAST_NO_EXTENSIONS=1``; the pure-Python reference
(``_pyproto``) behaves identically and is the fallback.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING

from . import _pyproto
from ._common import (
    NEED_DATA,
    Capabilities,
    CommandReply,
    ConnectionBroken,
    ReadyForData,
    Reply,
    Transaction,
    TransactionDone,
)

__all__ = [
    "IMPLEMENTATION",
    "IMPLEMENTATIONS",
    "NEED_DATA",
    "Capabilities",
    "CommandReply",
    "Connection",
    "ConnectionBroken",
    "ReadyForData",
    "Reply",
    "ReplyParser",
    "Transaction",
    "TransactionDone",
]


def _load_compiled() -> ModuleType | None:
    if os.environ.get("LMTPFAST_NO_EXTENSIONS") == "1":
        return None
    try:
        from . import _cproto
    except ImportError:
        return None
    return _cproto


_compiled = _load_compiled()

#: Every implementation available here, by name (tests run against each).
IMPLEMENTATIONS: dict[str, ModuleType] = {"python": _pyproto}
if _compiled is not None:
    IMPLEMENTATIONS["c"] = _compiled

_impl = _compiled if _compiled is not None else _pyproto
#: ``"c"`` or ``"python"``: the engine in use.
IMPLEMENTATION = "c" if _compiled is not None else "python"

if TYPE_CHECKING:
    # Both engines have the same API; type checkers see the reference's.
    from ._pyproto import Connection, ReplyParser
else:
    Connection = _impl.Connection
    ReplyParser = _impl.ReplyParser
