"""``lmtpfast queue``: see and manage queued mail, as ``mailq``/``postqueue``/``postsuper`` do.

Every action goes through the queue interface (:class:`lmtpfast.spool.Queue`),
so the same commands work on the embedded store, the directory spool and the
PostgreSQL queue, and they are safe while replays run: an entry being
delivered is never changed behind the replay's back (it is reported *busy*;
run the command again after the attempt). Each change is logged, one line
per entry (``--log-target``, default syslog when ``/dev/log`` exists).

    lmtpfast queue list SPOOL [filters] [--json]
    lmtpfast queue show SPOOL ID [--json] [--body]
    lmtpfast queue hold|release|retry|delete|bounce|requeue SPOOL (ID... | - | filters | --all)
        [--dry-run] [--json]
    lmtpfast queue import SPOOL      a directory spool into its store (replay does it too)
    lmtpfast queue import SPOOL --queue postgresql://...   a spool into a PostgreSQL queue
    lmtpfast queue init postgresql://...                   create or migrate its schema
    lmtpfast queue salvage SPOOL     rebuild a damaged queue.db

Exit status: 0 done (a filter that matches nothing is not an error); 75 some
entries were being delivered and were left alone (try again); 66 some IDs
were not found, or the queue is missing; 64 bad usage; 74 the queue refused
a write.
"""

from __future__ import annotations

import argparse
import datetime
import email.parser
import email.policy
import errno
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import IO, Any

import msgspec

from lmtpfast.spool import (
    ActionResult,
    EntryInfo,
    PgQueue,
    Queue,
    QueueError,
    QueueWriteError,
    Reason,
    Selection,
    SQLiteStore,
    open_queue,
    write_bounce,
)

from . import _exit, _log, _run
from ._options import add_json, add_quiet, parse_duration

__all__ = ["register"]

ACTIONS = ("hold", "release", "retry", "delete", "bounce", "requeue")
STATES = ("queued", "held", "failed", "quarantined")
# Which states each action applies to (the interface's rules; a dry run shows the same).
_ACTS_ON: dict[str, tuple[str, ...]] = {
    "hold": ("queued",), "release": ("held",), "retry": ("queued",),
    "delete": STATES, "bounce": ("queued", "held"), "requeue": ("failed", "quarantined"),
}
_PAST = {"hold": "placed on hold", "release": "released from hold", "retry": "made due now",
         "delete": "deleted", "bounce": "bounced", "requeue": "requeued"}
