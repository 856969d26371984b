"""The lmtpfast server side: an LMTP server engine, and the sink built on it.

``ServerSession`` is the sans-IO server engine (compiled when built, the
pure-Python reference otherwise; both behave alike); what a server does with
the mail is a ``Handler``; ``Server`` runs the engine over asyncio for one
handler. ``Sink`` is the server with the sink's handler (store, discard,
inject faults as a ``FaultPlan``/``FaultRule``/``parse_fault`` says);
``DotDecoder`` is the strict DATA decoder. See ``docs/sink.md``. ``Proxy``
is the server with the proxy's handler (``ProxyHandler``): an LMTP front end
that routes every recipient to its back end (``docs/proxy.md``).
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
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
from ._server import IMPLEMENTATION, IMPLEMENTATIONS, Server, ServerProtocol, parse_listen
from ._sink import ReceivedMessage, Sink, SinkHandler

if TYPE_CHECKING:
    # Both engines have the same API; type checkers see the reference's.
    from ._proxy import ProxyHandler, ProxyRecord, ProxyStats
    from ._proxyconf import (
        ClientTimeouts,
        ProxySettings,
        load_proxy_config,
        proxy_config_from_dict,
    )
    from ._proxyserver import Proxy
    from ._session import ServerSession
else:
    ServerSession = IMPLEMENTATIONS[IMPLEMENTATION].ServerSession
    # The proxy needs the agent: imported on first use, so the sink stays light.
    __getattr__ = lazy_exports(__name__, {
        "Proxy": "_proxyserver",
        "ProxyHandler": "_proxy",
        "ProxyRecord": "_proxy",
        "ProxyStats": "_proxy",
        "ProxySettings": "_proxyconf",
        "ClientTimeouts": "_proxyconf",
        "load_proxy_config": "_proxyconf",
        "proxy_config_from_dict": "_proxyconf",
    })

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
    "ClientTimeouts",
    "Decision",
    "Delay",
    "DotDecoder",
    "Envelope",
    "FaultPlan",
    "FaultRule",
    "Handler",
    "Item",
    "Pending",
    "Proxy",
    "ProxyHandler",
    "ProxyRecord",
    "ProxySettings",
    "ProxyStats",
    "ReceivedMessage",
    "Server",
    "ServerProtocol",
    "ServerSession",
    "SessionConfig",
    "Sink",
    "SinkHandler",
    "SinkStats",
    "load_proxy_config",
    "parse_fault",
    "parse_listen",
    "proxy_config_from_dict",
]
