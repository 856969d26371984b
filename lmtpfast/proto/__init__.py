"""The sans-IO LMTP engine: no sockets, no event loop below this package.

The compiled engine (``_cproto``, Cython over ``csrc/``) is used when it is
built, unless ``LMTPFAST_NO_EXTENSIONS=1``; the pure-Python reference
(``_pyproto``) behaves identically and is the fallback.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

from . import _pyproto
from ._common import (
    NEED_DATA,
    Capabilities,
    CommandReply,
    ConnectionBroken,
    Event,
    NeedData,
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
    "Engine",
    "Event",
    "NeedData",
    "ReadyForData",
    "Reply",
    "ReplyParser",
    "Transaction",
    "TransactionDone",
    "get_engine",
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


class Engine(NamedTuple):
    """One implementation of the core: its engine and its content encoder."""

    #: ``"c"`` (compiled) or ``"python"`` (the reference).
    name: str
    Connection: Any  # the engine class (both have ``_pyproto.Connection``'s API)
    encode_content: Any
    ContentEncoder: Any


def get_engine(engine: str | Engine | ModuleType | None = None) -> Engine:
    """The core to run on: ``"c"``, ``"python"``, a module of :data:`IMPLEMENTATIONS`, or
    ``None`` for the default (compiled when built, unless ``LMTPFAST_NO_EXTENSIONS=1``).

    The layers above take it as their ``engine=`` parameter, so one process
    (a test, a benchmark) can run both side by side.
    """
    from . import content

    if isinstance(engine, Engine):
        return engine
    if engine is None:
        name = IMPLEMENTATION
    elif isinstance(engine, ModuleType):
        found = [k for k, m in IMPLEMENTATIONS.items() if m is engine]
        if not found:
            raise ValueError(f"{engine.__name__} is not an lmtpfast engine")
        name = found[0]
    else:
        name = engine
    proto_mod = IMPLEMENTATIONS.get(name)
    content_mod = content.IMPLEMENTATIONS.get(name)
    if proto_mod is None or content_mod is None:
        known = ", ".join(repr(k) for k in IMPLEMENTATIONS)
        raise ValueError(f"engine {name!r} is not available here (available: {known}; the "
                         "compiled one needs `python setup.py build_ext --inplace`)")
    cached = _ENGINES.get(name)
    if cached is None:
        cached = _ENGINES[name] = Engine(name, proto_mod.Connection, content_mod.encode_content,
                                         content_mod.ContentEncoder)
    return cached


_ENGINES: dict[str, Engine] = {}
