"""What both server engines share: configuration, the handler interface, output items.

The server engine (:class:`~lmtpfast.server.ServerSession`, pure Python in
``_session.py``, compiled in ``_cserver.pyx``) speaks LMTP: it parses
commands, enforces the grammar and the limits, keeps the transaction and
produces the replies. What a server *does* with mail is a :class:`Handler`:
the sink (store, discard, inject faults) is one, the proxy will be another.
Nothing here does I/O; ``_server.py`` runs a session over asyncio.

A handler hook answers with an :data:`Answer`:

* ``None``: the engine's default reply (given to the hook as ``default``);
* ``bytes``: a complete reply (CR LF included). Its code decides whether
  the command takes effect: 2xx (354 for DATA) does, anything else does not;
  421 also closes the connection (RFC 5321 3.8);
* a :class:`Decision`: the code, plus the exact items to write instead of
  the reply (delays, a disconnect, a line that is no reply, ...), where
  :data:`DEFAULT` stands for the engine's default reply;
* an awaitable (``rcpt``, ``content``, the final replies, ... see
  :class:`Handler`): the answer is not known yet. The engine holds every
  later reply back (replies go out in command order), hands the awaitable to
  the I/O layer as a :class:`Pending` item, and goes on when the I/O layer
  calls ``session.resolve(pending, answer)``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import msgspec

if TYPE_CHECKING:
    from ._session import ServerSession

__all__ = [
    "ABORT",
    "CLOSE",
    "DEFAULT",
    "DEFAULT_EXTENSIONS",
    "DEFAULT_MAX_COMMANDS",
    "DEFAULT_MAX_LINE_LENGTH",
    "DEFAULT_MAX_RECIPIENTS",
    "DEFAULT_MAX_SIZE",
    "HOOKS",
    "STALL",
    "START_TLS",
    "Answer",
    "Decision",
    "Delay",
    "Envelope",
    "Handler",
    "Item",
    "Pending",
    "SessionConfig",
    "SinkStats",
    "answer_code",
]

#: What the sink advertises (and honours) unless told otherwise, in LHLO order.
DEFAULT_EXTENSIONS: Final = (
    "PIPELINING",
    "CHUNKING",
    "ENHANCEDSTATUSCODES",
    "8BITMIME",
    "SMTPUTF8",
    "SIZE",
    "DSN",
)
DEFAULT_MAX_SIZE: Final = 50 * 1024 * 1024
# Postfix's line_length_limit; RFC 5321's 512 is too tight for SMTPUTF8 and
# DSN parameters, and a bound is what matters.
DEFAULT_MAX_LINE_LENGTH: Final = 2048
# RFC 5321 section 4.5.3.1.8 asks for at least 100.
DEFAULT_MAX_RECIPIENTS: Final = 1000
#: Junk commands (NOOP, RSET, VRFY, unknown or refused ones) accepted before a
#: transaction completes (0 = no limit); one more gets 421 and a close.
DEFAULT_MAX_COMMANDS: Final = 0


class SinkStats(msgspec.Struct, kw_only=True):
    """Counters of one server, shared by its connections (JSON via ``msgspec.json``).

    ``transactions`` counts messages whose content arrived in full (final dot
    or BDAT LAST with at least one accepted recipient); ``final_replies``
    counts the replies sent after the content by reply code;
    ``messages_stored`` counts stored copies (one per recipient). The engine
    keeps the protocol counters, the I/O layer the connection counters, the
    handler the rest.
    """

    connections_total: int = 0
    connections_current: int = 0
    connections_peak: int = 0
    connections_refused: int = 0
    transactions: int = 0
    recipients_accepted: int = 0
    recipients_refused: int = 0
    messages_stored: int = 0
    store_errors: int = 0
    bytes_received: int = 0
    final_replies: dict[int, int] = msgspec.field(default_factory=dict)
    faults_fired: int = 0


# --- items: what the engine asks the I/O layer to do, in order ----------------


class Delay:
    """Wait ``seconds`` before writing the items that follow."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __repr__(self) -> str:
        return f"Delay({self.seconds})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Delay) and other.seconds == self.seconds

    def __hash__(self) -> int:
        return hash(("Delay", self.seconds))


class _Instruction:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self) -> str:
        return self.name  # a module-level singleton: pickles and copies as itself


