"""The proxy's configuration: the agent's TOML file plus a ``[proxy]`` table.

One file describes both sides: the ``[proxy]`` table says how clients are
served (listeners, limits, TLS, AUTH, timeouts, loop guards); everything else
is the agent's configuration (``docs/agent.md``: maps, transports, pools,
per-stage timeouts toward each back end), read by the same code as for
``lmtpfast replay``::

    default = "lmtp:unix:/run/dovecot/lmtp"
    transport_map = "pgsql:/etc/postfix/pgsql-transport.cf"
    recipient_map = "pgsql:/etc/postfix/pgsql-users.cf"

    [proxy]
    listen = ["127.0.0.1:24", "unix:/run/lmtpfast/lmtp"]
    hostname = "mx1.example.org"
    max_connections = 500
    hopcount_limit = 50

    [proxy.timeouts]
    command = 300
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from .._config import AgentConfig, _convert, config_from_dict, read_toml
from .._errors import ConfigurationError
from .._saslserver import check_mechanisms
from ._common import (
    DEFAULT_MAX_LINE_LENGTH,
    DEFAULT_MAX_RECIPIENTS,
    DEFAULT_MAX_SIZE,
)
from ._proxy import DEFAULT_HOPCOUNT_LIMIT, DEFAULT_SPOOL_THRESHOLD
from ._server import parse_listen

__all__ = [
    "PROXY_EXTENSIONS",
    "ClientTimeouts",
    "ProxySettings",
    "check_verify",
    "load_proxy_config",
    "proxy_config_from_dict",
]

#: What the proxy offers by default, in LHLO order (STARTTLS and AUTH are
#: added when a certificate / users are configured).
PROXY_EXTENSIONS: tuple[str, ...] = (
    "PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "CHUNKING", "SMTPUTF8", "SIZE",
)
_KNOWN_EXTENSIONS = frozenset((*PROXY_EXTENSIONS, "DSN"))


class ClientTimeouts(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How long the proxy waits for its client (seconds; 0 = for ever).

    ``command``: a deadline, not a silence timer: a command line must be
    complete this long after the client's turn began (its last command, or
    the last reply it waited for), and while content is read each
    ``max_line_length`` bytes must arrive within it, so a client that
    trickles a byte at a time (slow-loris) cannot hold a session (Postfix's
    ``smtpd_timeout`` with ``smtpd_per_record_deadline``). ``idle``: silence
    from the client. ``tls``: the STARTTLS handshake. Time the proxy owes an
    answer (a lookup, a back end's reply) is never charged to the client.
    """

    command: Annotated[float, msgspec.Meta(ge=0)] = 300.0
    idle: Annotated[float, msgspec.Meta(ge=0)] = 300.0
    tls: Annotated[float, msgspec.Meta(ge=0)] = 60.0


class ProxySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``[proxy]`` table (every key optional).

    ``listen``: where clients connect (``--listen`` replaces it).
    ``extensions``: LHLO keywords offered (PIPELINING and ENHANCEDSTATUSCODES
    are required of an LMTP server, RFC 2033). ``max_size`` (bytes, 0 = no
    limit), ``max_recipients`` per transaction, ``max_line_length``,
    ``max_commands`` (junk commands before a transaction, 0 = no limit),
    ``max_connections`` (client sessions, 0 = no limit): the abuse limits.
    ``hopcount_limit``: a message with this many ``Received:`` fields is
    refused ``554 5.4.6``. ``spool_threshold``: content beyond it goes to a
    private temp file in ``spool_dir`` (default: the system's temp folder).
    ``unix_mode``: permissions of unix listeners.
    ``received_header``: prepend the proxy's ``Received:`` field (the next hop
    counts it). ``shutdown_timeout``: how long SIGTERM lets open transactions
    finish. ``timeouts``: toward the client (:class:`ClientTimeouts`); toward
    the back ends each transport's ``timeouts`` apply.
    """

    listen: list[str] = []
    hostname: str = ""
    extensions: list[str] = msgspec.field(default_factory=lambda: list(PROXY_EXTENSIONS))
    max_size: Annotated[int, msgspec.Meta(ge=0)] = DEFAULT_MAX_SIZE
    max_recipients: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_MAX_RECIPIENTS
    max_line_length: Annotated[int, msgspec.Meta(ge=512)] = DEFAULT_MAX_LINE_LENGTH
    max_commands: Annotated[int, msgspec.Meta(ge=0)] = 100
    max_connections: Annotated[int, msgspec.Meta(ge=0)] = 1000
    hopcount_limit: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_HOPCOUNT_LIMIT
    spool_threshold: Annotated[int, msgspec.Meta(ge=0)] = DEFAULT_SPOOL_THRESHOLD
    spool_dir: str | None = None
    received_header: bool = True
    shutdown_timeout: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    #: Permissions of unix listeners: 0o666 lets Postfix's lmtp(8) (user
    #: ``postfix``) connect, as Dovecot's ``unix_listener lmtp { mode = 0666 }``.
    unix_mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] = 0o666
    timeouts: ClientTimeouts = ClientTimeouts()
    #: STARTTLS: a certificate and its key (PEM); offered when both are set.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    #: MAIL needs STARTTLS first (530 5.7.0 otherwise).
    tls_required: bool = False
    #: AUTH: ``none`` (not offered), ``optional``, ``required`` (MAIL needs it,
    #: 530 5.7.0) or ``tcp`` (required on TCP listeners, optional on unix sockets).
    auth: Literal["none", "optional", "required", "tcp"] = "none"
    #: ``user password`` lines (mode 0600), for ``auth``.
    sasl_users: str | None = None
    sasl_mechanisms: list[str] = msgspec.field(
        default_factory=lambda: ["SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN"])
    #: PLAIN/LOGIN over TCP without TLS (``None``: only on unix sockets).
    sasl_allow_plaintext: bool | None = None
    #: RCPT verification: each RCPT is forwarded to its back end at once, on the
    #: transaction the message will go on, and the back end's own reply is the
    #: answer. ``true`` for every transport, or a list of transport names.
    verify_recipients: bool | list[str] = False

    def __post_init__(self) -> None:
        for ext in self.extensions:
            if ext.upper() not in _KNOWN_EXTENSIONS:
                raise ConfigurationError(
                    f"unknown extension {ext!r} "
                    f"(offered can be {', '.join(sorted(_KNOWN_EXTENSIONS))})",
                    field="extensions")
        names = {e.upper() for e in self.extensions}
        for required in ("PIPELINING", "ENHANCEDSTATUSCODES"):
            if required not in names:
                raise ConfigurationError(f"an LMTP server must offer {required} (RFC 2033)",
                                         field="extensions")
        for dest in self.listen:
            parse_listen(dest)
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigurationError("tls_cert_file and tls_key_file go together",
                                     field="tls_cert_file")
        if self.tls_required and self.tls_cert_file is None:
            raise ConfigurationError("tls_required needs tls_cert_file and tls_key_file",
                                     field="tls_required")
        if self.auth != "none" and self.sasl_users is None:
            raise ConfigurationError(f"auth = {self.auth!r} needs sasl_users (a file of "
                                     "'user password' lines, mode 0600)", field="sasl_users")
        check_mechanisms(self.sasl_mechanisms)
        if self.hostname and not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+", self.hostname):
            raise ConfigurationError(f"bad host name {self.hostname!r}", field="hostname")

    @property
    def name(self) -> str:
        """The host name in the greeting, LHLO and the Received: field."""
        if self.hostname:
            return self.hostname
        name = socket.getfqdn()
        return name if name not in ("localhost", "localhost.localdomain") else socket.gethostname()


def proxy_config_from_dict(
    data: Mapping[str, Any], *, source: str = "<python>",
    base_dir: str | os.PathLike[str] | None = None,
) -> tuple[ProxySettings, AgentConfig]:
    """The ``[proxy]`` table and the agent's configuration from the file's data."""
    if not isinstance(data, Mapping):
        raise ConfigurationError("the configuration must be a table", source=source)
    rest = dict(data)
    table = rest.pop("proxy", {})
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    settings: ProxySettings = _convert(table, ProxySettings, source, "proxy")
    # Files named in [proxy] are relative to the config file, as map files are.
    fix = {}
    for key in ("spool_dir", "tls_cert_file", "tls_key_file", "sasl_users"):
        value = getattr(settings, key)
        if value is not None and not os.path.isabs(value):
            fix[key] = str(base / value)
    if fix:
        settings = msgspec.structs.replace(settings, **fix)
    config = config_from_dict(rest, source=source, base_dir=base)
    check_verify(settings, config)
    return settings, config


def check_verify(settings: ProxySettings, config: AgentConfig) -> None:
    """``verify_recipients`` names only transports the configuration has."""
    verify = settings.verify_recipients
    if isinstance(verify, list):
        unknown = [n for n in verify if n not in config.transports]
        if unknown:
            raise ConfigurationError(
                f"verify_recipients names unknown transport(s) {', '.join(map(repr, unknown))} "
                f"(the transports are {', '.join(sorted(config.transports)) or 'none'})",
                source=config.source, field="proxy.verify_recipients")


def load_proxy_config(path: str | os.PathLike[str]) -> tuple[ProxySettings, AgentConfig]:
    """Read a proxy's TOML file: its ``[proxy]`` table and its agent configuration."""
    source = os.fspath(path)
    return proxy_config_from_dict(read_toml(source), source=source,
                                  base_dir=Path(source).resolve().parent)
