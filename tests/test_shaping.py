"""Traffic shaping per destination (lmtpfast/_shaping.py): Postfix qmgr semantics, tested.

The window, the delays and the dead marks are checked in virtual time (an
injected clock and sleep: nothing waits for real time); then through the agent
against real peers: a destination that refuses connections, smtp-sink stopped
and started again (marked dead, deferred without connecting, probed, revived),
Dovecot behind a concurrency window, smtp-sink counting recipients per
transaction, and replay deferring (never bouncing) a dead destination's mail.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest

from lmtpfast import (
    FAILURES,
    Agent,
    LocalShapingState,
    Shaper,
    ShapingEvent,
    ShapingSettings,
    Timeouts,
)
from lmtpfast._shaping import PROBE, DestinationShaper
from lmtpfast._testing._procs import free_tcp_port
from lmtpfast._testing.postfix import split_capture
from lmtpfast.spool import Observer, Outcome, Replayer, RetryPolicy, Spool

SENDER = "sender@example.org"
MSG = b"Subject: shaping\r\n\r\nbody\r\n"
DEAD = FAILURES["destination-dead"]


class VirtualTime:
    """A clock that moves only when someone sleeps (or the test moves it)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        # Each sleeper wakes at its own time: concurrent sleeps do not add up.
        self.slept.append(round(seconds, 6))
        wake = self.now + seconds
        await asyncio.sleep(0)
        self.now = max(self.now, wake)


def shaper_for(vt: VirtualTime, events: list[ShapingEvent] | None = None,
               state: LocalShapingState | None = None, **settings: Any) -> DestinationShaper:
    sh = Shaper(state, clock=vt.clock, sleep=vt.sleep,
                listener=events.append if events is not None else None)
    return sh.destination("unix:/dest", ShapingSettings(**settings))


async def settle(cond: Any, limit: int = 1000) -> None:
    """Let the other tasks run until ``cond()`` (bounded)."""
    for _ in range(limit):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never came true")


# -- the window: slow start and back-off -------------------------------------------------


async def test_slow_start_grows_one_per_window_of_successes() -> None:
    d = shaper_for(VirtualTime(), concurrency_limit=4, initial_concurrency=1)
    windows = []
    for _ in range(8):
        ticket = await d.admit()
        assert ticket == "normal"
        d.done(ticket, "ok")
        windows.append(d.window)
    # +1/window per success: 1 success at 1, 2 at 2, 3 at 3, then the limit.
    assert windows == [2, 2, 3, 3, 3, 4, 4, 4]


async def test_failures_shrink_the_window_but_never_below_one() -> None:
    events: list[ShapingEvent] = []
    d = shaper_for(VirtualTime(), events, concurrency_limit=3, initial_concurrency=3,
                   dead_after=0)
    windows = []
    for _ in range(7):
        ticket = await d.admit()
        assert ticket is not None
        d.done(ticket, "setup_failed", "connection refused")
        windows.append(d.window)
    assert windows == [3, 3, 2, 2, 1, 1, 1]
    assert [e.event for e in events] == ["throttled", "throttled"]
    assert events[0].detail == "connection refused"
    assert not d.dead()  # dead_after=0: never marked dead


async def test_the_window_bounds_transactions_in_flight_in_order() -> None:
    d = shaper_for(VirtualTime(), concurrency_limit=2, initial_concurrency=2)
    admitted: list[int] = []

    async def one(i: int) -> None:
        await d.admit()
        admitted.append(i)

    tasks = [asyncio.ensure_future(one(i)) for i in range(5)]
    await settle(lambda: len(admitted) == 2)
    for _ in range(5):
        await asyncio.sleep(0)
    assert admitted == [0, 1] and d.inflight == 2
    d.done("normal", "broken")  # a failure: no growth, a slot freed
    await settle(lambda: len(admitted) == 3)
    assert admitted == [0, 1, 2] and d.inflight == 2
    for t in tasks[3:]:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert d.inflight == 2  # cancelled waiters took no slot