#: Write nothing more, ever; keep the connection open and discard input.
STALL: Final = _Instruction("STALL")
#: Write what came before, then close the connection.
CLOSE: Final = _Instruction("CLOSE")
#: Write what came before, then abort the connection (RST).
ABORT: Final = _Instruction("ABORT")
#: Write what came before, then start TLS as the server (RFC 3207) and call
#: ``session.tls_started()``; the engine reads nothing until then.
START_TLS: Final = _Instruction("START_TLS")
#: In a :class:`Decision`'s items: the engine's default reply goes here.
DEFAULT: Final = _Instruction("DEFAULT")


class Pending:
    """An answer the handler does not have yet: await ``awaitable``, then
    ``session.resolve(this, result)`` (or ``session.resolve(this, None, exc)``).

    Not written: the I/O layer starts waiting as soon as it sees one, whatever
    is queued before it. ``kind`` names the hook (``"rcpt"``, ``"content"``,
    ``"final"``, ...) for logs.
    """

    __slots__ = ("awaitable", "kind", "slot")

    def __init__(self, awaitable: Awaitable[Any], kind: str, slot: Any) -> None:
        self.awaitable = awaitable
        self.kind = kind
        self.slot = slot  # the engine's own bookkeeping

    def __repr__(self) -> str:
        return f"Pending({self.kind})"


Item: TypeAlias = "bytes | Delay | _Instruction | Pending"


class Decision:
    """A handler's full answer to one command.

    ``code`` is the reply code the answer stands for: 2xx (354 for DATA)
    makes the command take effect, 421 closes the connection after the
    items, 0 means "no reply" (the command does not take effect; use it with
    :data:`CLOSE`, :data:`ABORT` or :data:`STALL`). ``items`` are written
    instead of the reply, in order; :data:`DEFAULT` in them is the engine's
    default reply.
    """

    __slots__ = ("code", "items")

    def __init__(self, code: int, items: Sequence[Item]) -> None:
        self.code = code
        self.items = tuple(items)

    def __repr__(self) -> str:
        return f"Decision({self.code}, {list(self.items)!r})"


#: What a hook returns: see the module docstring.
Answer: TypeAlias = "bytes | Decision | None"


def answer_code(answer: bytes | Decision) -> int:
    """The reply code an answer stands for (0: none)."""
    if isinstance(answer, Decision):
        return answer.code
    c = answer[:3]
    return int(c) if len(c) == 3 and c.isdigit() else 0


class Envelope:
    """One transaction whose content is complete, as a handler sees it.

    ``recipients`` are the *accepted* recipients in RCPT order, duplicates
    included; ``rcpt_ids[i]`` is the number (0-based, counting every RCPT of
    the transaction that reached the handler's ``rcpt`` hook or the engine's
    checks) of the RCPT that accepted ``recipients[i]``, so a handler that
    kept per-RCPT state (a route) finds it. ``size`` is the content's size as
    received (un-stuffed); ``too_big`` says it exceeded ``max_size`` (the
    default final replies are then 552 and no content was passed on);
    ``chunked`` is true for BDAT.
    """

    __slots__ = (
        "chunked",
        "mail_params",
        "rcpt_ids",
        "rcpt_params",
        "recipients",
        "sender",
        "size",
        "too_big",
    )

    def __init__(
        self,
        sender: bytes,
        mail_params: list[bytes],
        recipients: list[bytes],
        rcpt_params: list[list[bytes]],
        rcpt_ids: list[int],
        size: int,
        too_big: bool,
        chunked: bool,
    ) -> None:
        self.sender = sender
        self.mail_params = mail_params
        self.recipients = recipients
        self.rcpt_params = rcpt_params
        self.rcpt_ids = rcpt_ids
        self.size = size
        self.too_big = too_big
        self.chunked = chunked

    def __repr__(self) -> str:
        return (
            f"Envelope(sender={self.sender!r}, recipients={self.recipients!r}, "
            f"size={self.size}, too_big={self.too_big}, chunked={self.chunked})"
        )


#: Hook names, in the order of :class:`Handler`'s methods.
HOOKS: Final = (
    "greeting",
    "lhlo",
    "mail",
    "rcpt",
    "data",
    "bdat",
    "content",
    "end_of_content",
    "rset",
    "noop",
    "quit",
    "starttls",
    "auth",
    "auth_line",
    "reset",
    "closed",
)


