"""``lmtpfast enqueue``: put messages into a spool (files, stdin, Maildir, mbox, .eml folder)."""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmtpfast.spool import ImportStats, PgWriter, Source, Spool, SQLiteStore

from . import _exit, _input
from ._location import configured_queue
from ._options import add_quiet

__all__ = ["register", "run"]

# The spool's names are imported by run(), not here (lmtpfast.spool loads each
# module on first use): building the parser (every command's --help) must not
# load the store, and queueing into the embedded store never loads the
# PostgreSQL queue.


def register(sub: Any) -> None:
    p = sub.add_parser(
        "enqueue",
        help="queue messages in a spool directory",
        description="Queue messages for `lmtpfast replay`: message files (or standard input), "
        "or every message of a Maildir folder, an mbox file or a folder of .eml files. The "
        "envelope is --from/--rcpt, or with --from-headers each message's Return-Path and "
        "Delivered-To / X-Original-To (the command line fills the gaps). Messages go into "
        "the spool's embedded store (SPOOL/queue.db) in groups (group commit: up to 50,000 "
        "messages, 64 MiB or one second each), each group's content flushed to disk and its "
        "rows committed at once before the next is read: what the command reports queued "
        "is on disk when it exits. dir:PATH writes a directory "
        "spool instead (one file pair per message), and so does a directory spool no replay "
        "has converted yet (so an older replay still sees what is queued). FILEs are all "
        "checked (readable, not larger than --max-size) "
        "before the first is queued, so a missing one queues nothing and a rerun cannot "
        "duplicate; should an input fail midway (an mbox that is not one), what was read "
        "before is queued and named. Exit status: 0 all queued, 65 some skipped (no "
        "envelope, bad address, a NUL byte, too large) or an input that is not what it was "
        "given as, 64 bad usage, 66 unreadable input, 74 spool not writable, 75 the write "
        "failed (try again).",
    )
    p.add_argument("spool", metavar="SPOOL", nargs="?",
                   help="spool directory (created if missing; dir:PATH for a directory spool)")
    p.add_argument("--queue", metavar="QUEUE",
                   help="the queue instead of SPOOL: postgresql://... (docs/queue.md) or a "
                   "spool; then every positional word is a FILE")
    p.add_argument("--config", metavar="FILE",
                   help="take the queue from this configuration's 'queue' when neither SPOOL "
                   "nor --queue is given")
    p.add_argument("files", nargs="*", metavar="FILE", help="message files; - or none: stdin")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--maildir", metavar="DIR", help="import every message of a Maildir folder")
    src.add_argument("--mbox", metavar="FILE", help="import every message of an mbox file")
    src.add_argument("--eml-dir", metavar="DIR", help="import every *.eml file of a folder")
    p.add_argument("--recursive", action="store_true", help="--eml-dir: include sub-folders")
    p.add_argument("--from", dest="sender", metavar="ADDR",
                   help="envelope sender ('' for the null sender)")
    p.add_argument("--rcpt", dest="recipients", action="append", default=[], metavar="ADDR",
                   help="envelope recipient (repeat for more)")
    p.add_argument("--from-headers", action="store_true",
                   help="take the envelope from Return-Path and Delivered-To/X-Original-To")
    p.add_argument("--ret", choices=("FULL", "HDRS"), help="DSN RET: what a bounce returns")
    p.add_argument("--envid", metavar="ID", help="DSN ENVID")
    p.add_argument("--notify", metavar="LIST",
                   help="DSN NOTIFY for every recipient: NEVER or SUCCESS,FAILURE,DELAY")
    p.add_argument("--no-fsync", action="store_true",
                   help="do not flush to disk (faster; keep the source until the replay is "
                   "done)")
    p.add_argument("--max-size", type=_input.parse_size, default=_input.DEFAULT_MAX_SIZE,
                   metavar="N", help="refuse FILEs and standard input larger than N bytes "
                   f"(k, m, g suffixes; 0: no limit; default "
                   f"{_input.DEFAULT_MAX_SIZE // 1024 // 1024}m)")
    add_quiet(p, "print nothing but errors")
    p.set_defaults(func=run)
    _files_anywhere(p)


def _files_anywhere(p: argparse.ArgumentParser) -> None:
    # argparse takes positionals only where they first appear, so FILEs after
    # the options ("enqueue SPOOL --from a --rcpt b m.eml") would be "unrecognized":
    # collect the stray non-option words as FILEs instead.
    original = p.parse_known_args

    def parse_known_args(args: Any = None, namespace: Any = None) -> Any:
        ns, extras = original(args, namespace)
        files = [e for e in extras if e == "-" or not e.startswith("-")]
        ns.files = [*(ns.files or []), *files]
        return ns, [e for e in extras if not (e == "-" or not e.startswith("-"))]

    setattr(p, "parse_known_args", parse_known_args)  # noqa: B010


def _files(names: list[str], limit: int) -> Iterator[Source]:
    from lmtpfast.spool import Source

    for name in names or ["-"]:
        if name == "-":
            yield Source("<stdin>", _input.read_limited(sys.stdin.buffer, limit))
        else:
            with open(name, "rb") as f:
                yield Source(name, _input.read_limited(f, limit))


def _check_files(names: list[str], limit: int) -> str | None:
    """Why some FILE cannot be queued (``None``: all can), checked before queueing any."""
    for name in names:
        if name == "-":
            continue
        try:
            st = os.stat(name)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "Is a directory")
            with open(name, "rb"):
                pass
        except OSError as exc:
            return f"cannot read {name}: {exc.strerror or exc}"
        if limit and stat.S_ISREG(st.st_mode) and st.st_size > limit:
            return f"{name}: message larger than {limit} bytes (--max-size {limit})"
    return None


