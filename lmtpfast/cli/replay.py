"""``lmtpfast replay``: deliver a spool, crash-safe; ``--demo`` shows it end to end.

SPOOL is a spool directory (its embedded store, ``SPOOL/queue.db``; a
directory spool found there is converted into it as the first pass goes, see
docs/spool.md), ``dir:PATH`` for the directory spool itself, or a queue URL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import msgspec

from lmtpfast import Agent, ConfigurationError, Timeouts
from lmtpfast.spool import (
    Observer,
    Outcome,
    PgQueue,
    PgShapingState,
    Queue,
    QueueCorrupt,
    QueueError,
    QueueWriteError,
    Replayer,
    RetryPolicy,
    SpoolError,
    SQLiteStore,
    Totals,
    exit_status,
    open_queue,
)

from . import _exit, _output, _run, _security
from ._location import configured_queue
from ._options import add_json, add_pace, add_quiet, parse_duration

__all__ = ["parse_duration", "register", "run"]

# Failures listed after the summary without -v (the JSON report has them all).
_SHOW_FAILURES = 20


def register(sub: Any) -> None:
    p = sub.add_parser(
        "replay",
        help="deliver the messages of a spool",
        description="Deliver the due messages of a spool (see docs/spool.md) over LMTP. "
        "SPOOL is a spool directory, whose embedded store (SPOOL/queue.db) is used; a "
        "directory spool found there (incoming/, deferred/, failed/) is converted into the "
        "store by the first pass, entry by entry and without loss (`lmtpfast queue import` "
        "does it on demand); dir:PATH replays a directory spool as it is. Delivered "
        "recipients leave the envelope; a message leaves the queue once every recipient has "
        "a final outcome (all delivered: removed; else kept as failed with the reasons). "
        "Temporary failures stay queued with exponential backoff until "
        "--max-queue-lifetime. Several replays may share one spool; a damaged store is "
        "salvaged when no other process uses it. Exit status: 0 all delivered, 75 anything "
        "still queued, 65 every undelivered recipient refused for good (or entries "
        "quarantined), 64 bad usage, 66 unreadable spool, 78 bad configuration.",
    )
    p.add_argument("spool", nargs="?", metavar="SPOOL",
                   help="spool directory (dir:PATH for a directory spool as it is)")
    p.add_argument("--queue", metavar="QUEUE",
                   help="the queue instead of SPOOL: postgresql://... for one shared by many "
                   "hosts (docs/queue.md), or a spool; default: the configuration's 'queue'")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--server", metavar="DEST",
                        help="unix:/path, host:port, [ipv6]:port, 'command:PROGRAM ARGS'")
    target.add_argument("--config", metavar="FILE", help="agent configuration (lmtpfast.toml)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true",
                      help="one pass over the due messages (default)")
    mode.add_argument("--watch", action="store_true",
                      help="keep delivering new and due messages until SIGINT/SIGTERM")
    add_pace(p)
    add_json(p, "the report (every outcome, the summary) at the end, instead of the text "
             "summary")
    p.add_argument("--report", metavar="FILE", dest="json_report",
                   help="write the JSON report (as --json prints it) to FILE")
    p.add_argument("--flush", action="store_true",
                   help="try deferred messages now, whatever their next attempt time")
    p.add_argument("--interval", type=parse_duration, default=1.0, metavar="T",
                   help="--watch: pause between idle scans (default 1s)")
    p.add_argument("--bounce-dir", metavar="DIR",
                   help="write an RFC 3464 bounce for the sender of each failed message here")
    p.add_argument("--timeout-scale", type=float, default=1.0, metavar="F",
                   help="multiply every Postfix default timeout by F (without the agent)")
    _security.add_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="print every recipient outcome")
    add_quiet(p, "no progress and no summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="event loop (default: uvloop when installed)")
    p.add_argument("--demo", action="store_true",
                   help="replay the bundled example spool into a temporary `lmtpfast sink`")
    p.set_defaults(func=run)


# -- reporting ---------------------------------------------------------------------


class _JsonReport:
    """Streams ``{"outcomes": [...], "summary": {...}, "exit_status": N}`` to a file.

    Outcomes are written as they happen, so the report costs no memory; the
    file appears under its name only when complete (temporary name, rename).
    A write error (a full disk) never stops the replay: the report is
    abandoned, its temporary file removed, and :attr:`error` says why.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        # Beside the target (the rename must not cross file systems), under a
        # name nobody can guess or plant a link at, private like the spool.
        folder, name = os.path.split(path)
        self.tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
        if path == "-":  # standard output (--json): written as it goes, nothing renamed
            self.tmp = ""
            self._f: IO[bytes] | None = sys.stdout.buffer
            self._first = True
            self._enc = msgspec.json.Encoder()
            self.error: OSError | None = None
            self._write(b'{"version":1,"outcomes":[\n')
            return
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        self._f = open(fd, "wb")  # noqa: SIM115 (closed in finish/abort)
        self._first = True
        self._enc = msgspec.json.Encoder()
        #: Why the report could not be written (``None`` while it can).
        self.error = None
        self._write(b'{"version":1,"outcomes":[\n')

    def _write(self, data: bytes) -> None:
        if self._f is None:
            return
        try:
            self._f.write(data)
        except OSError as exc:
            self.error = exc
            self.abort()

    def add(self, outcome: Outcome) -> None:
        if not self._first:
            self._write(b",\n")
        self._first = False
        self._write(self._enc.encode(outcome))

    def flush(self) -> None:
        """Hand what is written to the OS (a ``kill -9`` then loses none of it)."""
        if self._f is None:
            return
        try:
            self._f.flush()
        except OSError as exc:
            self.error = exc
            self.abort()

    def finish(self, totals: Totals, status: int, metrics: dict[str, Any] | None = None) -> None:
        self._write(b'\n],"summary":')
        summary = self._enc.encode(totals)
        if metrics is not None:  # the counters of the Prometheus endpoint, by the same names
            summary = summary[:-1] + b',"metrics":' + self._enc.encode(metrics) + b"}"
        self._write(summary)
        self._write(b',"exit_status":%d}\n' % status)
        if self._f is None:
            return
        if not self.tmp:
            self.flush()
            self._f = None
            return
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.error = exc
            self.abort()

    def abort(self) -> None:
        f, self._f = self._f, None
        if not self.tmp:
            return  # standard output: nothing to close or remove
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


