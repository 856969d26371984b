"""Counters and latency histograms of a delivery process: plain data, cheap to update.

One :class:`Metrics` object per process (``lmtpfast run``, ``replay``) is fed
by the replay observer and by the delivery path, and read two ways: as the
``metrics`` object of ``replay --json`` summaries (:meth:`Metrics.snapshot`)
and, through ``prometheus_client``, at ``--metrics-listen`` (``cli/_prom.py``
turns the same numbers into metric families at scrape time). Updating is a
dict increment or a bisect, never a lock or a library call, so the cost per
message stays in the noise (``bench/bench_ops.py`` measures it).

:data:`TRACE` is the context of one delivery attempt: replay sets a
:class:`Trace` before it calls the agent, and the layers below add what only
they see (connection set-up time, per-stage latencies) without an argument
threaded through every call.
"""

from __future__ import annotations

import bisect
import contextvars
from collections.abc import Iterable
from typing import Any

__all__ = ["BUCKETS", "METRICS", "TRACE", "Histogram", "Metrics", "Trace", "dsn_class"]

#: Connection set-up stages (their times add up to :attr:`Trace.setup`).
_SETUP = frozenset(("connect", "greeting", "lhlo", "starttls", "auth"))

#: Latency buckets in seconds (upper bounds; +Inf is implicit): 0.5 ms to 10 min.
BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                              0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)


class Histogram:
    """Counts per bucket, sum and count (what a Prometheus histogram needs)."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, cumulative count), ...]`` ending with ``+Inf``."""
        out, total = [], 0
        for bound, n in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


def dsn_class(enhanced: str | None, code: int) -> str:
    """``X.Y`` (class and subject of the enhanced code, RFC 3463) or ``X`` from the basic code.

    ``4.2`` is mailbox status, ``4.4`` network and routing, ``5.1`` addressing:
    bounded label values that say why mail is deferred or bounced.
    """
    if enhanced:
        cls, _, rest = enhanced.partition(".")
        subject = rest.partition(".")[0]
        if cls in ("2", "4", "5") and subject.isdigit():
            return f"{cls}.{subject}"
    return str(code)[:1] or "4"


class Trace:
    """What one delivery attempt cost, filled in by the layers that see it.

    The session reports the set-up stages (connect, greeting, lhlo, starttls,
    auth) of a connection opened for the attempt, the protocol the stages of
    its transaction (mail, rcpt, data, content, dot) when it had the
    connection to itself. Each goes to :data:`METRICS` too, when set.
    """

    __slots__ = ("metrics", "setup", "stages")

    def __init__(self) -> None:
        #: Connection set-up seconds spent for this attempt (new connections only).
        self.setup = 0.0
        #: ``(destination, stage, seconds)`` seen during this attempt.
        self.stages: list[tuple[str, str, float]] = []
        self.metrics = METRICS.get()

    def stage(self, destination: str, stage: str, seconds: float) -> None:
        """One stage's time (set-up stages also add to :attr:`setup`)."""
        self.stages.append((destination, stage, seconds))
        if stage in _SETUP:
            self.setup += seconds
        m = self.metrics
        if m is not None:
            m.observe(destination, stage, seconds)


#: The attempt being delivered in this task (``None``: nobody is measuring).
TRACE: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("lmtpfast_trace",
                                                                     default=None)
#: The process's metrics, where traces send their stage times (set by the
#: daemon before it starts delivering; tasks inherit it).
METRICS: contextvars.ContextVar[Metrics | None] = contextvars.ContextVar("lmtpfast_metrics",
                                                                         default=None)


class Metrics:
    """Every counter a delivery process exports (see ``docs/operations.md`` for the names)."""

    def __init__(self) -> None:
        #: (destination, status sent|deferred|bounced, dsn class) -> recipients.
        self.deliveries: dict[tuple[str, str, str], int] = {}
        #: (destination, stage) -> latency histogram. Stages: connect, greeting,
        #: lhlo, starttls, auth (set-up), mail, rcpt, data, dot (a transaction),
        #: and delivery (one attempt, set-up included).
        self.latency: dict[tuple[str, str], Histogram] = {}
        #: destination -> bytes of message content sent (one count per transaction).
        self.bytes_sent: dict[str, int] = {}
        #: Messages attempted, by what became of them (delivered, deferred, failed, quarantined).
        self.messages: dict[str, int] = {}
        #: Postfix's delivery delay (arrival to outcome) of delivered recipients.
        self.delay = Histogram()
        #: Queue depth by state (queued, held, failed, quarantined, not_due) and the
        #: oldest queued entry's arrival (Unix time; 0: none), refreshed by the daemon.
        self.queue: dict[str, int] = {}
        self.queue_oldest: float = 0.0
        #: Shaping: destination -> events (throttled, dead, probe, deferred_dead).
        self.shaping: dict[tuple[str, str], int] = {}
        #: Times the configuration was reloaded (ok / failed) and spool back-offs.
        self.reloads: dict[str, int] = {}
        self.spool_backoffs = 0

    # -- updates (hot path) ---------------------------------------------------------------

    def delivery(self, destination: str | None, status: str, enhanced: str | None,
                 code: int) -> None:
        key = (destination or "none", status, dsn_class(enhanced, code))
        d = self.deliveries
        d[key] = d.get(key, 0) + 1

    def observe(self, destination: str | None, stage: str, seconds: float) -> None:
        key = (destination or "none", stage)
        h = self.latency.get(key)
        if h is None:
            h = self.latency[key] = Histogram()
        h.observe(seconds)

    def sent(self, destination: str | None, nbytes: int) -> None:
        key = destination or "none"
        self.bytes_sent[key] = self.bytes_sent.get(key, 0) + nbytes

    def message(self, what: str) -> None:
        self.messages[what] = self.messages.get(what, 0) + 1

    def shaped(self, destination: str, event: str) -> None:
        key = (destination, event)
        self.shaping[key] = self.shaping.get(key, 0) + 1

    # -- reading ----------------------------------------------------------------------------

    def snapshot(self, extra: Iterable[tuple[str, Any]] = ()) -> dict[str, Any]:
        """Every counter as plain JSON data (the ``metrics`` object of a JSON summary).

        Names and labels are those of the Prometheus endpoint, so the two can
        be compared line by line.
        """
        return {
            "deliveries": [{"destination": d, "status": s, "dsn": c, "value": n}
                           for (d, s, c), n in sorted(self.deliveries.items())],
            "latency": [{"destination": d, "stage": s, "count": h.count, "sum": h.sum,
                         "buckets": dict(h.cumulative())}
                        for (d, s), h in sorted(self.latency.items())],
            "bytes_sent": dict(sorted(self.bytes_sent.items())),
            "messages": dict(sorted(self.messages.items())),
            "delay": {"count": self.delay.count, "sum": self.delay.sum},
            "queue": dict(sorted(self.queue.items())),
            "queue_oldest": self.queue_oldest,
            "shaping": [{"destination": d, "event": e, "value": n}
                        for (d, e), n in sorted(self.shaping.items())],
            "reloads": dict(sorted(self.reloads.items())),
            "spool_backoffs": self.spool_backoffs,
            **dict(extra),
        }