def _stopped(stats: ImportStats, problem: str, status: int) -> int:
    """Stopped by an error midway: say exactly what was queued before it."""
    for p in stats.problems:
        print(f"lmtpfast enqueue: skipped {p}", file=sys.stderr)
    done = ", ".join(f"{origin} as {id}" for origin, id in stats.ids)
    print(f"lmtpfast enqueue: {problem}; stopped"
          + (f" after queueing {len(stats.ids)} message(s): {done}" if stats.ids
             else "; nothing queued"), file=sys.stderr)
    return status


def run(args: argparse.Namespace) -> int:
    from lmtpfast.spool import BadEnvelope, QueueError, Spool, SpoolError, check_address, open_spool

    imported = args.maildir or args.mbox or args.eml_dir
    if imported and args.files:
        print("lmtpfast enqueue: give FILEs or one of --maildir/--mbox/--eml-dir, not both",
              file=sys.stderr)
        return _exit.EX_USAGE
    if not args.from_headers and (args.sender is None or not args.recipients):
        print("lmtpfast enqueue: give --from and --rcpt (or --from-headers)", file=sys.stderr)
        return _exit.EX_USAGE
    try:
        if args.sender is not None:
            check_address(args.sender, sender=True)
        for r in args.recipients:
            check_address(r)
    except BadEnvelope as exc:
        print(f"lmtpfast enqueue: {exc}", file=sys.stderr)
        return _exit.EX_USAGE
    options: dict[str, Any] = {}
    if args.ret:
        options["ret"] = args.ret
    if args.envid:
        options["envid"] = args.envid
    if args.notify:
        options["notify"] = tuple(w.strip() for w in args.notify.split(",") if w.strip())
    where = _location(args)
    if isinstance(where, int):
        return where
    spool: Spool | SQLiteStore | PgWriter
    try:
        spool = open_spool(where)
    except (SpoolError, QueueError, OSError) as exc:
        print(f"lmtpfast enqueue: cannot use spool {where}: {exc.strerror or exc}",
              file=sys.stderr)
        return _exit.EX_IOERR
    try:
        return _enqueue(args, spool, options)
    finally:
        if not isinstance(spool, Spool):
            spool.close()


def _location(args: argparse.Namespace) -> str | int:
    """Where to queue: SPOOL, --queue or the configuration's ``queue`` (else an exit status)."""
    if args.queue:
        if args.spool:  # with --queue every positional word is a message file
            args.files = [args.spool, *args.files]
        return str(args.queue)
    if args.spool:
        return str(args.spool)
    configured = configured_queue("enqueue", args.config)
    if configured is not None:
        return configured
    print("lmtpfast enqueue: give SPOOL (or --queue, or --config with 'queue')",
          file=sys.stderr)
    return _exit.EX_USAGE


def _enqueue(args: argparse.Namespace, spool: Spool | SQLiteStore | PgWriter,
             options: dict[str, Any]
             ) -> int:
    from lmtpfast.spool import (
        BadEnvelope,
        BadSource,
        ImportStats,
        QueueError,
        QueueWriteError,
        import_messages,
        iter_eml_dir,
        iter_maildir,
        iter_mbox,
    )

    if args.maildir:
        sources: Iterator[Source] = iter_maildir(args.maildir)
    elif args.mbox:
        sources = iter_mbox(args.mbox)
    elif args.eml_dir:
        sources = iter_eml_dir(args.eml_dir, recursive=args.recursive)
    else:
        problem = _check_files(args.files, args.max_size)
        if problem is not None:
            print(f"lmtpfast enqueue: {problem}; nothing queued", file=sys.stderr)
            return _exit.EX_DATAERR if "larger than" in problem else _exit.EX_NOINPUT
        sources = _files(args.files, args.max_size)
    stats = ImportStats()
    try:
        import_messages(spool, sources, sender=args.sender, recipients=args.recipients or None,
                        from_headers=args.from_headers, fsync=not args.no_fsync,
                        options=options, stats=stats)
    except BadEnvelope as exc:
        return _stopped(stats, str(exc), _exit.EX_USAGE)
    except (_input.TooBig, BadSource) as exc:
        return _stopped(stats, str(exc), _exit.EX_DATAERR)
    except QueueWriteError as exc:
        # Ours (the database is down): the sender keeps the mail and tries again.
        return _stopped(stats, f"the queue refused the write: {exc.strerror or exc}",
                        _exit.EX_TEMPFAIL)
    except QueueError as exc:  # no such queue (no schema, a wrong password)
        return _stopped(stats, f"cannot use the queue: {exc.strerror or exc}",
                        _exit.EX_NOINPUT)
    except (FileNotFoundError, IsADirectoryError, PermissionError, ValueError) as exc:
        return _stopped(stats, str(exc), _exit.EX_NOINPUT)
    except OSError as exc:
        return _stopped(stats, str(exc), _exit.EX_IOERR)
    for problem in stats.problems:
        print(f"lmtpfast enqueue: skipped {problem}", file=sys.stderr)
    if not args.quiet:
        print(f"queued {stats.queued} message(s) in {spool.path}"
              + (f", skipped {stats.skipped}" if stats.skipped else ""))
    return _exit.EX_DATAERR if stats.skipped else _exit.EX_OK
