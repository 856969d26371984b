"""lmtpfast: fast, correct LMTP (RFC 2033) delivery.

>>> results = await lmtpfast.deliver(message, sender="a@example.org",   # doctest: +SKIP
...                                  recipients=["b@example.org"], server="unix:/run/dovecot/lmtp")

A delivery returns one :class:`RecipientResult` per recipient, in RCPT order;
exceptions are for what cannot be decided per recipient (:class:`LMTPError`
and its subclasses).

Every public name is here; the modules behind them are private (``_``) and
may change. Names are imported on first use, so a program that needs only
the client (``lmtpfast send`` run once per message by an MTA) never pays for
the agent, the spool or the configuration reader.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the private module that defines it
_EXPORTS: dict[str, str] = {
    # delivery: one session, the agent, its pools
    "Client": "_session",
    "connect": "_session",
    "connect_sync": "_session",
    "SyncClient": "_session",
    "deliver": "_session",
    "Message": "_delivery",
    "Delivery": "_delivery",
    "MessageFile": "_delivery",
    "Agent": "_agent",
    "AgentStats": "_agent",
    "Routing": "_routing",
    "SyncAgent": "_sync",
    "deliver_sync": "_sync",
    "Pool": "_pool",
    "PoolClosed": "_errors",
    "PoolStats": "_pool",
    # settings and configuration
    "PoolSettings": "_settings",
    "ShapingSettings": "_settings",
    "Timeouts": "_settings",
    # traffic shaping per destination (slow start, rate limits, dead destinations)
    "Shaper": "_shaping",
    "ShapingEvent": "_shaping",
    "ShapingState": "_shaping",
    "ShapingUnavailable": "_shaping",
    "LocalShapingState": "_shaping",
    "AgentConfig": "_config",
    "Transport": "_config",
    "DEFAULT_TRANSPORT": "_config",
    "load_config": "_config",
    "config_from_dict": "_config",
    "Route": "_routing",
    "Router": "_routing",
    "TransportMap": "_routing",
    "VirtualMap": "_routing",
    "parse_route": "_routing",
    "Destination": "_destination",
    "DestinationSet": "_destination",
    "parse_destination": "_destination",
    "DSN": "_dsn",
    "loop_factory": "_loop",
    # operations: counters and latency histograms (lmtpfast run, replay --json)
    "Metrics": "_metrics",
    "Trace": "_metrics",
    "TRACE": "_metrics",
    "METRICS": "_metrics",
    # security
    "TLSPolicy": "_tls",
    "TLSInfo": "_tls",
    "SECURITY_LEVELS": "_tls",
    "AuthPolicy": "_sasl",
    "Credentials": "_sasl",
    "DEFAULT_MECHANISMS": "_sasl",
    "parse_mechanisms": "_sasl",
    "PasswordMap": "_passwords",
    # lookup tables (TYPE:NAME)
    "open_map": "_maps",
    "Map": "_maps",
    "MapError": "_maps",
    "MapWarning": "_maps",
    "CachedMap": "_maps",
    "CacheSettings": "_maps",
    "CacheStats": "_maps",
    "read_private_file": "_passwords",
    # outcomes
    "Failure": "_failures",
    "FAILURES": "_failures",
    "failure_results": "_failures",
    "RecipientResult": "_results",
    "Status": "_results",
    "DELIVERED": "_results",
    "TRANSIENT": "_results",
    "PERMANENT": "_results",
    # errors
    "LMTPError": "_errors",
    "ProtocolError": "_errors",
    "LocalProtocolError": "_errors",
    "RemoteProtocolError": "_errors",
    "ContentError": "_errors",
    "ConnectError": "_errors",
    "ConnectTimeout": "_errors",
    "TLSError": "_errors",
    "AuthenticationError": "_errors",
    "ServerDisconnected": "_errors",
    "ReadTimeout": "_errors",
    "ReplyError": "_errors",
    "DeliveryFailed": "_errors",
    "ConfigurationError": "_errors",
}

__all__ = [
    "DEFAULT_MECHANISMS",
    "DEFAULT_TRANSPORT",
    "DELIVERED",
    "DSN",
    "FAILURES",
    "METRICS",
    "PERMANENT",
    "SECURITY_LEVELS",
    "TRACE",
    "TRANSIENT",
    "Agent",
    "AgentConfig",
    "AgentStats",
    "AuthPolicy",
    "AuthenticationError",
    "CacheSettings",
    "CacheStats",
    "CachedMap",
    "Client",
    "ConfigurationError",
    "ConnectError",
    "ConnectTimeout",
    "ContentError",
    "Credentials",
    "Delivery",
    "DeliveryFailed",
    "Destination",
    "DestinationSet",
    "Failure",
    "LMTPError",
    "LocalProtocolError",
    "LocalShapingState",
    "Map",
    "MapError",
    "MapWarning",
    "Message",
    "MessageFile",
    "Metrics",
    "PasswordMap",
    "Pool",
    "PoolClosed",
    "PoolSettings",
    "PoolStats",
    "ProtocolError",
    "ReadTimeout",
    "RecipientResult",
    "RemoteProtocolError",
    "ReplyError",
    "Route",
    "Router",
    "Routing",
    "ServerDisconnected",
    "Shaper",
    "ShapingEvent",
    "ShapingSettings",
    "ShapingState",
    "ShapingUnavailable",
    "Status",
    "SyncAgent",
    "SyncClient",
    "TLSError",
    "TLSInfo",
    "TLSPolicy",
    "Timeouts",
    "Trace",
    "Transport",
    "TransportMap",
    "VirtualMap",
    "__version__",
    "config_from_dict",
    "connect",
    "connect_sync",
    "deliver",
    "deliver_sync",
    "failure_results",
    "load_config",
    "loop_factory",
    "open_map",
    "parse_destination",
    "parse_mechanisms",
    "parse_route",
    "read_private_file",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from ._agent import Agent, AgentStats
    from ._config import DEFAULT_TRANSPORT, AgentConfig, Transport, config_from_dict, load_config
    from ._delivery import Delivery, Message, MessageFile
    from ._destination import Destination, DestinationSet, parse_destination
    from ._dsn import DSN
    from ._errors import (
        AuthenticationError,
        ConfigurationError,
        ConnectError,
        ConnectTimeout,
        ContentError,
        DeliveryFailed,
        LMTPError,
        LocalProtocolError,
        PoolClosed,
        ProtocolError,
        ReadTimeout,
        RemoteProtocolError,
        ReplyError,
        ServerDisconnected,
        TLSError,
    )
    from ._failures import FAILURES, Failure, failure_results
    from ._loop import loop_factory
    from ._maps import CachedMap, CacheSettings, CacheStats, Map, MapError, MapWarning, open_map
    from ._metrics import METRICS, TRACE, Metrics, Trace
    from ._passwords import PasswordMap, read_private_file
    from ._pool import Pool, PoolStats
    from ._results import DELIVERED, PERMANENT, TRANSIENT, RecipientResult, Status
    from ._routing import Route, Router, Routing, TransportMap, VirtualMap, parse_route
    from ._sasl import DEFAULT_MECHANISMS, AuthPolicy, Credentials, parse_mechanisms
    from ._session import Client, SyncClient, connect, connect_sync, deliver
    from ._settings import PoolSettings, ShapingSettings, Timeouts
    from ._shaping import (
        LocalShapingState,
        Shaper,
        ShapingEvent,
        ShapingState,
        ShapingUnavailable,
    )
    from ._sync import SyncAgent, deliver_sync
    from ._tls import SECURITY_LEVELS, TLSInfo, TLSPolicy
