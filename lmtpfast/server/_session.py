"""Sans-IO server side of one LMTP connection.

:class:`ServerSession` takes the bytes a client sent and returns what to do:
reply bytes to write, plus the odd :class:`Delay` / :data:`STALL` /
:data:`CLOSE` / :data:`ABORT` instruction (from fault injection or QUIT).
It imports no asyncio; the sink's protocol class (``sink.py``) runs it.

Speed is the point, because benchmarks of the client measure against it:
``receive_data`` handles everything a read brought (a pipelined
MAIL/RCPT*/DATA group, or the end of one message and the next group) and
returns one joined ``bytes`` of replies, so the I/O layer does one write per
read (RFC 2920 asks servers to flush only when they would block on reading).
Content in discard mode is never copied or un-stuffed, only searched.

Replies (RFC 5321 codes, RFC 3463 enhanced codes, RFC 2033 LMTP rules):
after the final dot, or BDAT LAST, one reply per *accepted* RCPT, in RCPT
order, duplicates included.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Final

import msgspec

from ._data import DotDecoder
from ._faults import FaultEngine, FaultRule, RuleSet

__all__ = [
    "ABORT",
    "CLOSE",
    "DEFAULT_EXTENSIONS",
    "DEFAULT_MAX_LINE_LENGTH",
    "DEFAULT_MAX_RECIPIENTS",
    "DEFAULT_MAX_SIZE",
    "STALL",
    "Delay",
    "Item",
    "ServerSession",
    "SessionConfig",
    "SinkStats",
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


class SinkStats(msgspec.Struct, kw_only=True):
    """Counters of one sink, shared by its connections (JSON via ``msgspec.json``).

    ``transactions`` counts messages whose content arrived in full (final dot
    or BDAT LAST with at least one accepted recipient); ``final_replies``
    counts the replies sent after the content by reply code;
    ``messages_stored`` counts stored copies (one per recipient).
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


# --- instructions for the I/O layer ------------------------------------------


