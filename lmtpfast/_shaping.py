"""Traffic shaping per destination, with the semantics of Postfix's queue manager (qmgr).

The agent asks a :class:`DestinationShaper` before each transaction
(:meth:`~DestinationShaper.admit`) and tells it how the transaction went
(:meth:`~DestinationShaper.done`). Between the agent and the pool it decides
*whether* and *when* a transaction may start; the pool still decides on which
connection.

* **Concurrency with slow start** (``concurrency_limit``,
  ``initial_concurrency``): a window of transactions in flight starts at the
  initial concurrency; each transaction that reached the server adds
  ``1/window`` to a success count and each that could not get a session takes
  ``1/window`` off a failure count; a whole unit moves the window by one
  (Postfix 2.5's "1/concurrency" feedback with hysteresis 1), between 1 and
  the limit. Waiters are served in order.
* **Rate delay** (``rate_delay``, Postfix's ``destination_rate_delay``): one
  transaction at a time, the next starting that long after the previous ended.
* **Message rate** (``message_rate``): starts spaced ``1/rate`` seconds apart.
* **Dead destinations** (``dead_after``, ``dead_time``): after that many
  transactions in a row could not get a session, the destination is dead for
  ``dead_time`` seconds: :meth:`~DestinationShaper.admit` answers ``None`` at
  once and the agent defers those recipients without connecting
  (``_failures.DEAD_DESTINATION``, 451 4.4.1: never a bounce). Then one
  transaction probes; its success revives the destination (window back to
  the initial concurrency), its failure makes it dead again.

What several processes (or hosts) should agree on, dead marks and message-rate
slots, lives behind :class:`ShapingState`; :class:`LocalShapingState` keeps it
in memory for one process (and survives a SIGHUP reload: the daemon hands the
same object to the new agent). A shared implementation (PostgreSQL) keeps a
local mirror so these calls stay synchronous and cheap. A state that is
``shared`` (PostgreSQL) also holds the concurrency and rate limits for all
the workers: on top of its own window, each transaction then takes a leased
slot there (:meth:`ShapingState.acquire_slot`) and gives it back when done;
when the state cannot be reached, :meth:`DestinationShaper.admit` raises
:class:`ShapingUnavailable` and the agent defers (never bounces, never
starts past the limit). Time comes from
``clock`` and waiting from ``sleep`` (both injectable), so tests run in
virtual time. Every decision is reported to the listeners as a
:class:`ShapingEvent` (the daemon logs and counts them).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from ._settings import ShapingSettings

__all__ = [
    "PROBE",
    "DestinationShaper",
    "LocalShapingState",
    "Shaper",
    "ShapingEvent",
    "ShapingState",
    "ShapingUnavailable",
    "Ticket",
]

#: How a transaction went, as far as shaping cares: it reached the server
#: (whatever the server answered), it could not get a session (set-up failed),
#: the session broke under it, or it was cut short here (cancelled, shut down).
Outcome = Literal["ok", "setup_failed", "broken", "cancelled"]
EventName = Literal["throttled", "grown", "delayed", "marked_dead", "deferred_dead", "probe",
                    "revived", "unavailable"]

#: Polls of a full shared limit: the first after this, doubling up to ``_POLL_MAX``.
_POLL_MIN = 0.005
_POLL_MAX = 0.25


class ShapingUnavailable(Exception):
    """The shared shaping state cannot be asked (database down): defer, never bounce."""

#: Admission tickets: a normal transaction, or the one probing a dead destination.
Ticket = Literal["normal", "probe"]
NORMAL: Ticket = "normal"
PROBE: Ticket = "probe"


@dataclass(frozen=True, slots=True)
class ShapingEvent:
    """One shaping decision about a destination (for the log and the metrics)."""

    destination: str
    event: EventName
    #: The window after the event (``inf`` when unlimited).
    window: float
    detail: str = ""


class ShapingState:
    """What the processes delivering to a destination share: dead marks and rate slots.

    Times are the shaper's clock. Calls are synchronous and cheap (a shared
    implementation answers from a local mirror it refreshes in the background).
    """

    def dead_until(self, destination: str) -> float:
        """When the destination's dead spell ends (0.0: it is not dead)."""
        raise NotImplementedError

    def mark_dead(self, destination: str, until: float, reason: str) -> None:
        """Mark it dead until ``until`` (also ends a probe: another may be claimed then)."""
        raise NotImplementedError

    def reason(self, destination: str) -> str:
        """Why it was marked dead (the last set-up failure), or ``""``."""
        raise NotImplementedError

    def claim_probe(self, destination: str, now: float) -> bool:
        """True for exactly one caller once a dead spell has ended (it probes)."""
        raise NotImplementedError

    def revive(self, destination: str) -> None:
        """The probe got through: the destination is alive."""
        raise NotImplementedError

    def reserve_start(self, destination: str, now: float, interval: float) -> float:
        """Reserve the next start slot ``interval`` seconds after the previous; returns it."""
        raise NotImplementedError

    #: True when the limits hold across processes: the shaper then calls
    #: :meth:`acquire_slot` and :meth:`release_slot` around every transaction.
    shared = False

    async def acquire_slot(self, destination: str, limit: int, step: float
                           ) -> tuple[int, float] | None:
        """Take one of ``limit`` slots (0: no limit) and reserve a start ``step`` seconds
        after the previous (< 0: none); returns (token, seconds to wait) or ``None`` when
        all slots are taken. Raises :class:`ShapingUnavailable` when it cannot tell."""
        raise NotImplementedError

    def release_slot(self, destination: str, token: int, delay: float) -> None:
        """Give the slot back (in the background); no start before ``delay`` seconds."""
        raise NotImplementedError


