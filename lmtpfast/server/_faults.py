"""Fault injection for the sink: what to break, where, and how often.

A :class:`FaultPlan` is a list of :class:`FaultRule` plus LHLO keyword tweaks.
Each rule matches one command (and optionally an address pattern, an
occurrence number and/or a probability) and says what to do instead of, or
before, the normal reply. The grammar of the textual form (``--fault SPEC``)
is in ``docs/sink.md`` and in :func:`parse_fault`.

Nothing here does I/O: :class:`FaultEngine` holds the run-time state (match
counters, seeded RNGs) and the session asks it which rule, if any, applies.
Counters are shared by every connection of one sink, so ``nth=3`` means the
third matching command the sink sees, whichever connection sends it.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from fnmatch import fnmatchcase
from typing import Any, Final, Literal

import msgspec

from .._errors import ConfigurationError

__all__ = [
    "ACTIONS",
    "COMMANDS",
    "FaultEngine",
    "FaultPlan",
    "FaultRule",
    "parse_fault",
]

Command = Literal["greeting", "lhlo", "mail", "rcpt", "data", "bdat", "dot", "rset", "noop", "quit"]
COMMANDS: Final = (
    "greeting",
    "lhlo",
    "mail",
    "rcpt",
    "data",
    "bdat",
    "dot",
    "rset",
    "noop",
    "quit",
)

Action = Literal[
    "reply", "proceed", "stall", "disconnect", "reset", "garbage", "oversize", "extra", "short"
]
ACTIONS: Final = (
    "reply",
    "proceed",
    "stall",
    "disconnect",
    "reset",
    "garbage",
    "oversize",
    "extra",
    "short",
)

# Commands whose rules may carry an address pattern, and what it is matched
# against: MAIL the sender; RCPT and dot the recipient; DATA/BDAT any
# recipient accepted so far in the transaction.
_PATTERN_COMMANDS: Final = frozenset({"mail", "rcpt", "data", "bdat", "dot"})

DEFAULT_FAULT_TEXT: Final = "Fault injected by lmtpfast sink"
DEFAULT_EXTRA_REPLY: Final = "250 2.0.0 Unsolicited reply injected by lmtpfast sink"
DEFAULT_GARBAGE: Final = "garbage injected by lmtpfast sink: this is not an LMTP reply"
DEFAULT_OVERSIZE: Final = 65536
_MAX_OVERSIZE: Final = 16 * 1024 * 1024

_REPLY_RE = re.compile(r"^([2-5][0-9][0-9])(?: ([245]\.[0-9]{1,3}\.[0-9]{1,3})(?= |$))?(?: (.*))?$")


class FaultRule(msgspec.Struct, frozen=True, kw_only=True):
    """One fault: which command it matches and what it does.

    Matching: ``command`` (one of :data:`COMMANDS`); ``pattern`` an
    :func:`fnmatch`-style address pattern, compared case-insensitively
    (``mail``: the sender; ``rcpt``/``dot``: the recipient; ``data``/``bdat``:
    any accepted recipient); ``nth`` fires only on the Nth match (1-based);
    ``rate`` fires with that probability, drawn from ``random.Random(seed)``;
    ``times`` fires at most that many times in all.

    Effect: wait ``delay`` seconds, then ``action``:

    ``reply``       send ``code enhanced text`` instead of the normal reply
                    (the command then succeeds only if the code says so:
                    2xx, or 354 for DATA; 421 also closes the connection)
    ``proceed``     the normal reply (only useful with ``delay``)
    ``stall``       never reply again; keep the connection open, read and
                    discard what arrives
    ``disconnect``  close the connection instead of replying
    ``reset``       abort the connection (TCP RST where the OS does it)
    ``garbage``     send ``text`` (a line that is no reply) instead of the reply
    ``oversize``    send the reply's code followed by ``size`` bytes of text
    ``extra``       send the normal reply, then an unsolicited one (``code
                    enhanced text``)
    ``short``       ``dot`` only: send the first ``count`` per-recipient
                    replies, then ``then`` (``disconnect``, ``stall``, or
                    ``continue``: carry on with the next command as if
                    all had been sent, which shifts every later reply)
    """

    command: Command
    action: Action = "reply"
    pattern: str | None = None
    nth: int | None = None
    rate: float | None = None
    seed: int | None = None
    times: int | None = None
    delay: float = 0.0
    code: int = 0
    enhanced: str | None = None
    text: str = ""
    size: int = DEFAULT_OVERSIZE
    count: int = 0
    then: Literal["disconnect", "stall", "continue"] = "disconnect"

    def __post_init__(self) -> None:
        _validate(self)

    def reply_line(self) -> bytes:
        """The reply line this rule sends (``reply``/``extra``), with CR LF."""
        parts = [str(self.code)]
        if self.enhanced:
            parts.append(self.enhanced)
        if self.text:
            parts.append(self.text)
        return (" ".join(parts) + "\r\n").encode("utf-8")


def _validate(rule: FaultRule) -> None:
    def bad(problem: str) -> ConfigurationError:
        return ConfigurationError(problem, source="fault rule", field=rule.command)

    if rule.command not in COMMANDS:
        raise bad(f"unknown command {rule.command!r} (expected one of {', '.join(COMMANDS)})")
    if rule.action not in ACTIONS:
        raise bad(f"unknown action {rule.action!r} (expected one of {', '.join(ACTIONS)})")
    if rule.pattern is not None and rule.command not in _PATTERN_COMMANDS:
        raise bad(f"an address pattern only applies to {', '.join(sorted(_PATTERN_COMMANDS))}")
    if rule.pattern is not None and not rule.pattern:
        raise bad("empty address pattern")
    if rule.nth is not None and rule.nth < 1:
        raise bad("nth must be 1 or more")
    if rule.times is not None and rule.times < 1:
        raise bad("times must be 1 or more")
    if rule.rate is not None and not (0.0 < rule.rate <= 1.0):
        raise bad("rate must be a probability in (0, 1]")
    if not (math.isfinite(rule.delay) and rule.delay >= 0):
        raise bad("delay must be a finite number of seconds >= 0")
    if rule.action in ("reply", "extra"):
        if not 200 <= rule.code <= 599:
            raise bad(f"reply code {rule.code} is not in 200..599")
        if rule.enhanced is not None and (
            not re.fullmatch(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}", rule.enhanced)
            or rule.enhanced[0] != str(rule.code)[0]
        ):
            raise bad(f"enhanced code {rule.enhanced!r} does not fit reply code {rule.code}")
    for name, value in (("text", rule.text), ("pattern", rule.pattern or "")):
        if "\r" in value or "\n" in value or "\0" in value:
            raise bad(f"{name} contains CR, LF or NUL")
    if rule.action == "oversize" and not 1 <= rule.size <= _MAX_OVERSIZE:
        raise bad(f"oversize length must be in 1..{_MAX_OVERSIZE}")
    if rule.action == "short":
        if rule.command != "dot":
            raise bad("short only applies to dot (the replies after the final dot)")
        if rule.count < 0:
            raise bad("short needs a count >= 0")
    if rule.then not in ("disconnect", "stall", "continue"):
        raise bad("short ends with disconnect, stall or continue")


class FaultPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What the sink should do wrong.

    ``rules`` are tried in order and the first that matches wins (a rule that
    matches the command and pattern but loses its ``nth``/``rate``/``times``
    draw lets the next rule try). ``hide`` lists LHLO keywords to leave out of
    the LHLO reply while still honouring them (to test clients that must not
    use what is not advertised); ``advertise`` adds LHLO lines the sink does
    not honour (e.g. ``STARTTLS``, ``SIZE 10``).
    """

    rules: tuple[FaultRule, ...] = ()
    hide: tuple[str, ...] = ()
    advertise: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for kw in (*self.hide, *self.advertise):
            if not kw or not kw.isascii() or not kw.isprintable():
                raise ConfigurationError(f"bad LHLO keyword {kw!r}", source="fault plan")

    @classmethod
    def parse(
        cls, specs: Iterable[str], *, hide: Iterable[str] = (), advertise: Iterable[str] = ()
    ) -> FaultPlan:
        """A plan from textual specs (see :func:`parse_fault`)."""
        return cls(
            rules=tuple(parse_fault(s) for s in specs),
            hide=tuple(h.upper() for h in hide),
            advertise=tuple(advertise),
        )

    def __bool__(self) -> bool:
        return bool(self.rules or self.hide or self.advertise)