# mailq's markers after the id: being delivered, on hold; ours for failed/quarantined.
_MARK = {"held": "!", "failed": "#", "quarantined": "?"}
_BOUNCE_REASON = "message returned to sender by the operator (lmtpfast queue bounce)"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "queue", help="list, inspect, hold, release, retry, delete, bounce, requeue queued mail",
        description="Manage the mail queue of a spool (the embedded store, a directory spool "
        "'dir:PATH', or 'postgresql://...'), as postqueue/postsuper do for Postfix. Safe while "
        "replays run: entries being delivered are left alone and reported busy. Exit status: "
        "0 done, 75 some entries were busy, 66 unknown ids or no such queue, 64 bad usage, "
        "74 the queue refused a write.")
    qsub = p.add_subparsers(dest="queue_command", metavar="ACTION", parser_class=type(p))

    lp = qsub.add_parser("list", help="list entries (mailq / postqueue -p)",
                         description="One entry per block: id (marked * while being "
                         "delivered, ! on hold, # failed, ? quarantined), size, arrival, "
                         "sender, then each remaining recipient with its last reply. Default: "
                         "queued and held entries. --json: one object a line (postqueue -j's "
                         "fields and ours).")
    _queue_arg(lp)
    _filters(lp, states_default="queued,held")
    add_json(lp, "one object a line per entry (postqueue -j's fields and ours)")
    lp.set_defaults(func=_run_list)

    sp = qsub.add_parser("show", help="one entry: envelope, attempts, replies, headers",
                         description="Print an entry's envelope (sender, recipients with state, "
                         "attempts and last reply, DSN parameters), its queue bookkeeping and "
                         "the message header (--body: the whole message, as postcat -bh).")
    _queue_arg(sp)
    sp.add_argument("id", metavar="ID", help="the entry's id (as queue list prints it)")
    sp.add_argument("--body", action="store_true", help="print the whole message too")
    add_json(sp, "the entry, one object")
    sp.set_defaults(func=_run_show)

    helps = {
        "hold": "put queued entries on hold: no replay touches them (postsuper -h)",
        "release": "take entries off hold, due now (postsuper -H)",
        "retry": "make queued entries due now (postqueue -f, postqueue -i ID)",
        "delete": "remove entries, in any state (postsuper -d)",
        "bounce": "fail every queued recipient and write RFC 3464 bounces (postsuper -e + bounce)",
        "requeue": "put failed/ (and readable quarantined) entries back in the queue, due now",
    }
    for action in ACTIONS:
        ap = qsub.add_parser(action, help=helps[action],
                             description=f"{helps[action][0].upper()}{helps[action][1:]}. "
                             "Select entries by ID (or '-': ids from stdin, one a line), by "
                             "filters, or --all; without any of them nothing is done. "
                             f"Applies to entries that are {' or '.join(_ACTS_ON[action])}.")
        _queue_arg(ap)
        ap.add_argument("ids", metavar="ID", nargs="*", help="entry ids, or - to read them")
        _filters(ap, states_default=None)
        ap.add_argument("--all", action="store_true", help="every entry the action applies to")
        ap.add_argument("--dry-run", "-n", action="store_true",
                        help="only print what would be done")
        add_json(ap, "one {id, action, result} object a line per entry")
        add_quiet(ap, "no per-entry lines")
        if action == "bounce":
            ap.add_argument("--bounce-dir", metavar="DIR",
                            help="write the RFC 3464 bounce for each sender here (as replay "
                            "--bounce-dir); without it the entries only become failed")
            ap.add_argument("--reason", metavar="TEXT", default=_BOUNCE_REASON,
                            help="the text the bounce gives (code 554 5.0.0)")
        ap.set_defaults(func=_run_action, action=action)

    ip = qsub.add_parser("import", help="convert a directory spool into the spool's store",
                         description="Move every entry of the directory spool at SPOOL "
                         "(incoming/, deferred/, failed/) into its embedded store "
                         "(SPOOL/queue.db), with its whole state (recipients, replies, "
                         "attempts, next attempt, DSN). Each entry is claimed as a replay "
                         "claims it, committed to the store, then removed from the directory; "
                         "a rerun (or a crash) never queues one twice. Entries an older replay "
                         "holds are left for the next run (exit 75). `lmtpfast replay SPOOL` "
                         "does the same at the start of each pass.")
    ip.add_argument("queue", metavar="SPOOL", help="a directory spool")
    ip.add_argument("--queue", dest="into", metavar="URL",
                    help="move SPOOL's entries (its directory spool and its store) into this "
                    "PostgreSQL queue instead (postgresql://..., made by 'queue init'); "
                    "idempotent when rerun")
    ip.set_defaults(func=_run_import)

    np = qsub.add_parser("init", help="create or upgrade a PostgreSQL queue's schema",
                         description="Create the schema 'lmtpfast' (tables msg, body, rcpt, "
                         "imported; docs/queue.md) in the database of URL, or migrate an "
                         "older version; nothing changes when it is current. Safe while "
                         "workers run. Exit status: 0 done, 75 the database cannot be "
                         "reached, 78 it refused (permissions, a newer schema).")
    np.add_argument("queue", metavar="URL", nargs="?", help="postgresql://user@host/db")
    np.add_argument("--queue", dest="url", metavar="URL", help="the same, as an option")
    np.set_defaults(func=_run_init)

    vp = qsub.add_parser("salvage", help="rebuild a damaged queue.db, losing no message",
                         description="Copy every readable entry of SPOOL/queue.db into a fresh "
                         "database; a message whose entry cannot be read is rebuilt from its "
                         "content record and quarantined (it may have been delivered: "
                         "`lmtpfast queue requeue` sends it). The damaged files go to "
                         "SPOOL/quarantine/. Needs the store to itself (exit 75 while a replay "
                         "or an enqueue uses it). `lmtpfast replay` does it by itself when it "
                         "can.")
    vp.add_argument("queue", metavar="SPOOL", help="a spool directory with queue.db")
    vp.set_defaults(func=_run_salvage)
    p.set_defaults(func=lambda args: _usage(p))


