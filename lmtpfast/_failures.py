"""The one failure table: every per-recipient result lmtpfast makes up itself.

Postfix keeps its delivery agent's made-up outcomes in one file
(``smtp_trouble.c``); this module is that file for lmtpfast. Each local event
(a connection refused, a reply that never came, a route that does not exist,
a message the server cannot take) has one :class:`Failure` entry: the SMTP
code, the RFC 3463 enhanced code, the stage it is reported at and a text
template. Every layer builds its made-up results here (the engine's
``fail_transaction``, the session, the agent, replay, ``lmtpfast send``), so
the same event gets the same code, enhanced code and stage wherever it
happens. ``docs/reliability.md`` carries the table (``markdown_table()``
generates it; a test compares the two).

Results decided by a server keep the server's own code; the entries marked
*from the reply* below (a refused greeting, LHLO or AUTH) take the code from
the server's reply and only add lmtpfast's text. A 5xx greeting is treated as
temporary by default, as Postfix's ``lmtp_skip_5xx_greeting = yes`` does: a
back end that greets with 554 is usually starting or stopping, and bouncing
mail for that would lose it; ``skip_5xx_greeting=False`` restores the strict
reading.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from ._errors import (
    AuthenticationError,
    ConnectError,
    ConnectTimeout,
    ContentError,
    LMTPError,
    PoolClosed,
    ReadTimeout,
    RemoteProtocolError,
    ReplyError,
    ServerDisconnected,
    TLSError,
)
from ._results import RecipientResult, Status, status_of

__all__ = [
    "ALIAS_LOOP",
    "AUTH_FAILED",
    "AUTH_REFUSED",
    "BAD_CONTENT",
    "BAD_RECIPIENT",
    "BAD_SENDER",
    "CONNECT_FAILED",
    "CONNECT_TIMEOUT",
    "DEAD_DESTINATION",
    "EIGHTBIT_MISSING",
    "ERROR_TRANSPORT",
    "FAILURES",
    "GREETING_REFUSED",
    "LHLO_REFUSED",
    "LOCAL_ERROR",
    "LOST",
    "LOST_AFTER_DOT",
    "MAP_FAILURE",
    "NO_DESTINATION",
    "NO_ROUTE",
    "NO_ROUTE_BOUNCE",
    "PROTOCOL_ERROR",
    "RETRY_TRANSPORT",
    "SETUP_STAGES",
    "SHUTDOWN",
    "SIZE_LIMIT",
    "SMTPUTF8_MISSING",
    "TIMEOUT",
    "TLS_UNAVAILABLE",
    "TOO_BIG",
    "UNKNOWN_RECIPIENT",
    "Failure",
    "failure_results",
    "made_up",
    "markdown_table",
]

#: The session set-up stages, in the order ``_session.connect`` runs them.
SETUP_STAGES = ("connect", "greeting", "lhlo", "starttls", "auth")


class Failure(msgspec.Struct, frozen=True):
    """One local event and the result every layer gives a recipient for it.

    ``stage`` is where the result is reported; empty means "the stage the
    event interrupted" (a lost connection is reported at ``mail``, ``rcpt``,
    ``data``, ``content`` or ``final``, wherever it happened). ``text`` is a
    :meth:`str.format` template over the fields the caller passes
    (``detail``, ``dest``, ``address``...). ``from_reply``: the code comes
    from the server's reply (lmtpfast only words the text); ``code`` and
    ``enhanced`` are then the class it is given.
    """

    event: str
    code: int
    enhanced: str
    stage: str
    text: str
    summary: str
    possibly_delivered: bool = False
    from_reply: bool = False

    @property
    def status(self) -> Status:
        return status_of(self.code)

    def result(
        self, address: str, *, stage: str | None = None, destination: str | None = None,
        **fields: Any,
    ) -> RecipientResult:
        """This event's result for one recipient (``fields`` fill the text template)."""
        return RecipientResult(address, status_of(self.code), self.code, self.enhanced,
                               self.text.format(address=address, **fields),
                               stage or self.stage or "local", destination, True,
                               self.possibly_delivered)

    def results(
        self, addresses: Iterable[str], *, stage: str | None = None,
        destination: str | None = None, **fields: Any,
    ) -> list[RecipientResult]:
        """:meth:`result` for each address, in order."""
        return [self.result(a, stage=stage, destination=destination, **fields)
                for a in addresses]