class LocalShapingState(ShapingState):
    """:class:`ShapingState` in this process's memory."""

    def __init__(self) -> None:
        # destination -> [dead until, probe claimed, reason]
        self._dead: dict[str, list[object]] = {}
        self._next_start: dict[str, float] = {}

    def dead_until(self, destination: str) -> float:
        entry = self._dead.get(destination)
        return 0.0 if entry is None else entry[0]  # type: ignore[return-value]

    def mark_dead(self, destination: str, until: float, reason: str) -> None:
        self._dead[destination] = [until, False, reason]

    def reason(self, destination: str) -> str:
        entry = self._dead.get(destination)
        return "" if entry is None else str(entry[2])

    def claim_probe(self, destination: str, now: float) -> bool:
        entry = self._dead.get(destination)
        if entry is None or entry[1] or now < entry[0]:  # type: ignore[operator]
            return False
        entry[1] = True
        return True

    def revive(self, destination: str) -> None:
        self._dead.pop(destination, None)

    def reserve_start(self, destination: str, now: float, interval: float) -> float:
        start = max(now, self._next_start.get(destination, now))
        self._next_start[destination] = start + interval
        return start


class DestinationShaper:
    """The shaping of one destination: window, delays, dead marks."""

    __slots__ = ("_failure", "_failures_in_row", "_inflight", "_next_start", "_shaper",
                 "_success", "_tokens", "_waiters", "destination", "settings", "window")

    def __init__(self, shaper: Shaper, destination: str, settings: ShapingSettings) -> None:
        self._shaper = shaper
        self.destination = destination
        self.settings = settings
        limit = settings.concurrency_limit
        #: Transactions allowed in flight now (Postfix's window).
        self.window = float(min(settings.initial_concurrency, limit)) if limit else math.inf
        self._inflight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._success = 0.0
        self._failure = 0.0
        self._failures_in_row = 0
        self._next_start = 0.0  # rate_delay: no start before this
        #: Shared slots held by this worker's transactions (interchangeable).
        self._tokens: list[int] = []

    def __repr__(self) -> str:
        return (f"<DestinationShaper {self.destination} window={self.window:g} "
                f"inflight={self._inflight} waiting={len(self._waiters)}>")

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def limit(self) -> float:
        """Transactions that may be in flight now."""
        return 1.0 if self.settings.rate_delay > 0 else self.window  # whole numbers (or inf)

    @property
    def failures_in_row(self) -> int:
        return self._failures_in_row

    def dead(self) -> bool:
        """Marked dead now (its mail is deferred without connecting)?"""
        return self._shaper.state.dead_until(self.destination) > 0

    def reason(self) -> str:
        return self._shaper.state.reason(self.destination)

    def unshaped(self) -> bool:
        """No limit, no pace, not dead: a transaction may start now without asking.

        ``Agent.deliver_many`` pipelines to such a destination without a
        ticket per transaction (and calls :meth:`reached` when it answers).
        """
        s = self.settings
        return (not s.concurrency_limit and s.rate_delay <= 0 and s.message_rate <= 0
                and not self._shaper.state.dead_until(self.destination))

    def reached(self) -> None:
        """A transaction sent without a ticket was answered (the "ok" of :meth:`done`)."""
        self._failures_in_row = 0
        self._failure = 0.0

    # -- admission -----------------------------------------------------------------------

    async def admit(self) -> Ticket | None:
        """Wait until a transaction may start; ``None``: dead, defer without connecting.

        Every ticket must be given back with :meth:`done`.
        """
        sh = self._shaper
        state = sh.state
        ticket: Ticket = NORMAL
        if state.dead_until(self.destination):
            if not state.claim_probe(self.destination, sh.clock()):
                sh.emit(self, "deferred_dead")
                return None
            ticket = PROBE
            sh.emit(self, "probe")
        if self._inflight < self.limit and not self._waiters:
            self._inflight += 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut  # the slot is ours when it resolves (done() counted it)
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release()
                else:
                    self._waiters.remove(fut)
                if ticket is PROBE:
                    self._end_probe()
                raise
            if ticket is NORMAL and state.dead_until(self.destination):
                # It died while this one waited: defer it without connecting.
                self._release()
                sh.emit(self, "deferred_dead")
                return None
        try:
            if state.shared:
                await self._acquire_shared()
            else:
                await self._pace()
        except BaseException as exc:
            self._release()
            if ticket is PROBE:
                self._end_probe()
            if isinstance(exc, ShapingUnavailable):
                sh.emit(self, "unavailable", str(exc))
            raise
        return ticket

    def _shared_limit(self) -> tuple[int, float]:
        """(slots across all workers, rate step; < 0: no rate) for the shared state."""
        s = self.settings
        limit = 1 if s.rate_delay > 0 else s.concurrency_limit
        step = 1.0 / s.message_rate if s.message_rate > 0 else (
            0.0 if s.rate_delay > 0 else -1.0)
        return limit, step

    async def _acquire_shared(self) -> None:
        """Wait for a slot of the shared limit, then for the shared start (rate)."""
        limit, step = self._shared_limit()
        if limit <= 0 and step < 0:
            return
        sh = self._shaper
        poll = _POLL_MIN
        waited = 0.0
        bound = max(60.0, 2 * self.settings.dead_time)
        while True:
            got = await sh.state.acquire_slot(self.destination, limit, step)
            if got is not None:
                break
            # Full across the workers: look again soon (a release or an expired lease
            # frees one). Bounded: after ``bound`` seconds, defer.
            if waited >= bound:
                raise ShapingUnavailable(f"no free slot of {limit} for {self.destination} "
                                         f"within {bound:g}s")
            await sh.sleep(poll)
            waited += poll
            poll = min(_POLL_MAX, poll * 2)
        token, wait = got
        if limit > 0:
            self._tokens.append(token)
        local = self._next_start - sh.clock() if self.settings.rate_delay > 0 else 0.0
        wait = max(wait, local)
        if wait > 0:
            sh.emit(self, "delayed", f"{wait:.3f}s")
            try:
                await sh.sleep(wait)
            except BaseException:
                self._give_back_slot()
                raise

    def _give_back_slot(self) -> None:
        if self._tokens:
            self._shaper.state.release_slot(self.destination, self._tokens.pop(),
                                            self.settings.rate_delay)

    async def _pace(self) -> None:
        s = self.settings
        sh = self._shaper
        if s.rate_delay <= 0 and s.message_rate <= 0:
            return
        now = sh.clock()
        start = self._next_start if s.rate_delay > 0 else now
        if s.message_rate > 0:
            start = sh.state.reserve_start(self.destination, max(start, now),
                                           1.0 / s.message_rate)
        if start > now:
            sh.emit(self, "delayed", f"{start - now:.3f}s")
            await sh.sleep(start - now)

    # -- feedback --------------------------------------------------------------------------

    def done(self, ticket: Ticket, outcome: Outcome, reason: str = "") -> None:
        """Give the ticket back and say how the transaction went (``reason``: the failure)."""
        sh = self._shaper
        s = self.settings
        if s.rate_delay > 0:
            self._next_start = sh.clock() + s.rate_delay
        self._give_back_slot()
        self._release()
        if outcome == "ok":
            self._failures_in_row = 0
            self._failure = 0.0
            if ticket is PROBE:
                sh.state.revive(self.destination)
                self._restart_window()
                sh.emit(self, "revived")
            self._grow()
        elif outcome == "setup_failed":
            self._failures_in_row += 1
            self._shrink(reason)
            if ticket is PROBE or (s.dead_after and self._failures_in_row >= s.dead_after):
                self._mark_dead(reason)
        elif outcome == "broken":
            self._shrink(reason)
        elif ticket is PROBE:  # cancelled: no verdict; the next caller probes
            self._end_probe()
        self._wake()

    def _release(self) -> None:
        self._inflight -= 1
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters and self._inflight < self.limit:
            fut = waiters.popleft()
            if not fut.done():
                self._inflight += 1
                fut.set_result(None)

    def _grow(self) -> None:
        limit = self.settings.concurrency_limit
        if not limit or self.window >= limit:
            return
        self._success += 1.0 / self.window
        if self._success >= 1.0:
            self._success = 0.0
            self.window = min(self.window + 1.0, float(limit))
            self._shaper.emit(self, "grown")

    def _shrink(self, reason: str) -> None:
        if not self.settings.concurrency_limit:
            return
        self._success = 0.0
        self._failure -= 1.0 / self.window
        if self._failure <= -1.0:
            self._failure = 0.0
            if self.window > 1.0:
                self.window -= 1.0
                self._shaper.emit(self, "throttled", reason)

    def _restart_window(self) -> None:
        s = self.settings
        if s.concurrency_limit:
            self.window = float(min(s.initial_concurrency, s.concurrency_limit))
        self._success = self._failure = 0.0

    def _mark_dead(self, reason: str) -> None:
        sh = self._shaper
        until = sh.clock() + self.settings.dead_time
        sh.state.mark_dead(self.destination, until, reason)
        sh.emit(self, "marked_dead",
                f"{self._failures_in_row} failed session set-ups in a row; deferring its mail "
                f"for {self.settings.dead_time:g}s: {reason}")

    def _end_probe(self) -> None:
        # Dead again from now, so the next admission probes at once.
        sh = self._shaper
        sh.state.mark_dead(self.destination, sh.clock(), sh.state.reason(self.destination))