class _Progress:
    """A rich progress bar on stderr (messages, recipients, rate, ETA, failures)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]replay"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("msgs"),
            TextColumn("{task.fields[rate]:>7.0f} msg/s"),
            TextColumn("{task.fields[rcpts]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
            refresh_per_second=8,
        )
        self._task = self._progress.add_task("replay", total=None, rate=0.0, rcpts="")
        self._start = time.monotonic()
        self._progress.start()

    def total(self, n: int | None) -> None:
        self._progress.update(self._task, total=n)

    def update(self, t: Totals) -> None:
        done = t.messages + t.messages_quarantined + t.locked
        elapsed = max(time.monotonic() - self._start, 1e-6)
        rcpts = (f"rcpts {t.recipients_delivered} ok, {t.recipients_deferred} deferred, "
                 f"{t.recipients_failed + t.recipients_expired} failed"
                 + (f", {t.messages_quarantined} quarantined" if t.messages_quarantined else ""))
        self._progress.update(self._task, completed=done, rate=t.messages / elapsed, rcpts=rcpts)

    def stop(self) -> None:
        self._progress.stop()


class _CliObserver(Observer):
    def __init__(self, *, verbose: bool, progress: bool, report: _JsonReport | None) -> None:
        self.verbose = verbose
        self.report = report
        # Delivered outcomes are only printed (-v) or reported (--json).
        self.report_delivered = verbose or report is not None
        self.failures: list[Outcome] = []
        self.more_failures = 0
        self.duplicates = 0
        self.bar: _Progress | None = None
        self._last = 0.0
        self._totals: Totals | None = None
        if progress:
            try:
                self.bar = _Progress()
            except ImportError:
                self.bar = None  # rich missing: no bar (plain summary still printed)

    def pass_started(self, total: int | None) -> None:
        if self.bar is not None:
            self.bar.total(total)

    def _emit(self, o: Outcome) -> None:
        if self.report is not None:
            self.report.add(o)
        if self.verbose:
            self._print(o.line())
        elif o.outcome != "delivered":
            if len(self.failures) < _SHOW_FAILURES:
                self.failures.append(o)
            else:
                self.more_failures += 1

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar._progress.console.print(line, markup=False, highlight=False)
        else:
            _output.print_line(line)

    def outcome(self, outcome: Outcome) -> None:
        self._emit(outcome)

    def recording(self, n: int) -> None:
        # The queue is about to forget these entries: their report lines first.
        if self.report is not None:
            self.report.flush()

    def quarantined(self, id: str, reason: str) -> None:
        self._emit(Outcome(id=id, recipient="", outcome="quarantined", code=0, enhanced=None,
                           text=reason, stage="spool"))
        if self._totals is not None:
            self._tick(self._totals)

    def error(self, id: str, problem: str) -> None:
        self._stderr(f"lmtpfast replay: {id}: {problem}")

    def notice(self, text: str) -> None:
        self._stderr(f"lmtpfast replay: {text}")

    def backing_off(self, problem: str, delay: float) -> None:
        self._stderr(f"lmtpfast replay: spool write failed ({problem}): backing off, no new "
                     f"delivery for {delay:g} s")

    def _stderr(self, msg: str) -> None:
        if self.bar is not None:
            self.bar._progress.console.print(msg, markup=False, highlight=False)
        else:
            print(msg, file=sys.stderr)

    def message_done(self, totals: Totals) -> None:
        self._totals = totals
        self._tick(totals)

    def skipped(self, totals: Totals) -> None:
        self._totals = totals
        self._tick(totals)

    def _tick(self, totals: Totals) -> None:
        if self.bar is None:
            return
        now = time.monotonic()
        if now - self._last >= 0.1:
            self._last = now
            self.bar.update(totals)

    def close(self, totals: Totals) -> None:
        if self.bar is not None:
            self.bar.update(totals)
            self.bar.stop()


def _summary_rows(t: Totals, counts: dict[str, int] | None) -> list[tuple[str, str]]:
    rate = t.messages / t.elapsed if t.elapsed > 0 else 0.0
    rows = [
        ("messages attempted", f"{t.messages}"),
        ("  all delivered (removed)", f"{t.messages_delivered}"),
        ("  failed for good (kept)", f"{t.messages_failed}"),
        ("  deferred (still queued)", f"{t.messages_deferred}"),
        ("entries quarantined", f"{t.messages_quarantined}"),
        ("recipients delivered", f"{t.recipients_delivered}"),
        ("  possibly duplicated", f"{t.possibly_duplicated}"),
        ("recipients failed", f"{t.recipients_failed}"),
        ("recipients expired", f"{t.recipients_expired}"),
        ("recipients deferred", f"{t.recipients_deferred}"),
        ("held by another replay", f"{t.locked}"),
        ("deferred, not yet due", f"{t.not_due}"),
        ("left queued after an error", f"{t.errors}"),
        ("spool write errors", f"{t.spool_errors}"),
        ("outcomes not recorded", f"{t.unrecorded}"),
        ("elapsed", f"{t.elapsed:.2f} s"),
        ("rate", f"{rate:,.0f} msg/s"),
    ]
    if counts is not None:
        rows.append(("spool now", ", ".join(f"{k} {v}" for k, v in counts.items())))
    return rows


def _print_summary(t: Totals, obs: _CliObserver, counts: dict[str, int] | None,
                   status: int) -> None:
    say = _output.print_line  # a reader gone (| head) changes nothing
    if obs.failures and not obs.verbose:
        say("not delivered:")
        for o in obs.failures:
            say("  " + o.line())
        if obs.more_failures:
            say(f"  ... and {obs.more_failures} more (see --report)")
    rows = _summary_rows(t, counts)
    rows.append(("exit status", str(status)))
    if not _output.stdout_gone() and sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            table = Table(title="lmtpfast replay", show_header=False)
            table.add_column("what")
            table.add_column("count", justify="right")
            for k, v in rows:
                table.add_row(k, v)
            Console().print(table)
            return
    width = max(len(k) for k, _ in rows)
    for n, (k, v) in enumerate(rows, 1):
        say(f"{k:<{width}}  {v}", flush=n == len(rows))


# -- running -----------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    if args.demo:
        return _demo(args)
    if args.server is None and args.config is None:
        print("lmtpfast replay: give --server DEST or --config FILE", file=sys.stderr)
        return _exit.EX_USAGE
    where = _location(args)
    if isinstance(where, int):
        return where
    args.spool = where
    try:
        policy = RetryPolicy(min_backoff=args.min_backoff, max_backoff=args.max_backoff,
                             max_lifetime=args.max_queue_lifetime)
        timeouts = Timeouts.scaled(args.timeout_scale)
    except ConfigurationError as exc:
        print(f"lmtpfast replay: {exc}", file=sys.stderr)
        return _exit.EX_USAGE
    if args.server is not None:
        from lmtpfast import parse_destination

        try:
            dest = parse_destination(args.server)
        except ConfigurationError as exc:
            print(f"lmtpfast replay: --server: {exc}", file=sys.stderr)
            return _exit.EX_USAGE
    try:
        security = _security.transport_settings(args, dest if args.server is not None else None)
    except ConfigurationError as exc:
        print(f"lmtpfast replay: {exc}", file=sys.stderr)
        return _exit.EX_USAGE
    salvaged = 0
    try:
        queue = open_queue(args.spool)
    except QueueCorrupt as exc:
        # The store's database is damaged: rebuild it now if nobody else uses it.
        salvaged = _salvage(args.spool, exc)
        if salvaged < 0:
            return _exit.EX_TEMPFAIL
        try:
            queue = open_queue(args.spool)
        except (QueueError, SpoolError, OSError) as exc2:
            print(f"lmtpfast replay: cannot use spool {args.spool}: {exc2.strerror or exc2}",
                  file=sys.stderr)
            return _exit.EX_TEMPFAIL
    except QueueWriteError as exc:
        # A directory spool whose store cannot be made now (a full disk): replay
        # it as it is; it is converted by a later run.
        try:
            queue = open_queue(f"dir:{args.spool}")
        except (QueueError, SpoolError, OSError):
            print(f"lmtpfast replay: cannot use spool {args.spool}: {exc.strerror or exc}",
                  file=sys.stderr)
            return _exit.EX_TEMPFAIL
        print(f"lmtpfast replay: {exc.strerror or exc}: replaying the directory spool as it "
              "is (converted into the store by a later run)", file=sys.stderr)
    except (QueueError, SpoolError, OSError) as exc:
        print(f"lmtpfast replay: cannot use spool {args.spool}: {exc.strerror or exc}",
              file=sys.stderr)
        return _exit.EX_NOINPUT
    return _replay(args, queue, policy, timeouts, salvaged, security)


def _location(args: argparse.Namespace) -> str | int:
    """SPOOL, --queue, or the configuration's ``queue``; an exit status if none or both."""
    if args.spool and args.queue:
        print("lmtpfast replay: give SPOOL or --queue, not both", file=sys.stderr)
        return _exit.EX_USAGE
    if args.spool or args.queue:
        return str(args.spool or args.queue)
    configured = configured_queue("replay", args.config)
    if configured is not None:
        return configured
    print("lmtpfast replay: the SPOOL directory (or --queue, or 'queue' in the "
          "configuration) is required", file=sys.stderr)
    return _exit.EX_USAGE