def _store_path(location: str) -> str:
    return location[7:] if location.startswith("sqlite:") else location


def _run_init(args: argparse.Namespace) -> int:
    url = args.url or args.queue
    if not url or not url.startswith(("postgresql://", "postgres://")):
        print("lmtpfast queue init: give a postgresql:// URL", file=sys.stderr)
        return _exit.EX_USAGE
    try:
        queue = PgQueue(url)
        before, after = _run.run(queue.init())
    except QueueWriteError as exc:
        print(f"lmtpfast queue init: {exc.strerror or exc}", file=sys.stderr)
        return _exit.EX_TEMPFAIL
    except QueueError as exc:
        print(f"lmtpfast queue init: {exc.strerror or exc}", file=sys.stderr)
        return _exit.EX_CONFIG
    print(f"{queue.location}: schema version {after}" + (
        " (created)" if before == 0 else f" (migrated from {before})" if before != after
        else " (already current)"))
    return _exit.EX_OK


def _run_import_pg(path: str, url: str) -> int:
    async def move() -> tuple[int, int, int, int, list[tuple[str, str]]]:
        async with PgQueue(url) as queue:
            a = await queue.import_dir(path) if _has_dir_spool(path) else None
            b = await queue.import_store(path)
        parts = [r for r in (a, b) if r is not None]
        return (sum(r.imported for r in parts), sum(r.failed for r in parts),
                sum(r.already for r in parts), sum(r.locked for r in parts),
                [q for r in parts for q in r.quarantined])

    try:
        imported, failed, already, locked, quarantined = _run.run(move())
    except QueueWriteError as exc:
        print(f"lmtpfast queue import: {exc.strerror or exc}", file=sys.stderr)
        return _exit.EX_TEMPFAIL
    except (QueueError, OSError) as exc:
        print(f"lmtpfast queue import: {exc.strerror or exc}", file=sys.stderr)
        return _exit.EX_NOINPUT
    for id, reason in quarantined:
        print(f"lmtpfast queue import: {id}: quarantined: {reason}", file=sys.stderr)
    print(f"imported {imported} queued and {failed} failed entries into "
          f"{PgQueue(url).location}" + (f" ({already} imported by an earlier run, removed "
                                        "here now)" if already else "")
          + (f"; {locked} held by a replay, left for the next run" if locked else ""))
    return _exit.EX_TEMPFAIL if locked else _exit.EX_OK


def _has_dir_spool(path: str) -> bool:
    return any(os.path.isdir(os.path.join(path, d)) for d in ("incoming", "deferred", "failed"))


def _run_import(args: argparse.Namespace) -> int:
    path = _store_path(args.queue)
    if not os.path.isdir(path):
        print(f"lmtpfast queue import: no spool at {path}", file=sys.stderr)
        return _exit.EX_NOINPUT
    if args.into:
        return _run_import_pg(path, args.into)
    try:
        with SQLiteStore(path, create=True) as store:
            report = store.import_dir()
    except (QueueError, OSError) as exc:
        print(f"lmtpfast queue import: {path}: {exc.strerror or exc}", file=sys.stderr)
        return _exit.EX_IOERR
    for id, reason in report.quarantined:
        print(f"lmtpfast queue import: {id}: quarantined: {reason}", file=sys.stderr)
    print(f"imported {report.imported} queued and {report.failed} failed entries into "
          f"{path}/queue.db"
          + (f"; {report.already} imported by an earlier run, removed from the directory now"
             if report.already else "")
          + (f"; {report.locked} held by a replay, left for the next run"
             if report.locked else ""))
    return _exit.EX_TEMPFAIL if report.locked else _exit.EX_OK


