"""lmtpfast: fast, correct LMTP (RFC 2033) delivery.

>>> results = await lmtpfast.deliver(message, sender="a@example.org",   # doctest: +SKIP
...                                  recipients=["b@example.org"], server="unix:/run/dovecot/lmtp")

A delivery returns one :class:`RecipientResult` per recipient, in RCPT order;
exceptions are for what cannot be decided per recipient (see ``errors``).
"""

from .agent import Agent
from .client import Client, connect, deliver
from .destination import Destination, parse_destination
from .dsn import DSN
from .errors import (
    AuthenticationError,
    ConfigurationError,
    ConnectError,
    ConnectTimeout,
    ContentError,
    DeliveryFailed,
    LMTPError,
    LocalProtocolError,
    ProtocolError,
    ReadTimeout,
    RemoteProtocolError,
    ReplyError,
    ServerDisconnected,
    TLSError,
)
from .results import DELIVERED, PERMANENT, TRANSIENT, RecipientResult
from .sasl import AuthPolicy, Credentials
from .tls import TLSPolicy
from .transport import Timeouts

__version__ = "0.1.0"

__all__ = [
    "DELIVERED",
    "DSN",
    "PERMANENT",
    "TRANSIENT",
    "Agent",
    "AuthPolicy",
    "AuthenticationError",
    "Client",
    "ConfigurationError",
    "ConnectError",
    "ConnectTimeout",
    "ContentError",
    "Credentials",
    "DeliveryFailed",
    "Destination",
    "LMTPError",
    "LocalProtocolError",
    "ProtocolError",
    "ReadTimeout",
    "RecipientResult",
    "RemoteProtocolError",
    "ReplyError",
    "ServerDisconnected",
    "TLSError",
    "TLSPolicy",
    "Timeouts",
    "__version__",
    "connect",
    "deliver",
    "parse_destination",
]