async def test_unlimited_by_default() -> None:
    d = shaper_for(VirtualTime())
    tickets = [await d.admit() for _ in range(100)]
    assert all(t == "normal" for t in tickets) and d.inflight == 100
    assert math.isinf(d.window)


# -- delays -------------------------------------------------------------------------------


async def test_rate_delay_serialises_and_spaces_the_transactions() -> None:
    vt = VirtualTime()
    d = shaper_for(vt, rate_delay=2.0, concurrency_limit=10)
    starts: list[float] = []

    async def one() -> None:
        ticket = await d.admit()
        assert ticket is not None
        starts.append(vt.now)
        await asyncio.sleep(0)
        vt.now += 0.5  # the transaction takes half a second
        d.done(ticket, "ok")

    await asyncio.gather(*(one() for _ in range(4)))
    # One at a time (the limit is 1 whatever the window), 2 s after the previous ended.
    assert [s - starts[0] for s in starts] == [0.0, 2.5, 5.0, 7.5]


async def test_message_rate_spaces_starts_whatever_the_concurrency() -> None:
    vt = VirtualTime()
    d = shaper_for(vt, message_rate=4.0)
    starts: list[float] = []

    async def one() -> None:
        ticket = await d.admit()
        assert ticket is not None
        starts.append(vt.now)

    await asyncio.gather(*(one() for _ in range(5)))
    assert sorted(round(s - 1000.0, 6) for s in starts) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert d.inflight == 5  # concurrent: only the starts are spaced


# -- dead destinations ------------------------------------------------------------------------


async def test_dead_after_n_failures_then_probe_and_revive() -> None:
    vt = VirtualTime()
    events: list[ShapingEvent] = []
    d = shaper_for(vt, events, dead_after=3, dead_time=60.0, concurrency_limit=5,
                   initial_concurrency=2)
    for _ in range(2):
        t = await d.admit()
        assert t is not None
        d.done(t, "setup_failed", "connection refused")
    assert not d.dead()
    t = await d.admit()
    assert t is not None
    d.done(t, "ok")  # a success in between: the count starts again
    for _ in range(3):
        t = await d.admit()
        assert t is not None
        d.done(t, "setup_failed", "connection refused")
    assert d.dead() and d.reason() == "connection refused"
    assert await d.admit() is None  # deferred without connecting
    vt.now += 59.9
    assert await d.admit() is None
    vt.now += 0.1
    probe = await d.admit()
    assert probe == PROBE
    assert await d.admit() is None  # one probe at a time; the others still wait
    d.done(probe, "ok")
    assert not d.dead() and d.window == 2  # back to the initial concurrency
    assert await d.admit() == "normal"
    names = [e.event for e in events]
    assert names.count("marked_dead") == 1 and names.count("probe") == 1
    assert names[-1] == "revived"
    assert names.count("deferred_dead") == 3


async def probing(vt: VirtualTime) -> tuple[DestinationShaper, Any]:
    """A destination dead after one failure, its dead time over, and the probe's ticket."""
    d = shaper_for(vt, dead_after=1, dead_time=10.0)
    t = await d.admit()
    assert t is not None
    d.done(t, "setup_failed", "refused")
    vt.now += 10
    probe = await d.admit()
    assert probe == PROBE
    return d, probe


async def test_a_failed_probe_makes_it_dead_again() -> None:
    vt = VirtualTime()
    d, probe = await probing(vt)
    d.done(probe, "setup_failed", "still refused")
    assert d.dead() and d.reason() == "still refused"
    vt.now += 9.9
    assert await d.admit() is None
    vt.now += 0.1
    assert await d.admit() == PROBE


async def test_a_cancelled_probe_leaves_the_next_one_to_probe() -> None:
    d, probe = await probing(VirtualTime())
    d.done(probe, "cancelled")  # shut down mid-probe: no verdict
    assert d.dead()
    assert await d.admit() == PROBE