class Delay:
    """Wait ``seconds`` before writing the items that follow."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __repr__(self) -> str:
        return f"Delay({self.seconds})"


class _Instruction:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: Write nothing more, ever; keep the connection open and discard input.
STALL: Final = _Instruction("STALL")
#: Write what came before, then close the connection.
CLOSE: Final = _Instruction("CLOSE")
#: Write what came before, then abort the connection (RST).
ABORT: Final = _Instruction("ABORT")

Item = bytes | Delay | _Instruction

#: ``deliver(sender, recipients, content) -> stored`` — one bool per
#: recipient; a False turns that recipient's reply into 451 4.3.0.
Deliver = Callable[[bytes, Sequence[bytes], bytes], Sequence[bool]]


class SessionConfig:
    """What every session of one server shares; built once, read per command."""

    __slots__ = (
        "advertise",
        "chunking",
        "deliver",
        "dsn",
        "eightbit",
        "faults",
        "greeting",
        "hostname",
        "lhlo_reply",
        "max_line_length",
        "max_recipients",
        "max_size",
        "ok_text",
        "size_ext",
        "smtputf8",
    )

    def __init__(
        self,
        *,
        hostname: str = "lmtpfast-sink",
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
        max_size: int = DEFAULT_MAX_SIZE,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
        deliver: Deliver | None = None,
        faults: FaultEngine | None = None,
    ) -> None:
        exts = [e.upper() for e in extensions]
        self.hostname = hostname
        self.max_size = max_size
        self.max_line_length = max_line_length
        self.max_recipients = max_recipients
        self.deliver = deliver
        self.faults = faults
        self.chunking = "CHUNKING" in exts
        self.size_ext = "SIZE" in exts
        self.smtputf8 = "SMTPUTF8" in exts
        self.eightbit = "8BITMIME" in exts
        self.dsn = "DSN" in exts
        host = hostname.encode("utf-8")
        self.greeting = b"220 " + host + b" LMTP lmtpfast sink ready\r\n"
        plan = faults.plan if faults is not None else None
        hide = set(plan.hide) if plan is not None else set()
        lines = [host]
        for ext in exts:
            if ext in hide:
                continue
            if ext == "SIZE" and max_size:
                lines.append(b"SIZE %d" % max_size)
            else:
                lines.append(ext.encode("ascii"))
        if plan is not None:
            lines.extend(kw.encode("ascii") for kw in plan.advertise)
        self.lhlo_reply = b"".join(
            (b"250 " if i == len(lines) - 1 else b"250-") + ln + b"\r\n"
            for i, ln in enumerate(lines)
        )
        self.ok_text = b"> Saved\r\n" if deliver is not None else b"> Accepted, not stored\r\n"


# --- canned replies -----------------------------------------------------------

_R_OK = b"250 2.0.0 OK\r\n"
_R_RSET = b"250 2.0.0 Reset OK\r\n"
_R_VRFY = b"252 2.0.0 Cannot VRFY; send RCPT to find out\r\n"
_R_DATA = b"354 Start mail input; end with <CRLF>.<CRLF>\r\n"
_R_NEED_LHLO = b"503 5.5.1 Bad sequence of commands: send LHLO first\r\n"
_R_NEED_MAIL = b"503 5.5.1 Bad sequence of commands: send MAIL first\r\n"
_R_NESTED_MAIL = b"503 5.5.1 Bad sequence of commands: nested MAIL command\r\n"
_R_NO_RCPT = b"503 5.5.1 Bad sequence of commands: no valid recipients\r\n"
_R_MIXED = b"503 5.5.1 Bad sequence of commands: DATA and BDAT cannot be mixed\r\n"
_R_REFUSED = b"503 5.5.1 Bad sequence of commands: service refused, send QUIT\r\n"
_R_EHLO = b"500 5.5.1 This is an LMTP server: use LHLO, not HELO or EHLO\r\n"
_R_UNKNOWN = b"500 5.5.2 Command unrecognized\r\n"
_R_BARE_LF = b"500 5.5.2 Syntax error: bare LF in command line (use CRLF)\r\n"
_R_TOO_LONG = b"500 5.5.6 Line too long\r\n"
_R_NOT_IMPL = b"502 5.5.1 Command not implemented\r\n"
_R_NO_CHUNKING = b"502 5.5.1 BDAT not available: CHUNKING is not offered\r\n"
_R_SYNTAX_LHLO = b"501 5.5.4 Syntax: LHLO hostname\r\n"
_R_SYNTAX_MAIL = b"501 5.5.4 Syntax: MAIL FROM:<address> [parameters]\r\n"
_R_SYNTAX_RCPT = b"501 5.5.4 Syntax: RCPT TO:<address> [parameters]\r\n"
_R_SYNTAX_BDAT = b"501 5.5.4 Syntax: BDAT size [LAST]\r\n"
_R_SYNTAX_NOARG = b"501 5.5.4 Syntax error: no arguments allowed\r\n"
_R_BAD_SENDER = b"501 5.1.7 Bad sender address syntax\r\n"
_R_BAD_RCPT = b"501 5.1.3 Bad recipient address syntax\r\n"
_R_BAD_PARAM = b"501 5.5.4 Invalid parameter value\r\n"
_R_NEED_UTF8 = b"553 5.6.7 Non-ASCII address needs SMTPUTF8\r\n"
_R_TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
_R_TOO_MANY = b"452 4.5.3 Too many recipients\r\n"

# Characters never allowed in an unquoted address between < and >.
_BAD_ADDR = re.compile(rb"[\x00-\x20\x7f<>\\]")
_CTL = re.compile(rb"[\x00-\x1f\x7f]")

_CMD, _DATA, _BDAT, _SKIP_LINE, _DONE = range(5)


class _Stop:
    __slots__ = ()


# A fault already did everything (stall, disconnect, reset): stop the command.
_STOPPED: Final = _Stop()


class ServerSession:
    """One LMTP connection, server side, as a state machine over bytes.

    ``start()`` gives the greeting; ``receive_data(data)`` (``b""`` = EOF)
    gives the replies to everything ``data`` completes. Both return a list of
    :data:`Item`: ``bytes`` to write, :class:`Delay`, :data:`STALL`,
    :data:`CLOSE` or :data:`ABORT`, to carry out in order.
    """

    __slots__ = (
        "_bdat_chunk",
        "_bdat_err",
        "_bdat_last",
        "_bdat_left",
        "_bdat_parts",
        "_bdat_size",
        "_body",
        "_buf",
        "_cfg",
        "_decoder",
        "_f",
        "_greeted",
        "_instructions",
        "_out",
        "_rcpts",
        "_refused",
        "_scan",
        "_sender",
        "_state",
        "_stats",
        "_utf8",
    )

    def __init__(self, config: SessionConfig, stats: SinkStats | None = None) -> None:
        self._cfg = config
        self._stats = stats if stats is not None else SinkStats()
        self._out: list[Item] = []
        self._instructions = 0  # non-bytes items in _out: 0 means one joined write
        self._buf = b""
        self._scan = 0
        self._state = _CMD
        self._greeted = False
        self._refused = False  # greeting refused: only QUIT is allowed (RFC 5321 3.1)
        self._sender: bytes | None = None
        self._utf8 = False  # MAIL FROM had SMTPUTF8: non-ASCII recipients allowed
        self._rcpts: list[bytes] = []
        self._body = 0  # 0 none yet, 1 DATA, 2 BDAT: they cannot be mixed
        self._decoder: DotDecoder | None = None
        self._bdat_left = 0
        self._bdat_chunk = 0
        self._bdat_last = False
        self._bdat_err: bytes | None = None
        self._bdat_parts: list[bytes] = []
        self._bdat_size = 0
        eng = config.faults
        self._f: dict[str, RuleSet] = (
            {
                c: eng.rules_for(c)
                for c in (
                    "greeting",
                    "lhlo",
                    "mail",
                    "rcpt",
                    "data",
                    "bdat",
                    "dot",
                    "dot-short",
                    "rset",
                    "noop",
                    "quit",
                )
            }
            if eng is not None and eng.plan.rules
            else {}
        )

    # --- public --------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the session will produce nothing more (QUIT, EOF, fault)."""
        return self._state == _DONE

    def start(self) -> list[Item]:
        """The greeting (or what a ``greeting`` fault does instead)."""
        rules = self._f.get("greeting")
        rule = self._pre(rules, None) if rules else None
        if rule is _STOPPED:
            return self._take()
        if isinstance(rule, FaultRule) and rule.action == "reply":
            self._emit_fault_reply(rule)
            if rule.code >= 400:
                self._refused = True
            return self._take()
        mark = len(self._out)
        self._out.append(self._cfg.greeting)
        if isinstance(rule, FaultRule):
            self._post(rule, mark)
        return self._take()

    def receive_data(self, data: bytes) -> list[Item]:
        """Feed what the client sent; ``b""`` means it closed its side."""
        if self._state == _DONE:
            return []  # stalled or closing: input is read and dropped
        if not data:
            self._finish(CLOSE)
            return self._take()
        buf = self._buf + data if self._buf else data
        pos = 0
        n = len(buf)
        cfg = self._cfg
        while pos < n:
            st = self._state
            if st == _CMD:
                i = buf.find(b"\r\n", pos + self._scan)
                if i < 0:
                    if n - pos > cfg.max_line_length:
                        self._state = _SKIP_LINE
                        continue
                    # Never rescan what was searched: resume at the last byte
                    # (it may be the CR of a CR LF split across reads).
                    self._scan = n - pos - 1
                    break
                self._scan = 0
                line = buf[pos:i]
                pos = i + 2
                self._command(line)
            elif st == _DATA:
                dec = self._decoder
                assert dec is not None
                end = dec.feed(buf, pos)
                if end < 0:
                    pos = n
                    break
                pos = end
                self._end_of_content(dec.content(), dec.size)
            elif st == _BDAT:
                take = min(self._bdat_left, n - pos)
                if self._bdat_err is None:
                    self._bdat_size += take
                    if cfg.deliver is not None and not (
                        cfg.max_size and self._bdat_size > cfg.max_size
                    ):
                        self._bdat_parts.append(buf[pos : pos + take])
                pos += take
                self._bdat_left -= take
                if self._bdat_left:
                    break
                self._state = _CMD
                self._bdat_chunk_done()
            elif st == _SKIP_LINE:
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    pos = n - 1 if buf.endswith(b"\r") else n
                    break
                pos = i + 2
                self._state = _CMD
                self._scan = 0
                self._out.append(_R_TOO_LONG)
            else:
                break
        self._buf = buf[pos:] if pos < n and self._state != _DONE else b""
        return self._take()

    # --- plumbing ------------------------------------------------------------

    def _take(self) -> list[Item]:
        out = self._out
        if not out:
            return []  # never hand out our own list
        self._out = []
        if self._instructions == 0:
            return [out[0] if len(out) == 1 else b"".join(out)]  # type: ignore[arg-type]
        self._instructions = 0
        return out

    def _instruct(self, item: Delay | _Instruction) -> None:
        self._out.append(item)
        self._instructions += 1

    def _finish(self, how: _Instruction) -> None:
        self._instruct(how)
        self._state = _DONE
        self._buf = b""

    def _pre(self, rules: RuleSet | None, address: bytes | None) -> FaultRule | _Stop | None:
        """Ask the fault engine; carry out a delay and any terminal action."""
        eng = self._cfg.faults
        if not rules or eng is None:
            return None
        rule = eng.check(rules, address)
        if rule is None:
            return None
        return self._apply_pre(rule)

    def _apply_pre(self, rule: FaultRule) -> FaultRule | _Stop:
        self._stats.faults_fired += 1
        if rule.delay:
            self._instruct(Delay(rule.delay))
        act = rule.action
        if act == "stall":
            self._finish(STALL)
            return _STOPPED
        if act == "disconnect":
            self._finish(CLOSE)
            return _STOPPED
        if act == "reset":
            self._finish(ABORT)
            return _STOPPED
        return rule

    def _emit_fault_reply(self, rule: FaultRule) -> None:
        self._out.append(rule.reply_line())
        if rule.code == 421:  # RFC 5321: 421 means the server closes the channel
            self._finish(CLOSE)

    def _post(self, rule: FaultRule, mark: int) -> None:
        """Rewrite the reply written since ``mark`` as the rule's action says."""
        act = rule.action
        if act == "garbage":
            self._out[mark:] = [rule.text.encode("utf-8") + b"\r\n"]
        elif act == "oversize":
            first = self._out[mark] if len(self._out) > mark else b"250"
            code = first[:3] if isinstance(first, bytes) else b"250"
            self._out[mark:] = [code + b" " + b"x" * rule.size + b"\r\n"]
        elif act == "extra":
            self._out.append(rule.reply_line())

    def _reset_transaction(self) -> None:
        self._sender = None
        self._utf8 = False
        self._rcpts = []
        self._body = 0
        self._decoder = None
        self._bdat_parts = []
        self._bdat_size = 0

    # --- commands ------------------------------------------------------------

    def _command(self, line: bytes) -> None:
        out = self._out
        if len(line) > self._cfg.max_line_length:
            out.append(_R_TOO_LONG)
            return
        if b"\n" in line:
            out.append(_R_BARE_LF)
            return
        sp = line.find(b" ")
        if sp < 0:
            verb = line.upper()
            arg = b""
        else:
            verb = line[:sp].upper()
            arg = line[sp + 1 :]
        handler = _HANDLERS.get(verb)
        if handler is None:
            out.append(_R_UNKNOWN)
        elif self._refused and verb != b"QUIT":
            out.append(_R_REFUSED)
        else:
            handler(self, arg)

    def _lhlo(self, arg: bytes) -> None:
        if not arg.strip() or _CTL.search(arg):
            self._out.append(_R_SYNTAX_LHLO)
            return
        rule = self._pre(self._f.get("lhlo"), None)
        if rule is _STOPPED:
            return
        self._reset_transaction()
        if isinstance(rule, FaultRule) and rule.action == "reply":
            self._greeted = 200 <= rule.code < 300
            self._emit_fault_reply(rule)
            return
        self._greeted = True
        mark = len(self._out)
        self._out.append(self._cfg.lhlo_reply)
        if isinstance(rule, FaultRule):
            self._post(rule, mark)

    def _helo(self, arg: bytes) -> None:
        self._out.append(_R_EHLO)

    def _mail(self, arg: bytes) -> None:
        out = self._out
        if not self._greeted:
            out.append(_R_NEED_LHLO)
            return
        if self._sender is not None:
            out.append(_R_NESTED_MAIL)
            return
        if arg[:5].upper() != b"FROM:":
            out.append(_R_SYNTAX_MAIL)
            return
        parsed = _parse_path(arg[5:])
        if parsed is None:
            out.append(_R_BAD_SENDER)
            return
        addr, params = parsed
        utf8 = False
        reply = None
        if params:
            reply = self._check_mail_params(params)
            utf8 = any(p.upper() == b"SMTPUTF8" for p in params)
        if reply is None and not utf8 and not addr.isascii():
            reply = _R_NEED_UTF8
        rules = self._f.get("mail")
        rule = self._pre(rules, addr) if rules else None
        if rule is _STOPPED:
            return
        mark = len(out)
        if isinstance(rule, FaultRule) and rule.action == "reply":
            if 200 <= rule.code < 300:
                self._sender = addr
                self._utf8 = utf8
            self._emit_fault_reply(rule)
            return
        if reply is None:
            self._sender = addr
            self._utf8 = utf8
            out.append(b"250 2.1.0 Sender <" + addr + b"> OK\r\n")
        else:
            out.append(reply)
        if isinstance(rule, FaultRule):
            self._post(rule, mark)

    def _check_mail_params(self, params: list[bytes]) -> bytes | None:
        cfg = self._cfg
        for p in params:
            key, eq, value = p.partition(b"=")
            key = key.upper()
            if key == b"SIZE" and cfg.size_ext:
                if not value.isdigit():
                    return _R_BAD_PARAM
                if cfg.max_size and int(value) > cfg.max_size:
                    return _R_TOO_BIG
            elif key == b"BODY" and cfg.eightbit:
                if value.upper() not in (b"7BIT", b"8BITMIME"):
                    return b"555 5.5.4 Unsupported BODY type\r\n"
            elif key == b"SMTPUTF8" and cfg.smtputf8:
                if eq:
                    return _R_BAD_PARAM
            elif key == b"RET" and cfg.dsn:
                if value.upper() not in (b"FULL", b"HDRS"):
                    return _R_BAD_PARAM
            elif key == b"ENVID" and cfg.dsn:
                if not value:
                    return _R_BAD_PARAM
            else:
                return b"555 5.5.4 Unsupported parameter " + key[:64] + b"\r\n"
        return None

    def _rcpt(self, arg: bytes) -> None:
        out = self._out
        if self._sender is None:
            out.append(_R_NEED_MAIL if self._greeted else _R_NEED_LHLO)
            return
        if arg[:3].upper() != b"TO:":
            out.append(_R_SYNTAX_RCPT)
            return
        parsed = _parse_path(arg[3:])
        if parsed is None or not parsed[0]:
            out.append(_R_BAD_RCPT)
            return
        addr, params = parsed
        reply = self._check_rcpt_params(params) if params else None
        if reply is None and not self._utf8 and not addr.isascii():
            reply = _R_NEED_UTF8
        if reply is None and len(self._rcpts) >= self._cfg.max_recipients:
            reply = _R_TOO_MANY
        rules = self._f.get("rcpt")
        rule = self._pre(rules, addr) if rules else None
        if rule is _STOPPED:
            return
        mark = len(out)
        stats = self._stats
        if isinstance(rule, FaultRule) and rule.action == "reply":
            if 200 <= rule.code < 300:
                self._rcpts.append(addr)
                stats.recipients_accepted += 1
            else:
                stats.recipients_refused += 1
            self._emit_fault_reply(rule)
            return
        if reply is None:
            self._rcpts.append(addr)
            stats.recipients_accepted += 1
            out.append(b"250 2.1.5 Recipient <" + addr + b"> OK\r\n")
        else:
            stats.recipients_refused += 1
            out.append(reply)
        if isinstance(rule, FaultRule):
            self._post(rule, mark)

    def _check_rcpt_params(self, params: list[bytes]) -> bytes | None:
        dsn = self._cfg.dsn
        for p in params:
            key, _, value = p.partition(b"=")
            key = key.upper()
            if key == b"NOTIFY" and dsn:
                words = value.upper().split(b",")
                if not words or not (
                    words == [b"NEVER"]
                    or all(w in (b"SUCCESS", b"FAILURE", b"DELAY") for w in words)
                ):
                    return _R_BAD_PARAM
            elif key == b"ORCPT" and dsn:
                if b";" not in value:
                    return _R_BAD_PARAM
            else:
                return b"555 5.5.4 Unsupported parameter " + key[:64] + b"\r\n"
        return None

    def _data(self, arg: bytes) -> None:
        out = self._out
        if arg.strip():
            out.append(_R_SYNTAX_NOARG)
            return
        reply = self._content_sequence_error()
        if reply is None and self._body == 2:
            reply = _R_MIXED  # RFC 3030: no DATA once BDAT has begun a message
        if reply is not None:
            out.append(reply)
            return
        rules = self._f.get("data")
        rule = self._pre_any(rules) if rules else None
        if rule is _STOPPED:
            return
        if isinstance(rule, FaultRule) and rule.action == "reply":
            self._emit_fault_reply(rule)
            if rule.code == 354 and self._state != _DONE:
                self._start_data()
            return
        mark = len(out)
        out.append(_R_DATA)
        self._start_data()
        if isinstance(rule, FaultRule):
            self._post(rule, mark)

    def _start_data(self) -> None:
        cfg = self._cfg
        self._body = 1
        self._decoder = DotDecoder(keep=cfg.deliver is not None, limit=cfg.max_size)
        self._state = _DATA

    def _content_sequence_error(self) -> bytes | None:
        if self._sender is None:
            return _R_NEED_MAIL if self._greeted else _R_NEED_LHLO
        if not self._rcpts:
            return _R_NO_RCPT  # RFC 2033 4.2: DATA with no accepted RCPT gets 503
        return None

    def _pre_any(self, rules: RuleSet) -> FaultRule | _Stop | None:
        eng = self._cfg.faults
        if eng is None:
            return None
        rule = eng.check_any(rules, self._rcpts)
        return None if rule is None else self._apply_pre(rule)

    def _bdat(self, arg: bytes) -> None:
        if not self._cfg.chunking:
            self._out.append(_R_NO_CHUNKING)
            return
        words = arg.split(b" ")
        if (
            not 1 <= len(words) <= 2
            or not words[0].isdigit()
            or len(words[0]) > 18
            or (len(words) == 2 and words[1].upper() != b"LAST")
        ):
            # The chunk size is unknown, so what follows is read as commands.
            self._out.append(_R_SYNTAX_BDAT)
            return
        size = int(words[0])
        self._bdat_last = len(words) == 2
        err = self._content_sequence_error()
        if err is None and self._body == 1:
            err = _R_MIXED
        # RFC 3030: the chunk is read and discarded even when the command
        # fails, and the reply comes once it has been read.
        self._bdat_err = err
        if err is None:
            self._body = 2
        self._bdat_left = size
        self._bdat_chunk = size
        self._state = _BDAT
        if size == 0:
            self._state = _CMD
            self._bdat_chunk_done()

    def _bdat_chunk_done(self) -> None:
        out = self._out
        err = self._bdat_err
        if err is not None:
            out.append(err)
            return
        rules = self._f.get("bdat")
        rule = self._pre_any(rules) if rules else None
        if rule is _STOPPED:
            return
        if isinstance(rule, FaultRule) and rule.action == "reply":
            ok = 200 <= rule.code < 300 and not self._bdat_last
            if self._bdat_last:
                fr = self._stats.final_replies
                fr[rule.code] = fr.get(rule.code, 0) + 1
            if not ok:
                # RFC 3030: a failed BDAT fails the transaction; chunks
                # already in the pipeline are then refused with 503.
                self._reset_transaction()
            self._emit_fault_reply(rule)
            return
        mark = len(out)
        if self._bdat_last:
            parts = self._bdat_parts
            content = parts[0] if len(parts) == 1 else b"".join(parts)
            self._end_of_content(content, self._bdat_size)
        else:
            out.append(b"250 2.0.0 %d octets received\r\n" % self._bdat_chunk)
        if isinstance(rule, FaultRule):
            self._post(rule, mark)

    def _end_of_content(self, content: bytes, size: int) -> None:
        """The content is complete: one reply per accepted RCPT, in order."""
        cfg = self._cfg
        stats = self._stats
        stats.transactions += 1
        rcpts = self._rcpts
        sender = self._sender if self._sender is not None else b""
        self._reset_transaction()
        self._state = _CMD
        too_big = bool(cfg.max_size and size > cfg.max_size)
        stored: Sequence[bool] | None = None
        if not too_big and not self._f.get("dot") and not self._f.get("dot-short"):
            if cfg.deliver is not None:
                stored = cfg.deliver(sender, rcpts, content)
                stats.messages_stored += sum(stored)
            if stored is None or all(stored):
                ok = cfg.ok_text
                self._out.append(b"".join([b"250 2.0.0 <" + r + ok for r in rcpts]))
                fr = stats.final_replies
                fr[250] = fr.get(250, 0) + len(rcpts)
                return
        self._end_of_content_slow(sender, rcpts, content, too_big, stored)

    def _end_of_content_slow(
        self,
        sender: bytes,
        rcpts: list[bytes],
        content: bytes,
        too_big: bool,
        stored: Sequence[bool] | None,
    ) -> None:
        """Per-recipient faults, size refusals and store failures."""
        cfg = self._cfg
        eng = cfg.faults
        out = self._out
        # Decide every reply first, then store for the 2xx ones, then emit:
        # a 250 must only go out for a stored copy.
        limit = len(rcpts)
        then: _Instruction | None = None
        short = self._f.get("dot-short")
        if short and eng is not None:
            srule = eng.check_any(short, rcpts)
            if srule is not None:
                self._stats.faults_fired += 1
                if srule.delay:
                    self._instruct(Delay(srule.delay))
                limit = min(srule.count, limit)
                then = STALL if srule.then == "stall" else CLOSE
        per_rcpt = self._f.get("dot")
        plan: list[tuple[bytes, int, bytes, FaultRule | None]] = []
        for r in rcpts[:limit]:
            if too_big:
                code, reply = 552, b"552 5.3.4 <" + r + b"> Message too big for this sink\r\n"
            else:
                code, reply = 250, b"250 2.0.0 <" + r + cfg.ok_text
            rule = eng.check(per_rcpt, r) if per_rcpt and eng is not None else None
            if rule is not None and rule.action in ("stall", "disconnect", "reset"):
                plan.append((r, -1, b"", rule))
                break
            if rule is not None and rule.action == "reply":
                code, reply = rule.code, rule.reply_line()
            plan.append((r, code, reply, rule))
        delivered = [r for r, code, _, _ in plan if 200 <= code < 300]
        if stored is None:  # not stored yet (faults or size decided some replies)
            stored = [True] * len(delivered)
            if delivered and cfg.deliver is not None:
                stored = cfg.deliver(sender, delivered, content)
                self._stats.messages_stored += sum(stored)
        fr = self._stats.final_replies
        k = 0
        for r, code, reply, rule in plan:
            if 200 <= code < 300:
                if not stored[k]:
                    code = 451
                    reply = b"451 4.3.0 <" + r + b"> Could not store the message\r\n"
                k += 1
            if rule is not None and self._apply_pre(rule) is _STOPPED:
                return
            if code > 0:
                fr[code] = fr.get(code, 0) + 1
            mark = len(out)
            out.append(reply)
            if rule is not None and rule.action != "reply":
                self._post(rule, mark)
            elif rule is not None and code == 421:
                self._finish(CLOSE)
                return
        if then is not None:
            self._finish(then)

    def _rset(self, arg: bytes) -> None:
        self._simple("rset", arg, _R_RSET, reset=True)

    def _noop(self, arg: bytes) -> None:
        # RFC 5321 4.1.1.9: NOOP may carry a string, which is ignored.
        self._simple("noop", b"", _R_OK)

    def _quit(self, arg: bytes) -> None:
        self._simple("quit", arg, b"221 2.0.0 " + self._cfg.hostname.encode() + b" closing\r\n")
        if self._state != _DONE:
            self._finish(CLOSE)

    def _simple(self, name: str, arg: bytes, reply: bytes, *, reset: bool = False) -> None:
        if arg.strip():
            self._out.append(_R_SYNTAX_NOARG)
            return
        rules = self._f.get(name)
        rule = self._pre(rules, None) if rules else None
        if rule is _STOPPED:
            return
        if reset:
            self._reset_transaction()
        if isinstance(rule, FaultRule) and rule.action == "reply":
            self._emit_fault_reply(rule)
            return
        mark = len(self._out)
        self._out.append(reply)
        if isinstance(rule, FaultRule):
            self._post(rule, mark)

    def _vrfy(self, arg: bytes) -> None:
        self._out.append(_R_VRFY if arg else _R_SYNTAX_RCPT.replace(b"RCPT TO:", b"VRFY "))

    def _not_implemented(self, arg: bytes) -> None:
        self._out.append(_R_NOT_IMPL)


