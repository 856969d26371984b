"""The lmtpfast error tree.

Per-recipient outcomes are data (see :class:`lmtpfast.RecipientResult`); these
exceptions are for what cannot be decided per recipient: a server that cannot
be reached, a greeting refused, a broken protocol, a bad configuration.
Classes also inherit the matching builtin so generic ``except TimeoutError`` /
``except ConnectionError`` / ``except ValueError`` clauses keep working.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._results import RecipientResult

__all__ = [
    "AuthenticationError",
    "ConfigurationError",
    "ConnectError",
    "ConnectTimeout",
    "ContentError",
    "DeliveryFailed",
    "LMTPError",
    "LocalProtocolError",
    "PoolClosed",
    "ProtocolError",
    "ReadTimeout",
    "RemoteProtocolError",
    "ReplyError",
    "ServerDisconnected",
    "TLSError",
]


class LMTPError(Exception):
    """Base class of every error lmtpfast raises."""


class ProtocolError(LMTPError):
    """The conversation broke the protocol; the connection is unusable."""


class LocalProtocolError(ProtocolError, ValueError):
    """We were asked to send something the protocol forbids (bad address, CR/LF in an argument)."""


class ContentError(LocalProtocolError):
    """The message content cannot be sent as it is (a NUL byte, or too large for the server)."""


class RemoteProtocolError(ProtocolError):
    """The server sent something the protocol forbids (malformed or unexpected reply)."""


class ConnectError(LMTPError, ConnectionError):
    """The server could not be reached."""


class ConnectTimeout(ConnectError, TimeoutError):
    """Connecting, or waiting for the greeting, took too long."""


class TLSError(ConnectError):
    """TLS could not be set up as the policy demands.

    STARTTLS not offered or refused where TLS is required, a failed handshake,
    or a certificate that does not verify (the OpenSSL reason, e.g.
    ``CERTIFICATE_VERIFY_FAILED``, is in the message). Transient for the
    recipients, as Postfix defers them.
    """


class AuthenticationError(LMTPError):
    """SASL authentication could not be done, for a reason found on this side.

    No mechanism both sides accept (e.g. only PLAIN offered over plain TCP
    under ``noplaintext``), a malformed challenge, or a SCRAM server signature
    that does not verify. A server refusing the credentials is a
    :class:`ReplyError` with ``stage == "auth"`` instead. Messages never
    contain credentials.
    """

    stage = "auth"


class ServerDisconnected(LMTPError, ConnectionError):
    """The server closed the connection while replies were still expected."""


class ReadTimeout(LMTPError, TimeoutError):
    """A reply did not arrive within the stage's time limit."""

    def __init__(self, message: str, stage: str = "") -> None:
        super().__init__(message)
        self.stage = stage


class ReplyError(LMTPError):
    """A session-level command (greeting, LHLO, STARTTLS, AUTH, ...) was refused."""

    def __init__(self, code: int, enhanced: str | None, text: str, stage: str = "") -> None:
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.stage = stage
        parts = [str(code)]
        if enhanced:
            parts.append(enhanced)
        parts.append(text)
        prefix = f"{stage}: " if stage else ""
        super().__init__(prefix + " ".join(p for p in parts if p))

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500


class PoolClosed(LMTPError):
    """The pool (or the agent) was closed before a connection was free."""


class DeliveryFailed(LMTPError):
    """Raised only by helpers that promise delivery, when every recipient failed."""

    def __init__(self, results: Sequence[RecipientResult]) -> None:
        self.results = list(results)
        first = self.results[0] if self.results else None
        detail = f": {first.code} {first.text}" if first is not None else ""
        super().__init__(f"all {len(self.results)} recipient(s) failed{detail}")


class ConfigurationError(LMTPError, ValueError):
    """A configuration value, map line, destination or command-line option is wrong.

    ``source`` names the file (or option), ``line`` the line number when known,
    ``field`` the key or column that is wrong.
    """

    def __init__(
        self, problem: str, *, source: str | None = None, line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.problem = problem
        self.source = source
        self.line = line
        self.field = field
        where = ""
        if source:
            where = source + (f":{line}" if line is not None else "")
        if field:
            where = f"{where} [{field}]" if where else field
        super().__init__(f"{where}: {problem}" if where else problem)
