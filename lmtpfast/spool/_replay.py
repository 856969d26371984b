"""The replay engine: deliver a spool's due messages and record every outcome.

>>> async with Agent.for_server("unix:/run/dovecot/lmtp") as agent:   # doctest: +SKIP
...     async with open_queue("/var/spool/lmtpfast") as queue:
...         totals = await Replayer(queue, agent).run()

Replay delivers through :class:`~lmtpfast.Agent` only (a bare ``--server``
is an agent with one default route): each entry becomes one
:class:`~lmtpfast.Delivery` with its DSN (RET, ENVID; NOTIFY and ORCPT per
recipient), which reaches every back end that advertises DSN.

Per recipient: delivered → removed from the envelope; permanent → kept as
``failed`` with its reply; transient → kept ``queued`` and the message is tried
again after an exponential backoff, until the maximal queue lifetime makes the
failure final (Postfix's ``maximal_queue_lifetime``). A message leaves the
queue only when every recipient has a final outcome: deleted when all were
delivered, moved to ``failed/`` otherwise.

The scan is lazy and the number of messages in memory is bounded by
``concurrency``, so memory does not grow with the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import msgspec

from .._delivery import BadSender, Delivery, MessageFile
from .._dsn import DSN
from .._errors import ConfigurationError, ContentError, LMTPError
from .._failures import BAD_CONTENT, BAD_SENDER, LOCAL_ERROR
from .._metrics import METRICS, TRACE, Trace
from .._results import RecipientResult
from ._format import Envelope, Reason, Recipient
from ._queue import Entry, Queue, QueueCorrupt, QueueError, QueueWriteError, Selection, Update
from ._store import Spool

if TYPE_CHECKING:
    from .._agent import Agent

__all__ = [
    "Observer",
    "Outcome",
    "Replayer",
    "RetryPolicy",
    "Totals",
    "delivery_for",
    "exit_status",
]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to try a deferred message again, and when to give up (Postfix's defaults)."""

    #: First retry delay (``minimal_backoff_time``); doubled at each attempt.
    min_backoff: float = 300.0
    #: Longest retry delay (``maximal_backoff_time``).
    max_backoff: float = 4000.0
    #: Age after which a temporary failure is final (``maximal_queue_lifetime``).
    max_lifetime: float = 5 * 86400.0

    def __post_init__(self) -> None:
        for name in ("min_backoff", "max_backoff", "max_lifetime"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ConfigurationError(f"must be a number of seconds >= 0, got {value!r}",
                                         field=name)

    def backoff(self, attempts: int) -> float:
        """Delay after the *attempts*-th attempt failed for some recipient."""
        if self.min_backoff <= 0:
            return 0.0
        return float(min(self.max_backoff, self.min_backoff * 2 ** min(max(attempts - 1, 0), 30)))


OutcomeKind = Literal["delivered", "deferred", "failed", "expired", "quarantined"]


class Outcome(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """What one attempt did for one recipient: one line of the report.

    ``quarantined`` lines are about a whole entry (``recipient`` empty,
    ``text`` the reason).
    """

    id: str
    recipient: str
    outcome: OutcomeKind
    code: int
    enhanced: str | None
    text: str
    stage: str
    destination: str | None = None
    attempts: int = 0
    #: An earlier attempt may already have delivered it: this one may be a
    #: duplicate (delivered), or the next one may be (deferred).
    possibly_duplicated: bool = False
    local: bool = False
    next_attempt: float | None = None
    #: Seconds from arrival to this outcome (Postfix's ``delay=``).
    delay: float | None = None
    #: Postfix's ``delays=a/b/c/d``: before this attempt picked the entry up,
    #: in replay before the transaction, connection set-up, the transaction.
    delays: tuple[float, float, float, float] | None = None
    #: Bytes of the message (Postfix's ``size=``).
    size: int = 0

    def line(self) -> str:
        if self.outcome == "quarantined":
            return f"{self.id}: quarantined: {self.text}"
        enh = f" {self.enhanced}" if self.enhanced else ""
        dup = " (possibly duplicated)" if self.possibly_duplicated else ""
        return f"{self.id} {self.recipient}: {self.outcome}: {self.code}{enh} {self.text}{dup}"


class Totals(msgspec.Struct, omit_defaults=False):
    """Counters of a replay run (the summary table and the JSON report's summary)."""

    messages: int = 0
    messages_delivered: int = 0
    messages_failed: int = 0
    messages_deferred: int = 0
    messages_quarantined: int = 0
    recipients_delivered: int = 0
    recipients_failed: int = 0
    recipients_expired: int = 0
    recipients_deferred: int = 0
    possibly_duplicated: int = 0
    #: Entries skipped because another replay held them.
    locked: int = 0
    #: Deferred entries not yet due at the pass (still queued).
    not_due: int = 0
    #: Entries left as they were because of a file system error (still queued).
    errors: int = 0
    #: Spool writes that failed (disk full, read-only, I/O error): each one
    #: backs the whole spool off.
    spool_errors: int = 0
    #: Entries whose outcome could still not be written when replay ended:
    #: their delivered recipients will get the message again from a later replay.
    unrecorded: int = 0
    passes: int = 0
    elapsed: float = 0.0


class Observer:
    """Hooks replay calls as it goes (no-ops here): progress bars, reports, logs."""

    #: Whether :meth:`outcome` wants ``delivered`` outcomes too (a report, a log):
    #: a replay that only shows failures skips building them.
    report_delivered: bool = True

    def pass_started(self, total: int | None) -> None:
        """A pass begins; *total* is the number of due-or-not entries, if counted."""

    def outcome(self, outcome: Outcome) -> None:
        """One recipient's outcome of one attempt."""

    def message_done(self, totals: Totals) -> None:
        """A message was attempted (its recipients' outcomes were reported before)."""

    def quarantined(self, id: str, reason: str) -> None:
        """A corrupt entry was moved to ``quarantine/``."""

    def skipped(self, totals: Totals) -> None:
        """An entry was skipped (held by another replay)."""

    def error(self, id: str, problem: str) -> None:
        """An entry could not be updated (a file system error); it stays queued."""

    def backing_off(self, problem: str, delay: float) -> None:
        """A spool write failed: no new delivery for *delay* seconds (then a retry)."""

    def recording(self, n: int) -> None:
        """*n* outcomes are about to be written to the queue (flush what reports them first)."""


def exit_status(totals: Totals) -> int:
    """sysexits status of a run, as ``lmtpfast send`` decides it.

    75 when anything is still queued (deferred, not due, held by another
    replay); else 65 when some recipient failed for good or an entry was
    quarantined; else 0.
    """
    if (totals.recipients_deferred or totals.not_due or totals.locked or totals.messages_deferred
            or totals.errors or totals.spool_errors or totals.unrecorded):
        return 75
    if (totals.recipients_failed or totals.recipients_expired or totals.messages_failed
            or totals.messages_quarantined):
        return 65
    return 0


#: Reply texts kept in an envelope are cut to this many characters, and
#: destinations to 256, so the space an envelope rewrite needs has a bound
#: that can be reserved before a delivery (see :meth:`Claim.reserve`).
MAX_REASON_TEXT = 512
# Back-off of the whole spool after a failed spool write: first, longest (s).
SPOOL_BACKOFF = (1.0, 60.0)
# --once: how often to retry outcomes not yet recorded before giving up on them.
_HELD_RETRIES = 5


def _reason(res: RecipientResult, now: float, text: str | None = None) -> Reason:
    dest = res.destination
    return Reason(code=res.code, enhanced=res.enhanced,
                  text=(res.text if text is None else text)[:MAX_REASON_TEXT], stage=res.stage,
                  local=res.local, destination=None if dest is None else dest[:256], at=now)


class Replayer:
    """Delivers the due entries of *queue* through *agent* (an :class:`~lmtpfast.Agent`).

    *queue* is any :class:`~lmtpfast.spool.Queue` (a :class:`Spool` is taken
    as its :class:`~lmtpfast.spool.DirQueue`, closed when :meth:`run` ends).
    One pass::

        claimer --claim(k)--> work --> delivery tasks --> updates --record()--> queue
           ^                                                                 |
           +------ room: claimed and not yet recorded < concurrency <--------+

    *concurrency* bounds the entries this replay holds at once (claimed and
    not recorded yet), so it bounds the memory and what a ``kill -9`` can
    duplicate; *batch* is the entries per claim (default a quarter of
    *concurrency*). Outcomes are recorded in batches, one call each (when
    half the slots wait, when nothing else is ready, at least every 50 ms).
    *flush* makes every queued entry due when the run starts (``postqueue
    -f``). *bounce_dir*: an RFC 3464 bounce is written there for each entry
    that ends failed (once: ``bounced`` is recorded).

    A write the queue refuses (a full disk, a read-only file system) never
    re-delivers: the entries stay claimed by this replay, no new delivery
    starts for a while (*spool_backoff*, doubled at each failure), and the
    outcomes are written first when the pause is over. A run that ends with
    outcomes it still could not write stashes them (the embedded store's
    worker journal) or names each entry and who got it (docs/spool.md, "When
    the spool cannot be written").
    """

    def __init__(
        self,
        queue: Queue | Spool,
        agent: Agent,
        *,
        concurrency: int = 64,
        batch: int | None = None,
        policy: RetryPolicy | None = None,
        observer: Observer | None = None,
        flush: bool = False,
        bounce_dir: str | os.PathLike[str] | None = None,
        count_first: bool = False,
        clock: Callable[[], float] = time.time,
        spool_backoff: tuple[float, float] = SPOOL_BACKOFF,
        pipelined: bool | None = None,
    ) -> None:
        if concurrency < 1:
            raise ConfigurationError("concurrency must be 1 or more", field="concurrency")
        if batch is not None and batch < 1:
            raise ConfigurationError("batch must be 1 or more", field="batch")
        self._own_queue = isinstance(queue, Spool)
        if isinstance(queue, Spool):
            from ._dirstore import DirQueue

            queue = DirQueue(queue)
        self.queue: Queue = queue
        self.agent = agent
        self.concurrency = concurrency
        self.batch = batch or max(1, concurrency // 4)
        self.policy = policy or RetryPolicy()
        self.observer = observer or Observer()
        self.flush = flush
        self.bounce_dir = None if bounce_dir is None else os.fspath(bounce_dir)
        self.count_first = count_first
        self.clock = clock
        self.totals = Totals()
        #: Earliest next-attempt time seen among entries not yet due (last pass).
        self.next_due: float | None = None
        #: (first, longest) pause of the whole queue after a refused write.
        self.spool_backoff = spool_backoff
        #: Deliver through one ``Agent.deliver_many`` stream (pipelined per
        #: connection) rather than a task per entry timed alone on its
        #: connection. Default: pipelined unless per-stage latencies are being
        #: collected (``METRICS`` set, as the daemon does: they need one
        #: transaction at a time on a connection) or *agent* has no
        #: ``deliver_many`` (a stand-in with ``deliver`` only).
        if pipelined is None:
            pipelined = METRICS.get() is None and callable(getattr(agent, "deliver_many", None))
        self.pipelined = pipelined
        # Outcomes delivered but not written down yet: their claims stay held,
        # so neither this replay nor another delivers them again.
        self._unwritten: list[Update] = []
        self._problem = ""
        self._trouble = False  # a queue write failed since the last probe
        self._trouble_delay = 0.0
        self._flushed = False
        self._due = 0.0

    async def run(
        self, *, watch: bool = False, interval: float = 1.0, stop: asyncio.Event | None = None,
        wake: asyncio.Event | None = None,
    ) -> Totals:
        """One pass (``watch=False``), or passes until *stop* is set (``watch=True``).

        In watch mode, a pass that found nothing to do is followed by a pause
        of *interval* seconds (shorter if a deferred entry falls due sooner),
        cut short when *wake* is set (new work: a file-system notification,
        an operator's release; the caller sets it, the pause clears it).
        """
        start = time.monotonic()
        stop = stop or asyncio.Event()
        try:
            retries = 0
            passes = 0
            while True:
                if self._unwritten:
                    await self._retry_writes()
                before = self.totals.messages
                if not self._trouble and (watch or passes == 0):
                    passes += 1
                    await self.run_pass(stop)
                if stop.is_set() or not (watch or (self._unwritten and retries < _HELD_RETRIES)):
                    break
                if self._trouble:
                    retries += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=self._trouble_delay)
                    if stop.is_set():
                        break
                    self._trouble = False  # the next round is the probe
                    continue
                self._trouble_delay = 0.0
                if self.totals.messages == before:
                    delay = interval
                    if self.next_due is not None:
                        delay = max(0.0, min(delay, self.next_due - self.clock()))
                    await _pause(stop, wake, max(delay, 0.01))
                    if stop.is_set():
                        break
                # In watch mode "not due" and "locked" describe the latest pass only.
                self.totals.not_due = 0
                self.totals.locked = 0
        finally:
            if self._unwritten:
                await self._retry_writes()
            await self._give_up_unwritten()
            if self._own_queue:
                await self.queue.close()
            self.totals.elapsed = time.monotonic() - start
        return self.totals

    async def run_pass(self, stop: asyncio.Event | None = None) -> Totals:
        """Try every entry that is due now, once."""
        totals = self.totals
        totals.passes += 1
        queue = self.queue
        due = self.clock()
        if self.flush and not self._flushed:
            await queue.retry(Selection(states=("queued",)))
            self._flushed = True
            # retry() makes entries due at the wall clock's now: this pass
            # takes them even when the replay's own clock (injected) is behind.
            due = max(due, time.time())
        self._due = due
        try:
            for id, reason in await queue.begin_pass(due=due):
                self._quarantined(id, reason)
        except QueueWriteError as exc:
            self._write_trouble(exc)
            return totals
        except QueueCorrupt:
            raise
        except QueueError as exc:
            # Housekeeping failed (a directory spool beside the store that cannot
            # be converted): said, counted, and the queue's own entries go on.
            self.totals.errors += 1
            self.observer.error("", f"{exc.strerror or exc}")
        total = None
        if self.count_first:
            total = (await queue.status(due=due)).queued
        self.observer.pass_started(total)
        await _Pass(self, due, stop).run()
        with contextlib.suppress(QueueError, OSError):
            st = await queue.end_pass(due=due)
            totals.not_due += st.not_due
            totals.locked += st.claimed
            self.next_due = st.next_due
        return totals

    # -- one entry ---------------------------------------------------------------------

    async def attempt(self, entry: Entry) -> Update:
        """Deliver *entry*'s queued recipients and decide what becomes of it."""
        pending = entry.envelope.queued()
        started = self.clock()
        trace = TRACE.get()
        if trace is None:
            trace = Trace()
            token = TRACE.set(trace)
        else:
            # The delivery task's own (one per task, not per message).
            token = None
            trace.setup = 0.0
            trace.stages.clear()
        if pending:
            try:
                results = await self._deliver(entry, pending)
            finally:
                if token is not None:
                    TRACE.reset(token)
        else:
            if token is not None:
                TRACE.reset(token)
            results = []  # only failed recipients left: a crash came before the move
        return self.decide(entry, pending, results, started, trace.setup)

    def decide(self, entry: Entry, pending: list[Recipient], results: list[RecipientResult],
               started: float, setup: float = 0.0) -> Update:
        """What becomes of *entry* after its *pending* recipients got *results*.

        *started*: when the delivery began (the clock's time); *setup*: the
        seconds of it spent setting up a connection (0 when not measured).
        """
        env = entry.envelope
        totals = self.totals
        picked = entry.picked or started
        now = self.clock()
        arrival = env.arrival if env.arrival is not None else now
        setup = min(setup, max(now - started, 0.0))
        timing = (now - arrival, entry.size if pending else 0,
                  (max(picked - arrival, 0.0), max(started - picked, 0.0), setup,
                   max(now - started - setup, 0.0)))
        totals.messages += 1
        if pending:
            env.attempts += 1
            env.last_attempt = now
        keep = [r for r in env.recipients if r.state != "queued"]
        deferred = []
        delivered_to = []
        report_delivered = self.observer.report_delivered
        for r, res in zip(pending, results, strict=True):
            r.attempts += 1
            dup = r.possibly_delivered
            if res.delivered:
                env.delivered += 1
                totals.recipients_delivered += 1
                totals.possibly_duplicated += dup
                delivered_to.append(r.address)
                if report_delivered:
                    self._report(entry, timing, r.address, "delivered", res, r.attempts, dup)
                continue
            r.last = _reason(res, now)
            if res.permanent:
                r.state = "failed"
                totals.recipients_failed += 1
                self._report(entry, timing, r.address, "failed", res, r.attempts, dup)
            else:
                r.possibly_delivered = dup or res.possibly_delivered
                deferred.append((r, res))
            keep.append(r)
        env.recipients = keep

        if deferred and now - arrival >= self.policy.max_lifetime:
            age = _age(now - arrival)
            for r, res in deferred:
                r.state = "failed"
                assert r.last is not None
                r.last = _reason(res, r.last.at,
                                 f"{r.last.text} (gave up: message in queue for {age})")
                totals.recipients_expired += 1
                self._report(entry, timing, r.address, "expired", res, r.attempts,
                             r.possibly_delivered, text=r.last.text)
            deferred = []

        # After this pass's due time whatever the backoff: one pass tries it once.
        next_attempt = max(now + self.policy.backoff(env.attempts), self._due + 0.001)
        if deferred:
            for r, res in deferred:
                totals.recipients_deferred += 1
                self._report(entry, timing, r.address, "deferred", res, r.attempts,
                             r.possibly_delivered, next_attempt=next_attempt)
            totals.messages_deferred += 1
            update = Update(entry, "defer", next_attempt=next_attempt)
        elif env.failed():
            if self._bounce(entry):
                totals.messages_failed += 1
                update = Update(entry, "failed")
            else:
                # Every recipient is decided but the bounce is not written:
                # kept queued (the decision recorded), the bounce tried again.
                totals.messages_deferred += 1
                update = Update(entry, "defer", next_attempt=next_attempt)
        else:
            totals.messages_delivered += 1
            update = Update(entry, "done")
        update.delivered = tuple(delivered_to)
        self.observer.message_done(totals)
        return update

    async def _deliver(self, entry: Entry, pending: list[Recipient]) -> list[RecipientResult]:
        try:
            return await self.agent.deliver(delivery_for(entry.content, entry.envelope, pending))
        except (LMTPError, OSError) as exc:
            return _failed([r.address for r in pending], exc)

    def _report(
        self, entry: Entry, timing: tuple[float, int, tuple[float, float, float, float]],
        address: str, kind: OutcomeKind, res: RecipientResult, attempts: int, dup: bool, *,
        next_attempt: float | None = None, text: str | None = None,
    ) -> None:
        self.observer.outcome(Outcome(
            id=entry.id, recipient=address, outcome=kind, code=res.code, enhanced=res.enhanced,
            text=res.text if text is None else text, stage=res.stage,
            destination=res.destination, attempts=attempts, possibly_duplicated=dup,
            local=res.local, next_attempt=next_attempt, delay=timing[0], size=timing[1],
            delays=timing[2],
        ))

    def _bounce(self, entry: Entry) -> bool:
        """Write the bounce once; False if it could not be written (the entry waits)."""
        env = entry.envelope
        if self.bounce_dir is None or env.bounced:
            return True
        from ._bounce import BOUNCE_SIZE_LIMIT, write_bounce

        try:
            # The start of the message only: a bounce returns a large one's header.
            write_bounce(self.bounce_dir, entry.id, env,
                         bytes(entry.content[:BOUNCE_SIZE_LIMIT + 1]), message_size=entry.size)
        except OSError as exc:
            self.observer.error(entry.id, f"bounce not written, kept queued: {_problem(exc)}")
            return False
        env.bounced = True
        return True

    def _quarantined(self, id: str, reason: str) -> None:
        self.totals.messages_quarantined += 1
        self.observer.quarantined(id, reason)

    # -- writes the queue refuses ---------------------------------------------------

    def _write_trouble(self, exc: OSError) -> None:
        """A queue write failed: stop starting deliveries, and back off (doubling)."""
        self.totals.spool_errors += 1
        self._problem = _problem(exc)
        if self._trouble:
            return  # several failures at once are one back-off
        first, longest = self.spool_backoff
        self._trouble = True
        self._trouble_delay = (first if not self._trouble_delay
                               else min(longest, self._trouble_delay * 2))
        self.observer.backing_off(self._problem, self._trouble_delay)

    def _hold(self, updates: Sequence[Update], exc: QueueWriteError) -> None:
        """Keep outcomes the queue refused (their claims stay held) and back off."""
        problem = _problem(exc)
        for u in updates:
            self.observer.error(u.entry.id, "outcome not recorded yet (held, nothing is "
                                f"delivered again): {problem}")
        self._unwritten += updates
        self._write_trouble(exc)

    async def _retry_writes(self) -> bool:
        """Write the held outcomes; False (and a back-off) while the queue refuses."""
        ups, self._unwritten = self._unwritten, []
        try:
            await self.queue.record(ups)
        except QueueWriteError as exc:
            self._unwritten = ups if exc.pending is None else exc.pending
            self._write_trouble(exc)
            return False
        return True

    async def _give_up_unwritten(self) -> None:
        """The run ends with outcomes it could not write: stash them, or name each entry."""
        ups, self._unwritten = self._unwritten, []
        if not ups:
            return
        kept = 0
        with contextlib.suppress(QueueError, OSError):
            kept = await self.queue.stash(ups)
        for u in ups[:kept]:
            self.totals.errors += 1
            self.observer.error(u.entry.id, f"outcome not recorded ({self._problem}): kept in "
                                "the worker journal, applied before this entry is tried again")
        for u in ups[kept:]:
            self.totals.unrecorded += 1
            to = ", ".join(u.delivered) or "nobody"
            self.observer.error(u.entry.id, f"outcome not recorded ({self._problem}): left "
                                f"queued as before; it was delivered to {to}, who will get it "
                                "again from a later replay")
            u.entry.close()


class _Pass:
    """The tasks of one pass: a claimer, the delivery tasks and the recorder."""

    def __init__(self, replayer: Replayer, due: float, stop: asyncio.Event | None) -> None:
        self.r = replayer
        self.due = due
        self.stop = stop
        self.work: asyncio.Queue[Entry | None] = asyncio.Queue()
        self.pending: list[Update] = []
        #: Claimed and not recorded yet (the bound on a kill's duplicates).
        self.held = 0
        self.room = asyncio.Event()
        self.wake = asyncio.Event()
        self.closing = False
        #: The queue refused a write in this pass: claim nothing more.
        self.refused = False
        #: The recorder's exception, if it died.
        self.failed: BaseException | None = None
        self.record_at = max(1, min(replayer.concurrency // 2, 256))

    async def run(self) -> None:
        if self.r.pipelined:
            tasks = [asyncio.create_task(self.stream())]
        else:
            tasks = [asyncio.create_task(self.deliver()) for _ in range(self.r.concurrency)]
        recorder = asyncio.create_task(self.recorder())
        try:
            await self.claimer()
        finally:
            for _ in tasks:
                self.work.put_nowait(None)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            self.closing = True
            self.wake.set()
            await recorder
            for res in results:
                if isinstance(res, BaseException):
                    raise res

    def _stopped(self) -> bool:
        return ((self.stop is not None and self.stop.is_set()) or self.refused
                or self.r._trouble or self.failed is not None)

    async def claimer(self) -> None:
        r = self.r
        cap, size = r.concurrency, r.batch
        while not self._stopped():
            free = cap - self.held
            if free < min(size, cap):
                self.room.clear()
                self.wake.set()  # let the recorder free some slots
                await self.room.wait()
                continue
            try:
                batch = await r.queue.claim(min(free, size), due=self.due)
            except QueueWriteError as exc:
                r._write_trouble(exc)
                return
            for id, reason in batch.quarantined:
                r._quarantined(id, reason)
            if batch.locked:
                r.totals.locked += batch.locked
                r.observer.skipped(r.totals)
            self.held += len(batch.entries)
            picked = r.clock()
            for e in batch.entries:
                e.picked = picked
                self.work.put_nowait(e)
            if batch.exhausted:
                return

    async def deliver(self) -> None:
        r = self.r
        work = self.work
        TRACE.set(Trace())  # this task's context: reused by each of its attempts
        while (entry := await work.get()) is not None:
            if self.refused or self.failed is not None:
                update = Update(entry, "release")  # the queue refuses writes: untried
            else:
                try:
                    update = await r.attempt(entry)
                except Exception as exc:  # a bug of ours must not lose the entry's claim
                    r.totals.errors += 1
                    r.observer.error(entry.id, f"left queued: {type(exc).__name__}: {exc}")
                    update = Update(entry, "release")
            # self.pending, not a local: the recorder swaps the list.
            self._done(update)

    def _done(self, update: Update) -> None:
        # self.pending, not a local: the recorder swaps the list.
        pending = self.pending
        pending.append(update)
        if len(pending) >= self.record_at or self.work.empty():
            self.wake.set()

    async def stream(self) -> None:
        """Every claimed entry through one ``Agent.deliver_many`` stream (no task each)."""
        r = self.r
        under_way: dict[int, tuple[Entry, list[Recipient], float]] = {}

        def decide(entry: Entry, pending: list[Recipient], results: list[RecipientResult],
                   started: float) -> Update:
            try:
                return r.decide(entry, pending, results, started)
            except Exception as exc:  # a bug of ours must not lose the entry's claim
                r.totals.errors += 1
                r.observer.error(entry.id, f"left queued: {type(exc).__name__}: {exc}")
                return Update(entry, "release")

        async def deliveries() -> AsyncIterator[Delivery]:
            work = self.work
            while (entry := await work.get()) is not None:
                if self.refused or self.failed is not None:
                    self._done(Update(entry, "release"))  # the queue refuses writes: untried
                    continue
                started = r.clock()
                pending = entry.envelope.queued()
                if not pending:  # only failed recipients left: a crash came before the move
                    self._done(decide(entry, pending, [], started))
                    continue
                try:
                    d = delivery_for(entry.content, entry.envelope, pending)
                except (LMTPError, OSError) as exc:
                    self._done(decide(entry, pending,
                                      _failed([p.address for p in pending], exc), started))
                    continue
                under_way[id(d)] = (entry, pending, started)
                yield d

        try:
            async for d, results in r.agent.deliver_many(
                    deliveries(), concurrency=r.concurrency,
                    errors=lambda d, exc: _failed(d.recipients, exc)):
                entry, pending, started = under_way.pop(id(d))
                self._done(decide(entry, pending, results, started))
        except BaseException as exc:
            # Deliveries under way have no known outcome: their entries stay
            # claimed (given back suspect when this replay ends); the rest of
            # the work was not tried.
            r.totals.errors += len(under_way)
            for entry, _, _ in under_way.values():
                r.observer.error(entry.id, f"outcome unknown, left claimed: "
                                 f"{type(exc).__name__}: {exc}")
            self.failed = exc
            self.room.set()
            while not self.work.empty():
                left = self.work.get_nowait()
                if left is not None:
                    self._done(Update(left, "release"))
            raise

    async def recorder(self) -> None:
        try:
            await self._record_loop()
        except BaseException as exc:
            self.failed = exc  # never leave the claimer waiting for room
            self.room.set()
            raise

    async def _record_loop(self) -> None:
        r = self.r
        while True:
            if not self.pending:
                if self.closing:
                    return
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=0.05)
                continue
            ups, self.pending = self.pending, []
            r.observer.recording(len(ups))
            try:
                statuses = await r.queue.record(ups)
            except QueueWriteError as exc:
                # Never re-deliver: the entries stay ours; keep the outcomes.
                self.refused = True
                pending = ups if exc.pending is None else exc.pending
                r._hold(pending, exc)
            else:
                for u, s in zip(ups, statuses, strict=True):
                    if s == "lost":
                        r.totals.errors += 1
                        r.observer.error(u.entry.id, "another replay took this entry over; "
                                         "this outcome was not recorded")
            self.held -= len(ups)
            self.room.set()


async def _pause(stop: asyncio.Event, wake: asyncio.Event | None, timeout: float) -> None:
    """Until *stop* or *wake* is set (*wake* is cleared), or *timeout* seconds passed."""
    if wake is None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=timeout)
        return
    if not wake.is_set():
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
    wake.clear()


def _failed(addresses: Sequence[str], exc: Exception) -> list[RecipientResult]:
    """The results of a delivery that raised *exc* (nothing was sent); other errors raise."""
    if isinstance(exc, ContentError):
        return BAD_CONTENT.results(addresses, detail=exc)
    if isinstance(exc, BadSender):
        return BAD_SENDER.results(addresses, detail=exc.address)
    if isinstance(exc, LMTPError | OSError):
        # LocalProtocolError (a DSN value a hand-made envelope got wrong...)
        # included: the entry stays queued.
        return LOCAL_ERROR.results(addresses, detail=exc)
    raise exc


def _problem(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return f"{text}: {exc.filename}" if exc.filename else text


def _age(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds:.0f} seconds"


def delivery_for(message: bytes | memoryview | MessageFile, env: Envelope,
                 pending: list[Recipient]) -> Delivery:
    """The :class:`~lmtpfast.Delivery` for an entry's *pending* recipients, with its DSN."""
    dsn = None
    if (env.ret is not None or env.envid is not None
            or any(r.notify or r.orcpt for r in pending)):
        dsn = DSN(ret=env.ret, envid=env.envid,
                  notify_each=tuple(r.notify for r in pending),  # type: ignore[misc]
                  orcpt=tuple(r.orcpt for r in pending))
    return Delivery.build(message, sender=env.sender, recipients=[r.address for r in pending],
                          dsn=dsn)