class Handler:
    """What a server does with the LMTP the engine parsed; override what you need.

    The engine calls only the hooks listed in :attr:`hooks` (by default the
    methods a subclass overrides), so a handler pays for nothing else. Every
    hook that answers a command gets the engine's ``default`` reply (which
    may itself be a refusal, e.g. a 555 for an unknown parameter: syntax and
    sequence errors never reach a hook) and returns an :data:`Answer`.
    ``session.context`` is free for the handler's per-connection state.

    May return an awaitable (the engine then waits, see :class:`Pending`):
    ``rcpt`` (the engine reads further pipelined RCPTs meanwhile, so their
    lookups can run together, and holds DATA/BDAT until all are decided),
    ``content`` (back-pressure: no more input is consumed until it is done),
    each element of what ``end_of_content`` returns (the per-recipient final
    replies, sent in RCPT order as they become known; the next transaction's
    commands are read meanwhile), ``auth`` and ``auth_line``. Anything
    else must answer at once.
    """

    #: The hooks the engine calls; computed from the overridden methods.
    hooks: frozenset[str] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.hooks = frozenset(
            h for h in HOOKS if getattr(cls, h, None) is not getattr(Handler, h, None)
        )

    def greeting(self, session: ServerSession, default: bytes) -> Answer:
        """The 220 on connect; a 4xx/5xx leaves only QUIT usable (421 closes)."""
        return None

    def lhlo(self, session: ServerSession, name: bytes, default: bytes) -> Answer:
        """LHLO ``name`` (the transaction, if any, is reset first)."""
        return None

    def mail(
        self, session: ServerSession, sender: bytes, params: list[bytes], default: bytes
    ) -> Answer:
        """MAIL FROM:<sender> (``b""`` for ``<>``) with its parameters."""
        return None

    def rcpt(
        self,
        session: ServerSession,
        index: int,
        recipient: bytes,
        params: list[bytes],
        default: bytes,
    ) -> Answer | Awaitable[Answer]:
        """RCPT TO:<recipient>; ``index`` numbers the RCPTs of the transaction (see Envelope)."""
        return None

    def data(self, session: ServerSession, default: bytes) -> Answer:
        """DATA, before the 354 (a 354 answer starts the content)."""
        return None

    def bdat(self, session: ServerSession, size: int, last: bool, default: bytes | None) -> Answer:
        """A BDAT chunk has been read (its bytes went to ``content``).

        ``default`` is the chunk's ``250`` reply, or None for ``LAST``, whose
        replies are the final ones: there a 2xx-coded (or None) answer carries
        on to ``end_of_content`` (and :data:`DEFAULT` in a Decision is where
        its replies go); any other code refuses the message with that answer
        instead of one reply per recipient.
        """
        return None

    def content(self, session: ServerSession, chunk: bytes) -> Awaitable[None] | None:
        """Content as it arrives: un-stuffed DATA or BDAT chunks, in order, none empty."""
        return None

    def end_of_content(
        self, session: ServerSession, envelope: Envelope
    ) -> Sequence[Answer | Awaitable[Answer]] | Decision | bytes | None:
        """The content is complete: the final replies.

        A sequence: one answer per accepted recipient, in RCPT order (each
        may be awaitable; the engine sends them in order as they come; an
        answer that closes or stalls the connection ends the list early).
        A single ``Decision``/``bytes``: written instead of all of them.
        None: the engine's defaults (``250 2.0.0 <rcpt> ...``, or 552 when
        ``envelope.too_big``).
        """
        return None

    def rset(self, session: ServerSession, default: bytes) -> Answer:
        """RSET (the transaction is reset before it is answered)."""
        return None

    def noop(self, session: ServerSession, default: bytes) -> Answer:
        """NOOP."""
        return None

    def quit(self, session: ServerSession, default: bytes) -> Answer:
        """QUIT (the connection closes after the reply)."""
        return None

    def starttls(self, session: ServerSession, default: bytes) -> Answer:
        """STARTTLS, when offered: a 220 answer starts TLS (:data:`START_TLS`)."""
        return None

    def auth(
        self, session: ServerSession, mechanism: bytes, initial: bytes | None, default: bytes
    ) -> Answer | Awaitable[Answer]:
        """AUTH mechanism [initial-response], when offered (default: 504).

        334 continues the exchange (the client's next line goes to
        ``auth_line``), 235 authenticates the session, anything else ends it.
        """
        return None

    def auth_line(
        self, session: ServerSession, line: bytes, default: bytes
    ) -> Answer | Awaitable[Answer]:
        """A client line during an AUTH exchange (``*`` cancels without asking)."""
        return None

    def reset(self, session: ServerSession) -> None:
        """The open transaction was abandoned (RSET, LHLO, a failed BDAT, end of connection)."""

    def closed(self, session: ServerSession) -> None:
        """The connection is gone (or the session ended): release per-session state."""


