"""``lmtpfast run``: the delivery daemon (``replay --watch`` made a service).

What it adds to ``replay --watch`` (docs/operations.md):

* new entries wake it at once (inotify on the spool, the store's doorbell;
  a bounded poll of ``--interval`` where notifications are unavailable);
* ``SIGHUP`` reloads the configuration and its maps: a new agent takes the
  next deliveries, the old one finishes those in flight and closes; a
  configuration that does not load is logged and the running one kept;
* ``SIGTERM``/``SIGINT`` stop it: no new delivery starts, those in flight get
  ``--stop-timeout`` seconds, then it exits, 0 when nothing is left queued,
  else 75 (a second signal stops at once);
* a spool that cannot be read or written backs it off (doubling, up to a
  minute) instead of ending it;
* systemd ``Type=notify``: ``READY=1`` once delivering, ``RELOADING=1`` /
  ``READY=1`` around a reload, ``STOPPING=1``, ``STATUS=`` lines, and
  ``WATCHDOG=1`` pings when ``WatchdogSec=`` is set (examples/lmtpfast.service);
* one Postfix-shaped log line per recipient outcome (cli/_log.py), and a
  Prometheus endpoint with ``--metrics-listen``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

from lmtpfast import (
    METRICS,
    Agent,
    ConfigurationError,
    LocalShapingState,
    Metrics,
    ShapingEvent,
    Timeouts,
)
from lmtpfast.spool import (
    DirQueue,
    Observer,
    Outcome,
    Replayer,
    RetryPolicy,
    Selection,
    Spool,
    SpoolError,
    Totals,
)

from . import _exit, _log, _run, _security
from ._options import add_json, add_loop, add_pace, add_quiet, parse_duration
from ._systemd import Notifier
from .replay import _JsonReport

__all__ = ["OpsObserver", "register", "run"]

_STATUS = {"delivered": "sent", "deferred": "deferred", "failed": "bounced",
           "expired": "bounced"}
_SPOOL_BACKOFF = (1.0, 60.0)


def add_service_arguments(p: Any) -> None:
    """Options shared by ``run`` and ``replay``: logging and metrics."""
    _log.add_arguments(p)
    g = p.add_argument_group("metrics (docs/operations.md)")
    g.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="the delivery daemon: deliver a spool as a service (systemd, logs, metrics)",
        description="Deliver the spool's mail as a service: new entries are picked up at once "
        "(inotify, no busy polling), SIGHUP reloads the configuration and its maps, SIGTERM "
        "or SIGINT stop gracefully within --stop-timeout, a failing spool backs it off. "
        "Speaks systemd's sd_notify (Type=notify) when NOTIFY_SOCKET is set. Logs one "
        "Postfix-shaped line per recipient outcome. Exit status: 0 stopped with nothing "
        "queued, 75 stopped with mail still queued, 64 bad usage, 66 unusable spool, 78 bad "
        "configuration.")
    p.add_argument("spool", metavar="SPOOL", help="spool directory")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--config", metavar="FILE",
                        help="agent configuration (lmtpfast.toml); reloaded on SIGHUP")
    target.add_argument("--server", metavar="DEST",
                        help="unix:/path, host:port, [ipv6]:port, 'command:PROGRAM ARGS'")
    add_pace(p)
    add_json(p, "at the end, every outcome and the summary with the metrics (as replay "
             "--json)")
    p.add_argument("--report", metavar="FILE", dest="json_report",
                   help="write that JSON report to FILE instead")
    p.add_argument("--bounce-dir", metavar="DIR",
                   help="write an RFC 3464 bounce for the sender of each failed message here")
    p.add_argument("--interval", type=parse_duration, default=None, metavar="T",
                   help="longest idle pause between passes (default 60s when the spool "
                   "notifies, 1s when it cannot)")
    p.add_argument("--stop-timeout", type=parse_duration, default=30.0, metavar="T",
                   help="on SIGTERM/SIGINT: how long deliveries in flight may finish "
                   "(default 30s)")
    p.add_argument("--timeout-scale", type=float, default=1.0, metavar="F",
                   help="--server: multiply every Postfix default timeout by F")
    p.add_argument("--metrics-interval", type=parse_duration, default=15.0, metavar="T",
                   help="how often the queue depth is counted for the metrics (default 15s)")
    add_quiet(p, "log warnings and errors only")
    add_loop(p)
    _security.add_arguments(p)
    add_service_arguments(p)
    p.set_defaults(func=run)


class OpsObserver(Observer):
    """Replay's outcomes to the delivery log and the metrics (and on to *inner*)."""

    def __init__(self, log: _log.DeliveryLog, metrics: Metrics,
                 inner: Observer | None = None, report: Any = None) -> None:
        self.log = log
        self.metrics = metrics
        self.inner = inner
        self.report = report
        self._attempt: object = None
        self._seen: set[str | None] = set()

    def outcome(self, outcome: Outcome) -> None:
        o = outcome
        m = self.metrics
        status = _STATUS.get(o.outcome, o.outcome)
        m.delivery(o.destination, status, o.enhanced, o.code)
        delays = o.delays
        if delays is not None:
            if delays is not self._attempt:  # the outcomes of one attempt share it
                self._attempt, self._seen = delays, set()
            if o.destination not in self._seen:
                self._seen.add(o.destination)
                m.observe(o.destination, "delivery", delays[2] + delays[3])
                m.sent(o.destination, o.size)
        if o.outcome == "delivered" and o.delay is not None:
            m.delay.observe(o.delay)
        self.log.delivery(o.id, o.recipient, o.outcome, code=o.code, enhanced=o.enhanced,
                          text=o.text, relay=o.destination, delay=o.delay or 0.0,
                          delays=delays, attempts=o.attempts,
                          possibly_duplicated=o.possibly_duplicated, stage=o.stage,
                          next_attempt=o.next_attempt)
        if self.report is not None:
            self.report.add(o)
        if self.inner is not None:
            self.inner.outcome(o)

    def message_done(self, totals: Totals) -> None:
        self.metrics.messages.update(delivered=totals.messages_delivered,
                                     deferred=totals.messages_deferred,
                                     failed=totals.messages_failed,
                                     quarantined=totals.messages_quarantined)
        if self.inner is not None:
            self.inner.message_done(totals)

    def quarantined(self, id: str, reason: str) -> None:
        self.log.event(id, f"quarantined: {reason}", level=logging.WARNING)
        self.metrics.messages["quarantined"] = self.metrics.messages.get("quarantined", 0) + 1
        if self.inner is not None:
            self.inner.quarantined(id, reason)

    def error(self, id: str, problem: str) -> None:
        self.log.event(id or "-", problem, level=logging.WARNING)
        if self.inner is not None:
            self.inner.error(id, problem)

    def backing_off(self, problem: str, delay: float) -> None:
        self.metrics.spool_backoffs += 1
        self.log.message(f"spool write failed ({problem}): backing off, no new delivery for "
                         f"{delay:g} s", level=logging.WARNING)
        if self.inner is not None:
            self.inner.backing_off(problem, delay)

    def notice(self, text: str) -> None:
        self.log.message(text)

    def pass_started(self, total: int | None) -> None:
        if self.inner is not None:
            self.inner.pass_started(total)

    def skipped(self, totals: Totals) -> None:
        if self.inner is not None:
            self.inner.skipped(totals)