async def test_waiters_are_deferred_when_it_dies_meanwhile() -> None:
    d = shaper_for(VirtualTime(), dead_after=1, concurrency_limit=1, initial_concurrency=1)
    first = await d.admit()
    assert first is not None
    waiting = [asyncio.ensure_future(d.admit()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiting)
    d.done(first, "setup_failed", "refused")
    assert await asyncio.gather(*waiting) == [None, None, None]
    assert d.inflight == 0


async def test_the_state_is_shared_through_the_interface() -> None:
    """Two shapers (a reloaded daemon's agents, later two hosts) over one state object."""
    vt = VirtualTime()
    state = LocalShapingState()
    a = shaper_for(vt, state=state, dead_after=1)
    b = shaper_for(vt, state=state, dead_after=1)
    t = await a.admit()
    assert t is not None
    a.done(t, "setup_failed", "refused")
    assert b.dead() and await b.admit() is None


def test_settings_are_checked() -> None:
    from lmtpfast import ConfigurationError

    for bad in ({"concurrency_limit": -1}, {"initial_concurrency": 0}, {"rate_delay": -1},
                {"message_rate": float("nan")}, {"dead_time": 0}, {"dead_after": True}):
        with pytest.raises(ConfigurationError):
            ShapingSettings(**bad)


def test_shaping_from_a_config_file_table() -> None:
    from lmtpfast import config_from_dict

    cfg = config_from_dict({"transports": {"lmtp1": {
        "destination": "unix:/x", "shaping": {"concurrency_limit": 4, "rate_delay": 0.5,
                                              "dead_after": 2}}}})
    s = cfg.transports["lmtp1"].shaping
    assert (s.concurrency_limit, s.rate_delay, s.dead_after, s.initial_concurrency) == (
        4, 0.5, 2, 5)


# -- real peers, through the agent ----------------------------------------------------------


def _agent(dest: str, vt: VirtualTime, events: list[ShapingEvent], engine: str,
           **settings: Any) -> Agent:
    agent = Agent.for_server(dest, timeouts=Timeouts.scaled(0.05), connect_backoff=0,
                             engine=engine, clock=vt.clock, on_shaping=events.append,
                             **settings)
    agent.shaper.sleep = vt.sleep
    return agent


async def test_a_refusing_destination_is_marked_dead_and_not_connected(engine: str) -> None:
    vt = VirtualTime()
    events: list[ShapingEvent] = []
    dest = f"127.0.0.1:{free_tcp_port()}"  # nothing listens: connection refused
    async with _agent(dest, vt, events, engine, dead_after=3, dead_time=30.0) as agent:
        results = [await agent.deliver(MSG, sender=SENDER, recipients=[f"u{i}@example.org"])
                   for i in range(6)]
        (pool,) = agent.pools().values()
        assert pool.stats.connect_failures == 3  # the last three never connected
    for (r,) in results[:3]:
        assert (r.code, r.enhanced, r.stage, r.transient) == (451, "4.4.1", "connect", True)
        assert "cannot connect" in r.text
    for (r,) in results[3:]:
        assert (r.code, r.enhanced, r.stage, r.transient, r.local) == (
            DEAD.code, DEAD.enhanced, DEAD.stage, True, True)
        assert "marked dead after 3" in r.text and r.destination == dest
    assert [e.event for e in events] == ["marked_dead", "deferred_dead", "deferred_dead",
                                         "deferred_dead"]


@pytest.mark.postfix
async def test_stopped_and_restarted_back_end(smtp_sink: Any, engine: str) -> None:
    sink = smtp_sink()
    vt = VirtualTime()
    events: list[ShapingEvent] = []
    async with _agent(sink.destination, vt, events, engine, dead_after=2,
                      dead_time=30.0, max_connections=1) as agent:
        (ok,) = await agent.deliver(MSG, sender=SENDER, recipients=["a@example.org"])
        assert ok.delivered
        sink.stop()
        agent.pools()[next(iter(agent.pools()))].expire_connections()
        down = [await agent.deliver(MSG, sender=SENDER, recipients=["b@example.org"])
                for _ in range(4)]
        (pool,) = agent.pools().values()
        failures = pool.stats.connect_failures
        assert [r.transient for (r,) in down] == [True] * 4
        assert [r.enhanced == DEAD.enhanced and "marked dead" in r.text
                for (r,) in down] == [False, False, True, True]
        sink.start()
        (still,) = await agent.deliver(MSG, sender=SENDER, recipients=["c@example.org"])
        assert "marked dead" in still.text  # dead until its time is up, even if back
        vt.now += 30.0
        (probe,) = await agent.deliver(MSG, sender=SENDER, recipients=["d@example.org"])
        assert probe.delivered, probe
        (after,) = await agent.deliver(MSG, sender=SENDER, recipients=["e@example.org"])
        assert after.delivered
        assert pool.stats.connect_failures == failures == 2
    names = [e.event for e in events]
    assert names == ["marked_dead", "deferred_dead", "deferred_dead", "deferred_dead", "probe",
                     "revived"]


@pytest.mark.dovecot
async def test_concurrency_window_with_dovecot(dovecot: Any, engine: str) -> None:
    vt = VirtualTime()
    events: list[ShapingEvent] = []
    async with _agent(dovecot.destination_unix, vt, events, engine, concurrency_limit=2,
                      initial_concurrency=1, pipeline_depth=1) as agent:
        results = await asyncio.gather(*(
            agent.deliver(MSG + f"n={i}\r\n".encode(), sender=SENDER,
                          recipients=["alice@example.org"]) for i in range(12)))
        (pool,) = agent.pools().values()
        (shaped,) = agent.shaper.destinations().values()
        # Never more transactions in flight than the window (one per connection
        # here), and the window grew from 1 to its limit.
        assert pool.stats.peak_connections == 2
        assert shaped.window == 2 and shaped.inflight == 0
    assert all(r.delivered for (r,) in results)
    assert len(dovecot.messages("alice")) == 12
    assert [e.event for e in events] == ["grown"]


@pytest.mark.postfix
async def test_recipients_per_transaction_and_rate_delay(smtp_sink: Any, engine: str) -> None:
    sink = smtp_sink(capture=True)
    vt = VirtualTime()
    events: list[ShapingEvent] = []
    rcpts = [f"r{i}@example.org" for i in range(7)]
    async with _agent(sink.destination, vt, events, engine, recipient_limit=3,
                      rate_delay=5.0) as agent:
        results = await agent.deliver(MSG, sender=SENDER, recipients=rcpts)
        (shaped,) = agent.shaper.destinations().values()
        assert shaped.inflight == 0
    assert all(r.delivered for r in results)
    got = []
    for dump in sink.captures():
        meta, _ = split_capture(dump)
        got.append(len(meta.get("X-Rcpt-Args", [])))
    assert sorted(got) == [1, 3, 3]
    # Three transactions, one at a time, each 5 s (virtual) after the previous ended.
    assert vt.slept == [5.0, 5.0]
    assert [e.event for e in events] == ["delayed", "delayed"]


class Recorder(Observer):
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def outcome(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


async def test_replay_defers_a_dead_destinations_mail(tmp_path: Path, engine: str) -> None:
    """Nothing bounces and nothing is lost: every entry stays queued, deferred 4.4.1."""
    spool = Spool(tmp_path / "spool", create=True)
    ids = [spool.enqueue(MSG, SENDER, [f"u{i}@example.org"], fsync=False) for i in range(5)]
    vt = VirtualTime()
    events: list[ShapingEvent] = []
    rec = Recorder()
    async with _agent(f"unix:{tmp_path}/nobody", vt, events, engine, dead_after=2) as agent:
        await Replayer(spool, agent, observer=rec, policy=RetryPolicy(min_backoff=0),
                       concurrency=1).run()
        (pool,) = agent.pools().values()
        assert pool.stats.connect_failures == 2
    assert sorted(o.id for o in rec.outcomes) == sorted(ids)
    assert {o.outcome for o in rec.outcomes} == {"deferred"}
    assert sum("marked dead" in o.text for o in rec.outcomes) == 3
    assert all(o.enhanced == "4.4.1" for o in rec.outcomes)
    counts = spool.count()
    assert counts.get("deferred", 0) == 5 and counts.get("failed", 0) == 0, counts
