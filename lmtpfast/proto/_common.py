"""Data shared by both implementations of the sans-IO core.

Nothing here does I/O or imports asyncio. The pure-Python engine
(``_pyproto``) and the compiled one (``_cproto``) both build these objects, so
the layers above never know which engine runs.
"""

from __future__ import annotations

from abc import ABCMeta
from collections.abc import Iterable, Sequence

from .._errors import LocalProtocolError
from .._failures import LOST, PROTOCOL_ERROR, made_up
from .._results import RecipientResult, Status

__all__ = [
    "BDAT_BURST",
    "DEFAULT_MAX_LINE_LENGTH",
    "DEFAULT_MAX_REPLY_LINES",
    "NEED_DATA",
    "Capabilities",
    "CommandReply",
    "ConnectionBroken",
    "Event",
    "NeedData",
    "ReadyForData",
    "Reply",
    "Transaction",
    "TransactionDone",
    "address_problem",
    "check_session_verb",
    "encode_address",
    "encode_local_name",
    "encode_param",
]

#: What the engines give a recipient whose transaction a broken connection
#: interrupted (the failure table's rows, lmtpfast/_failures.py): the server
#: broke the protocol, or the connection was lost or timed out.
PROTOCOL_CODE, PROTOCOL_ENHANCED = PROTOCOL_ERROR.code, PROTOCOL_ERROR.enhanced
LOST_CODE, LOST_ENHANCED = LOST.code, LOST.enhanced

# RFC 5321 says 512 octets per reply line; real servers exceed it (long
# LHLO keyword lists, SESSIONID tails), so allow generous but bounded input.
DEFAULT_MAX_LINE_LENGTH = 8192
DEFAULT_MAX_REPLY_LINES = 200

#: Pipelined BDAT transactions an engine sends before the queue of replies must
#: drain: BDAT has no 354, so only a drained queue proves their replies were in
#: step with the commands (see ``_pyproto``). Chosen by measurement
#: (``docs/performance.md``).
BDAT_BURST = 8