# --- textual form -------------------------------------------------------------

_Bad = Callable[[str], ConfigurationError]

_SPEC_RE = re.compile(
    r"""^(?P<cmd>[A-Za-z]+)
        (?:@(?P<opts>[a-z]+=[^:=]*(?::[a-z]+=[^:=]*)*))?
        (?::(?P<pattern>[^=]+))?
        =(?P<action>.*)$""",
    re.VERBOSE | re.DOTALL,
)


def parse_fault(spec: str) -> FaultRule:
    """Parse one ``--fault`` spec into a :class:`FaultRule`.

    Grammar::

        SPEC    = COMMAND [ "@" OPTION *( ":" OPTION ) ] [ ":" PATTERN ] "=" ACTION
        OPTION  = "nth=" N | "rate=" P | "seed=" N | "times=" N
        ACTION  = "delay:" SECONDS [ "," EFFECT ] | EFFECT
        EFFECT  = REPLY | "stall" | "disconnect" | "reset" | "garbage" [ ":" TEXT ]
                | "oversize" [ ":" N ] | "extra" [ ":" REPLY ]
                | "short:" N [ ":disconnect" | ":stall" | ":continue" ]
        REPLY   = CODE [ " " ENHANCED ] [ " " TEXT ]

    Examples: ``rcpt:bob@*=550 5.1.1 No such user``,
    ``dot:*@example.org=452 4.2.2 Over quota``, ``data=disconnect``,
    ``mail@rate=0.01:seed=1=421 4.3.2 Going away``, ``lhlo=stall``,
    ``greeting=delay:2``, ``dot@nth=2=short:1:stall``.
    Raises :class:`~lmtpfast.ConfigurationError` when it is wrong.
    """

    def bad(problem: str) -> ConfigurationError:
        return ConfigurationError(problem, source="--fault", field=spec)

    m = _SPEC_RE.match(spec.strip())
    if m is None:
        raise bad(
            "expected COMMAND[@OPTION:...][:PATTERN]=ACTION, "
            "e.g. 'rcpt:bob@*=550 5.1.1 No such user'"
        )
    cmd = m["cmd"].lower()
    if cmd not in COMMANDS:
        raise bad(f"unknown command {cmd!r} (expected one of {', '.join(COMMANDS)})")
    fields: dict[str, Any] = {"command": cmd}
    if m["pattern"] is not None:
        fields["pattern"] = m["pattern"]
    for opt in m["opts"].split(":") if m["opts"] else ():
        key, _, value = opt.partition("=")
        if key not in ("nth", "seed", "times", "rate"):
            raise bad(f"unknown option {key!r} (expected nth, rate, seed or times)")
        try:
            fields[key] = float(value) if key == "rate" else int(value)
        except ValueError:
            raise bad(f"option {key}={value!r} is not a number") from None
    action = m["action"].strip()
    if action.startswith("delay:"):
        seconds, _, action = action[6:].partition(",")
        try:
            fields["delay"] = float(seconds)
        except ValueError:
            raise bad(f"delay {seconds!r} is not a number of seconds") from None
        action = action.strip() or "proceed"
    fields.update(_parse_effect(action, bad))
    try:
        return FaultRule(**fields)
    except ConfigurationError as exc:  # from _validate: re-raise naming the spec
        raise bad(exc.problem) from None


