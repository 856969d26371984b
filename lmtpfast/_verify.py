"""A transaction held open toward one back end while its recipients arrive (RCPT verification).

What the proxy's ``verify_recipients`` runs on (``docs/proxy.md``): at the
first RCPT a client sends for a back end, MAIL goes to that back end on a
pooled connection taken for this transaction alone; every RCPT for it is
forwarded as it comes and the back end's own reply (code, enhanced code,
text) is the answer; after the client's final dot the content goes on the
same transaction. So a back end sees one transaction per message, as
without verification (single-instance store), and no recipient is asked
twice.

* A back end that cannot be reached, times out or hangs up during the
  RCPTs gives the recipients still waiting (and those that come later) a
  transient result (``451 4.4.x``, the failure table); nothing was
  delivered. A reused connection that dies before its first reply is
  replaced once, as the agent does for a transaction that reached nobody.
* After the dot the outcomes are the transaction's: the back end's own
  replies, transient and "possibly delivered" when the connection broke
  after the dot (``_common.fail_transaction``).
* :meth:`VerifiedTransaction.abandon` (the client said RSET or went away)
  sends RSET; the connection goes back to the pool only when it answered.
* With every connection of the pool busy (``max_connections``) there is no
  waiting: the transaction is *unverified* and its recipients go the plain
  way (routed only, delivered after the dot).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._errors import LMTPError, ReadTimeout, RemoteProtocolError
from ._failures import (
    DEAD_DESTINATION,
    LOCAL_ERROR,
    LOST,
    PROTOCOL_ERROR,
    TIMEOUT,
    failure_results,
)
from ._results import RecipientResult
from ._shaping import ShapingUnavailable
from .proto._common import result_from_reply

if TYPE_CHECKING:
    from ._delivery import Delivery
    from ._pool import Pool
    from ._session import Client, OpenEnvelope
    from ._shaping import DestinationShaper, Outcome, Ticket
    from .proto import Reply

__all__ = ["VerifiedTransaction"]

log = logging.getLogger("lmtpfast.proxy")


class VerifiedTransaction:
    """One message's transaction toward one back end, its RCPTs sent as they come.

    :meth:`add` forwards a recipient and returns a future for the back end's
    answer (``None``: not verified, see the module docstring); :meth:`finish`
    sends the content and gives the final results; :meth:`abandon` resets.
    Exactly one of the two ends it.
    """

    def __init__(self, pool: Pool, shaper: DestinationShaper, destination: str, limit: int,
                 skip_5xx_greeting: bool, sender: str, *, eight_bit: bool = False) -> None:
        self._pool = pool
        self._shaper = shaper
        self.destination = destination
        self.limit = limit
        self._skip_5xx = skip_5xx_greeting
        self.sender = sender
        self._eight_bit = eight_bit
        self.addresses: list[str] = []
        self._futures: list[asyncio.Future[RecipientResult | None]] = []
        self._env_index: list[int] = []  # our index -> index in the envelope (-1: not sent)
        self._conn: Client | None = None
        self._env: OpenEnvelope | None = None
        self._ticket: Ticket | None = None
        self._opening: asyncio.Task[None] | None = None
        self._failed: list[RecipientResult] | None = None  # one result, for every later RCPT
        self._retried = False
        self._reused = False
        #: True when no connection could be had at once: the recipients are plain ones.
        self.unverified = False
        self.ended = False
        self._flush_due = False

    @property
    def full(self) -> bool:
        """The transport's ``recipient_limit`` is reached: further recipients go the plain way."""
        return len(self.addresses) >= self.limit

    # -- RCPT --------------------------------------------------------------------------

    def add(self, address: str) -> asyncio.Future[RecipientResult | None]:
        """Forward ``RCPT TO:<address>``; the future gets the back end's answer."""
        fut: asyncio.Future[RecipientResult | None] = (
            asyncio.get_running_loop().create_future())
        self.addresses.append(address)
        self._futures.append(fut)
        self._env_index.append(-1)
        if self.unverified:
            fut.set_result(None)
        elif self._failed is not None:
            fut.set_result(self._failure_for(address))
        elif self._env is not None:
            self._send(len(self.addresses) - 1)
            if not self._flush_due:  # the RCPTs of one pipelined group: one write
                self._flush_due = True
                asyncio.get_running_loop().call_soon(self._flush)
        elif self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        return fut

    def future(self, pos: int) -> asyncio.Future[RecipientResult | None]:
        """The answer to the RCPT at ``pos`` (a recipient given twice is asked once)."""
        return self._futures[pos]

    def _failure_for(self, address: str) -> RecipientResult:
        assert self._failed is not None
        r = self._failed[0]
        return RecipientResult(address, r.status, r.code, r.enhanced, r.text, r.stage,
                               r.destination, True, False)

    async def _open(self) -> None:
        shaper = self._shaper
        try:
            ticket = await shaper.admit()
        except ShapingUnavailable as exc:
            self._fail(LOCAL_ERROR.results(["-"], destination=self.destination,
                                           detail=f"traffic shaping state unavailable: {exc}"))
            return
        if ticket is None:
            self._fail(DEAD_DESTINATION.results(
                ["-"], destination=self.destination, dest=self.destination,
                count=shaper.settings.dead_after, detail=shaper.reason() or "no session"))
            return
        self._ticket = ticket
        try:
            conn = await self._pool.acquire_exclusive()
        except (LMTPError, OSError) as exc:
            self._end_ticket("setup_failed", str(exc))
            self._fail(failure_results(exc, ["-"], destination=self.destination,
                                       skip_5xx_greeting=self._skip_5xx))
            return
        if conn is None:
            self._end_ticket("cancelled")
            self.unverified = True
            log.info("RCPT verification at %s skipped: every pooled connection is busy",
                     self.destination)
            for fut in self._futures:
                if not fut.done():
                    fut.set_result(None)
            return
        self._conn = conn
        self._reused = conn.transactions > 0
        try:
            self._env = conn.open_transaction(self.sender, eight_bit=self._eight_bit)
        except LMTPError as exc:
            self._release(reusable=False)
            self._end_ticket("broken", str(exc))
            self._fail(LOST.results(["-"], stage="mail", destination=self.destination,
                                    detail=f"session with {self.destination} failed: {exc}"))
            return
        for i, fut in enumerate(self._futures):
            if not fut.done():
                self._send(i)
        self._flush()

    def _flush(self) -> None:
        self._flush_due = False
        env = self._env
        if env is not None:
            env.flush()

    def _send(self, i: int) -> None:
        env = self._env
        assert env is not None
        try:
            reply = env.rcpt(self.addresses[i], flush=False)
        except LMTPError as exc:
            self._broken(env, exc)
            return
        self._env_index[i] = len(env.recipients) - 1
        reply.add_done_callback(  # type: ignore[attr-defined]
            lambda f, i=i, env=env: self._answered(i, env, f))

    def _answered(self, i: int, env: OpenEnvelope, f: asyncio.Future[Reply]) -> None:
        if f.cancelled():
            return
        exc = f.exception()
        if exc is not None:
            self._broken(env, exc)
            return
        fut = self._futures[i]
        if env is not self._env or fut.done():
            return
        mail = env.mail_reply
        address = self.addresses[i]
        if mail is not None and not 200 <= mail.code < 300:
            result = result_from_reply(address, mail, "mail")
        else:
            result = result_from_reply(address, f.result(), "rcpt")
        fut.set_result(RecipientResult(result.address, result.status, result.code,
                                       result.enhanced, result.text, result.stage,
                                       self.destination))

    def _broken(self, env: OpenEnvelope, exc: BaseException) -> None:
        """The connection failed before every RCPT was answered."""
        if env is not self._env:
            return  # an earlier failure of that envelope dealt with it
        self._env = None
        self._release(reusable=False)
        if self._reused and not self._retried and not env.replied:
            # A cached connection that died before answering anything: nothing
            # reached the back end, so another connection may take it all again.
            self._retried = True
            self._end_ticket("broken", str(exc))
            log.info("RCPT verification at %s: cached connection lost before any reply (%s); "
                     "retrying on another", self.destination, exc)
            self._opening = asyncio.ensure_future(self._open())
            return
        self._end_ticket("broken", str(exc))
        entry = (TIMEOUT if isinstance(exc, ReadTimeout) else
                 PROTOCOL_ERROR if isinstance(exc, RemoteProtocolError) else LOST)
        stage = getattr(exc, "stage", "") or "rcpt"
        self._fail(entry.results(["-"], stage=stage, destination=self.destination,
                                 detail=f"session with {self.destination} failed: {exc}"))

    def _fail(self, results: list[RecipientResult]) -> None:
        self._failed = results
        for i, fut in enumerate(self._futures):
            if not fut.done():
                fut.set_result(self._failure_for(self.addresses[i]))

    # -- the end -----------------------------------------------------------------------

    async def _settled(self) -> None:
        while self._opening is not None and not self._opening.done():
            await asyncio.shield(self._opening)
        # Answers still owed (a RCPT in flight) come before the content.
        pending = [f for f in self._futures if not f.done()]
        if pending:
            await asyncio.wait(pending)

    async def finish(self, delivery: Delivery, positions: Sequence[int]
                     ) -> list[RecipientResult]:
        """Send ``delivery``'s content; the results of the recipients at ``positions``.

        ``positions`` index :attr:`addresses` (those whose RCPT was accepted and
        that are to get the message; ``delivery.recipients`` are them, in order).
        """
        self.ended = True
        await self._settled()
        env, results = self._env, None
        if env is not None:
            try:
                results = await env.send(delivery)
            except (LMTPError, OSError) as exc:
                log.warning("%s: content not sent: %s", self.destination, exc)
                results = None
            conn = self._conn
            ok = conn is not None and conn.usable
            self._release(reusable=ok)
            self._end_ticket("ok" if ok else "broken", "" if ok or not results
                             else results[0].text)
        out: list[RecipientResult] = []
        for pos, address in zip(positions, delivery.recipients, strict=True):
            j = self._env_index[pos]
            r = results[j] if results is not None and 0 <= j < len(results) else None
            if r is None:
                r = LOST.result(address, stage="data", destination=self.destination,
                                detail=f"session with {self.destination} failed before the "
                                "content was sent")
            elif r.destination != self.destination or r.address != address:
                r = RecipientResult(address, r.status, r.code, r.enhanced, r.text, r.stage,
                                    self.destination, r.local, r.possibly_delivered)
            out.append(r)
        return out

    async def abandon(self) -> None:
        """The client's transaction ended without content: RSET, and the connection back."""
        if self.ended:
            return
        self.ended = True
        try:
            await self._settled()
        except asyncio.CancelledError:
            self._release(reusable=False)
            raise
        env = self._env
        if env is None:
            return
        self._env = None
        ok = False
        try:
            await env.abandon()
            conn = self._conn
            ok = conn is not None and conn.usable
        except (LMTPError, OSError):
            ok = False
        finally:
            self._release(reusable=ok)
            self._end_ticket("ok" if ok else "broken")

    def _release(self, *, reusable: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if not reusable and conn.usable:
                conn.abort()
            self._pool.release(conn, reusable=reusable)

    def _end_ticket(self, outcome: Outcome, reason: str = "") -> None:
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            self._shaper.done(ticket, outcome, reason)