# -- the table -------------------------------------------------------------------------------
# Postfix's words are kept where lmtpfast says the same thing.

CONNECT_FAILED = Failure(
    "connect-failed", 451, "4.4.1", "connect", "{detail}",
    "the server cannot be reached (refused, no such socket, unreachable)")
CONNECT_TIMEOUT = Failure(
    "connect-timeout", 451, "4.4.1", "connect", "{detail}",
    "connecting took longer than `timeouts.connect`")
GREETING_REFUSED = Failure(
    "greeting-refused", 450, "4.3.2", "greeting", "{dest} refused the session: {reply}",
    "the greeting is 4xx or 5xx: its code, a 5xx made 4xx unless `skip_5xx_greeting = false` "
    "(Postfix's `lmtp_skip_5xx_greeting`)", from_reply=True)
LHLO_REFUSED = Failure(
    "lhlo-refused", 550, "5.5.0", "lhlo", "{dest} refused the session: {reply}",
    "LHLO is refused: its code", from_reply=True)
TLS_UNAVAILABLE = Failure(
    "tls-unavailable", 454, "4.7.5", "starttls", "{detail}",
    "TLS is required and not offered, refused, or the handshake or certificate check failed")
AUTH_REFUSED = Failure(
    "auth-refused", 454, "4.7.0", "auth",
    "SASL authentication to {dest} failed; server said: {reply}",
    "the server refuses AUTH: deferred (Postfix's `smtp_sasl_auth_soft_bounce`); "
    "a 4xx refusal keeps its code")
AUTH_FAILED = Failure(
    "auth-failed", 454, "4.7.0", "auth", "SASL authentication to {dest} failed: {detail}",
    "AUTH cannot be done on this side (no usable mechanism, bad challenge, SCRAM proof)")
LOST = Failure(
    "lost-connection", 451, "4.4.2", "", "{detail}",
    "the connection broke before the message content was complete")
LOST_AFTER_DOT = Failure(
    "lost-after-dot", 451, "4.4.2", "final", "{detail}",
    "the connection broke after the whole content was sent: the server may have stored it",
    possibly_delivered=True)
TIMEOUT = Failure(
    "timeout", 451, "4.4.2", "", "{detail}",
    "a reply did not come within its stage's time limit (`timeouts.STAGE`)")
PROTOCOL_ERROR = Failure(
    "protocol-error", 451, "4.5.0", "", "{detail}",
    "the server broke the protocol (malformed, oversized or unexpected reply; replies out of "
    "step)")
BAD_CONTENT = Failure(
    "bad-content", 554, "5.6.0", "local", "{detail}",
    "the message cannot be sent as it is (a NUL byte)")
BAD_SENDER = Failure(
    "bad-sender", 553, "5.1.7", "local", "bad sender address syntax: {detail}",
    "the sender address cannot be sent (CR, LF, NUL, unbalanced quotes...)")
BAD_RECIPIENT = Failure(
    "bad-recipient", 501, "5.1.3", "local", "bad recipient address syntax: {detail}",
    "the recipient address cannot be sent; the other recipients go on")
UNKNOWN_RECIPIENT = Failure(
    "unknown-recipient", 550, "5.1.1", "route",
    "<{address}>: Recipient address rejected: User unknown in the recipient table",
    "the recipient map does not list the recipient (Postfix's `local_recipient_maps`)")
NO_ROUTE = Failure(
    "no-route", 451, "4.4.4", "route",
    "no route for {to}: no transport map entry matches and no default route is "
    "configured", "no transport map entry and no default route: a configuration of ours, "
    "deferred (`no_route = \"defer\"`, the default)")
NO_ROUTE_BOUNCE = Failure(
    "no-route-bounce", 554, "5.4.4", "route",
    "no route for {to}: no transport map entry matches and no default route is "
    "configured", "the same with `no_route = \"bounce\"`: final")
NO_DESTINATION = Failure(
    "no-destination", 554, "5.4.4", "route",
    "no destination for {to}: route {route!r} has no next hop and transport "
    "{transport!r} no destination", "the route names neither a next hop nor a destination")
