"""A pipelined LMTP load generator (what ``lmtpfast bench`` runs).

Like Postfix's smtp-source, but each connection keeps a window of
transactions in flight, so a connection costs about one round trip per
message instead of one per command.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import msgspec

from lmtpfast import Client, ConfigurationError, Delivery, LMTPError, Timeouts, connect

__all__ = ["BenchConfig", "BenchReport", "make_message", "run_bench"]


class BenchConfig(msgspec.Struct, frozen=True):
    server: str
    messages: int | None = 10_000
    duration: float | None = None
    connections: int = 8
    window: int = 32  # transactions in flight per connection
    recipients: int = 1
    recipient_pattern: str = "user{n}@example.com"
    sender: str = "bench@example.org"
    size: int = 1024
    message: bytes | None = None  # send this instead of a generated message of ``size``
    pipelining: bool = True
    chunking: str = "auto"  # auto: BDAT when advertised; on: require it; off: DATA
    rate: float | None = None  # messages per second across all connections


class BenchReport(msgspec.Struct):
    server: str
    chunking: bool
    pipelining: bool
    connections: int
    recipients_per_message: int
    message_size: int
    messages: int
    recipients: int
    elapsed: float
    messages_per_second: float
    recipients_per_second: float
    megabytes_per_second: float
    latency_ms: dict[str, float]
    outcomes: dict[str, int]
    cpu_seconds: float
    cpu_per_message_us: float
    errors: list[str]


def make_message(size: int, n: int = 0) -> bytes:
    """A plain-text message of about ``size`` bytes with 76-character lines."""
    head = (
        b"From: bench@example.org\r\nTo: user@example.com\r\n"
        b"Subject: lmtpfast bench %d\r\nMessage-ID: <%d@bench.lmtpfast>\r\n\r\n" % (n, n)
    )
    line = b"The quick brown fox jumps over the lazy dog; lmtpfast load generator text.\r\n"
    body_len = max(0, size - len(head))
    body = (line * (body_len // len(line) + 1))[:body_len]
    if body and not body.endswith(b"\r\n"):
        body = body[:-2] + b"\r\n" if len(body) >= 2 else b"\r\n"
    return head + body


def _percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    samples.sort()
    n = len(samples)

    def at(q: float) -> float:
        return samples[min(n - 1, int(q * n))] * 1000

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": samples[-1] * 1000}


async def run_bench(
    config: BenchConfig, *, timeouts: Timeouts | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> BenchReport:
    """Run one load test and report what happened.

    ``progress(messages_done, elapsed)`` is called about once a second.
    """
    message = config.message if config.message is not None else make_message(config.size)
    recipients = [config.recipient_pattern.format(n=i + 1) for i in range(config.recipients)]
    latencies: list[float] = []
    outcomes: Counter[tuple[int, str | None]] = Counter()
    errors: list[str] = []
    sent = 0
    done_msgs = 0
    deadline = None
    budget = config.messages
    loop = asyncio.get_running_loop()

    def take() -> bool:
        nonlocal sent
        if budget is not None and sent >= budget:
            return False
        if deadline is not None and loop.time() >= deadline:
            return False
        sent += 1
        return True

    # One Delivery, built (and encoded) once and sent again and again, as
    # smtp-source sends one message: the cost measured is the delivery's.
    delivery = Delivery.build(message, sender=config.sender, recipients=recipients)

    def plain(started: deque[float]) -> Iterator[Delivery]:
        while take():
            started.append(time.perf_counter())
            yield delivery

    async def paced(started: deque[float]) -> AsyncIterator[Delivery]:
        # This connection's share of --rate, one delivery per tick.
        tick = config.connections / config.rate if config.rate else 0.0
        due = time.perf_counter()
        while take():
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            due = max(due, now) + tick
            started.append(time.perf_counter())
            yield delivery

    async def worker(conn: Client) -> None:
        nonlocal done_msgs
        # One send_many per connection, `window` transactions in flight. The
        # results of one connection come in the order sent (the same delivery
        # each time: none is decided locally ahead of the others).
        started: deque[float] = deque()
        source = paced(started) if config.rate else plain(started)
        try:
            async for _, results in conn.send_many(source, window=config.window):
                latencies.append(time.perf_counter() - started.popleft())
                for r in results:
                    outcomes[(r.code, r.enhanced)] += 1  # formatted once, at the end
                done_msgs += 1
        except LMTPError as exc:
            errors.append(str(exc))

    conns = await asyncio.gather(*[
        connect(config.server, pipelining=config.pipelining, timeouts=timeouts,
                chunking=config.chunking != "off")
        for _ in range(config.connections)
    ])
    if config.chunking == "on" and not conns[0].chunking:
        await asyncio.gather(*[c.quit() for c in conns], return_exceptions=True)
        raise ConfigurationError("--chunking on: the server does not offer CHUNKING")
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if config.duration is not None:
        deadline = loop.time() + config.duration
    ticker = None
    if progress is not None:
        async def tick() -> None:
            while True:
                await asyncio.sleep(1.0)
                progress(done_msgs, time.perf_counter() - t0)

        ticker = asyncio.ensure_future(tick())
    try:
        await asyncio.gather(*[worker(conn) for conn in conns])
    finally:
        if ticker is not None:
            ticker.cancel()
        elapsed = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.gather(*[c.quit() for c in conns], return_exceptions=True)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    rcpts = sum(outcomes.values())
    return BenchReport(
        server=config.server,
        chunking=conns[0].chunking,
        pipelining=conns[0].pipelining,
        connections=config.connections,
        recipients_per_message=config.recipients,
        message_size=len(message),
        messages=done_msgs,
        recipients=rcpts,
        elapsed=elapsed,
        messages_per_second=done_msgs / elapsed if elapsed else 0.0,
        recipients_per_second=rcpts / elapsed if elapsed else 0.0,
        megabytes_per_second=done_msgs * len(message) / elapsed / 1e6 if elapsed else 0.0,
        latency_ms=_percentiles(latencies),
        outcomes={f"{code} {enh or ''}".strip(): n for (code, enh), n in outcomes.items()},
        cpu_seconds=cpu,
        cpu_per_message_us=cpu / done_msgs * 1e6 if done_msgs else 0.0,
        errors=errors[:10],
    )


def format_report(report: BenchReport) -> Sequence[str]:
    lat = report.latency_ms
    lines = [
        f"server {report.server}: {report.connections} connections"
        f"{', pipelining' if report.pipelining else ''}{', BDAT' if report.chunking else ''}, "
        f"{report.recipients_per_message} recipient(s), {report.message_size} bytes",
        f"messages   {report.messages} in {report.elapsed:.3f}s = "
        f"{report.messages_per_second:,.0f} msg/s",
        f"recipients {report.recipients} = {report.recipients_per_second:,.0f} rcpt/s, "
        f"{report.megabytes_per_second:.1f} MB/s",
    ]
    if lat:
        lines.append(
            f"latency ms p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  "
            f"max {lat['max']:.2f}"
        )
    lines.append(f"client CPU {report.cpu_seconds:.3f}s = {report.cpu_per_message_us:.1f} us/msg")
    lines.append("outcomes   " + ", ".join(f"{k}: {v}" for k, v in sorted(report.outcomes.items())))
    for err in report.errors:
        lines.append(f"error      {err}")
    return lines