def _run_salvage(args: argparse.Namespace) -> int:
    path = _store_path(args.queue)
    if not os.path.lexists(os.path.join(path, "queue.db")):
        print(f"lmtpfast queue salvage: no queue.db in {path}", file=sys.stderr)
        return _exit.EX_NOINPUT
    try:
        report = SQLiteStore.salvage(path)
    except QueueError as exc:
        print(f"lmtpfast queue salvage: {path}: {exc.strerror or exc}", file=sys.stderr)
        return _exit.EX_TEMPFAIL if exc.errno == errno.EBUSY else _exit.EX_IOERR
    print(f"salvaged {path}/queue.db: {report.recovered} entries kept, {report.rebuilt} "
          "rebuilt from their content and quarantined"
          + (f"; damaged files moved to {', '.join(report.moved)}" if report.moved else ""))
    return _exit.EX_OK


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_usage(sys.stderr)
    return _exit.EX_USAGE


def _queue_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("queue", metavar="SPOOL",
                   help="spool directory (embedded store), dir:PATH, or postgresql://...")
    _log.add_arguments(p)


def _filters(p: argparse.ArgumentParser, *, states_default: str | None) -> None:
    g = p.add_argument_group("filters (all given must match)")
    g.add_argument("--sender", metavar="PATTERN", help="sender, shell pattern (*@example.org)")
    g.add_argument("--recipient", metavar="PATTERN", help="a remaining recipient, shell pattern")
    g.add_argument("--domain", metavar="DOMAIN", help="a remaining recipient's domain")
    g.add_argument("--older", type=parse_duration, metavar="T", help="arrived more than T ago")
    g.add_argument("--younger", type=parse_duration, metavar="T", help="arrived less than T ago")
    g.add_argument("--code", metavar="CODE",
                   help="a remaining recipient's last reply starts so (4, 452, 4.2.2)")
    g.add_argument("--state", metavar="LIST", default=states_default,
                   help=f"states, comma-separated: {', '.join(STATES)}"
                   + (f" (default {states_default})" if states_default else ""))


def _states(text: str | None) -> tuple[Any, ...] | None:
    if text is None or text == "all":
        return None
    states = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in states if s not in STATES]
    if bad or not states:
        raise ValueError(f"--state: unknown state {', '.join(bad) or repr(text)} "
                         f"(one of {', '.join(STATES)}, or all)")
    return states


def _selection(args: argparse.Namespace, ids: tuple[str, ...] | None) -> Selection:
    return Selection(ids=ids, states=_states(args.state), sender=args.sender,
                     recipient=args.recipient, domain=args.domain, older=args.older,
                     younger=args.younger, code=args.code)


def _has_filter(args: argparse.Namespace) -> bool:
    return any(getattr(args, k) is not None for k in ("sender", "recipient", "domain", "older",
                                                       "younger", "code", "state"))


def _open(args: argparse.Namespace) -> Queue | int:
    location = args.queue
    if not location.startswith(("postgresql://", "postgres://")) and not os.path.exists(
            location.split(":", 1)[1] if location.startswith(("dir:", "sqlite:")) else location):
        print(f"lmtpfast queue: no queue at {location}", file=sys.stderr)
        return _exit.EX_NOINPUT
    try:
        return open_queue(location, convert=False)
    except QueueError as exc:
        print(f"lmtpfast queue: cannot use {location}: {exc.strerror or exc}", file=sys.stderr)
        return _exit.EX_NOINPUT


def _main(args: argparse.Namespace, body: Callable[[Queue], Any]) -> int:
    q = _open(args)
    if isinstance(q, int):
        return q

    async def go() -> int:
        async with q:
            status: int = await body(q)
            return status

    try:
        return _run.run(go())
    except QueueWriteError as exc:
        print(f"lmtpfast queue: the queue refused a write: {exc.strerror or exc}",
              file=sys.stderr)
        return _exit.EX_IOERR
    except QueueError as exc:
        print(f"lmtpfast queue: {exc.strerror or exc}", file=sys.stderr)
        return _exit.EX_NOINPUT


# -- list ------------------------------------------------------------------------------


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%a %b %d %H:%M:%S", time.localtime(ts))