class NeedData:
    """The type of :data:`NEED_DATA` (one instance)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: ``next_event()`` returns this when it needs more bytes from the peer.
NEED_DATA = NeedData()


class Reply:
    """One complete server reply: code, enhanced status code (RFC 3463) and text lines.

    ``lines`` holds the text of each line after ``NNN-``/``NNN ``, as sent.
    ``text`` is the lines joined with ``\\n``, each without its enhanced code.
    """

    __slots__ = ("code", "enhanced", "lines")

    def __init__(self, code: int, enhanced: str | None, lines: tuple[str, ...]) -> None:
        self.code = code
        self.enhanced = enhanced
        self.lines = lines

    @property
    def text(self) -> str:
        enh = self.enhanced
        lines = self.lines
        if len(lines) == 1:  # the common case, once per recipient: keep it cheap
            line = lines[0]
            if enh is None:
                return line
            cut = len(enh)
            if line.startswith(enh) and line[cut : cut + 1] in ("", " "):
                return line[cut:].lstrip(" ")
            return line
        if enh is None:
            return "\n".join(lines)
        cut = len(enh)
        return "\n".join(
            ln[cut:].lstrip(" ") if ln.startswith(enh) and ln[cut : cut + 1] in ("", " ") else ln
            for ln in self.lines
        )

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reply):
            return NotImplemented
        return (self.code, self.enhanced, self.lines) == (other.code, other.enhanced, other.lines)

    def __hash__(self) -> int:
        return hash((self.code, self.enhanced, self.lines))

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.enhanced!r}, {self.lines!r})"


def parse_enhanced(code: int, first_line: str) -> str | None:
    """The RFC 3463 status code at the start of ``first_line``, if it matches ``code``'s class.

    ``class.subject.detail``: class 2, 4 or 5 (the reply's first digit),
    subject and detail 1-3 digits, followed by a space or the end of line.
    """
    n = len(first_line)
    if n < 5 or first_line[1] != ".":
        return None
    cls = first_line[0]
    if cls not in "245" or ord(cls) - 48 != code // 100:
        return None
    i = 2
    for _part in range(2):
        start = i
        while i < n and "0" <= first_line[i] <= "9":
            i += 1
        if not 1 <= i - start <= 3:
            return None
        if _part == 0:
            if i >= n or first_line[i] != ".":
                return None
            i += 1
    if i < n and first_line[i] != " ":
        return None
    return first_line[:i]


class Capabilities:
    """What the server's LHLO reply advertised (keywords upper-cased)."""

    __slots__ = ("keywords",)

    def __init__(self, keywords: dict[str, str]) -> None:
        self.keywords = keywords

    @classmethod
    def from_reply(cls, reply: Reply, ignore: Iterable[str] = ()) -> Capabilities:
        """Parse an LHLO reply; keywords in ``ignore`` are dropped (Postfix's
        ``lmtp_discard_lhlo_keywords``, e.g. to turn pipelining off)."""
        drop = {k.upper() for k in ignore}
        keywords: dict[str, str] = {}
        for line in reply.lines[1:]:  # the first line is the server's greeting name
            word, _, params = line.strip().partition(" ")
            key = word.upper()
            if not key or key in drop:
                continue
            keywords[key] = params.strip()
        return cls(keywords)

    def has(self, keyword: str) -> bool:
        return keyword.upper() in self.keywords

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.keywords

    @property
    def chunking(self) -> bool:
        return "CHUNKING" in self.keywords

    @property
    def eightbitmime(self) -> bool:
        return "8BITMIME" in self.keywords

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.keywords

    @property
    def enhancedstatuscodes(self) -> bool:
        return "ENHANCEDSTATUSCODES" in self.keywords

    @property
    def starttls(self) -> bool:
        return "STARTTLS" in self.keywords

    @property
    def dsn(self) -> bool:
        return "DSN" in self.keywords

    @property
    def size(self) -> int | None:
        """The advertised maximum message size; 0 means no limit; None if SIZE is absent."""
        if "SIZE" not in self.keywords:
            return None
        value = self.keywords["SIZE"]
        # isdigit() alone accepts "²" and other digits int() refuses (found by fuzzing).
        return int(value) if value.isascii() and value.isdigit() else 0

    @property
    def auth(self) -> frozenset[str]:
        return frozenset(self.keywords.get("AUTH", "").upper().split())

    def __repr__(self) -> str:
        return f"Capabilities({self.keywords!r})"


# --- envelope arguments -------------------------------------------------------

_FORBIDDEN_WHY = "contains a forbidden character (CR, LF, NUL, <, > or space)"


def address_problem(address: str, *, allow_empty: bool = False) -> str | None:
    """Why ``address`` cannot go between ``<`` and ``>`` of MAIL FROM/RCPT TO, or ``None``.

    The one address syntax check (engine, agent, spool). RFC 5321 4.1.2: a
    local part is a dot-string or a quoted string (``"john doe"@example.com``,
    backslash escapes inside); the domain may be an address literal in
    brackets. Refused: CR, LF, NUL and every other control character
    anywhere; an unbalanced quote or bracket; a space, ``<`` or ``>``
    outside quotes. Otherwise lenient, as servers are (``postmaster``, ``+``
    tags, several ``@``). Non-ASCII is allowed here; sending it needs
    SMTPUTF8 (see :func:`encode_address`).
    """
    if not isinstance(address, str):
        return f"must be str, not {type(address).__name__}"
    if not address:
        return None if allow_empty else "is empty"
    # isprintable() refuses CR, LF, NUL, TAB and every other control character.
    if not address.isprintable():
        return _FORBIDDEN_WHY
    if '"' not in address and "[" not in address and "]" not in address:
        # The common case: no quotes, no address literal.
        if " " in address or "<" in address or ">" in address:
            return _FORBIDDEN_WHY
        return None
    if address[0] == '"':
        n = len(address)
        i = 1
        while i < n:
            ch = address[i]
            if ch == "\\":
                i += 2  # quoted-pair: the next character is taken as it is
                continue
            if ch == '"':
                break
            i += 1
        if i >= n:
            return "has an unbalanced quote"
        rest = address[i + 1 :]
        if not rest:
            return None  # a quoted local part alone, as "postmaster" may be
        if rest[0] != "@":
            return "has a quoted local part that is not followed by @domain"
        domain = rest[1:]
    else:
        at = address.rfind("@")
        local, domain = (address[:at], address[at + 1 :]) if at >= 0 else (address, "")
        if '"' in local:
            return "has an unbalanced quote (a quoted local part starts with a quote)"
        if "[" in local or "]" in local:
            return "has an unbalanced bracket (brackets only enclose an address literal)"
        if " " in local or "<" in local or ">" in local:
            return _FORBIDDEN_WHY
    if '"' in domain:
        return "has an unbalanced quote (a domain is never quoted)"
    if " " in domain or "<" in domain or ">" in domain:
        return _FORBIDDEN_WHY
    if "[" in domain or "]" in domain:
        literal = domain[1:-1]
        if domain[0] != "[" or domain[-1] != "]" or "[" in literal or "]" in literal:
            return "has an unbalanced bracket (an address literal is the whole domain)"
    return None


def encode_address(address: str, *, allow_empty: bool = False, utf8: bool = False) -> bytes:
    """``address`` as the bytes that go between ``<`` and ``>``.

    Checked by :func:`address_problem`: nothing that could end the command
    or inject another one gets through. Non-ASCII needs ``utf8`` (SMTPUTF8).
    """
    if (
        # The common case, cheaply: printable ASCII without quotes, brackets,
        # spaces or angle brackets needs no parsing (once per recipient).
        isinstance(address, str) and address and address.isascii() and address.isprintable()
        and '"' not in address and " " not in address and "<" not in address
        and ">" not in address and "[" not in address and "]" not in address
    ):
        return address.encode("ascii")
    problem = address_problem(address, allow_empty=allow_empty)
    if problem is not None:
        if problem == "is empty":
            raise LocalProtocolError("empty recipient address")
        if problem.startswith("must be str"):
            raise LocalProtocolError(f"address {problem}")
        raise LocalProtocolError(f"address {address!r} {problem}")
    if address.isascii():
        return address.encode("ascii")
    if not utf8:
        raise LocalProtocolError(f"address {address!r} is not ASCII and SMTPUTF8 is not in use")
    return address.encode("utf-8")



def encode_param(param: str) -> bytes:
    """An ESMTP parameter (``SIZE=123``, ``NOTIFY=SUCCESS``): printable ASCII, no spaces."""
    if not param or not param.isascii() or not param.isprintable() or " " in param:
        raise LocalProtocolError(f"bad ESMTP parameter {param!r}")
    return param.encode("ascii")


def encode_local_name(name: str) -> bytes:
    """The LHLO argument: a domain or address literal, printable ASCII, no spaces."""
    if (not isinstance(name, str) or not name or not name.isascii() or not name.isprintable()
            or " " in name):
        raise LocalProtocolError(f"bad LHLO name {name!r}: printable ASCII without spaces")
    return name.encode("ascii")


# Commands that only the engine's own methods may send: through command()
# they would put the queue of expected replies out of step with the server.
_ENGINE_VERBS = frozenset({"MAIL", "RCPT", "DATA", "BDAT", "LHLO"})


def check_session_verb(verb: str) -> str:
    """``verb`` upper-cased, if it may be sent with ``Connection.command()``."""
    upper = verb.upper() if isinstance(verb, str) else ""
    if not upper or not upper.isascii() or not upper.replace("-", "").isalnum():
        raise LocalProtocolError(f"bad command verb {verb!r}")
    if upper in _ENGINE_VERBS:
        raise LocalProtocolError(
            f"{upper} is sent by lhlo()/start_transaction(), not command(): the replies "
            "would be out of step"
        )
    return upper


def check_command_argument(arg: str) -> bytes:
    """A free-form command argument (LHLO name, AUTH data): no CR, LF or NUL."""
    if "\r" in arg or "\n" in arg or "\0" in arg:
        # The value is not quoted: it may be a SASL response carrying a secret.
        raise LocalProtocolError("command argument contains CR, LF or NUL")
    return arg.encode("utf-8")


# --- transactions and events -----------------------------------------------


class Transaction(metaclass=ABCMeta):  # noqa: B024 (for register(), not abstract)
    """One MAIL/RCPT/DATA transaction as the engine tracks it.

    The engine fills the replies as they arrive and ``results`` (one
    :class:`~lmtpfast.RecipientResult` per recipient, in RCPT order) when the
    transaction is done. ``content`` is an opaque slot for the layer above
    (the transport keeps the encoded message there).

    The compiled engine's transactions are its own typed twin
    (``_cproto.CTransaction``), registered here: ``isinstance`` holds for both.
    """

    __slots__ = (
        "accepted",
        "content",
        "data_reply",
        "done",
        "dot_sent",
        "final_replies",
        "id",
        "mail_reply",
        "mail_sent",
        "rcpt_replies",
        "recipients",
        "results",
        "sender",
        "waiter",
    )

    def __init__(self, txn_id: int, sender: str, recipients: Sequence[str]) -> None:
        self.id = txn_id
        self.sender = sender
        self.recipients = list(recipients)
        self.mail_reply: Reply | None = None
        self.rcpt_replies: list[Reply | None] = [None] * len(self.recipients)
        self.data_reply: Reply | None = None
        self.final_replies: list[Reply | None] = [None] * len(self.recipients)
        self.accepted: list[int] = []
        self.mail_sent = False
        self.dot_sent = False
        self.done = False
        self.results: list[RecipientResult] = []
        self.content: object = None
        self.waiter: object = None

    def __repr__(self) -> str:
        return (
            f"<Transaction {self.id} from={self.sender!r} rcpts={len(self.recipients)}"
            f" done={self.done}>"
        )


def result_from_reply(address: str, reply: Reply, stage: str) -> RecipientResult:
    # Once per recipient: positional arguments and an inline status keep it cheap.
    code = reply.code
    status: Status = (
        "delivered" if 200 <= code < 300 else "permanent" if 500 <= code < 600 else "transient"
    )
    return RecipientResult(address, status, code, reply.enhanced, reply.text, stage)


def finish_transaction(txn: Transaction) -> None:
    """Compute ``txn.results`` from the replies it received (no failure pending)."""
    results = []
    mail = txn.mail_reply
    for i, address in enumerate(txn.recipients):
        if mail is not None and not 200 <= mail.code < 300:
            results.append(result_from_reply(address, mail, "mail"))
            continue
        rcpt = txn.rcpt_replies[i]
        if rcpt is None or not 200 <= rcpt.code < 300:
            if rcpt is None:  # never asked: MAIL refused already covered; defensive
                raise AssertionError("transaction finished without a RCPT reply")
            results.append(result_from_reply(address, rcpt, "rcpt"))
            continue
        final = txn.final_replies[i]
        if final is not None:
            results.append(result_from_reply(address, final, "final"))
            continue
        data = txn.data_reply
        if data is not None and data.code != 354:
            results.append(result_from_reply(address, data, "data"))
            continue
        raise AssertionError("accepted recipient finished without a reply")
    txn.results = results
    txn.done = True


def fail_transaction(
    txn: Transaction, code: int, enhanced: str, why: str, stage: str, *, unproven: bool = False,
) -> None:
    """Decide every recipient of an unfinished transaction after the connection failed.

    Replies already received stand; recipients still waiting get a made-up
    transient reply. Those whose reply after the final dot was lost are
    flagged ``possibly_delivered``: the server may have stored the message.

    Final replies are trusted only up to the first accepted recipient whose
    address repeats an earlier accepted one: a server that answers once per
    distinct address (against RFC 2033 4.2) would have given that slot the
    next recipient's reply. From there on: transient, possibly delivered.

    ``unproven``: the replies of ``txn`` were never shown to be in step with
    the commands (a reply stream found shifted, or lost before the next proof;
    see ``_pyproto``). Then none of them is trusted, except the MAIL and RCPT
    replies of a DATA transaction whose 354 came in place: every recipient
    is transient, possibly delivered once the content was sent.
    """
    results = []
    mail = txn.mail_reply
    data = txn.data_reply
    envelope_proven = not unproven or (data is not None and data.code == 354)
    finals_trusted = not unproven
    seen: set[str] = set()
    for i, address in enumerate(txn.recipients):
        rcpt = txn.rcpt_replies[i]
        final = txn.final_replies[i]
        mail_ok = mail is not None and 200 <= mail.code < 300
        rcpt_ok = rcpt is not None and 200 <= rcpt.code < 300
        if mail_ok and rcpt_ok and finals_trusted:
            key = address.lower()
            if key in seen:
                finals_trusted = False
            seen.add(key)
        if not envelope_proven:
            pass  # every recipient made up below
        elif mail is not None and not mail_ok:
            results.append(result_from_reply(address, mail, "mail"))
            continue
        elif rcpt is not None and not rcpt_ok:
            results.append(result_from_reply(address, rcpt, "rcpt"))
            continue
        elif final is not None and finals_trusted:
            results.append(result_from_reply(address, final, "final"))
            continue
        elif data is not None and data.code != 354 and not unproven:
            results.append(result_from_reply(address, data, "data"))
            continue
        if txn.dot_sent:
            where = "final"
        elif data is not None or stage == "content":
            where = "content"
        elif rcpt is not None:
            where = "data"
        elif mail is not None:
            where = "rcpt"
        else:
            setup = ("connect", "greeting", "lhlo", "starttls", "auth")
            where = stage if stage in setup else "mail"
        # With BDAT the content may be sent before the RCPT reply came back:
        # the server may have delivered either way.
        results.append(made_up(address, code, enhanced, why, where, txn.dot_sent))
    txn.results = results
    txn.done = True


class ReadyForData:
    """The server sent 354 for ``txn``: send its content, then call ``end_data(txn)``."""

    __slots__ = ("transaction",)

    def __init__(self, transaction: Transaction) -> None:
        self.transaction = transaction

    def __repr__(self) -> str:
        return f"ReadyForData({self.transaction!r})"


class TransactionDone:
    """Every recipient of ``transaction`` has its result in ``transaction.results``."""

    __slots__ = ("transaction",)

    def __init__(self, transaction: Transaction) -> None:
        self.transaction = transaction

    def __repr__(self) -> str:
        return f"TransactionDone({self.transaction!r})"


class CommandReply:
    """The reply to a session command (``greeting``, ``LHLO``, ``RSET``, ``NOOP``, ``QUIT``...)."""

    __slots__ = ("command", "reply")

    def __init__(self, command: str, reply: Reply) -> None:
        self.command = command
        self.reply = reply

    def __repr__(self) -> str:
        return f"CommandReply({self.command!r}, {self.reply!r})"


class ConnectionBroken:
    """The connection cannot go on: ``error`` says why; ``transactions`` were failed by it.

    Emitted once; after it the engine emits nothing else. The transactions are
    finished with made-up transient results (see ``fail_transaction``) and have
    no separate ``TransactionDone`` event.
    """

    __slots__ = ("error", "transactions")

    def __init__(self, error: Exception, transactions: list[Transaction]) -> None:
        self.error = error
        self.transactions = transactions

    def __repr__(self) -> str:
        return f"ConnectionBroken({self.error!r}, {len(self.transactions)} transactions)"


#: What ``Connection.next_event()`` returns.
Event = ReadyForData | TransactionDone | CommandReply | ConnectionBroken | NeedData
