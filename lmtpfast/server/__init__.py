"""The lmtpfast sink: a fast LMTP server with fault injection, for tests and benchmarks.

``Sink`` is the asyncio server; ``FaultPlan``/``FaultRule``/``parse_fault``
describe what it should do wrong; ``ServerSession`` is the sans-IO state
machine underneath and ``DotDecoder`` its DATA decoder. See ``docs/sink.md``.
"""

from ._data import DotDecoder
from ._faults import FaultPlan, FaultRule, parse_fault
from ._session import DEFAULT_EXTENSIONS, DEFAULT_MAX_SIZE, ServerSession, SessionConfig, SinkStats
from ._sink import ReceivedMessage, Sink

__all__ = [
    "DEFAULT_EXTENSIONS",
    "DEFAULT_MAX_SIZE",
    "DotDecoder",
    "FaultPlan",
    "FaultRule",
    "ReceivedMessage",
    "ServerSession",
    "SessionConfig",
    "Sink",
    "SinkStats",
    "parse_fault",
]
