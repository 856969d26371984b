"""LMTP destinations, written exactly as Postfix writes them (lmtp(8)).

``unix:/path/name``, ``inet:host:port``, ``host:port``, ``host`` (port 24),
``[::1]:24``, ``[2001:db8::1]``, ``inet:host:lmtp`` (a service name); and
``command:PROGRAM ARGS...``, a program that speaks LMTP on its stdin and
stdout (split into words as a POSIX shell would, without running one:
``command:/usr/lib/dovecot/lmtp -c /etc/dovecot/dovecot.conf``).
"""

from __future__ import annotations

import _socket  # not socket: its enum and selectors are start-up cost for `lmtpfast send`
from collections.abc import Sequence
from typing import Literal

import msgspec

from ._errors import ConfigurationError

__all__ = ["DEFAULT_PORT", "Destination", "DestinationSet", "parse_destination"]

#: The LMTP port Postfix assumes when none is given.
DEFAULT_PORT = 24


class Destination(msgspec.Struct, frozen=True):
    """Where an LMTP server listens: a unix socket path, a TCP host and port, or a program.

    For ``kind == "command"``, ``path`` is the command line as written and
    :attr:`argv` its words.
    """

    kind: Literal["unix", "inet", "command"]
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return self.kind == "unix"

    @property
    def is_local(self) -> bool:
        """A unix socket or a program: nothing crosses a network (plaintext AUTH is fine)."""
        return self.kind != "inet"

    @property
    def argv(self) -> list[str]:
        """The program and its arguments (``command:`` destinations; ``[]`` otherwise)."""
        if self.kind != "command":
            return []
        import shlex

        return shlex.split(self.path)

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "command":
            return f"command:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def parse(cls, text: str | Destination) -> Destination:
        return parse_destination(text)


class DestinationSet(msgspec.Struct, frozen=True):
    """Back ends that share one transport's users: each user goes to one of them.

    The choice is rendezvous (highest-random-weight) hashing of the user's
    address with each member: stable as long as the set is, and when a
    member leaves the set only its own users move (each to its next-ranked
    member); a member joining takes a fair share from every other. What
    Dovecot's director did, without a director: every front end with the
    same set computes the same answer.
    """

    members: tuple[Destination, ...]
    #: A member that cannot be reached: its users are deferred (False, the
    #: default: their mailboxes live there) or tried on their next-ranked member.
    failover: bool = False

    def __post_init__(self) -> None:
        if len(self.members) < 1:
            raise ConfigurationError("a destination set needs at least one member")
        if len(set(self.members)) != len(self.members):
            raise ConfigurationError("a destination set lists a member twice")

    def ranked(self, key: str) -> tuple[Destination, ...]:
        """Every member, best first, for ``key`` (a user's address, lower-cased)."""
        if len(self.members) == 1:
            return self.members
        return tuple(sorted(self.members, key=lambda m: _weight(m, key), reverse=True))

    def pick(self, key: str) -> Destination:
        """The member that holds ``key``'s mailbox."""
        return max(self.members, key=lambda m: _weight(m, key))

    def __str__(self) -> str:
        return "{" + ", ".join(str(m) for m in self.members) + "}"

    @classmethod
    def parse(cls, texts: Sequence[str | Destination], *, failover: bool = False
              ) -> DestinationSet:
        """A set from destination texts (``"imap1:24"``, ``"unix:/path"``) or Destinations."""
        return cls(tuple(parse_destination(t) for t in texts), failover)


def _weight(member: Destination, key: str) -> int:
    # A stable hash (not Python's, which is salted per process): every front
    # end and every restart picks the same member. Imported here: `lmtpfast
    # send` parses a destination per process and never needs a digest.
    import hashlib

    digest = hashlib.blake2b(f"{member}\n{key}".encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big")


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
            return _socket.getservbyname("lmtp", "tcp")
        except OSError:
            return DEFAULT_PORT
    try:
        return _socket.getservbyname(value, "tcp")
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
    if spec.startswith("command:"):
        line = spec[8:].strip()
        import shlex

        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise ConfigurationError(f"bad command line in destination {text!r}: {exc}"
                                     ) from None
        if not words:
            raise ConfigurationError(f"empty command in destination {text!r}")
        return Destination("command", path=line)
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