ALIAS_LOOP = Failure(
    "virtual-loop", 554, "5.4.6", "route", "{detail}",
    "the virtual map loops or rewrites too deep")
MAP_FAILURE = Failure(
    "map-failure", 451, "4.3.0", "route", "{detail}",
    "a lookup table cannot be read (database down, file unreadable): deferred, never bounced")
ERROR_TRANSPORT = Failure(
    "error-transport", 550, "5.0.0", "route", "{detail}",
    "the route is `error:` (the text's own enhanced code, if any, wins)")
RETRY_TRANSPORT = Failure(
    "retry-transport", 450, "4.0.0", "route", "{detail}",
    "the route is `retry:` (the text's own enhanced code, if any, wins)")
TOO_BIG = Failure(
    "too-big", 552, "5.3.4", "local", "{detail}",
    "the message is larger than the limit set here (`lmtpfast send --max-size`)")
SIZE_LIMIT = Failure(
    "size-limit", 552, "5.3.4", "local",
    "message of {size} bytes exceeds the server's size limit of {limit} bytes",
    "the message is larger than the server's SIZE (RFC 1870 size: CRLF line ends, no "
    "dot-stuffing)")
SMTPUTF8_MISSING = Failure(
    "smtputf8-missing", 553, "5.6.7", "local",
    "non-ASCII address, and the server does not offer SMTPUTF8",
    "a non-ASCII address and a server without SMTPUTF8 (RFC 6531)")
EIGHTBIT_MISSING = Failure(
    "8bitmime-missing", 554, "5.6.3", "local",
    "8-bit message and the server does not offer 8BITMIME; it cannot be converted to "
    "7 bits: {detail}",
    "8-bit content the server cannot take (no 8BITMIME) and that cannot be converted to 7 "
    "bits (8-bit headers); bodies are converted")
DEAD_DESTINATION = Failure(
    "destination-dead", 451, "4.4.1", "connect",
    "delivery temporarily suspended: {dest} marked dead after {count} failed session "
    "set-ups ({detail})",
    "the destination is marked dead (`shaping.dead_after` transactions in a row could not "
    "get a session): deferred without connecting until a probe gets through")
SHUTDOWN = Failure(
    "shutdown", 451, "4.3.2", "connect", "{detail}",
    "the agent or pool was closed before the delivery got a connection")
LOCAL_ERROR = Failure(
    "local-error", 451, "4.3.0", "local", "delivery failed: {detail}",
    "an error on this side that no recipient caused")

#: Every entry by event name, in the order of the docs table.
FAILURES: Mapping[str, Failure] = {f.event: f for f in (
    CONNECT_FAILED, CONNECT_TIMEOUT, GREETING_REFUSED, LHLO_REFUSED, TLS_UNAVAILABLE,
    AUTH_REFUSED, AUTH_FAILED, LOST, LOST_AFTER_DOT, TIMEOUT, PROTOCOL_ERROR, BAD_CONTENT,
    BAD_SENDER, BAD_RECIPIENT, UNKNOWN_RECIPIENT, NO_ROUTE, NO_ROUTE_BOUNCE, NO_DESTINATION,
    ALIAS_LOOP, MAP_FAILURE, ERROR_TRANSPORT, RETRY_TRANSPORT, TOO_BIG, SIZE_LIMIT,
    SMTPUTF8_MISSING, EIGHTBIT_MISSING, DEAD_DESTINATION, SHUTDOWN, LOCAL_ERROR)}


def made_up(
    address: str, code: int, enhanced: str | None, text: str, stage: str,
    possibly_delivered: bool = False,
) -> RecipientResult:
    """A made-up result with the code the engine chose from this table (``LOST``,
    ``PROTOCOL_ERROR``...) for a transaction a broken connection interrupted."""
    return RecipientResult(address, status_of(code), code, enhanced, text, stage, None, True,
                           possibly_delivered)


def _reply_text(exc: ReplyError) -> str:
    return " ".join(str(p) for p in (exc.code, exc.enhanced, exc.text) if p)


