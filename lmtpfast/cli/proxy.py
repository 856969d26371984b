"""``lmtpfast proxy``: an LMTP front end that routes every recipient to its back end.

Signals: SIGTERM/SIGINT stop gracefully (no new connections; open
transactions get ``shutdown_timeout`` seconds, then 421 4.3.2); SIGHUP reads
the configuration again and routes new transactions with the new maps and
transports, without dropping a session (a broken new file is logged and the
old one kept); SIGUSR1 writes the counters to ``--stats-json``.

One Postfix-shaped log line per recipient (``--log-target``, ``cli/_log.py``,
the same lines as ``lmtpfast run``), Prometheus metrics at
``--metrics-listen`` (the delivery metrics of ``docs/operations.md`` plus the
proxy's own ``lmtpfast_proxy_*`` counters), systemd ``Type=notify``.

Exit status: 0 after a clean stop, 64 usage, 71 cannot listen or write,
78 configuration error (including a route back to the proxy itself).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import msgspec

from lmtpfast import ConfigurationError, Metrics, loop_factory
from lmtpfast.server import Proxy, ProxyRecord, load_proxy_config

from . import _exit, _log
from ._options import add_quiet
from ._systemd import Notifier
from ._workers import SIGNALS, supervise

__all__ = ["counters", "register", "run", "serve_one"]

EX_OSERR = 71

# RecipientResult.status -> the delivery log's outcome words.
_OUTCOME = {"delivered": "delivered", "transient": "deferred", "permanent": "failed"}
_STATUS = {"delivered": "sent", "transient": "deferred", "permanent": "bounced"}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``proxy`` subcommand to the ``lmtpfast`` parser."""
    p = subparsers.add_parser(
        "proxy",
        help="run an LMTP front end that routes each recipient to its mailbox back end",
        description=(
            "An LMTP (RFC 2033) server that routes every recipient at RCPT time through the "
            "configuration's maps and, after the final dot, sends the message once per back "
            "end, all back ends in parallel, over pooled pipelined connections. Each client "
            "recipient gets its own back end's reply. See docs/proxy.md."
        ),
    )
    p.add_argument("--config", metavar="FILE", required=True,
                   help="the TOML file: a [proxy] table plus the agent's maps and transports")
    p.add_argument("--listen", metavar="DEST", action="append",
                   help="where to listen (repeatable; replaces [proxy] listen): unix:/path, "
                   "HOST:PORT, [::1]:PORT")
    p.add_argument("--ready-file", metavar="FILE",
                   help="once listening, write the real destinations to FILE (one a line)")
    p.add_argument("--stats-json", metavar="FILE",
                   help="write the counters as JSON on exit and on SIGUSR1")
    p.add_argument("--log-file", metavar="FILE", help="shorthand for --log-target FILE")
    add_quiet(p, "log warnings and errors only (as lmtpfast run -q)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes (default 1): each a whole proxy with its own "
                   "back-end pools, sharing the listeners (SO_REUSEPORT on TCP, one socket "
                   "for unix listeners); the parent forwards SIGTERM, SIGHUP and SIGUSR1")
    p.add_argument("--engine", choices=("auto", "c", "python"), default="auto",
                   help="server engine (default: compiled when built)")
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="event loop (default: uvloop when installed)")
    _log.add_arguments(p)
    p.set_defaults(func=run)


def _fail(status: int, message: str) -> int:
    print(f"lmtpfast proxy: {message}", file=sys.stderr)
    return status


class _Outcomes:
    """Each recipient's outcome: one log line, the delivery metrics."""

    def __init__(self, log: _log.DeliveryLog, metrics: Metrics) -> None:
        self.log = log
        self.metrics = metrics

    def __call__(self, rec: ProxyRecord) -> None:
        r = rec.result
        self.metrics.delivery(r.destination, _STATUS.get(r.status, r.status), r.enhanced,
                              r.code)
        if r.delivered:
            self.metrics.delay.observe(rec.delay)
        self.log.delivery(rec.id, rec.recipient, _OUTCOME.get(r.status, r.status), code=r.code,
                          enhanced=r.enhanced, text=r.text, relay=r.destination,
                          delay=rec.delay, possibly_duplicated=r.possibly_delivered,
                          stage=r.stage)

    def many(self, records: Sequence[ProxyRecord]) -> None:
        """The records of one back-end transaction: the same lines and counts, made at once."""
        metrics = self.metrics
        delivery = metrics.delivery
        observe = metrics.delay.observe
        rows = []
        for rec in records:
            r = rec.result
            status = r.status
            delivery(r.destination, _STATUS.get(status, status), r.enhanced, r.code)
            if status == "delivered":
                observe(rec.delay)
            rows.append((rec.recipient, _OUTCOME.get(status, status), r.code, r.enhanced,
                         r.text, r.destination, r.possibly_delivered, r.stage))
        if records:
            self.log.deliveries(records[0].id, records[0].delay, rows)