def _iso(ts: float | None) -> str | None:
    if not ts:
        return None
    return datetime.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def info_json(info: EntryInfo) -> dict[str, Any]:
    """An entry as one JSON object: ``postqueue -j``'s fields, then ours."""
    env = info.envelope
    rcpts = []
    if env is not None:
        for r in env.recipients:
            obj: dict[str, Any] = {"address": r.address, "state": r.state,
                                   "attempts": r.attempts}
            if r.last is not None:
                obj["delay_reason"] = _log.clean(r.last.line())
                obj["last"] = msgspec.to_builtins(r.last)
            if r.possibly_delivered:
                obj["possibly_delivered"] = True
            rcpts.append(obj)
    out: dict[str, Any] = {
        "queue_name": {"queued": "deferred" if env is not None and env.attempts else "incoming",
                       "held": "hold"}.get(info.state, info.state),
        "queue_id": info.id,
        "arrival_time": int(env.arrival) if env is not None and env.arrival else None,
        "message_size": info.size,
        "sender": env.sender if env is not None else None,
        "recipients": rcpts,
        "state": info.state,
        "claimed": info.claimed,
    }
    if env is not None:
        out.update(attempts=env.attempts, next_attempt=env.next_attempt or None,
                   last_attempt=env.last_attempt, delivered=env.delivered)
    if info.suspect:
        out["suspect"] = True
    if info.reason:
        out["reason"] = info.reason
    return out


async def _run_list_q(args: argparse.Namespace, q: Queue) -> int:
    out = sys.stdout
    selection = _selection(args, None)
    n = total_size = 0
    enc = msgspec.json.Encoder()
    if not args.json:
        print(f"{'-Queue ID-':<22} {'--Size--':>8} {'----Arrival Time----':<20} "
              "-Sender/Recipient-------", file=out)
    async for info in q.entries(selection):
        n += 1
        total_size += info.size
        if args.json:
            out.write(enc.encode(info_json(info)).decode() + "\n")
            continue
        _print_entry(out, info)
    if not args.json:
        if n:
            print(f"-- {max(1, total_size // 1024) if total_size else 0} Kbytes in {n} "
                  f"Request{'s' if n != 1 else ''}.", file=out)
        else:
            print("Mail queue is empty", file=out)
    out.flush()
    return _exit.EX_OK


def _print_entry(out: IO[str], info: EntryInfo) -> None:
    env = info.envelope
    mark = "*" if info.claimed else _MARK.get(info.state, " ")
    sender = env.sender if env is not None else "(envelope unreadable)"
    arrival = _when(env.arrival if env is not None else None)
    print(f"{info.id + mark:<22} {info.size:>8} {arrival:<20} {_log.clean(sender) or '<>'}",
          file=out)
    if info.reason:
        print(f"{'':<52}({_log.clean(info.reason)})", file=out)
    if env is not None:
        for r in env.recipients:
            if r.last is not None:
                print(f"{'':<44}({_log.clean(r.last.line())})", file=out)
            tag = "" if r.state == "queued" else f" [{r.state}]"
            dup = " [possibly delivered]" if r.possibly_delivered else ""
            print(f"{'':<44}{r.address}{tag}{dup}", file=out)
    print(file=out)


def _run_list(args: argparse.Namespace) -> int:
    try:
        _states(args.state)
    except ValueError as exc:
        print(f"lmtpfast queue: {exc}", file=sys.stderr)
        return _exit.EX_USAGE
    return _main(args, lambda q: _run_list_q(args, q))


# -- show ------------------------------------------------------------------------------


def _headers(content: bytes) -> list[tuple[str, str]]:
    end = len(content)
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = content.find(sep)
        if at >= 0:
            end = min(end, at)
    msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(content[:end])
    return [(k, _log.clean(str(v).replace("\r", "").replace("\n", " "))) for k, v in msg.items()]