async def refresh_queue_metrics(spool: Spool, metrics: Metrics) -> None:
    """Queue depth by state and the oldest queued arrival, into *metrics*."""
    q = DirQueue(spool)
    st = await q.status()
    metrics.queue.update(queued=st.queued, not_due=st.not_due, held=st.held, failed=st.failed,
                         quarantined=st.quarantined)
    oldest = 0.0
    async for info in q.entries(Selection(states=("queued",))):
        a = info.envelope.arrival if info.envelope is not None else None
        if a and (not oldest or a < oldest):
            oldest = a
    metrics.queue_oldest = oldest


#: Shaping events and the level they are logged at (None: counted, not logged:
#: one a transaction, and each deferred recipient has its own line anyway).
_SHAPING_LEVELS: dict[str, int | None] = {
    "marked_dead": logging.WARNING, "revived": logging.INFO, "probe": logging.INFO,
    "throttled": logging.INFO, "grown": logging.DEBUG, "delayed": None, "deferred_dead": None,
    "unavailable": None}


def shaping_listener(log: _log.DeliveryLog, metrics: Metrics) -> Any:
    """A :class:`ShapingEvent` listener that counts every event and logs the notable ones."""
    def on_event(ev: ShapingEvent) -> None:
        metrics.shaped(ev.destination, ev.event)
        level = _SHAPING_LEVELS.get(ev.event, logging.INFO)
        if level is not None and log.enabled(level):
            window = "unlimited" if ev.window == float("inf") else f"{ev.window:g}"
            text = f"destination {ev.destination}: {ev.event.replace('_', ' ')}"
            log.message(f"{text} (window {window})" + (f": {ev.detail}" if ev.detail else ""),
                        level=level, destination=ev.destination, shaping=ev.event,
                        window=None if ev.window == float("inf") else ev.window)
    return on_event


