"""The replay engine: deliver a spool's due messages and record every outcome.

>>> async with Agent.for_server("unix:/run/dovecot/lmtp") as agent:   # doctest: +SKIP
...     totals = await Replayer(Spool("/var/spool/lmtpfast"), agent).run()

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import msgspec

from .._delivery import BadSender, Delivery
from .._dsn import DSN
from .._errors import ConfigurationError, ContentError, LMTPError
from .._failures import BAD_CONTENT, BAD_SENDER, LOCAL_ERROR
from .._metrics import TRACE, Trace
from .._results import RecipientResult
from ._format import Envelope, Reason, Recipient, encode_envelope
from ._store import Claim, Quarantined, Spool

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
# Per recipient: text and destination at 6 bytes a character (JSON's \uXXXX
# for control characters), plus the keys and numbers of a Reason.
_RESERVE_PER_RECIPIENT = 6 * (MAX_REASON_TEXT + 256) + 512
# Back-off of the whole spool after a failed spool write: first, longest (s).
SPOOL_BACKOFF = (1.0, 60.0)
# --once: how often to retry outcomes not yet recorded before giving up on them.
_HELD_RETRIES = 5


def _reason(res: RecipientResult, now: float, text: str | None = None) -> Reason:
    dest = res.destination
    return Reason(code=res.code, enhanced=res.enhanced,
                  text=(res.text if text is None else text)[:MAX_REASON_TEXT], stage=res.stage,
                  local=res.local, destination=None if dest is None else dest[:256], at=now)


@dataclass(slots=True, eq=False)
class _Record:
    """What one attempt decided for an entry, and what is still to be written down."""

    claim: Claim
    kind: Literal["delivered", "deferred", "failed"]
    next_attempt: float
    #: Recipients this attempt delivered (named when the record is lost).
    delivered_to: list[str]
    problem: str = ""


def _reasons_text(id: str, claim: Claim) -> str:
    env = claim.envelope
    lines = [f"Message {id} from <{env.sender}>: every remaining recipient failed.", ""]
    for r in env.failed():
        last = r.last.line() if r.last else "no reply recorded"
        lines.append(f"<{r.address}>: {last}")
    return "\n".join(lines) + "\n"


class Replayer:
    """Delivers the due entries of *spool* through *agent* (an :class:`~lmtpfast.Agent`).

    *concurrency* bounds the messages in flight (and so the memory). *flush*
    tries deferred entries whatever their next attempt time (``postqueue -f``).
    *bounce_dir*: write an RFC 3464 bounce there for each message that ends in
    ``failed/`` (see :mod:`lmtpfast.spool._bounce`).
    """

    def __init__(
        self,
        spool: Spool,
        agent: Agent,
        *,
        concurrency: int = 64,
        policy: RetryPolicy | None = None,
        observer: Observer | None = None,
        flush: bool = False,
        bounce_dir: str | os.PathLike[str] | None = None,
        count_first: bool = False,
        clock: Callable[[], float] = time.time,
        spool_backoff: tuple[float, float] = SPOOL_BACKOFF,
    ) -> None:
        if concurrency < 1:
            raise ConfigurationError("concurrency must be 1 or more", field="concurrency")
        self.spool = spool
        self.agent = agent
        self.concurrency = concurrency
        self.policy = policy or RetryPolicy()
        self.observer = observer or Observer()
        self.flush = flush
        self.bounce_dir = None if bounce_dir is None else os.fspath(bounce_dir)
        self.count_first = count_first
        self.clock = clock
        self.totals = Totals()
        #: Earliest next-attempt time seen among entries not yet due (last pass).
        self.next_due: float | None = None
        #: (first, longest) pause of the whole spool after a failed spool write.
        self.spool_backoff = spool_backoff
        # Outcomes delivered but not yet written down, by entry: their claims
        # stay held, so neither this replay nor another delivers them again.
        self._held: dict[str, _Record] = {}
        self._trouble = False  # a spool write failed since the last probe
        self._trouble_delay = 0.0

    async def run(
        self, *, watch: bool = False, interval: float = 1.0, stop: asyncio.Event | None = None,
        wake: asyncio.Event | None = None,
    ) -> Totals:
        """One pass (``watch=False``), or passes until *stop* is set (``watch=True``).

        In watch mode, a pass that found nothing to do is followed by a pause
        of *interval* seconds (shorter if a deferred entry falls due sooner),
        cut short when *wake* is set (new work: a file-system notification,
        an operator's release; the caller sets it, the pause clears it).

        When a spool write fails (a full disk, a read-only or failing file
        system) no new delivery starts for a while (``spool_backoff``, doubled
        at each failure); outcomes not yet written keep their claims and are
        written first when the pause is over. See docs/spool.md, "When the
        spool cannot be written".
        """
        start = time.monotonic()
        stop = stop or asyncio.Event()
        try:
            retries = 0
            passes = 0
            while True:
                if self._held:
                    self._retry_held()
                before = self.totals.messages
                if not self._trouble and (watch or passes == 0):
                    passes += 1
                    await self.run_pass(stop)
                if stop.is_set() or not (watch or (self._held and retries < _HELD_RETRIES)):
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
            if self._held:
                self._retry_held()
            self._give_up_held()
            self.spool.drop_reservations()
            self.totals.elapsed = time.monotonic() - start
        return self.totals

    async def run_pass(self, stop: asyncio.Event | None = None) -> Totals:
        """Try every entry that is due now, once."""
        totals = self.totals
        totals.passes += 1
        scan = self.spool.scan(due=self.clock(), flush=self.flush)
        total = None
        if self.count_first:
            c = self.spool.count()
            total = c["incoming"] + c["deferred"]
        self.observer.pass_started(total)
        queue: asyncio.Queue[tuple[Literal["incoming", "deferred"], str] | None] = asyncio.Queue(
            maxsize=self.concurrency
        )

        async def worker() -> None:
            while (item := await queue.get()) is not None:
                await self._one(*item)

        workers = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
        try:
            for item in scan:
                if (stop is not None and stop.is_set()) or self._trouble:
                    break
                await queue.put(item)
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        totals.not_due += scan.not_due
        self.next_due = scan.next_due
        return totals

    async def _one(self, queue: Literal["incoming", "deferred"], id: str) -> None:
        if self._trouble:
            return  # the spool cannot be written: deliver nothing until it can
        try:
            claim = self.spool.claim(queue, id)
        except Quarantined as q:
            self.totals.messages_quarantined += 1
            self.observer.quarantined(q.id, q.reason)
            return
        except OSError as exc:  # e.g. the quarantine record itself cannot be written
            self.totals.errors += 1
            self.observer.error(id, f"left queued: {_problem(exc)}")
            self._spool_trouble(exc)
            return
        if claim is None:
            self.totals.locked += 1
            self.observer.skipped(self.totals)
            return
        try:
            await self._attempt(claim)
        except OSError as exc:
            # Before any delivery (the space for the record could not be
            # reserved, ...): the entry stays as it was, nothing was sent.
            self.totals.errors += 1
            self.observer.error(id, f"left queued, not delivered: {_problem(exc)}")
            self._spool_trouble(exc)
        finally:
            if id not in self._held:
                claim.release()

    async def _attempt(self, claim: Claim) -> None:
        env = claim.envelope
        totals = self.totals
        pending = env.queued()
        picked = self.clock()
        started = picked
        trace = Trace()
        size = 0
        if pending:
            if len(pending) > 1 or env.failed():
                # A delivery to some of them must be recordable whatever the
                # disk does next: set the space for the rewrite aside first
                # (on a full disk this fails here, before anything is sent).
                claim.reserve(len(encode_envelope(env)) + 1024
                              + _RESERVE_PER_RECIPIENT * len(pending))
            try:
                message = claim.read_message()
            except OSError as exc:
                try:
                    claim.spool._quarantine(claim.queue, claim.id,
                                            f"message file cannot be read: {exc.strerror or exc}",
                                            have_lock=True)
                except Quarantined as q:
                    totals.messages_quarantined += 1
                    self.observer.quarantined(q.id, q.reason)
                return
            size = len(message)
            started = self.clock()
            token = TRACE.set(trace)
            try:
                results = await self._deliver(message, env, pending)
            finally:
                TRACE.reset(token)
        else:
            results = []  # only failed recipients left: a crash came before the move
        now = self.clock()
        arrival = env.arrival if env.arrival is not None else now
        setup = min(trace.setup, max(now - started, 0.0))
        timing = (now - arrival, size, (max(picked - arrival, 0.0), max(started - picked, 0.0),
                                        setup, max(now - started - setup, 0.0)))
        totals.messages += 1
        if pending:
            env.attempts += 1
            env.last_attempt = now
        keep = []
        deferred = []
        delivered_to = []
        for r in env.recipients:
            if r.state != "queued":
                keep.append(r)
        for r, res in zip(pending, results, strict=True):
            r.attempts += 1
            dup = r.possibly_delivered
            if res.delivered:
                env.delivered += 1
                totals.recipients_delivered += 1
                totals.possibly_duplicated += dup
                delivered_to.append(r.address)
                self._report(claim, timing, r.address, "delivered", res, r.attempts, dup)
                continue
            r.last = _reason(res, now)
            if res.permanent:
                r.state = "failed"
                totals.recipients_failed += 1
                self._report(claim, timing, r.address, "failed", res, r.attempts, dup)
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
                self._report(claim, timing, r.address, "expired", res, r.attempts,
                             r.possibly_delivered, text=r.last.text)
            deferred = []

        if deferred:
            next_attempt = now + self.policy.backoff(env.attempts)
            for r, res in deferred:
                totals.recipients_deferred += 1
                self._report(claim, timing, r.address, "deferred", res, r.attempts,
                             r.possibly_delivered, next_attempt=next_attempt)
            record = _Record(claim, "deferred", next_attempt, delivered_to)
        elif env.failed():
            record = _Record(claim, "failed", now + self.policy.backoff(env.attempts),
                             delivered_to)
        else:
            record = _Record(claim, "delivered", now, delivered_to)
        if not self._write(record):
            self._held[claim.id] = record

    # -- writing outcomes down -----------------------------------------------------

    def _write(self, record: _Record) -> bool:
        """Write *record* to the spool; False (and the spool backs off) if it failed."""
        claim = record.claim
        totals = self.totals
        try:
            if record.kind == "deferred":
                claim.save(next_attempt=record.next_attempt)
                totals.messages_deferred += 1
            elif record.kind == "delivered":
                claim.delivered()
                totals.messages_delivered += 1
            elif not self._bounce(claim, record):
                # Every recipient is decided but the bounce is not written: kept
                # in the queue (the decision recorded) and tried again later.
                claim.save(next_attempt=record.next_attempt)
                totals.messages_deferred += 1
            else:
                try:
                    claim.failed(_reasons_text(claim.id, claim))
                except OSError as exc:
                    # failed/ cannot be written: record the decision in the
                    # queue instead (the space was reserved); moved next time.
                    self._spool_trouble(exc)
                    self.observer.error(claim.id, f"not moved to failed/ yet: {_problem(exc)}")
                    claim.save(next_attempt=self.clock())
                    totals.messages_deferred += 1
                else:
                    totals.messages_failed += 1
        except OSError as exc:
            record.problem = _problem(exc)
            if claim.id not in self._held:
                self.observer.error(claim.id, "outcome not recorded yet (held, nothing is "
                                    f"delivered again): {record.problem}")
            self._spool_trouble(exc)
            return False
        claim.release()
        self.observer.message_done(totals)
        return True

    def _retry_held(self) -> None:
        """Write the held outcomes, oldest first, until one fails."""
        for id, record in list(self._held.items()):
            if not self._write(record):
                return
            del self._held[id]

    def _give_up_held(self) -> None:
        """Replay ends with outcomes it could not write: say so, entry by entry."""
        for id, record in self._held.items():
            self.totals.unrecorded += 1
            to = ", ".join(record.delivered_to) or "nobody"
            self.observer.error(id, f"outcome not recorded ({record.problem}): left queued as "
                                f"before; it was delivered to {to}, who will get it again "
                                "from a later replay")
            record.claim.release()
        self._held.clear()

    def _spool_trouble(self, exc: OSError) -> None:
        """A spool write failed: stop starting deliveries, and back off (doubling)."""
        self.totals.spool_errors += 1
        if self._trouble:
            return  # several workers failing at once are one back-off
        first, longest = self.spool_backoff
        self._trouble = True
        self._trouble_delay = (first if not self._trouble_delay
                               else min(longest, self._trouble_delay * 2))
        self.observer.backing_off(_problem(exc), self._trouble_delay)

    async def _deliver(
        self, message: bytes, env: Envelope, pending: list[Recipient],
    ) -> list[RecipientResult]:
        addresses = [r.address for r in pending]
        try:
            return await self.agent.deliver(delivery_for(message, env, pending))
        except ContentError as exc:
            return BAD_CONTENT.results(addresses, detail=exc)
        except BadSender as exc:
            return BAD_SENDER.results(addresses, detail=exc.address)
        except (LMTPError, OSError) as exc:
            # LocalProtocolError (a DSN value a hand-made envelope got wrong...)
            # included: nothing was sent; the entry stays queued.
            return LOCAL_ERROR.results(addresses, detail=exc)

    def _report(
        self, claim: Claim, timing: tuple[float, int, tuple[float, float, float, float]],
        address: str, kind: OutcomeKind, res: RecipientResult, attempts: int, dup: bool, *,
        next_attempt: float | None = None, text: str | None = None,
    ) -> None:
        self.observer.outcome(Outcome(
            id=claim.id, recipient=address, outcome=kind, code=res.code, enhanced=res.enhanced,
            text=res.text if text is None else text, stage=res.stage,
            destination=res.destination, attempts=attempts, possibly_duplicated=dup,
            local=res.local, next_attempt=next_attempt, delay=timing[0], size=timing[1],
            delays=timing[2],
        ))

    def _bounce(self, claim: Claim, record: _Record) -> bool:
        """Write the bounce once; False if it could not be written (the entry waits)."""
        env = claim.envelope
        if self.bounce_dir is None or env.bounced:
            return True
        from ._bounce import write_bounce

        try:
            write_bounce(self.bounce_dir, claim.id, env, claim.read_message())
        except OSError as exc:
            self.observer.error(claim.id, f"bounce not written, kept queued: {_problem(exc)}")
            return False
        env.bounced = True
        return True


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


def _problem(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return f"{text}: {exc.filename}" if exc.filename else text


def _age(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds:.0f} seconds"


def delivery_for(message: bytes, env: Envelope, pending: list[Recipient]) -> Delivery:
    """The :class:`~lmtpfast.Delivery` for an entry's *pending* recipients, with its DSN."""
    dsn = None
    if (env.ret is not None or env.envid is not None
            or any(r.notify or r.orcpt for r in pending)):
        dsn = DSN(ret=env.ret, envid=env.envid,
                  notify_each=tuple(r.notify for r in pending),  # type: ignore[misc]
                  orcpt=tuple(r.orcpt for r in pending))
    return Delivery.build(message, sender=env.sender, recipients=[r.address for r in pending],
                          dsn=dsn)