class SessionConfig:
    """What every session of one server shares; built once, read per command.

    ``extensions`` are the LHLO keywords advertised *and* honoured (an entry
    may carry arguments: ``"AUTH PLAIN LOGIN"``). ``hide`` leaves keywords out
    of the LHLO reply while still honouring them; ``advertise`` adds lines
    that are not honoured (both faults of the sink). ``auth_required`` /
    ``tls_required`` make MAIL wait for AUTH / STARTTLS (530 5.7.0).
    ``max_commands`` bounds the commands between two transactions (0 = no
    limit). ``delivered_text`` ends the default final reply
    ``250 2.0.0 <rcpt> TEXT``.
    """

    __slots__ = (
        "advertise",
        "auth",
        "auth_required",
        "chunking",
        "delivered_text",
        "dsn",
        "eightbit",
        "greeting",
        "hide",
        "hostname",
        "lhlo_reply",
        "lhlo_reply_tls",
        "max_commands",
        "max_line_length",
        "max_recipients",
        "max_size",
        "size_ext",
        "smtputf8",
        "starttls",
        "tls_required",
        "too_big_text",
    )

    def __init__(
        self,
        *,
        hostname: str = "lmtpfast-sink",
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
        max_size: int = DEFAULT_MAX_SIZE,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
        max_commands: int = DEFAULT_MAX_COMMANDS,
        greeting_text: str = "LMTP lmtpfast sink ready",
        delivered_text: str = "Accepted, not stored",
        too_big_text: str = "Message too big for this sink",
        hide: Sequence[str] = (),
        advertise: Sequence[str] = (),
        auth_required: bool = False,
        tls_required: bool = False,
    ) -> None:
        lines = [e.strip() for e in extensions if e.strip()]
        names = [ln.split(" ", 1)[0].upper() for ln in lines]
        self.hostname = hostname
        self.max_size = max_size
        self.max_line_length = max_line_length
        self.max_recipients = max_recipients
        self.max_commands = max_commands
        self.chunking = "CHUNKING" in names
        self.size_ext = "SIZE" in names
        self.smtputf8 = "SMTPUTF8" in names
        self.eightbit = "8BITMIME" in names
        self.dsn = "DSN" in names
        self.starttls = "STARTTLS" in names
        self.auth = "AUTH" in names
        self.auth_required = auth_required
        self.tls_required = tls_required
        self.hide = tuple(h.upper() for h in hide)
        self.advertise = tuple(advertise)
        host = hostname.encode("utf-8")
        self.greeting = b"220 " + host + b" " + greeting_text.encode("utf-8") + b"\r\n"
        self.delivered_text = b"> " + delivered_text.encode("utf-8") + b"\r\n"
        self.too_big_text = b"> " + too_big_text.encode("utf-8") + b"\r\n"

        def reply(tls: bool) -> bytes:
            out = [host]
            for line, name in zip(lines, names, strict=True):
                if name in self.hide or (tls and name == "STARTTLS"):
                    continue
                if name == "SIZE" and line.upper() == "SIZE" and max_size:
                    out.append(b"SIZE %d" % max_size)
                else:
                    out.append(line.upper().encode("ascii"))
            out.extend(kw.encode("ascii") for kw in self.advertise)
            return b"".join(
                (b"250 " if i == len(out) - 1 else b"250-") + ln + b"\r\n"
                for i, ln in enumerate(out)
            )

        self.lhlo_reply = reply(False)
        self.lhlo_reply_tls = reply(True)
