"""``lmtpfast send``: deliver one message and print one line per recipient.

Made to be run by an MTA as well as by people: Postfix's pipe(8) reads the
first characters of the output and the exit status (see docs/postfix.md), so
every line starts with the enhanced status code, the first line is the
recipient whose outcome decides the exit status, and the status is the
sysexits code closest to it (:mod:`lmtpfast.cli._exit`). Errors of our own
(usage, configuration, unreadable input) start with ``4.3.5``: an MTA then
defers the mail instead of bouncing it for a set-up mistake.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NoReturn

from lmtpfast import (
    DSN,
    FAILURES,
    SECURITY_LEVELS,
    ConfigurationError,
    ContentError,
    Delivery,
    Destination,
    LMTPError,
    LocalProtocolError,
    RecipientResult,
    Timeouts,
    connect,
    connect_sync,
    failure_results,
    parse_destination,
)

from . import _exit, _input, _output, _security

if TYPE_CHECKING:
    import argparse

__all__ = ["fast_args", "register", "run"]

_HELP = """\
Deliver one message over LMTP and print one line per recipient, each starting
with its enhanced status code (2.0.0 delivered, 4.x.x try again, 5.x.x refused
for good); the first line is the recipient that decided the exit status.

Exit status: 0 every recipient delivered; 75 some recipient not finally
decided (try again later); otherwise the first refusal's: 67 no such user
(5.1.x), 65 the message cannot be sent as it is (5.6.x), 77 refused by policy
(5.7.x), 73 mailbox full or disabled (5.2.x), 69 other refusals; 64 bad usage,
66 unreadable input, 78 bad configuration (these print 4.3.5 first, so an MTA
defers rather than bounces).

