"""The Prometheus endpoint (``--metrics-listen HOST:PORT``): ``prometheus_client`` over our
counters.

The delivery path counts into a :class:`lmtpfast.Metrics` (plain dicts, no
locks); this collector turns those numbers, the agent's pools and the maps'
caches into metric families when Prometheus scrapes, on the HTTP server
thread of ``prometheus_client.start_http_server``. Reading the counters from
that thread is safe: each dict is copied in one step (``list(d.items())``,
atomic under the GIL) before it is iterated. ``docs/operations.md`` lists
every metric.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from lmtpfast import Metrics

__all__ = ["MetricsCollector", "serve"]


def _pools(agent: Any) -> list[tuple[str, Any]]:
    pools = getattr(agent, "pools", None)
    if pools is None:
        return []
    return [(str(dest), pool) for (_, dest), pool in list(pools().items())]


def _maps(agent: Any) -> list[Any]:
    maps = getattr(agent, "maps", None)
    return list(maps()) if maps is not None else []


class MetricsCollector:
    """A ``prometheus_client`` custom collector over one :class:`Metrics` and the current agent."""

    def __init__(self, metrics: Metrics, agent: Callable[[], Any]) -> None:
        self.metrics = metrics
        self.agent = agent

    def describe(self) -> list[Any]:
        return []  # families are built per scrape (labels come and go with destinations)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        m = self.metrics
        c = CounterMetricFamily("lmtpfast_deliveries", "Recipient outcomes by destination, "
                                "status (sent, deferred, bounced) and enhanced-code class X.Y",
                                labels=["destination", "status", "dsn"])
        for (dest, status, dsn), n in list(m.deliveries.items()):
            c.add_metric([dest, status, dsn], n)
        yield c
        h = HistogramMetricFamily("lmtpfast_stage_seconds", "Latency per protocol stage and "
                                  "destination (delivery: one attempt, set-up included)",
                                  labels=["destination", "stage"])
        for (dest, stage), hist in list(m.latency.items()):
            h.add_metric([dest, stage], hist.cumulative(), hist.sum)
        yield h
        d = HistogramMetricFamily("lmtpfast_delivery_delay_seconds",
                                  "Arrival to delivery of delivered recipients (Postfix delay=)")
        d.add_metric([], m.delay.cumulative(), m.delay.sum)
        yield d
        b = CounterMetricFamily("lmtpfast_bytes_sent", "Message bytes sent, by destination",
                                labels=["destination"])
        for dest, n in list(m.bytes_sent.items()):
            b.add_metric([dest], n)
        yield b
        g = CounterMetricFamily("lmtpfast_messages", "Messages attempted, by what became of "
                                "them", labels=["outcome"])
        for what, n in list(m.messages.items()):
            g.add_metric([what], n)
        yield g
        q = GaugeMetricFamily("lmtpfast_queue_entries", "Queue entries by state",
                              labels=["state"])
        for state, n in list(m.queue.items()):
            q.add_metric([state], n)
        yield q
        oldest = m.queue_oldest
        yield GaugeMetricFamily("lmtpfast_queue_oldest_age_seconds",
                                "Age of the oldest queued entry (0: none)",
                                value=max(0.0, time.time() - oldest) if oldest else 0.0)
        s = CounterMetricFamily("lmtpfast_shaping_events", "Traffic shaping by destination: "
                                "throttled, grown, delayed, marked_dead, deferred_dead, probe, "
                                "revived, unavailable",
                                labels=["destination", "event"])
        for (dest, event), n in list(m.shaping.items()):
            s.add_metric([dest, event], n)
        yield s
        r = CounterMetricFamily("lmtpfast_reloads", "Configuration reloads (SIGHUP) by result",
                                labels=["result"])
        for result, n in list(m.reloads.items()):
            r.add_metric([result], n)
        yield r
        yield CounterMetricFamily("lmtpfast_spool_backoffs",
                                  "Times delivery paused because the spool refused a write",
                                  value=m.spool_backoffs)
        yield from self._pool_families()
        yield from self._map_families()

    def _pool_families(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        agent = self.agent()
        size = GaugeMetricFamily("lmtpfast_pool_connections", "Open connections per pool",
                                 labels=["destination"])
        idle = GaugeMetricFamily("lmtpfast_pool_idle_connections", "Idle connections per pool",
                                 labels=["destination"])
        counters = {
            "connections_opened": "Connections opened",
            "connections_reused": "Times a connection was reused for another transaction",
            "connections_closed": "Connections closed",
            "connect_failures": "Connection set-ups that failed",
            "transactions": "Transactions sent",
        }
        fams = {k: CounterMetricFamily(f"lmtpfast_pool_{k}", v, labels=["destination"])
                for k, v in counters.items()}
        for dest, pool in _pools(agent):
            size.add_metric([dest], getattr(pool, "size", 0))
            idle.add_metric([dest], getattr(pool, "idle_connections", 0))
            stats = pool.stats
            for k, fam in fams.items():
                fam.add_metric([dest], getattr(stats, k, 0))
        yield size
        yield idle
        yield from fams.values()

    def _map_families(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        lookups = CounterMetricFamily("lmtpfast_map_lookups", "Keys looked up in a cached map",
                                      labels=["map"])
        hits = CounterMetricFamily("lmtpfast_map_hits", "Keys answered from the map cache",
                                   labels=["map"])
        fails = CounterMetricFamily("lmtpfast_map_failures", "Keys whose backend lookup failed",
                                    labels=["map"])
        entries = GaugeMetricFamily("lmtpfast_map_cache_entries", "Keys held in the map cache",
                                    labels=["map"])
        for mp in _maps(self.agent()):
            st = getattr(mp, "stats", None)
            if st is None:
                continue
            name = mp.mapname
            hit = st.hits + st.negative_hits
            lookups.add_metric([name], hit + st.misses)
            hits.add_metric([name], hit)
            fails.add_metric([name], st.backend_failures)
            entries.add_metric([name], st.size)
        yield lookups
        yield hits
        yield fails
        yield entries


def serve(listen: str, metrics: Metrics, agent: Callable[[], Any],
          extra: Sequence[Any] = ()) -> tuple[Any, Any]:
    """Start the endpoint on ``HOST:PORT`` (``[::1]:PORT`` for IPv6); returns (server, thread).

    Port 0 picks a free port: ``server.server_port`` says which. ``extra``
    collectors add a command's own families (the proxy's counters).
    """
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.process_collector import ProcessCollector

    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit():
        raise ValueError(f"--metrics-listen {listen!r}: give HOST:PORT, e.g. 127.0.0.1:9124")
    registry = CollectorRegistry()
    registry.register(MetricsCollector(metrics, agent))
    for collector in extra:
        registry.register(collector)
    ProcessCollector(registry=registry)
    server, thread = start_http_server(int(port), addr=host, registry=registry)
    return server, thread