class Shaper:
    """The :class:`DestinationShaper` of every destination of an agent.

    ``state`` is shared with other agents (a reloaded daemon's) or processes;
    ``clock`` (seconds, monotonic) and ``sleep`` are injectable for tests.
    ``listener`` gets every :class:`ShapingEvent`.
    """

    def __init__(
        self,
        state: ShapingState | None = None,
        *,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[object]] | None = None,
        listener: Callable[[ShapingEvent], None] | None = None,
    ) -> None:
        self.state = state if state is not None else LocalShapingState()
        self.clock = clock or time.monotonic
        self.sleep = sleep or asyncio.sleep
        self.listeners: list[Callable[[ShapingEvent], None]] = [listener] if listener else []
        self._destinations: dict[str, DestinationShaper] = {}

    def destination(self, destination: str, settings: ShapingSettings) -> DestinationShaper:
        """The shaper of ``destination`` (made on first use with ``settings``)."""
        d = self._destinations.get(destination)
        if d is None:
            d = self._destinations[destination] = DestinationShaper(self, destination, settings)
        return d

    def destinations(self) -> dict[str, DestinationShaper]:
        return dict(self._destinations)

    def emit(self, d: DestinationShaper, event: EventName, detail: str = "") -> None:
        if self.listeners:
            ev = ShapingEvent(d.destination, event, d.window, detail)
            for listener in list(self.listeners):
                listener(ev)