One status for several recipients: with several --rcpt a non-zero status also
covers the recipients that were delivered (75 makes an MTA send them the
message again, a refusal makes it bounce them too). An MTA must therefore run
one recipient per command: in Postfix, TRANSPORT_destination_recipient_limit =
1 (docs/postfix.md has the master.cf and main.cf lines).
"""


def register(sub: Any) -> None:
    import argparse

    from ._options import add_json

    p = sub.add_parser(
        "send",
        help="deliver one message",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--server", required=True, metavar="DEST",
                   help="unix:/path, host, host:port, [ipv6]:port, inet:host:port, "
                   "'command:PROGRAM ARGS' (LMTP on its stdin/stdout)")
    p.add_argument("--from", dest="sender", required=True, metavar="ADDR",
                   help="envelope sender ('' for the null sender)")
    p.add_argument("--rcpt", dest="recipients", action="append", required=True, metavar="ADDR",
                   help="envelope recipient (repeat for more; an MTA should give one, see above)")
    p.add_argument("file", nargs="?", default="-", help="message file, or - for standard input")
    p.add_argument("--lhlo-name", metavar="NAME", help="name to give in LHLO (default: host name)")
    p.add_argument("--no-pipelining", action="store_true", help="send one command at a time")
    p.add_argument("--timeout-scale", type=float, default=1.0, metavar="F",
                   help="multiply every Postfix default timeout by F")
    p.add_argument("--max-size", type=_input.parse_size, default=_input.DEFAULT_MAX_SIZE,
                   metavar="N", help="refuse a message larger than N bytes (k, m, g suffixes; 0: "
                   f"no limit; default {_input.DEFAULT_MAX_SIZE // 1024 // 1024}m); the "
                   "server's SIZE applies too")
    add_json(p, "one result per recipient")
    p.add_argument("--notify", metavar="LIST",
                   help="DSN NOTIFY for every recipient: NEVER, or SUCCESS,FAILURE,DELAY")
    p.add_argument("--ret", choices=("FULL", "HDRS"), help="DSN RET: what a bounce returns")
    p.add_argument("--envid", metavar="ID", help="DSN ENVID")
    p.add_argument("--orcpt", action="append", metavar="ADDR",
                   help="DSN ORCPT (original recipient), one per --rcpt in order")
    _security.add_arguments(p)
    p.set_defaults(func=run)

    def usage_error(message: str) -> NoReturn:
        # argparse's own errors come first in the output too: mark them ours.
        sys.stderr.write(f"{_exit.OUR_FAULT} {p.prog}: error: {message}\n")
        p.print_usage(sys.stderr)
        sys.exit(_exit.EX_USAGE)

    setattr(p, "error", usage_error)  # noqa: B010


#: Every option register() defines (with _security's), as the fast path sees it:
#: option -> (dest, kind). Kinds: "flag" (store_true), "append", "str", "float",
#: "size", or a tuple of choices. tests/test_startup.py checks this table
#: against the argparse parser, so an option added there and not here fails.
_OPTIONS: dict[str, tuple[str, str | tuple[str, ...]]] = {
    "--server": ("server", "str"),
    "--from": ("sender", "str"),
    "--rcpt": ("recipients", "append"),
    "--lhlo-name": ("lhlo_name", "str"),
    "--no-pipelining": ("no_pipelining", "flag"),
    "--timeout-scale": ("timeout_scale", "float"),
    "--max-size": ("max_size", "size"),
    "--json": ("json", "flag"),
    "--notify": ("notify", "str"),
    "--ret": ("ret", ("FULL", "HDRS")),
    "--envid": ("envid", "str"),
    "--orcpt": ("orcpt", "append"),
    "--tls": ("tls", SECURITY_LEVELS),
    "--ca-file": ("ca_file", "str"),
    "--cert-file": ("cert_file", "str"),
    "--key-file": ("key_file", "str"),
    "--tls-server-name": ("tls_server_name", "str"),
    "--tls-no-verify": ("tls_no_verify", "flag"),
    "--sasl-user": ("sasl_user", "str"),
    "--sasl-password-file": ("sasl_password_file", "str"),
    "--sasl-password-map": ("sasl_password_map", "str"),
    "--sasl-mechanisms": ("sasl_mechanisms", "str"),
    "--sasl-allow-plaintext": ("sasl_allow_plaintext", "flag"),
}
#: Defaults other than None (flags: False).
_DEFAULTS: dict[str, Any] = {"file": "-", "timeout_scale": 1.0,
                             "max_size": _input.DEFAULT_MAX_SIZE, "tls": "none"}


def fast_args(argv: list[str]) -> Any:
    """``send``'s options parsed as argparse would, without it; ``None``: ask argparse.

    An MTA runs ``lmtpfast send`` once per message, and argparse (with its
    gettext and locale, and the parser built option by option) was a tenth of
    that process. Only exact spellings are taken here (``--opt value``,
    ``--opt=value``, one message file or ``-``); anything else (help, an
    abbreviation, a short option, a value that starts with ``-``, a bad
    value, a missing required option) returns ``None``, and argparse parses
    the line, with its messages and exit status.
    """
    ns: dict[str, Any] = {dest: False if kind == "flag" else None
                          for dest, kind in _OPTIONS.values()}
    ns.update(_DEFAULTS)
    files: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "-" or not word.startswith("-"):
            files.append(word)
            continue
        name, eq, value = word.partition("=")
        option = _OPTIONS.get(name)
        if option is None:
            return None  # -h, --help, a short or abbreviated option, --, a mistake
        dest, kind = option
        if kind == "flag":
            if eq:
                return None
            ns[dest] = True
            continue
        if not eq:
            following = next(words, None)
            if following is None or (following.startswith("-") and following != "-"):
                return None
            value = following
        if kind == "append":
            ns[dest] = [*(ns[dest] or ()), value]
        elif kind == "str":
            ns[dest] = value
        elif isinstance(kind, tuple):
            if value not in kind:
                return None
            ns[dest] = value
        else:
            try:
                ns[dest] = float(value) if kind == "float" else _input.parse_size(value)
            except Exception:
                return None
    if len(files) > 1 or ns["server"] is None or ns["sender"] is None or not ns["recipients"]:
        return None
    if files:
        ns["file"] = files[0]
    from types import SimpleNamespace

    return SimpleNamespace(command="send", func=run, **ns)


def _fail(status: int, text: str) -> int:
    """A failure of ours: one line, starting with the code that makes an MTA defer."""
    print(f"{_exit.OUR_FAULT} lmtpfast send: {text}", file=sys.stderr, flush=True)
    return status


def _read_message(name: str, limit: int) -> bytes:
    if name == "-":
        return _input.read_limited(sys.stdin.buffer, limit)
    with open(name, "rb") as f:
        return _input.read_limited(f, limit)


def _one_line(text: str) -> str:
    # A multi-line reply is one line here: one line per recipient, always.
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def _line(r: RecipientResult) -> str:
    enh = f" {r.enhanced}" if r.enhanced else ""
    extra = " (may be delivered more than once on retry)" if r.possibly_delivered else ""
    return f"{_exit.enhanced_of(r)} {r.address}: {r.code}{enh} {_one_line(r.text)}{extra}"


def print_results(results: list[RecipientResult], as_json: bool) -> None:
    if as_json:
        import msgspec

        _output.print_line(msgspec.json.encode(results).decode(), flush=True)
        return
    # The deciding recipient first: an MTA takes the DSN from the first line.
    first = _exit.deciding(results)
    order = list(range(len(results)))
    if first:
        order.insert(0, order.pop(first))
    for n, i in enumerate(order, 1):
        _output.print_line(_line(results[i]), flush=n == len(order))


def _dsn(args: argparse.Namespace) -> DSN | None:
    if not (args.notify or args.ret or args.envid or args.orcpt):
        return None
    notify = tuple(w.strip().upper() for w in (args.notify or "").split(",") if w.strip())
    if args.orcpt is not None and len(args.orcpt) != len(args.recipients):
        raise LocalProtocolError("give one --orcpt per --rcpt")
    return DSN(ret=args.ret, envid=args.envid, notify=notify,  # type: ignore[arg-type]
               orcpt=None if args.orcpt is None else tuple(args.orcpt))


def _check_utf8(what: str, address: str) -> None:
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        # Bytes that are not UTF-8 on the command line arrive as surrogates.
        shown = address.encode("utf-8", "surrogateescape")
        raise LocalProtocolError(f"{what} {shown!r} is not valid UTF-8") from None


def run(args: argparse.Namespace) -> int:
    try:
        dest = parse_destination(args.server)
    except ConfigurationError as exc:
        return _fail(_exit.EX_USAGE, f"--server: {exc}")
    try:
        _check_utf8("--from", args.sender)
        for r in args.recipients:
            _check_utf8("--rcpt", r)
    except LocalProtocolError as exc:
        return _fail(_exit.EX_USAGE, str(exc))
    try:
        timeouts = Timeouts.scaled(args.timeout_scale)
    except ConfigurationError as exc:
        return _fail(_exit.EX_USAGE, f"--timeout-scale: {exc}")
    try:
        tls, auth = _security.policies(args, dest)
    except ConfigurationError as exc:
        return _fail(_exit.EX_CONFIG if exc.source else _exit.EX_USAGE, str(exc))
    try:
        message = _read_message(args.file, args.max_size)
    except OSError as exc:
        return _fail(_exit.EX_NOINPUT, f"cannot read {args.file}: {exc.strerror or exc}")
    except _input.TooBig as exc:
        # Refused for every recipient before anything is sent, as the
        # server's own SIZE refusal would be (552 5.3.4).
        too_big = FAILURES["too-big"].results(args.recipients, detail=exc)
        return _report(too_big, args, str(exc))
    # The request is checked once, before connecting (Delivery.build): a NUL
    # is refused for every recipient, a bad address is a usage error.
    try:
        delivery = Delivery.build(message, sender=args.sender, recipients=args.recipients,
                                  dsn=_dsn(args))
    except ContentError as exc:
        return _report(failure_results(exc, args.recipients), args, str(exc))
    except LocalProtocolError as exc:
        return _fail(_exit.EX_USAGE, str(exc))
    if delivery.refused:
        return _fail(_exit.EX_USAGE, "; ".join(r.text for r in delivery.refused.values()))

    options: dict[str, Any] = dict(lhlo_name=args.lhlo_name, timeouts=timeouts,
                                   pipelining=not args.no_pipelining, tls=tls, auth=auth)
    try:
        if dest.kind == "command":
            from . import _run  # the event loop, only for a program to run

            results = _run.run(_deliver_async(dest, delivery, options))
        else:
            # One message, then exit: a blocking session (no event loop to start).
            conn = connect_sync(dest, **options)
            try:
                results = conn.send(delivery)
            finally:
                conn.quit()
    except (LMTPError, OSError) as exc:
        # The session could not be set up: the failure table says what each
        # recipient gets, as it says it for the agent and replay.
        return _report(failure_results(exc, args.recipients, destination=str(dest)), args,
                       f"{dest}: {exc}")
    return _report(results, args)


async def _deliver_async(dest: Destination, delivery: Delivery,
                         options: dict[str, Any]) -> list[RecipientResult]:
    # A command: destination runs a program, which needs the event loop.
    conn = await connect(dest, **options)
    try:
        return await conn.send(delivery)
    finally:
        await conn.quit()


def _report(results: list[RecipientResult], args: argparse.Namespace,
            problem: str | None = None) -> int:
    """The results on standard output, then the problem (if any) on standard error."""
    # In this order: an MTA reads both as one stream and looks at its start.
    print_results(results, args.json)
    if problem:
        print(f"lmtpfast send: {problem}", file=sys.stderr)
    return _exit.status_for(results)
