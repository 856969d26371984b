"""The lmtpfast server side: an LMTP server engine, and the sink built on it.

``ServerSession`` is the sans-IO server engine (compiled when built, the
pure-Python reference otherwise; both behave alike); what a server does with
the mail is a ``Handler``; ``Server`` runs the engine over asyncio for one
handler. ``Sink`` is the server with the sink's handler (store, discard,
inject faults as a ``FaultPlan``/``FaultRule``/``parse_fault`` says);
``DotDecoder`` is the strict DATA decoder. See ``docs/sink.md``.
"""

from typing import TYPE_CHECKING

from ._common import (
    ABORT,
    CLOSE,
    DEFAULT,
    DEFAULT_EXTENSIONS,
    DEFAULT_MAX_SIZE,
    STALL,
    START_TLS,
    Answer,
    Decision,
    Delay,
    Envelope,
    Handler,
    Item,
    Pending,
    SessionConfig,
    SinkStats,
)
from ._data import DotDecoder
from ._faults import FaultPlan, FaultRule, parse_fault
from ._server import IMPLEMENTATION, IMPLEMENTATIONS, Server, ServerProtocol
from ._sink import ReceivedMessage, Sink, SinkHandler

if TYPE_CHECKING:
    # Both engines have the same API; type checkers see the reference's.
    from ._session import ServerSession
else:
    ServerSession = IMPLEMENTATIONS[IMPLEMENTATION].ServerSession

__all__ = [
    "ABORT",
    "CLOSE",
    "DEFAULT",
    "DEFAULT_EXTENSIONS",
    "DEFAULT_MAX_SIZE",
    "IMPLEMENTATION",
    "IMPLEMENTATIONS",
    "STALL",
    "START_TLS",
    "Answer",
    "Decision",
    "Delay",
    "DotDecoder",
    "Envelope",
    "FaultPlan",
    "FaultRule",
    "Handler",
    "Item",
    "Pending",
    "ReceivedMessage",
    "Server",
    "ServerProtocol",
    "ServerSession",
    "SessionConfig",
    "Sink",
    "SinkHandler",
    "SinkStats",
    "parse_fault",
]