_HANDLERS: dict[bytes, Callable[[ServerSession, bytes], None]] = {
    b"LHLO": ServerSession._lhlo,
    b"HELO": ServerSession._helo,
    b"EHLO": ServerSession._helo,
    b"MAIL": ServerSession._mail,
    b"RCPT": ServerSession._rcpt,
    b"DATA": ServerSession._data,
    b"BDAT": ServerSession._bdat,
    b"RSET": ServerSession._rset,
    b"NOOP": ServerSession._noop,
    b"QUIT": ServerSession._quit,
    b"VRFY": ServerSession._vrfy,
    b"STARTTLS": ServerSession._not_implemented,
    b"AUTH": ServerSession._not_implemented,
    b"EXPN": ServerSession._not_implemented,
    b"ETRN": ServerSession._not_implemented,
    b"HELP": ServerSession._not_implemented,
}


def _parse_path(rest: bytes) -> tuple[bytes, list[bytes]] | None:
    """``<address> [params]`` after ``FROM:``/``TO:`` -> (address, params), or None.

    Accepts a space after the colon (common, though RFC 5321 has none),
    drops an RFC 5321 source route (``<@a,@b:user@c>``) and allows a quoted
    local part (which may hold ``>`` or spaces).
    """
    rest = rest.lstrip(b" ")
    if rest[:1] != b"<":
        return None
    if rest[1:2] == b'"':
        i = 2
        while True:
            q = rest.find(b'"', i)
            if q < 0:
                return None
            if rest[q - 1 : q] != b"\\":
                break
            i = q + 1
        j = rest.find(b">", q)
        if j < 0:
            return None
        addr = rest[1:j]
        if _CTL.search(addr):
            return None
    else:
        j = rest.find(b">")
        if j < 0:
            return None
        addr = rest[1:j]
        if addr[:1] == b"@":
            c = addr.find(b":")
            if c < 0:
                return None
            addr = addr[c + 1 :]
        if _BAD_ADDR.search(addr):
            return None
    tail = rest[j + 1 :]
    if not tail:
        return addr, []
    if tail[:1] != b" ":
        return None
    return addr, tail.split()