class _ProxyCollector:
    """``lmtpfast_proxy_*`` families: the proxy's and its server's counters, at scrape time."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = msgspec.to_builtins(self.proxy.stats)
        for name, value in stats.items():
            yield CounterMetricFamily(f"lmtpfast_proxy_{name}", f"Proxy counter {name} "
                                      "(docs/proxy.md)", value=value)
        server = self.proxy.server_stats
        yield GaugeMetricFamily("lmtpfast_proxy_client_connections",
                                "Client connections open now", value=server.connections_current)
        for name in ("connections_total", "connections_refused", "recipients_accepted",
                     "recipients_refused", "bytes_received"):
            yield CounterMetricFamily(f"lmtpfast_proxy_client_{name}", f"Client side: {name}",
                                      value=getattr(server, name))
        finals = CounterMetricFamily("lmtpfast_proxy_final_replies",
                                     "Replies after the content, by code", labels=["code"])
        for code, n in sorted(server.final_replies.items()):
            finals.add_metric([str(code)], n)
        yield finals


def counters(proxy: Proxy) -> dict[str, Any]:
    """Every counter of a proxy: its own, the server's and the back-end side's."""
    return {"proxy": msgspec.to_builtins(proxy.stats),
            "server": msgspec.to_builtins(proxy.server_stats),
            "backends": msgspec.to_builtins(proxy.agent_stats)}


def run(args: argparse.Namespace) -> int:
    """Run the proxy until SIGTERM/SIGINT; return the exit status."""
    workers = getattr(args, "workers", 1)
    if workers < 1:
        return _fail(_exit.EX_USAGE, f"--workers must be at least 1, not {workers}")
    if workers > 1:
        if args.metrics_listen:
            return _fail(_exit.EX_USAGE, "--metrics-listen is served by one process: not "
                         "with --workers above 1 (scrape --stats-json instead)")
        return supervise(args)
    return serve_one(args)


def serve_one(
    args: argparse.Namespace,
    *,
    listen: list[str] | None = None,
    listen_sockets: dict[str, socket.socket] | None = None,
    reuse_port: bool = False,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """One proxy process (the only one, or a worker of ``--workers``): its exit status.

    ``listen``, ``listen_sockets`` and ``reuse_port`` are a worker's
    listeners (``_workers.py``); ``on_ready`` is called once it listens.
    """
    if args.quiet and args.log_level == "info":
        args.log_level = "warning"
    if args.log_file:
        args.log_target = args.log_file
    try:
        log = _log.open_log(args, "lmtpfast/proxy")
    except ValueError as exc:
        return _fail(_exit.EX_USAGE, str(exc))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="lmtpfast proxy: %(levelname)s: %(message)s")
    try:
        settings, config = load_proxy_config(args.config)
        metrics = Metrics()
        proxy = Proxy(config, settings, listen=listen if listen is not None else args.listen,
                      on_result=_Outcomes(log, metrics),
                      engine=None if args.engine == "auto" else args.engine,
                      listen_sockets=listen_sockets, reuse_port=reuse_port)
    except ConfigurationError as exc:
        return _fail(_exit.EX_CONFIG, str(exc))
    factory: Any = None
    if args.loop != "asyncio":
        factory = loop_factory()
        if factory is None and args.loop == "uvloop":
            return _fail(_exit.EX_USAGE, "uvloop is not installed")
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_serve(proxy, args, log, metrics, on_ready))


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


async def _serve(proxy: Proxy, args: argparse.Namespace, log: _log.DeliveryLog,
                 metrics: Metrics, on_ready: Callable[[], None] | None = None) -> int:
    try:
        await proxy.start()
    except ConfigurationError as exc:
        await proxy.stop()
        return _fail(_exit.EX_CONFIG, str(exc))
    except OSError as exc:
        await proxy.stop()
        return _fail(EX_OSERR, f"cannot listen: {exc}")
    http = None
    if args.metrics_listen:
        from ._prom import serve

        try:
            http, _thread = serve(args.metrics_listen, metrics, lambda: proxy.agent,
                                  extra=[_ProxyCollector(proxy)])
        except (OSError, ValueError) as exc:
            await proxy.stop()
            return _fail(_exit.EX_CONFIG, f"--metrics-listen {args.metrics_listen}: {exc}")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    notify = Notifier()

    def write_stats() -> None:
        if args.stats_json:
            try:
                _write_atomic(args.stats_json, msgspec.json.encode(counters(proxy)) + b"\n")
            except OSError as exc:
                log.message(f"cannot write {args.stats_json}: {exc}", level=logging.ERROR)

    def reload() -> None:
        notify.reloading()
        try:
            _, config = load_proxy_config(args.config)
            proxy.reload(config)
        except ConfigurationError as exc:
            metrics.reloads["failed"] = metrics.reloads.get("failed", 0) + 1
            msg = f"reload refused, keeping the old configuration: {exc}"
            log.message(msg, level=logging.ERROR)
            print(f"lmtpfast proxy: {msg}", file=sys.stderr)
            notify.ready("proxying (reload failed)")
            return
        metrics.reloads["ok"] = metrics.reloads.get("ok", 0) + 1
        log.message("configuration reloaded")
        print("lmtpfast proxy: configuration reloaded", file=sys.stderr)
        notify.ready("proxying (reloaded)")

    handlers = {signal.SIGINT: stop.set, signal.SIGTERM: stop.set, signal.SIGHUP: reload,
                signal.SIGUSR1: write_stats}
    for sig, fn in handlers.items():
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, fn)
    # A worker of --workers starts with these blocked (cli/_workers.py): now
    # that the handlers are in place, a signal that came meanwhile is handled.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    try:
        if args.ready_file:
            _write_atomic(args.ready_file,
                          "".join(d + "\n" for d in proxy.destinations).encode())
        where = " ".join(proxy.destinations)
        log.message(f"listening on {where}")
        print(f"lmtpfast proxy listening on {where}", file=sys.stderr)
        notify.ready("proxying")
        # What start-up made lives as long as the process: out of the
        # collector's sight, a full collection does not walk it again.
        gc.freeze()
        if on_ready is not None:
            on_ready()
        await stop.wait()
    finally:
        notify.stopping("stopping")
        for sig in handlers:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        await proxy.shutdown()
        if http is not None:
            http.shutdown()
        notify.close()
    write_stats()
    log.message("stopped")
    log.close()
    return _exit.EX_OK
