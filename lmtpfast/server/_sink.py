"""``Sink``: a fast LMTP server for tests, benchmarks and the demo.

A :class:`~lmtpfast.server._server.Server` whose handler,
:class:`SinkHandler`, discards messages, stores them in a Maildir per
recipient local part and/or keeps them in memory (``collect=True``), and
misbehaves as its :class:`~lmtpfast.server.FaultPlan` says. The protocol
itself (grammar, limits, replies) is the server engine's.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import msgspec

from .._errors import ConfigurationError
from ._common import (
    ABORT,
    CLOSE,
    DEFAULT,
    DEFAULT_EXTENSIONS,
    DEFAULT_MAX_LINE_LENGTH,
    DEFAULT_MAX_RECIPIENTS,
    DEFAULT_MAX_SIZE,
    STALL,
    Answer,
    Decision,
    Delay,
    Envelope,
    Handler,
    Item,
    SessionConfig,
    SinkStats,
    answer_code,
)
from ._faults import FaultEngine, FaultPlan, FaultRule, RuleSet
from ._server import Server, parse_listen
from ._session import ServerSession

__all__ = ["Deliver", "ReceivedMessage", "Sink", "SinkHandler"]

log = logging.getLogger("lmtpfast.sink")

_parse_listen = parse_listen  # the tests' name for it

#: ``deliver(sender, recipients, content) -> stored`` — one bool per
#: recipient; a False turns that recipient's reply into 451 4.3.0.
Deliver = Callable[[bytes, Sequence[bytes], bytes], Sequence[bool]]

# Fault commands whose rules the handler needs a hook for.
_COMMAND_HOOKS = {
    "greeting": "greeting",
    "lhlo": "lhlo",
    "mail": "mail",
    "rcpt": "rcpt",
    "data": "data",
    "bdat": "bdat",
    "dot": "end_of_content",
    "dot-short": "end_of_content",
    "rset": "rset",
    "noop": "noop",
    "quit": "quit",
}


class ReceivedMessage(msgspec.Struct, frozen=True):
    """A message as the sink received it (``collect=True``).

    ``recipients`` are those that got a 2xx reply after the content, in RCPT
    order, duplicates included; ``content`` is exactly what was decoded.
    """

    sender: str
    recipients: list[str]
    content: bytes


class SinkHandler(Handler):
    """The sink's behaviour on the server engine: store or discard, inject faults.

    ``deliver`` (None: discard, content never even un-stuffed) is called
    with each message and the recipients about to get a 2xx final reply;
    ``faults`` decides, command by command, what to do wrong. Only the hooks
    that a rule or the storage needs are called: without faults and storage
    the engine runs alone.
    """

    def __init__(
        self, stats: SinkStats, *, deliver: Deliver | None = None, faults: FaultEngine | None = None
    ) -> None:
        self._stats = stats
        self._deliver = deliver
        self._eng = faults if faults is not None and faults.plan.rules else None
        eng = self._eng
        self._rules: dict[str, RuleSet] = (
            {c: eng.rules_for(c) for c in _COMMAND_HOOKS if eng.rules_for(c)} if eng else {}
        )
        hooks = {_COMMAND_HOOKS[c] for c in self._rules}
        if deliver is not None:
            hooks |= {"content", "end_of_content", "reset"}
        if "bdat" in self._rules:
            hooks.add("end_of_content")  # BDAT LAST's rule may rewrite the final replies
        self.hooks = frozenset(hooks)

    # --- faults ------------------------------------------------------------------

    def _effect(self, rule: FaultRule, default: bytes | None, dcode: int) -> Decision:
        """What a rule that fired does to one reply (``default``)."""
        self._stats.faults_fired += 1
        items: list[Item] = [Delay(rule.delay)] if rule.delay else []
        act = rule.action
        if act == "stall":
            return Decision(0, [*items, STALL])
        if act == "disconnect":
            return Decision(0, [*items, CLOSE])
        if act == "reset":
            return Decision(0, [*items, ABORT])
        if act == "reply":
            return Decision(rule.code, [*items, rule.reply_line()])
        if act == "garbage":
            items.append(rule.text.encode("utf-8") + b"\r\n")
        elif act == "oversize":
            code = default[:3] if default else b"%d" % dcode
            items.append(code + b" " + b"x" * rule.size + b"\r\n")
        elif act == "extra":
            items += [DEFAULT, rule.reply_line()]
        else:  # proceed (after the delay)
            items.append(DEFAULT)
        return Decision(dcode, items)

    def _simple(self, command: str, default: bytes, address: bytes | None = None) -> Answer:
        rules = self._rules.get(command)
        if not rules:
            return None
        assert self._eng is not None
        rule = self._eng.check(rules, address)
        return None if rule is None else self._effect(rule, default, answer_code(default))

    def _any(self, command: str, session: Any, default: bytes | None, dcode: int) -> Answer:
        rules = self._rules.get(command)
        if not rules:
            return None
        assert self._eng is not None
        rule = self._eng.check_any(rules, session.recipients)
        return None if rule is None else self._effect(rule, default, dcode)

    def greeting(self, session: ServerSession, default: bytes) -> Answer:
        return self._simple("greeting", default)

    def lhlo(self, session: ServerSession, name: bytes, default: bytes) -> Answer:
        return self._simple("lhlo", default)

    def mail(
        self, session: ServerSession, sender: bytes, params: list[bytes], default: bytes
    ) -> Answer:
        return self._simple("mail", default, sender)

    def rcpt(
        self,
        session: ServerSession,
        index: int,
        recipient: bytes,
        params: list[bytes],
        default: bytes,
    ) -> Answer:
        return self._simple("rcpt", default, recipient)

    def data(self, session: ServerSession, default: bytes) -> Answer:
        return self._any("data", session, default, 354)

    def bdat(self, session: ServerSession, size: int, last: bool, default: bytes | None) -> Answer:
        ans = self._any("bdat", session, default, 250)
        if last and isinstance(ans, Decision) and ans.items and ans.code != 250:
            # A reply on the LAST chunk refuses the message with that one
            # reply, even a 2xx one (counted here: the engine counts none).
            code = ans.code
            if 200 <= code < 300:
                fr = self._stats.final_replies
                fr[code] = fr.get(code, 0) + 1
                return Decision(0, ans.items)
        return ans

    def rset(self, session: ServerSession, default: bytes) -> Answer:
        return self._simple("rset", default)

    def noop(self, session: ServerSession, default: bytes) -> Answer:
        return self._simple("noop", default)

    def quit(self, session: ServerSession, default: bytes) -> Answer:
        return self._simple("quit", default)

    # --- content -----------------------------------------------------------------

    def content(self, session: ServerSession, chunk: bytes) -> None:
        parts = session.context
        if parts is None:
            session.context = [chunk]
        else:
            parts.append(chunk)
        return None

    def reset(self, session: ServerSession) -> None:
        session.context = None

    def end_of_content(self, session: ServerSession, envelope: Envelope) -> Sequence[Answer] | None:
        parts = session.context
        session.context = None
        content = b"" if not parts else parts[0] if len(parts) == 1 else b"".join(parts)
        rcpts = envelope.recipients
        deliver = self._deliver
        if not self._rules.get("dot") and not self._rules.get("dot-short"):
            if envelope.too_big or deliver is None:
                return None
            stored = deliver(envelope.sender, rcpts, content)
            self._stats.messages_stored += sum(stored)
            if all(stored):
                return None
            return [
                None if ok else b"451 4.3.0 <" + r + b"> Could not store the message\r\n"
                for r, ok in zip(rcpts, stored, strict=True)
            ]
        return self._faulty_finals(envelope, content)

    def _faulty_finals(self, envelope: Envelope, content: bytes) -> list[Answer]:
        """Per-recipient faults after the dot; only 2xx-answered copies are stored."""
        eng = self._eng
        assert eng is not None
        stats = self._stats
        rcpts = envelope.recipients
        too_big = envelope.too_big
        limit = len(rcpts)
        then: Any = None
        before: list[Item] = []
        silent_rest = False
        short = self._rules.get("dot-short")
        if short:
            srule = eng.check_any(short, rcpts)
            if srule is not None:
                stats.faults_fired += 1
                if srule.delay:
                    before.append(Delay(srule.delay))
                limit = min(srule.count, limit)
                # "continue": no reply for the rest, and on with the next
                # command (a server that loses replies: a pipelining
                # client's later replies shift).
                silent_rest = srule.then == "continue"
                then = STALL if srule.then == "stall" else None if silent_rest else CLOSE
        per_rcpt = self._rules.get("dot")
        dcode = 552 if too_big else 250
        # Decide every reply first, then store the 2xx ones, then answer:
        # a 250 must only go out for a stored copy.
        plan: list[tuple[bytes, int, FaultRule | None]] = []
        for r in rcpts[:limit]:
            rule = eng.check(per_rcpt, r) if per_rcpt else None
            if rule is not None and rule.action in ("stall", "disconnect", "reset"):
                plan.append((r, -1, rule))
                break
            code = rule.code if rule is not None and rule.action == "reply" else dcode
            plan.append((r, code, rule))
        delivered = [r for r, code, _ in plan if 200 <= code < 300]
        stored: Sequence[bool] = [True] * len(delivered)
        if delivered and self._deliver is not None:
            stored = self._deliver(envelope.sender, delivered, content)
            stats.messages_stored += sum(stored)
        answers: list[Answer] = []
        k = 0
        for r, code, rule in plan:
            ans: Answer = None
            if 200 <= code < 300:
                if not stored[k]:
                    ans = b"451 4.3.0 <" + r + b"> Could not store the message\r\n"
                k += 1
            if rule is not None:
                eff = self._effect(rule, None, dcode)
                if isinstance(ans, bytes):  # the store failure replaces a 2xx reply
                    failed: bytes = ans
                    if rule.action == "reply":
                        eff = Decision(451, [*eff.items[:-1], failed])
                    else:
                        eff = Decision(451, [failed if i is DEFAULT else i for i in eff.items])
                ans = eff
            answers.append(ans)
        if then is not None or before:
            if not answers:
                answers.append(Decision(0, [*before, then] if then is not None else before))
            else:
                if before:
                    answers[0] = _prepend(answers[0], before, dcode)
                if then is not None and len(answers) == limit:
                    answers[-1] = _append(answers[-1], then, dcode)
        if silent_rest:
            answers += [Decision(0, [])] * (len(rcpts) - len(answers))
        return answers


def _prepend(ans: Answer, items: list[Item], dcode: int) -> Decision:
    if ans is None:
        return Decision(dcode, [*items, DEFAULT])
    if isinstance(ans, bytes):
        return Decision(answer_code(ans), [*items, ans])
    return Decision(ans.code, [*items, *ans.items])


def _append(ans: Answer, item: Item, dcode: int) -> Decision:
    if ans is None:
        return Decision(dcode, [DEFAULT, item])
    if isinstance(ans, bytes):
        return Decision(answer_code(ans), [ans, item])
    return Decision(ans.code, [*ans.items, item])


class Sink(Server):
    """An LMTP server that accepts (or, with faults, mishandles) everything.

    ``listen`` is one destination or a list (``unix:/path``, ``host:port``,
    ``[v6]:port``; port 0 picks one); after :meth:`start`,
    :attr:`destinations` holds the real ones, e.g. ``"127.0.0.1:40123"`` or
    ``"unix:/tmp/s"``. ``extensions`` are the LHLO keywords advertised *and*
    honoured (drop one to turn it off); ``max_size`` 0 means no limit.
    ``maildir`` stores each message once per accepted recipient in
    ``maildir/<local part>/new/``; ``collect`` keeps them in
    :attr:`messages`. ``max_connections`` > 0 refuses connections beyond it
    with ``421 4.3.2``. ``received_headers`` prepends ``Return-Path`` and
    ``Delivered-To`` to stored copies. ``engine`` picks the server engine
    (``"c"``, ``"python"``; default the compiled one when built).
    """

    def __init__(
        self,
        listen: str | Sequence[str],
        *,
        maildir: str | os.PathLike[str] | None = None,
        hostname: str = "lmtpfast-sink",
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
        max_size: int = DEFAULT_MAX_SIZE,
        faults: FaultPlan | None = None,
        max_connections: int = 0,
        collect: bool = False,
        received_headers: bool = False,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
        engine: str | ModuleType | None = None,
    ) -> None:
        if not hostname or any(c in hostname for c in " \r\n\0"):
            raise ConfigurationError(f"bad hostname {hostname!r}", source="hostname")
        if max_size < 0 or max_connections < 0 or max_line_length < 64 or max_recipients < 1:
            raise ConfigurationError("limits must be positive", source="sink limits")
        self.maildir = os.fspath(maildir) if maildir is not None else None
        self.collect = collect
        self.received_headers = received_headers
        self.faults = faults if faults is not None else FaultPlan()
        #: Messages received, when ``collect`` is true.
        self.messages: list[ReceivedMessage] = []
        self._engine = FaultEngine(self.faults)
        store = self.maildir is not None or collect
        stats = SinkStats()
        config = SessionConfig(
            hostname=hostname,
            extensions=extensions,
            max_size=max_size,
            max_line_length=max_line_length,
            max_recipients=max_recipients,
            delivered_text="Saved" if store else "Accepted, not stored",
            hide=self.faults.hide,
            advertise=self.faults.advertise,
        )
        handler = SinkHandler(stats, deliver=self._deliver if store else None, faults=self._engine)
        super().__init__(
            listen,
            handler,
            config,
            stats=stats,
            max_connections=max_connections,
            engine=engine,
        )
        self._created: set[str] = set()
        self._seq = itertools.count(1)
        self._host_tag = socket.gethostname().replace("/", "_").replace(":", "_") or "sink"

    async def __aenter__(self) -> Sink:
        await self.start()
        return self

    # --- storage -----------------------------------------------------------------

    def _deliver(self, sender: bytes, recipients: Sequence[bytes], content: bytes) -> list[bool]:
        if self.collect:
            self.messages.append(
                ReceivedMessage(
                    sender=_text(sender), recipients=[_text(r) for r in recipients], content=content
                )
            )
        if self.maildir is None:
            return [True] * len(recipients)
        return [self._store(sender, r, content) for r in recipients]

    def _store(self, sender: bytes, rcpt: bytes, content: bytes) -> bool:
        assert self.maildir is not None
        box = os.path.join(self.maildir, _mailbox_name(rcpt))
        try:
            if box not in self._created:
                for sub in ("tmp", "new", "cur"):
                    os.makedirs(os.path.join(box, sub), exist_ok=True)
                self._created.add(box)
            now = time.time()
            name = (
                f"{int(now)}.M{int(now * 1e6) % 1000000}P{os.getpid()}"
                f"Q{next(self._seq)}.{self._host_tag}"
            )
            tmp = os.path.join(box, "tmp", name)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if self.received_headers:
                    os.write(
                        fd, b"Return-Path: <" + sender + b">\r\nDelivered-To: " + rcpt + b"\r\n"
                    )
                view = memoryview(content)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.rename(tmp, os.path.join(box, "new", name))
        except OSError as exc:
            log.warning("cannot store message for %s: %s", _text(rcpt), exc)
            self.stats.store_errors += 1
            return False
        return True


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _mailbox_name(rcpt: bytes) -> str:
    """The Maildir folder of a recipient: its local part, made safe as a file name."""
    local = rcpt.rpartition(b"@")[0] if b"@" in rcpt else rcpt
    if local[:1] == b'"' and local[-1:] == b'"' and len(local) >= 2:
        local = local[1:-1]
    name = local.decode("utf-8", "replace").replace("/", "_").replace("\0", "_")
    if not name or name.startswith("."):
        name = "_" + name  # never "", ".", ".." or a hidden folder
    return name