def _parse_effect(action: str, bad: _Bad) -> dict[str, Any]:
    word, _, arg = action.partition(":")
    if word in ("stall", "disconnect", "reset", "proceed") and not arg:
        return {"action": word}
    if word == "garbage":
        return {"action": "garbage", "text": arg or DEFAULT_GARBAGE}
    if word == "oversize":
        if not arg:
            return {"action": "oversize"}
        if not arg.isdigit():
            raise bad(f"oversize length {arg!r} is not a number")
        return {"action": "oversize", "size": int(arg)}
    if word == "extra":
        fields = _parse_reply(arg or DEFAULT_EXTRA_REPLY, bad)
        fields["action"] = "extra"
        return fields
    if word == "short":
        count, _, then = arg.partition(":")
        if not count.isdigit():
            raise bad("short needs a number of replies to send, e.g. short:1 or short:0:stall")
        if then not in ("", "disconnect", "stall", "continue"):
            raise bad(f"short ends with disconnect, stall or continue, not {then!r}")
        return {"action": "short", "count": int(count), "then": then or "disconnect"}
    if action[:1].isdigit():
        fields = _parse_reply(action, bad)
        fields["action"] = "reply"
        return fields
    raise bad(
        f"unknown action {action!r} (expected a reply like '550 5.1.1 text', delay:S, stall,"
        " disconnect, reset, garbage, oversize[:N], extra[:REPLY] or"
        " short:N[:stall|:continue])"
    )