async def _run_show_q(args: argparse.Namespace, q: Queue) -> int:
    info = await q.show(args.id)
    if info is None:
        print(f"lmtpfast queue: {args.id}: no such entry", file=sys.stderr)
        return _exit.EX_NOINPUT
    try:
        content = await q.content(args.id)
    except (KeyError, QueueError) as exc:
        content = None
        problem = str(exc)
    else:
        problem = ""
    out = sys.stdout
    if args.json:
        obj = info_json(info)
        env = info.envelope
        if env is not None:
            obj.update(ret=env.ret, envid=env.envid)
            for o, r in zip(obj["recipients"], env.recipients, strict=True):
                if r.notify:
                    o["notify"] = list(r.notify)
                if r.orcpt:
                    o["orcpt"] = r.orcpt
        obj["headers"] = [[k, v] for k, v in _headers(content)] if content is not None else None
        if args.body and content is not None:
            obj["body"] = content.decode("utf-8", "replace")
        out.write(msgspec.json.encode(obj).decode() + "\n")
        return _exit.EX_OK
    env = info.envelope
    rows = [("id", info.id), ("state", info.state + (" (being delivered)" if info.claimed
                                                     else "")),
            ("size", str(info.size))]
    if info.suspect:
        rows.append(("suspect", "a replay died holding it: recipients may be delivered twice"))
    if info.reason:
        rows.append(("reason", _log.clean(info.reason)))
    if env is not None:
        rows += [("sender", f"<{_log.clean(env.sender)}>"), ("arrival", _when(env.arrival)),
                 ("attempts", str(env.attempts)), ("last attempt", _when(env.last_attempt)),
                 ("next attempt", _when(env.next_attempt) if info.state == "queued" else "-"),
                 ("delivered so far", str(env.delivered))]
        if env.ret or env.envid:
            rows.append(("dsn", f"RET={env.ret or '-'} ENVID={env.envid or '-'}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k + ':':<{width + 1}} {v}", file=out)
    if env is not None:
        print("recipients:", file=out)
        for r in env.recipients:
            extra = []
            if r.possibly_delivered:
                extra.append("possibly delivered")
            if r.notify:
                extra.append("NOTIFY=" + ",".join(r.notify))
            if r.orcpt:
                extra.append(f"ORCPT={r.orcpt}")
            tail = f" ({'; '.join(extra)})" if extra else ""
            print(f"  <{r.address}> {r.state}, {r.attempts} attempt"
                  f"{'s' if r.attempts != 1 else ''}{tail}", file=out)
            if r.last is not None:
                at = f" at {_when(r.last.at)}" if r.last.at else ""
                where = f" from {_log.clean(r.last.destination)}" if r.last.destination else ""
                local = " (local)" if r.last.local else ""
                print(f"    last: {_log.clean(r.last.line())} [{r.last.stage or '-'}]{where}"
                      f"{at}{local}", file=out)
    if content is None:
        print(f"message: unreadable ({problem})", file=out)
        return _exit.EX_OK
    print("headers:", file=out)
    for k, v in _headers(content):
        print(f"  {k}: {v}", file=out)
    if args.body:
        print("message:", file=out)
        out.flush()
        sys.stdout.buffer.write(content)
        sys.stdout.buffer.flush()
    return _exit.EX_OK


def _run_show(args: argparse.Namespace) -> int:
    return _main(args, lambda q: _run_show_q(args, q))


# -- actions ------------------------------------------------------------------------------


def _read_ids(words: Iterable[str]) -> list[str]:
    ids: list[str] = []
    for w in words:
        if w == "-":
            ids.extend(line.strip() for line in sys.stdin if line.strip())
        else:
            ids.append(w)
    return ids


async def _targets(q: Queue, selection: Selection, action: str) -> AsyncIterator[EntryInfo]:
    acts_on = _ACTS_ON[action]
    async for info in q.entries(selection):
        if info.state in acts_on:
            yield info


async def _run_action_q(args: argparse.Namespace, q: Queue, log: _log.DeliveryLog,
                        selection: Selection) -> int:
    action: str = args.action
    out = sys.stdout
    enc = msgspec.json.Encoder()

    def line(id: str, result: str) -> None:
        if args.json:
            out.write(enc.encode({"id": id, "action": action, "result": result}).decode() + "\n")
        elif not args.quiet:
            print(f"{id}: {result}", file=out)

    if args.dry_run:
        n = 0
        async for info in _targets(q, selection, action):
            n += 1
            line(info.id, f"would be {_PAST[action]}" + (" (being delivered: busy now)"
                                                           if info.claimed else ""))
        if not args.json and not args.quiet:
            print(f"lmtpfast queue {action}: {n} entr{'y' if n == 1 else 'ies'} would be "
                  f"{_PAST[action]} (dry run)", file=sys.stderr)
        return _exit.EX_OK
    if action == "bounce":
        result = await q.bounce(selection, Reason(code=554, enhanced="5.0.0", text=args.reason,
                                                  stage="operator", local=True, at=time.time()))
        if args.bounce_dir:
            await _write_bounces(q, result, args.bounce_dir, log)
    else:
        result = await getattr(q, action)(selection)
    assert isinstance(result, ActionResult)
    who = _operator()
    for id in result.done:
        line(id, _PAST[action])
        log.event(id, f"{_PAST[action]} by {who} (lmtpfast queue {action})",
                  action=action, operator=who)
    for id in result.busy:
        line(id, "busy (being delivered): left alone, try again")
        log.event(id, f"{action} refused: being delivered (lmtpfast queue {action})",
                  action=action, result="busy", operator=who)
    missing = result.missing
    if selection.ids is None:
        missing = []  # filters only: an entry in another state is simply not selected
    for id in missing:
        line(id, f"not found (or not {' or '.join(_ACTS_ON[action])})")
    if not args.json and not args.quiet:
        n = len(result.done)
        print(f"lmtpfast queue {action}: {n} entr{'y' if n == 1 else 'ies'} {_PAST[action]}"
              + (f", {len(result.busy)} busy" if result.busy else "")
              + (f", {len(missing)} not found" if missing else ""), file=sys.stderr)
    if result.busy:
        return _exit.EX_TEMPFAIL
    if missing:
        return _exit.EX_NOINPUT
    return _exit.EX_OK


async def _write_bounces(q: Queue, result: ActionResult, bounce_dir: str,
                         log: _log.DeliveryLog) -> None:
    for id in result.done:
        info = await q.show(id)
        if info is None or info.envelope is None:
            continue
        try:
            content = await q.content(id)
            path = write_bounce(bounce_dir, id, info.envelope, content)
        except (OSError, KeyError) as exc:
            log.event(id, f"bounce not written: {exc}", level=40)
            print(f"lmtpfast queue bounce: {id}: bounce not written: {exc}", file=sys.stderr)
            continue
        if path is not None:
            log.event(id, f"sender non-delivery notification: {os.path.basename(path)}")


def _operator() -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()})"
    except (ImportError, KeyError):
        return f"uid {os.getuid()}"