class Daemon:
    """One ``lmtpfast run``: the replayer, its signals, reloads, notifications and metrics."""

    def __init__(self, args: argparse.Namespace, spool: Spool, log: _log.DeliveryLog) -> None:
        self.args = args
        self.spool = spool
        self.log = log
        self.metrics = Metrics()
        self.notify = Notifier()
        self.stop = asyncio.Event()
        self.wake = asyncio.Event()
        self.replayer: Replayer | None = None
        self._reloading: asyncio.Task[None] | None = None
        self._hard = asyncio.Event()
        # The agent delivering now (an async context manager: closing it lets
        # its deliveries in flight finish).
        self._cm: Any = None
        self.totals = Totals()
        self.cut_short = False
        self.report: Any = None
        # Dead marks and rate slots outlive a reload (the new agent knows what
        # the old one learnt about the back ends).
        self.shaping_state = LocalShapingState()
        #: --server's TLS and SASL options, as Transport fields.
        self.security: dict[str, Any] = {}
        self._on_shaping = shaping_listener(log, self.metrics)

    def _deliverer(self) -> Agent:
        # Replay delivers through the agent only: --server is one default route.
        shaping = {"shaping_state": self.shaping_state, "on_shaping": self._on_shaping}
        if self.args.config is not None:
            return Agent.from_config(self.args.config, **shaping)
        return Agent.for_server(self.args.server, max_connections=self.args.connections,
                                timeouts=Timeouts.scaled(self.args.timeout_scale), **shaping,
                                **self.security)

    def current_agent(self) -> Any:
        return self.replayer.agent if self.replayer is not None else None

    # -- signals ------------------------------------------------------------------------

    def _on_stop(self, signame: str) -> None:
        if self.stop.is_set():
            self.log.message(f"{signame} again: stopping now")
            self._hard.set()
            return
        self.log.message(f"{signame} received: stopping (deliveries in flight get "
                         f"{self.args.stop_timeout:g} s)")
        self.notify.stopping("stopping")
        self.stop.set()

    def _on_hup(self) -> None:
        if self._reloading is not None and not self._reloading.done():
            self.log.message("SIGHUP received: a reload is already running")
            return
        self._reloading = asyncio.ensure_future(self.reload())

    async def reload(self) -> None:
        """Build a new agent from the configuration file; swap it in if it loads."""
        if self.args.config is None:
            self.log.message("SIGHUP received: nothing to reload (--server)")
            return
        self.notify.reloading()
        try:
            new = self._deliverer()
            deliverer = await new.__aenter__()
        except (ConfigurationError, OSError, ValueError) as exc:
            self.metrics.reloads["failed"] = self.metrics.reloads.get("failed", 0) + 1
            self.log.message(f"reload of {self.args.config} failed, keeping the running "
                             f"configuration: {exc}", level=logging.ERROR)
            self.notify.ready("delivering (reload failed)")
            return
        assert self.replayer is not None
        self.replayer.agent = deliverer
        old_cm, self._cm = self._cm, new
        self.metrics.reloads["ok"] = self.metrics.reloads.get("ok", 0) + 1
        self.log.message(f"reloaded {self.args.config} (configuration and maps)")
        self.notify.ready("delivering (reloaded)")
        self.wake.set()  # routes may have changed: a pass now
        # The old agent finishes the deliveries it has in flight, then closes.
        with contextlib.suppress(Exception):
            await old_cm.__aexit__(None, None, None)

    # -- running ------------------------------------------------------------------------

    async def main(self) -> int:
        args = self.args
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._on_stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        watch = DirQueue(self.spool).watch()
        interval = args.interval if args.interval is not None else (60.0 if watch else 1.0)
        if watch is not None:
            watch.attach(self.wake)
        server = None
        if args.metrics_listen:
            from ._prom import serve

            try:
                server, _thread = serve(args.metrics_listen, self.metrics, self.current_agent)
            except (OSError, ValueError) as exc:
                self.log.message(f"--metrics-listen {args.metrics_listen}: {exc}",
                                 level=logging.ERROR)
                return _exit.EX_CONFIG
        # Every delivery task inherits it: the session and protocol layers send
        # their per-stage times (connect ... dot) to these metrics.
        METRICS.set(self.metrics)
        self._cm = self._deliverer()
        deliverer = await self._cm.__aenter__()
        policy = RetryPolicy(min_backoff=args.min_backoff, max_backoff=args.max_backoff,
                             max_lifetime=args.max_queue_lifetime)
        self.replayer = Replayer(self.spool, deliverer, concurrency=args.concurrency,
                                 policy=policy,
                                 observer=OpsObserver(self.log, self.metrics, report=self.report),
                                 bounce_dir=args.bounce_dir)
        tasks = [asyncio.ensure_future(self._metrics_loop())]
        if self.notify.watchdog:
            tasks.append(asyncio.ensure_future(self._watchdog()))
        self.log.message(f"started: spool {self.spool.path}, "
                         f"{'config ' + args.config if args.config else 'server ' + args.server}"
                         f", {'inotify' if watch else f'polling every {interval:g} s'}"
                         + (f", metrics at http://{args.metrics_listen.rpartition(':')[0]}:"
                            f"{server.server_port}/metrics" if server else ""))
        self.notify.ready("delivering")
        try:
            await self._deliver_until_stopped(interval)
        finally:
            for t in tasks:
                t.cancel()
            if watch is not None:
                watch.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._cm.__aexit__(None, None, None),
                                       max(args.stop_timeout, 1.0))
            if server is not None:
                server.shutdown()
        return self._status()

    async def _deliver_until_stopped(self, interval: float) -> None:
        assert self.replayer is not None
        backoff = 0.0
        while not self.stop.is_set():
            task = asyncio.ensure_future(self.replayer.run(
                watch=True, interval=interval, stop=self.stop, wake=self.wake))
            stopped = asyncio.ensure_future(self.stop.wait())
            await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                # Stopping: the replayer finishes what is in flight, within the deadline.
                hard = asyncio.ensure_future(self._hard.wait())
                await asyncio.wait([task, hard], timeout=self.args.stop_timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
                hard.cancel()
                if not task.done():
                    self.log.message("deliveries still in flight at the stop deadline: "
                                     "stopping anyway (they stay queued and are retried)",
                                     level=logging.WARNING)
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                    self.cut_short = True
                    return
            stopped.cancel()
            try:
                self.totals = task.result()
                backoff = 0.0
            except (OSError, SpoolError) as exc:
                # The spool itself failed (unreadable, removed, I/O error): pause, retry.
                backoff = min(_SPOOL_BACKOFF[1], max(_SPOOL_BACKOFF[0], backoff * 2))
                self.metrics.spool_backoffs += 1
                self.log.message(f"spool {self.spool.path} failed ({exc.strerror or exc}): "
                                 f"backing off {backoff:g} s", level=logging.ERROR)
                self.notify.status(f"spool failing: {exc.strerror or exc}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), backoff)

    async def _metrics_loop(self) -> None:
        while True:
            with contextlib.suppress(OSError, SpoolError):
                await refresh_queue_metrics(self.spool, self.metrics)
            await asyncio.sleep(self.args.metrics_interval)

    async def _watchdog(self) -> None:
        assert self.notify.watchdog is not None
        while True:
            self.notify.ping()
            await asyncio.sleep(self.notify.watchdog)

    def _status(self) -> int:
        try:
            c = self.spool.count()
        except OSError:
            return _exit.EX_TEMPFAIL
        left = c["incoming"] + c["deferred"] + c.get("hold", 0)
        self.log.message(f"stopped: {left} entr{'y' if left == 1 else 'ies'} left queued")
        return _exit.EX_TEMPFAIL if left or self.cut_short else _exit.EX_OK


def run(args: argparse.Namespace) -> int:
    if args.quiet and args.log_level == "info":
        args.log_level = "warning"
    try:
        log = _log.open_log(args, "lmtpfast/run")
    except ValueError as exc:
        print(f"lmtpfast run: {exc}", file=sys.stderr)
        return _exit.EX_USAGE
    try:
        spool = Spool(args.spool)
    except (SpoolError, OSError) as exc:
        print(f"lmtpfast run: cannot use spool {args.spool}: {exc.strerror or exc}",
              file=sys.stderr)
        return _exit.EX_NOINPUT
    try:
        RetryPolicy(min_backoff=args.min_backoff, max_backoff=args.max_backoff,
                    max_lifetime=args.max_queue_lifetime)
        if args.server is not None:
            from lmtpfast import parse_destination

            security = _security.transport_settings(args, parse_destination(args.server))
        else:
            from lmtpfast import Agent

            security = _security.transport_settings(args, None)
            Agent.from_config(args.config)  # refuse a bad configuration before starting
    except ConfigurationError as exc:
        print(f"lmtpfast run: {exc}", file=sys.stderr)
        return _exit.EX_CONFIG
    daemon = Daemon(args, spool, log)
    daemon.security = security
    report = None
    if args.json:
        args.json_report = args.json_report or "-"
    if args.json_report:
        try:
            report = daemon.report = _JsonReport(args.json_report)
        except OSError as exc:
            print(f"lmtpfast run: cannot write {args.json_report}: {exc.strerror or exc}",
                  file=sys.stderr)
            return _exit.EX_IOERR
    status = _exit.EX_SOFTWARE
    try:
        status = _run.run(daemon.main(), use_uvloop=args.loop != "asyncio")
        return status
    finally:
        daemon.notify.close()
        log.close()
        if report is not None:
            if status == _exit.EX_SOFTWARE:
                report.abort()
            else:
                report.finish(daemon.totals, status, daemon.metrics.snapshot())