def _shaping_notices(obs: _CliObserver, quiet: bool) -> Any:
    """A destination marked dead or revived, said on standard error (unless -q)."""
    def on_event(ev: Any) -> None:
        if not quiet and ev.event in ("marked_dead", "revived"):
            obs.notice(f"destination {ev.destination}: {ev.event.replace('_', ' ')}"
                       + (f": {ev.detail}" if ev.detail else ""))
    return on_event


def _tune_gc() -> None:
    """Keep the cyclic collector off the hot path (measured: ~36 us per message otherwise).

    Entries in flight live a few milliseconds, long enough to survive a
    young collection and be traversed again and again in the older ones;
    replay makes almost no cyclic garbage. The start-up heap (modules,
    configuration) is frozen out of every collection, and young collections
    wait for 20,000 allocations instead of 700.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def _salvage(location: str, exc: QueueCorrupt) -> int:
    """Rebuild a damaged store (``lmtpfast queue salvage``); -1 if it cannot be done now."""
    print(f"lmtpfast replay: {exc.strerror or exc}: salvaging it", file=sys.stderr)
    path = location[7:] if location.startswith("sqlite:") else location
    try:
        report = SQLiteStore.salvage(path)
    except (QueueError, OSError) as err:
        print(f"lmtpfast replay: cannot salvage {path}: {err.strerror or err} (nothing was "
              "delivered; run `lmtpfast queue salvage` once it can)", file=sys.stderr)
        return -1
    print(f"lmtpfast replay: salvaged: {report.recovered} entries kept, {report.rebuilt} "
          f"rebuilt from their content and quarantined (they may have been delivered: "
          f"`lmtpfast queue list {path} --state quarantined`); the damaged files: "
          f"{', '.join(report.moved) or 'none'}", file=sys.stderr)
    return report.rebuilt


def _replay(args: argparse.Namespace, queue: Queue, policy: RetryPolicy,
            timeouts: Timeouts, salvaged: int = 0,
            security: dict[str, Any] | None = None) -> int:
    security = security or {}
    report = None
    if args.json:  # the report is the output: no text beside it on standard output
        args.json_report = args.json_report or "-"
        args.verbose = False
    if args.json_report:
        try:
            report = _JsonReport(args.json_report)
        except IsADirectoryError:
            print(f"lmtpfast replay: --report {args.json_report}: is a directory (give a file "
                  "name)", file=sys.stderr)
            return _exit.EX_USAGE
        except OSError as exc:
            print(f"lmtpfast replay: cannot write {args.json_report}: {exc.strerror or exc}",
                  file=sys.stderr)
            return _exit.EX_IOERR
    progress = not args.quiet and not args.no_progress and sys.stderr.isatty()
    obs = _CliObserver(verbose=args.verbose, progress=progress, report=report)

    stop = asyncio.Event()
    after: dict[str, int] | None = None

    def hangup() -> None:
        # A terminal hang-up or an operator's "reload" must not stop --watch;
        # there is nothing to reload yet (issue 16 adds it), so say so.
        obs.notice("SIGHUP received: ignored (replay has no configuration to reload; "
                   "SIGTERM or SIGINT stops it)")

    async def main() -> Totals:
        nonlocal after
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # First signal: finish the messages in flight and stop cleanly.
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, hangup)
        # Workers of one PostgreSQL queue share their dead destinations.
        shared = PgShapingState(queue) if isinstance(queue, PgQueue) else None
        try:
            # Replay delivers through the agent only: --server is one default route.
            shaping = {"on_shaping": _shaping_notices(obs, args.quiet), "shaping_state": shared}
            agent = (Agent.from_config(args.config, **shaping) if args.config is not None else
                     Agent.for_server(args.server, max_connections=args.connections,
                                      timeouts=timeouts, **security, **shaping))
            async with agent:
                replayer = Replayer(queue, agent, concurrency=args.concurrency,
                                    policy=policy, observer=obs, flush=args.flush,
                                    bounce_dir=args.bounce_dir, count_first=progress)
                totals = await replayer.run(watch=args.watch, interval=args.interval,
                                            stop=stop)
            with contextlib.suppress(QueueError, OSError):
                await queue.sweep()
            with contextlib.suppress(QueueError, OSError):
                after = (await queue.status()).as_dict()
            return totals
        finally:
            if shared is not None:
                await shared.close()
            await queue.close()

    _tune_gc()
    try:
        totals = _run.run(main(), use_uvloop=args.loop != "asyncio")
    except QueueCorrupt as exc:
        # Found damaged mid-run: nothing is lost (what was recorded stays),
        # the rest is rebuilt (or left for `lmtpfast queue salvage`).
        obs.close(Totals())
        if report is not None:
            report.abort()
        _salvage(args.spool, exc)
        return _exit.EX_TEMPFAIL
    except QueueError as exc:
        # The queue cannot be used at all (a database without the schema, a
        # wrong password): said plainly, nothing was delivered or changed.
        obs.close(Totals())
        if report is not None:
            report.abort()
        print(f"lmtpfast replay: cannot use the queue: {exc.strerror or exc}", file=sys.stderr)
        return _exit.EX_NOINPUT
    except BaseException:
        obs.close(Totals())
        if report is not None:
            report.abort()
        raise
    totals.messages_quarantined += salvaged
    obs.close(totals)
    status = exit_status(totals)
    if (args.watch or stop.is_set()) and (after is None or after["queued"]):
        # Stopped by a signal: what matters is whether anything is left queued.
        status = _exit.EX_TEMPFAIL
    if report is not None:
        report.finish(totals, status)
        if report.error is not None:
            print(f"lmtpfast replay: the report {args.json_report} could not be written "
                  f"({report.error.strerror or report.error}); no report was left",
                  file=sys.stderr)
            if status == _exit.EX_OK:
                status = _exit.EX_IOERR  # the deliveries went well, the report did not
    if not args.quiet and not args.json:
        _print_summary(totals, obs, after, status)
    return status


# -- the demo ----------------------------------------------------------------------

_DEMO_FAULTS = (
    # unknown users: refused for good at RCPT, as a mailbox server would
    "rcpt:nobody@*=550 5.1.1 User unknown",
    "rcpt:ghost@*=550 5.1.1 User unknown",
    # carol's mailbox is over quota, for now: a temporary failure after the dot
    "dot:carol@*=452 4.2.2 Mailbox full, try again later",
)


def _demo(args: argparse.Namespace) -> int:
    """Write the demo spool, start `lmtpfast sink` with faults, replay once, report."""
    from ._demo import write_demo_spool

    work = Path(tempfile.mkdtemp(prefix="lmtpfast-demo-"))
    write_demo_spool(str(work / "spool"))
    sock = work / "lmtp.sock"
    maildir = work / "maildir"
    ready = work / "ready"
    cmd = [sys.executable, "-m", "lmtpfast", "sink", "--listen", f"unix:{sock}",
           "--maildir", str(maildir), "--ready-file", str(ready), "--duration", "300",
           "--quiet"]
    for spec in _DEMO_FAULTS:
        cmd += ["--fault", spec]
    print(f"$ python -m lmtpfast.cli._demo {work / 'spool'}   # 20 example messages")
    print("$ " + " ".join(_quote(c) for c in cmd) + " &")
    sink = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not ready.exists():
            if sink.poll() is not None:
                print("lmtpfast replay --demo: the sink did not start", file=sys.stderr)
                return _exit.EX_SOFTWARE
            if time.monotonic() > deadline:
                print("lmtpfast replay --demo: the sink did not get ready", file=sys.stderr)
                return _exit.EX_SOFTWARE
            time.sleep(0.02)
        print(f"$ lmtpfast replay {work / 'spool'} --server unix:{sock} --once -v "
              f"--report {work / 'report.json'} --bounce-dir {work / 'bounces'}")
        demo_args = argparse.Namespace(**{**vars(args), "spool": str(work / "spool"),
                                          "server": f"unix:{sock}", "config": None,
                                          "watch": False, "once": True, "verbose": True,
                                          "json_report": str(work / "report.json"),
                                          "bounce_dir": str(work / "bounces"),
                                          "demo": False})
        status = run(demo_args)
    finally:
        sink.terminate()
        try:
            sink.wait(10)
        except subprocess.TimeoutExpired:
            sink.kill()
            sink.wait()
    print()
    print(f"delivered mail:     {maildir}")
    print(f"failed messages:    lmtpfast queue list {work / 'spool'} --state failed "
          "(reasons: lmtpfast queue show SPOOL ID)")
    print(f"still queued:       lmtpfast queue list {work / 'spool'} (carol's, retried later)")
    print(f"bounces to senders: {work / 'bounces'}")
    print(f"JSON report:        {work / 'report.json'}")
    print(f"replay exit status: {status} (75: something is still queued)")
    # The demo worked if the replay reached its expected end: mixed outcomes.
    return _exit.EX_OK if status in (_exit.EX_OK, _exit.EX_TEMPFAIL, _exit.EX_DATAERR) else status


def _quote(s: str) -> str:
    return s if re.fullmatch(r"[\w@%+=:,./-]+", s) else "'" + s.replace("'", "'\\''") + "'"