def _parse_reply(text: str, bad: _Bad) -> dict[str, Any]:
    m = _REPLY_RE.match(text.strip())
    if m is None:
        raise bad(
            f"{text!r} is not a reply: expected CODE [ENHANCED] [TEXT], e.g. '452 4.2.2 Over quota'"
        )
    code, enhanced, rest = m.groups()
    if enhanced is not None and enhanced[0] != code[0]:
        raise bad(f"enhanced code {enhanced} does not fit reply code {code}")
    return {"code": int(code), "enhanced": enhanced, "text": rest or DEFAULT_FAULT_TEXT}


# --- run time ---------------------------------------------------------------


class _RuleState:
    """One rule's counters and RNG; shared by all connections of a sink."""

    __slots__ = ("fired", "matched", "pattern", "rng", "rule")

    def __init__(self, rule: FaultRule) -> None:
        self.rule = rule
        self.pattern = rule.pattern.lower() if rule.pattern is not None else None
        self.rng = random.Random(rule.seed) if rule.rate is not None else None
        self.matched = 0
        self.fired = 0


RuleSet = tuple[_RuleState, ...]


class FaultEngine:
    """The run-time side of a :class:`FaultPlan`: counts matches and decides."""

    __slots__ = ("_by_command", "fired", "plan")

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self.fired = 0
        by: dict[str, list[_RuleState]] = {}
        for rule in plan.rules:
            # The transaction-level "short" rules are tried once per final
            # dot, before the per-recipient ones; keep them apart.
            key = "dot-short" if rule.action == "short" else rule.command
            by.setdefault(key, []).append(_RuleState(rule))
        self._by_command = {k: tuple(v) for k, v in by.items()}

    def rules_for(self, command: str) -> RuleSet:
        """The rules of ``command`` (``dot-short`` for the ``short`` ones); () if none."""
        return self._by_command.get(command, ())

    def check(self, rules: RuleSet, address: bytes | None = None) -> FaultRule | None:
        """The first rule of ``rules`` that fires for ``address``, or None."""
        addr: str | None = None
        winner: FaultRule | None = None
        for st in rules:
            if st.pattern is not None:
                if address is None:
                    continue
                if addr is None:
                    addr = address.decode("utf-8", "surrogateescape").lower()
                if not fnmatchcase(addr, st.pattern):
                    continue
            winner = self._count(st, winner)
        return winner

    def check_any(self, rules: RuleSet, addresses: Sequence[bytes]) -> FaultRule | None:
        """Like :meth:`check`, where a pattern matches if any of ``addresses`` does."""
        lowered: list[str] | None = None
        winner: FaultRule | None = None
        for st in rules:
            if st.pattern is not None:
                if lowered is None:
                    lowered = [a.decode("utf-8", "surrogateescape").lower() for a in addresses]
                if not any(fnmatchcase(a, st.pattern) for a in lowered):
                    continue
            winner = self._count(st, winner)
        return winner

    def _count(self, st: _RuleState, winner: FaultRule | None) -> FaultRule | None:
        # Every matching rule counts the occurrence, even after an earlier
        # rule fired, so "nth=2" means the 2nd matching command whatever
        # other rules did with the 1st.
        st.matched += 1
        if winner is not None:
            return winner
        rule = st.rule
        if rule.nth is not None and st.matched != rule.nth:
            return None
        if rule.times is not None and st.fired >= rule.times:
            return None
        if st.rng is not None and rule.rate is not None and st.rng.random() >= rule.rate:
            return None
        st.fired += 1
        self.fired += 1
        return rule