def _run_action(args: argparse.Namespace) -> int:
    ids = _read_ids(args.ids)
    try:
        selection = _selection(args, tuple(ids) if ids else None)
    except ValueError as exc:
        print(f"lmtpfast queue: {exc}", file=sys.stderr)
        return _exit.EX_USAGE
    if not ids and not args.all and not _has_filter(args):
        print(f"lmtpfast queue {args.action}: give entry IDs, a filter, or --all",
              file=sys.stderr)
        return _exit.EX_USAGE
    if args.all and (ids or _has_filter(args)):
        print(f"lmtpfast queue {args.action}: --all goes alone (no IDs, no filters)",
              file=sys.stderr)
        return _exit.EX_USAGE
    if args.all or selection.states is None:
        selection = Selection(ids=selection.ids, states=_ACTS_ON[args.action],  # type: ignore[arg-type]
                              sender=selection.sender, recipient=selection.recipient,
                              domain=selection.domain, older=selection.older,
                              younger=selection.younger, code=selection.code)
    try:
        log = _log.open_log(args, "lmtpfast/queue", default_target=_log.default_target())
    except ValueError as exc:
        print(f"lmtpfast queue: {exc}", file=sys.stderr)
        return _exit.EX_USAGE
    try:
        return _main(args, lambda q: _run_action_q(args, q, log, selection))
    finally:
        log.close()
