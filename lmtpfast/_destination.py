"""LMTP destinations, written exactly as Postfix writes them (lmtp(8)).

``unix:/path/name``, ``inet:host:port``, ``host:port``, ``host`` (port 24),
``[::1]:24``, ``[2001:db8::1]``, ``inet:host:lmtp`` (a service name).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Literal

from ._errors import ConfigurationError

__all__ = ["DEFAULT_PORT", "Destination", "parse_destination"]

#: The LMTP port Postfix assumes when none is given.
DEFAULT_PORT = 24


@dataclass(frozen=True, slots=True)
class Destination:
    """Where an LMTP server listens: a unix socket path or a TCP host and port."""

    kind: Literal["unix", "inet"]
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return self.kind == "unix"

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def parse(cls, text: str | Destination) -> Destination:
        return parse_destination(text)


def _port(value: str, text: str) -> int:
    if value.isdigit():
        port = int(value)
        if not 0 < port < 65536:
            raise ConfigurationError(f"port {port} out of range in destination {text!r}")
        return port
    if not value:
        raise ConfigurationError(f"empty port in destination {text!r}")
    if value.lower() == "lmtp":
        # /etc/services may not list lmtp; Postfix's own default is 24.
        try:
            return socket.getservbyname("lmtp", "tcp")
        except OSError:
            return DEFAULT_PORT
    try:
        return socket.getservbyname(value, "tcp")
    except OSError:
        raise ConfigurationError(
            f"unknown service name {value!r} in destination {text!r}") from None


def parse_destination(text: str | Destination) -> Destination:
    """Parse a Postfix-style LMTP destination; a :class:`ConfigurationError` says what is wrong."""
    if isinstance(text, Destination):
        return text
    if not isinstance(text, str):
        raise ConfigurationError(f"destination must be a string, not {type(text).__name__}")
    spec = text.strip()
    if not spec or any(c in spec for c in "\r\n\0"):
        raise ConfigurationError(f"bad destination {text!r}")
    if spec.startswith("unix:"):
        path = spec[5:]
        if not path:
            raise ConfigurationError(f"empty socket path in destination {text!r}")
        return Destination("unix", path=path)
    if spec.startswith("inet:"):
        spec = spec[5:]
    elif spec.startswith("/"):
        # smtplib.LMTP's convention; Postfix would need "unix:".
        return Destination("unix", path=spec)
    if spec.startswith("["):
        close = spec.find("]")
        if close < 0:
            raise ConfigurationError(f"missing ']' in destination {text!r}")
        host = spec[1:close]
        rest = spec[close + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigurationError(f"junk after ']' in destination {text!r}")
        port = _port(rest[1:], text) if rest else DEFAULT_PORT
    else:
        if spec.count(":") > 1:
            raise ConfigurationError(
                f"IPv6 address needs brackets in destination {text!r} (write [addr]:port)"
            )
        host, sep, port_text = spec.partition(":")
        port = _port(port_text, text) if sep else DEFAULT_PORT
    if not host or any(c.isspace() for c in host):
        raise ConfigurationError(f"bad host in destination {text!r}")
    return Destination("inet", host=host, port=port)