def _from_reply(
    entry: Failure, exc: ReplyError, addresses: Iterable[str], dest: str,
    destination: str | None, *, stage: str | None = None, force_transient: bool = False,
) -> list[RecipientResult]:
    code, enhanced, local = exc.code, exc.enhanced, False
    if force_transient and code >= 500:
        # Postfix's skip_5xx_greeting: the class becomes 4, the rest stays.
        code -= 100
        enhanced = "4" + enhanced[1:] if enhanced else None
        local = True
    if enhanced is None:
        enhanced = "5.0.0" if code >= 500 else "4.0.0"
    text = entry.text.format(dest=dest, reply=_reply_text(exc))
    status = status_of(code)
    return [RecipientResult(a, status, code, enhanced, text, stage or entry.stage, destination,
                            local) for a in addresses]


def failure_results(
    exc: BaseException, addresses: Iterable[str], *, destination: str | None = None,
    skip_5xx_greeting: bool = True,
) -> list[RecipientResult]:
    """The results for recipients whose delivery raised ``exc`` before any transaction.

    What the agent (and ``lmtpfast send``) give when connecting, the greeting,
    LHLO, STARTTLS or AUTH failed, when the pool was closed, or when an error
    no recipient caused came up. ``destination`` names the server in the texts
    and the results (``None``: nothing was asked of a server, e.g. a NUL byte).
    ``skip_5xx_greeting=False`` makes a 5xx greeting permanent.
    """
    dest = destination or "the server"
    stage = getattr(exc, "stage", "") or ""
    if isinstance(exc, ReplyError) and exc.code < 400:
        # A greeting or set-up reply that is neither a success nor a refusal.
        return PROTOCOL_ERROR.results(addresses, stage=stage or "connect", destination=destination,
                                      detail=f"session with {dest} failed: {exc}")
    if isinstance(exc, ReplyError) and exc.stage == "auth":
        if exc.transient:
            return _from_reply(AUTH_REFUSED, exc, addresses, dest, destination)
        return AUTH_REFUSED.results(addresses, destination=destination, dest=dest,
                                    reply=_reply_text(exc))
    if isinstance(exc, AuthenticationError):
        return AUTH_FAILED.results(addresses, destination=destination, dest=dest, detail=exc)
    if isinstance(exc, TLSError):
        return TLS_UNAVAILABLE.results(addresses, destination=destination, detail=exc)
    if isinstance(exc, ReplyError):
        if exc.stage == "greeting":
            return _from_reply(GREETING_REFUSED, exc, addresses, dest, destination,
                               force_transient=skip_5xx_greeting)
        # LHLO, or another set-up command refused (a 421 to STARTTLS).
        return _from_reply(LHLO_REFUSED, exc, addresses, dest, destination,
                           stage=exc.stage or "lhlo")
    if isinstance(exc, ConnectTimeout):
        return CONNECT_TIMEOUT.results(addresses, destination=destination, detail=exc)
    if isinstance(exc, ConnectError):
        return CONNECT_FAILED.results(addresses, destination=destination, detail=exc)
    if isinstance(exc, PoolClosed):
        return SHUTDOWN.results(addresses, destination=destination, detail=exc)
    if isinstance(exc, ContentError):
        return BAD_CONTENT.results(addresses, destination=destination, detail=exc)
    if isinstance(exc, ReadTimeout | ServerDisconnected | RemoteProtocolError | OSError):
        entry = (TIMEOUT if isinstance(exc, ReadTimeout) else
                 PROTOCOL_ERROR if isinstance(exc, RemoteProtocolError) else LOST)
        where = stage if stage in SETUP_STAGES else "connect"
        return entry.results(addresses, stage=where, destination=destination,
                             detail=f"session with {dest} failed: {exc}")
    if isinstance(exc, LMTPError):
        return LOCAL_ERROR.results(addresses, destination=destination, detail=exc)
    raise TypeError(f"no failure table entry for {type(exc).__name__}") from exc


def markdown_table() -> str:
    """The table as docs/reliability.md carries it (one row per entry)."""
    lines = ["| event | code | enhanced | stage | what happened |",
             "|---|---|---|---|---|"]
    for f in FAILURES.values():
        code, enhanced = ("the reply's", "the reply's") if f.from_reply else (f.code, f.enhanced)
        stage = f.stage or "the stage interrupted"
        extra = " (possibly delivered)" if f.possibly_delivered else ""
        lines.append(f"| `{f.event}` | {code} | {enhanced} | {stage} | {f.summary}{extra} |")
    return "\n".join(lines) + "\n"
