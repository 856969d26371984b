"""asyncio transport for the sans-IO engine: pipelined writer, flow control, stage timers.

:class:`LMTPProtocol` is an ``asyncio.Protocol`` (not streams: no extra task
or buffer copy per reply). Everything the engine decides is turned into
future results here; nothing about LMTP itself is decided in this file.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import ssl
from collections import deque
from typing import TYPE_CHECKING, cast

from ._delivery import STREAM_CHUNK, StreamedContent, start_transaction
from ._errors import (
    ConnectError,
    ConnectTimeout,
    LMTPError,
    ReadTimeout,
    ServerDisconnected,
    TLSError,
)
from ._metrics import TRACE, Trace
from ._results import RecipientResult
from ._settings import Timeouts
from ._tls import TLSInfo, tls_info
from .proto import (
    NEED_DATA,
    CommandReply,
    Connection,
    ConnectionBroken,
    ReadyForData,
    Reply,
    Transaction,
    TransactionDone,
)

if TYPE_CHECKING:
    from ._command import Program
    from ._destination import Destination

__all__ = ["Batch", "LMTPProtocol", "StreamedContent", "open_connection", "protocol_class"]


# The stages a timed transaction reports, in order (the engine's "final" is the dot).
_DATA_PLAN = ("mail", "rcpt", "data", "final")
_BDAT_PLAN = ("mail", "rcpt", "final")
_STAGE_NAMES = {"final": "dot"}



class Batch:
    """Collects decided transactions for one consumer, waking it once per many.

    ``Client.send_many`` submits many transactions with this as their waiter
    (no future each); the protocol appends each decided transaction to
    ``done``. The consumer sets ``in_flight`` (how many are still to be
    decided) before :meth:`wait`, and is woken when ``wake_at`` decisions are
    waiting or nothing is in flight any more (the last one, or a break): a
    pipelined connection goes on while the window is half full, and the
    consumer's task runs once per half window, not once per message.
    """

    __slots__ = ("_loop", "_waiter", "done", "in_flight", "wake_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, wake_at: int = 1) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        #: Decided transactions not yet taken by the consumer, in the order decided.
        self.done: deque[Transaction] = deque()
        #: Transactions submitted and not yet decided (kept by the consumer).
        self.in_flight = 0
        #: Wake the consumer once this many decisions are waiting.
        self.wake_at = wake_at

    def transaction_done(self, txn: Transaction) -> None:
        self.done.append(txn)
        self.in_flight -= 1
        waiter = self._waiter
        if (waiter is not None and (self.in_flight <= 0 or len(self.done) >= self.wake_at)
                and not waiter.done()):
            waiter.set_result(None)

    async def wait(self) -> None:
        """Return once ``wake_at`` decisions wait or none is in flight (at once if so)."""
        if len(self.done) >= self.wake_at or self.in_flight <= 0:
            return
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class LMTPProtocol(asyncio.Protocol):
    """One LMTP connection on an event loop; any number of pipelined transactions.

    The reference: ``_cprotocol.ProtocolCore`` is the compiled twin of its
    per-message methods (``data_received``, ``eof_received``, ``submit``, ``usable``,
    ``_process``, ``_flush``, ``_resolve``, ``_chunk_done``, ``_arm_timer``,
    ``_current_stage``): a change to one of them goes into both.
    """

    def __init__(
        self,
        engine: Connection,
        timeouts: Timeouts,
        loop: asyncio.AbstractEventLoop,
        peer: str = "",
    ) -> None:
        self.engine = engine
        self.timeouts = timeouts
        self.peer = peer
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        # The session set-up stage under way (greeting, lhlo, starttls, auth);
        # connect() sets it to None once the session is ready.
        self.setup_stage: str | None = "greeting"
        # Futures for session command replies, in order, with the stage each is.
        self._command_waiters: deque[tuple[str, asyncio.Future[Reply]]] = deque()
        self._greeting: asyncio.Future[Reply] = loop.create_future()
        self._closed: asyncio.Future[None] = loop.create_future()
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_stage: str | None = None  # the stage the timer was last checked for
        self._limits: dict[str, float] = {}  # stage -> seconds, from timeouts
        self._last_progress = 0.0
        self._content_task: asyncio.Task[None] | None = None
        # Without PIPELINING a streamed BDAT chunk waits for the reply to the
        # one before: the transaction streaming and a future that is True when
        # the reply came (ReadyForData), False when the transaction was
        # decided or the connection broke.
        self._chunk_ready: tuple[Transaction, asyncio.Future[bool]] | None = None
        self.error: Exception | None = None
        # A transaction being timed (lmtpfast.TRACE was set when it was sent and
        # nothing else was in flight): the stage awaited and since when.
        self._trace: Trace | None = None
        self._traced_stage: str | None = None
        self._traced_at = 0.0
        self._traced_plan: tuple[str, ...] = ()
        #: What STARTTLS negotiated (``None`` while the connection is in plain text).
        self.tls: TLSInfo | None = None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Pipelined groups must not wait for Nagle's delayed ACK.
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        self._last_progress = self._loop.time()
        engine = self.engine
        engine.receive_data(data)
        self._process()

    def eof_received(self) -> bool | None:
        self.engine.receive_data(b"")
        self._process()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiting():
            self.engine.fail(ServerDisconnected(
                f"connection to {self.peer} lost" + (f": {exc}" if exc else "")))
            self._process()
        self._cancel_timer()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(ServerDisconnected("connection lost while writing"))
        if not self._closed.done():
            self._closed.set_result(None)
        self._fail_waiters(self.error or ServerDisconnected(f"connection to {self.peer} lost"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- operations ------------------------------------------------------------------

    async def wait_greeting(self) -> Reply:
        return await self._greeting

    def command(self, verb: str, argument: str | None = None) -> asyncio.Future[Reply]:
        """Send a session command; the future gets its reply (whatever the code)."""
        self._check_usable()
        if verb.upper() == "LHLO":
            self.engine.lhlo()
        else:
            self.engine.command(verb, argument)
        fut: asyncio.Future[Reply] = self._loop.create_future()
        # "AUTH-RESPONSE" lines are part of the AUTH stage.
        stage = verb.lower().partition("-")[0]
        self._command_waiters.append((stage, fut))
        if self.setup_stage is not None:
            self.setup_stage = stage
        self._flush()
        return fut

    def transaction(
        self,
        sender: str,
        recipients: list[str],
        content: bytes | StreamedContent,
        *,
        mail_params: list[str] | tuple[str, ...] = (),
        rcpt_params: list[list[str]] | None = None,
        smtputf8: bool = False,
        chunking: bool = False,
    ) -> asyncio.Future[list[RecipientResult]]:
        """Queue a transaction; the future gets one result per recipient.

        ``content`` is the encoded message (dot-stuffed for DATA, only
        CRLF-normalised for ``chunking``) or a :class:`StreamedContent`.
        """
        fut: asyncio.Future[list[RecipientResult]] = self._loop.create_future()
        self.submit(fut, sender, recipients, content, mail_params=mail_params,
                    rcpt_params=rcpt_params, smtputf8=smtputf8, chunking=chunking)
        return fut

    def submit(
        self,
        waiter: Batch | asyncio.Future[list[RecipientResult]],
        sender: str,
        recipients: list[str],
        content: bytes | StreamedContent,
        *,
        mail_params: list[str] | tuple[str, ...] = (),
        rcpt_params: list[list[str]] | None = None,
        smtputf8: bool = False,
        chunking: bool = False,
    ) -> Transaction:
        """Queue a transaction whose decision goes to ``waiter`` (a future or a :class:`Batch`).

        A future gets ``txn.results``; a batch gets the transaction itself.
        Raises before anything is queued when the transaction cannot be sent.
        """
        self._check_usable()
        if self._trace is None and self.engine.waiting_for is None:
            # Alone on the connection: its stages can be timed (when someone asks).
            self._trace = TRACE.get()
            self._traced_stage = None
            self._traced_plan = _BDAT_PLAN if chunking and not isinstance(
                content, StreamedContent) else _DATA_PLAN
        txn, owed_now = start_transaction(
            self.engine, sender, recipients, content, mail_params=mail_params,
            rcpt_params=rcpt_params, smtputf8=smtputf8, chunking=chunking)
        txn.waiter = waiter
        if owed_now:
            self._process()  # a streamed BDAT transaction is ready for content at once
        else:
            self._flush()
        return txn

    # -- a transaction whose envelope grows (the proxy's RCPT verification) ----------

    def open_transaction(
        self, sender: str, *, mail_params: list[str] | tuple[str, ...] = (),
        smtputf8: bool = False,
    ) -> tuple[Transaction, asyncio.Future[Reply]]:
        """Send MAIL alone (``Connection.open_transaction``); the future gets its reply.

        Python in both protocol classes: one per transaction, off the per-message path.
        """
        self._check_usable()
        txn = self.engine.open_transaction(sender, mail_params=mail_params, smtputf8=smtputf8)
        fut: asyncio.Future[Reply] = self._loop.create_future()
        self._command_waiters.append(("mail", fut))
        self._flush()
        return txn, fut

    def add_recipient(self, txn: Transaction, recipient: str, *, smtputf8: bool = False,
                      flush: bool = True) -> asyncio.Future[Reply]:
        """Send one more RCPT of an open transaction; the future gets its reply.

        ``flush=False`` leaves it queued for the next :meth:`flush` (the RCPTs
        of a pipelined group in one write).
        """
        self._check_usable()
        self.engine.add_recipient(txn, recipient, smtputf8=smtputf8)
        fut: asyncio.Future[Reply] = self._loop.create_future()
        self._command_waiters.append(("rcpt", fut))
        if flush:
            self._flush()
        return fut

    def flush(self) -> None:
        """Write what is queued (after ``add_recipient(..., flush=False)``)."""
        self._flush()

    def close_transaction(
        self, txn: Transaction, content: bytes | StreamedContent, *, chunking: bool = False,
    ) -> asyncio.Future[list[RecipientResult]]:
        """The envelope is complete: DATA or BDAT and ``content``; the future gets the results."""
        self._check_usable()
        fut: asyncio.Future[list[RecipientResult]] = self._loop.create_future()
        streamed = isinstance(content, StreamedContent)
        txn.waiter = fut
        if chunking and not streamed:
            self.engine.close_transaction(txn, body=content)  # type: ignore[arg-type]
        else:
            txn.content = content
            self.engine.close_transaction(txn, chunking=chunking)
        if chunking and streamed:
            self._process()  # ready for its first chunk at once
        else:
            self._flush()
        return fut

    def abandon_transaction(self, txn: Transaction) -> asyncio.Future[list[RecipientResult]]:
        """RSET instead of the content; the future is done once the RSET is answered."""
        self._check_usable()
        fut: asyncio.Future[list[RecipientResult]] = self._loop.create_future()
        txn.waiter = fut
        self.engine.abandon_transaction(txn)
        self._flush()
        return fut

    def new_batch(self, wake_at: int = 1) -> Batch:
        """A collector for :meth:`submit` (``send_many``), of this implementation."""
        return Batch(self._loop, wake_at)

    def abort(self, error: Exception) -> None:
        """Give up on the connection: open transactions get transient results."""
        if self.error is None:
            self.error = error
        if self._waiting():
            self.engine.fail(error)
            self._process()
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def wait_closed(self) -> None:
        await self._closed

    @property
    def usable(self) -> bool:
        return self.error is None and self.engine.usable and not self._closed.done()

    def peer_silent(self) -> bool:
        """True unless the socket has something to read right now.

        An idle connection has nothing to read: readable means the server
        closed it (EOF), reset it, or said goodbye (a 421 before closing) and
        the event loop has not run to notice yet. One poll(2), no waiting.
        """
        transport = self._transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return True
        try:
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

    async def start_tls(
        self, context: ssl.SSLContext, server_hostname: str | None, verified: bool,
    ) -> TLSInfo:
        """Upgrade the live connection after the server's 220 to STARTTLS (RFC 3207).

        The handshake has the ``starttls`` time limit. The transport is
        swapped, then the engine is told: it refuses any byte that arrived in
        the clear after the 220 (an injection). A failure raises
        :class:`TLSError` (OpenSSL's reason in the message) with the connection
        aborted; the caller says LHLO again on success.
        """
        transport = self._transport
        assert transport is not None
        if self.error is not None or self._closed.done():
            # E.g. bytes injected after the 220 already broke the session.
            raise self.error or ServerDisconnected(f"connection to {self.peer} lost before TLS")
        try:
            new = await self._loop.start_tls(
                transport, self, context, server_side=False, server_hostname=server_hostname,
                ssl_handshake_timeout=self.timeouts.starttls)
        except asyncio.CancelledError:
            self.abort(ServerDisconnected("TLS handshake cancelled"))
            raise
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError | ConnectionAbortedError) and "handshake" not in reason:
                reason = f"handshake not done within {self.timeouts.starttls:g}s ({reason})"
            error = TLSError(f"TLS handshake with {self.peer} failed: {reason}")
            self.abort(error)
            if not self._closed.done():  # the SSL layer may never call connection_lost
                self._closed.set_result(None)
            raise error from exc
        if new is None:  # pragma: no cover - only if the loop closed under us
            raise ServerDisconnected(f"connection to {self.peer} closed during the TLS handshake")
        self._transport = new
        self.engine.start_tls_done()
        self._process()  # a refusal of injected bytes surfaces here
        if not self.usable:
            raise self.error or ServerDisconnected(f"connection to {self.peer} lost after TLS")
        ssl_object = new.get_extra_info("ssl_object")
        if ssl_object is None:  # pragma: no cover - every loop we support provides it
            raise TLSError(f"TLS with {self.peer}: the event loop gives no SSL object")
        self.tls = tls_info(ssl_object, verified, server_hostname)
        return self.tls

    # -- internals -------------------------------------------------------------------

    def _check_usable(self) -> None:
        if not self.usable:
            raise self.error or ServerDisconnected(f"connection to {self.peer} is closed")

    def _flush(self) -> None:
        out = self.engine.data_to_send()
        if out and self._transport is not None:
            self._transport.write(out)
        self._arm_timer()

    def _process(self) -> None:
        engine = self.engine
        out: list[bytes] = []
        while True:
            ev = engine.next_event()
            if ev is NEED_DATA:
                break
            if isinstance(ev, TransactionDone):
                self._resolve(ev.transaction)
            elif isinstance(ev, ReadyForData):
                txn = ev.transaction
                content = txn.content
                if content is None:
                    # Streaming already: the reply to the last chunk came.
                    self._chunk_done(txn, True)
                elif isinstance(content, bytes | bytearray):
                    # Content, dot and the next group leave in one write.
                    out.append(bytes(content))
                    txn.content = None
                    engine.end_data(txn)
                else:
                    self._flush_list(out)
                    self._start_streaming(txn)
            elif isinstance(ev, CommandReply):
                self._on_command_reply(ev)
            elif isinstance(ev, ConnectionBroken):
                self._on_broken(ev)
        wire = engine.data_to_send()
        if wire:
            out.append(wire)
        self._flush_list(out)
        self._arm_timer()

    def _flush_list(self, out: list[bytes]) -> None:
        if out and self._transport is not None and not self._transport.is_closing():
            if len(out) == 1:
                self._transport.write(out[0])
            else:
                self._transport.write(b"".join(out))
        out.clear()

    def _chunk_done(self, txn: Transaction, ready: bool) -> None:
        waiting = self._chunk_ready
        if waiting is not None and waiting[0] is txn and not waiting[1].done():
            waiting[1].set_result(ready)

    def _resolve(self, txn: Transaction) -> None:
        self._chunk_done(txn, False)
        fut = txn.waiter
        if type(fut) is Batch:
            fut.transaction_done(txn)
        elif isinstance(fut, asyncio.Future):
            if not fut.done():
                fut.set_result(txn.results)
        elif fut is not None:  # another collector (the compiled Batch)
            cast(Batch, fut).transaction_done(txn)

    def _on_command_reply(self, ev: CommandReply) -> None:
        if ev.command == "greeting":
            if not self._greeting.done():
                self._greeting.set_result(ev.reply)
            return
        if self._command_waiters:
            _, fut = self._command_waiters.popleft()
            if not fut.done():
                fut.set_result(ev.reply)

    def _on_broken(self, ev: ConnectionBroken) -> None:
        if self.error is None:
            self.error = ev.error
        for txn in ev.transactions:
            self._resolve(txn)
        self._fail_waiters(ev.error)
        if self._content_task is not None:
            self._content_task.cancel()
        if self._transport is not None:
            self._transport.abort()

    def _fail_waiters(self, error: Exception) -> None:
        # Say which session stage the failure interrupted (for per-recipient
        # results made from it), unless the error knows already (ReadTimeout).
        if not self._greeting.done():
            stage = "greeting"
        elif self._command_waiters:
            stage = self._command_waiters[0][0]
        else:
            stage = self.setup_stage or ""
        if stage and isinstance(error, LMTPError) and not getattr(error, "stage", ""):
            setattr(error, "stage", stage)  # noqa: B010 - not every LMTPError declares it
        if not self._greeting.done():
            self._greeting.set_exception(error)
            self._greeting.exception()  # mark retrieved: nobody may be waiting yet
        while self._command_waiters:
            _, fut = self._command_waiters.popleft()
            if not fut.done():
                fut.set_exception(error)

    # -- content streaming ---------------------------------------------------------

    def _start_streaming(self, txn: Transaction) -> None:
        self._content_task = self._loop.create_task(self._stream_content(txn))

    async def _stream_content(self, txn: Transaction) -> None:
        content = txn.content
        assert isinstance(content, StreamedContent)
        txn.content = None
        transport = self._transport
        assert transport is not None
        bdat = content.chunking
        engine = self.engine
        loop = self._loop
        # Without PIPELINING each BDAT chunk waits for its reply (RFC 2920).
        one_by_one = bdat and not engine.pipelining
        encoder = content.encoder(dot_stuff=not bdat)
        raw = content.raw
        try:
            for start in range(0, len(raw), STREAM_CHUNK):
                # The engine stops owing content when the transaction is
                # decided (a refused chunk, every recipient refused: RFC 3030
                # 2) or the connection broke; after a write error asyncio
                # drops writes silently. Either way: send nothing more, so the
                # last chunk or the dot is never "sent" (which would flag the
                # recipients possibly delivered).
                if engine.content_owed is not txn or transport.is_closing():
                    return
                piece = encoder.encode(raw[start : start + STREAM_CHUNK])
                if not piece:
                    continue
                ready = None
                if bdat:
                    if one_by_one:
                        ready = loop.create_future()
                        self._chunk_ready = (txn, ready)
                    engine.send_chunk(txn, piece)
                    piece = engine.data_to_send()
                transport.write(piece)
                self._last_progress = loop.time()
                if ready is not None:
                    self._arm_timer()  # the chunk's reply has the DATA limit
                    if not await ready:
                        return
                elif self._paused:
                    await self._drain()
            if engine.content_owed is not txn or transport.is_closing():
                return
            tail = encoder.finish()
            if bdat:
                engine.send_chunk(txn, tail, last=True)
                self._process()
                return
            if tail:
                transport.write(tail)
        except LMTPError as exc:
            # A NUL found only now (callers check first): the server already
            # has part of the message, so only dropping the connection is safe.
            self.abort(exc)
            return
        except (ConnectionError, asyncio.CancelledError):
            return
        except OSError as exc:
            # A message file (MessageFile) that cannot be read midway: the
            # server has part of the message, so drop the connection (the
            # recipients are deferred; the content never ended, no duplicate).
            self.abort(exc)
            return
        finally:
            self._chunk_ready = None
        if self.engine.content_owed is txn:
            self.engine.end_data(txn)
            self._process()

    async def _drain(self) -> None:
        self._drain_waiter = self._loop.create_future()
        self._arm_timer()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None

    # -- timers ------------------------------------------------------------------------

    def _current_stage(self) -> str | None:
        stage = self.engine.waiting_for
        if stage is None and self.engine.content_owed is not None and self._content_task:
            return "content"
        return stage

    def _waiting(self) -> bool:
        """The engine can still get replies: not broken, not closed.

        Not ``usable``: while QUIT or STARTTLS is pending the engine takes no
        new commands, but their replies still need a time limit.
        """
        engine = self.engine
        return engine.error is None and not engine.closed

    def _arm_timer(self) -> None:
        # One timer per connection, re-armed lazily: data_received only
        # records the time, the timer checks it when it fires.
        if not self._waiting():
            return
        stage = self._current_stage()
        if self._trace is not None and stage != self._traced_stage:
            self._trace_stage(stage)
        if stage is None:
            # Idle: nothing is awaited. The next command's clock starts when
            # it is sent, not at the last reply before the gap.
            self._timer_stage = None
            return
        timer = self._timer
        if timer is not None and stage == self._timer_stage:
            return  # the usual case on a busy connection: nothing to do
        limit = self._limits.get(stage)
        if limit is None:
            limit = self._limits[stage] = self.timeouts.for_stage(stage)
        now = self._loop.time()
        due = now + limit
        if timer is None or self._timer_stage is None:
            self._last_progress = now  # a wait starts now (first command, or after idle)
        self._timer_stage = stage
        if timer is not None:
            if timer.when() <= due:
                return  # it fires early and re-arms from _last_progress
            timer.cancel()  # a shorter limit (say RSET after the dot) now applies
        self._timer = self._loop.call_at(due, self._on_timer)

    def _trace_stage(self, stage: str | None) -> None:
        """The traced transaction's wait moved on to ``stage``: the last one took this long.

        Pipelined replies often come in one read, so the wait can skip stages:
        those get 0 (their reply was there when the previous one came), and
        every stage of the transaction is reported once whatever the packets.
        """
        now = self._loop.time()
        prev = self._traced_stage
        if prev is not None:
            trace = self._trace
            assert trace is not None
            peer = self.peer
            trace.stage(peer, _STAGE_NAMES.get(prev, prev), now - self._traced_at)
            plan = self._traced_plan
            if prev in plan and (stage is None or stage in plan):
                end = len(plan) if stage is None else plan.index(stage)
                for skipped in plan[plan.index(prev) + 1:end]:
                    trace.stage(peer, _STAGE_NAMES.get(skipped, skipped), 0.0)
            if prev == "final" or stage is None:
                self._trace = None  # its replies are in; what follows is someone else's
                self._traced_stage = None
                return
        self._traced_stage = stage
        self._traced_at = now

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        stage = self._current_stage()
        if stage is None or not self._waiting():
            self._timer_stage = None
            return
        limit = self.timeouts.for_stage(stage)
        due = self._last_progress + limit
        now = self._loop.time()
        if now < due:
            self._timer = self._loop.call_at(due, self._on_timer)
            return
        what = "sending message content" if stage == "content" else (
            f"waiting for the {stage.upper()} reply")
        self.abort(ReadTimeout(
            f"conversation with {self.peer} timed out after {limit:g}s while {what}", stage))



def _compiled_protocol() -> type[LMTPProtocol] | None:
    # The compiled hot path in front of the reference (asyncpg's protocol.pyx
    # shape): per-message methods from _cprotocol, the rest from LMTPProtocol.
    if os.environ.get("LMTPFAST_NO_EXTENSIONS") == "1":
        return None
    try:
        from ._cprotocol import ProtocolCore, _bind
    except ImportError:
        return None
    _bind(StreamedContent, _DATA_PLAN, _BDAT_PLAN)

    class CLMTPProtocol(ProtocolCore, LMTPProtocol):  # type: ignore[misc]
        """:class:`LMTPProtocol` with its per-message methods compiled (``_cprotocol``)."""

    return CLMTPProtocol


#: ``LMTPProtocol`` with the compiled hot path, when built (else ``None``).
CLMTPProtocol = _compiled_protocol()


def protocol_class(engine_name: str) -> type[LMTPProtocol]:
    """The protocol for a core: compiled with the compiled engine, else the reference."""
    if engine_name == "c" and CLMTPProtocol is not None:
        return CLMTPProtocol
    return LMTPProtocol


async def open_connection(
    conn: Connection, timeouts: Timeouts, dest: Destination, peer: str, engine_name: str,
) -> tuple[LMTPProtocol, Program | None]:
    """Connect on the running loop (within ``timeouts.connect``) with ``conn`` as the engine.

    The protocol is :func:`protocol_class` of ``engine_name``. For a
    ``command:`` destination the program is started on a socket pair and
    returned too (the session reaps it).
    """
    loop = asyncio.get_running_loop()
    protocol_type = protocol_class(engine_name)

    def factory() -> LMTPProtocol:
        return protocol_type(conn, timeouts, loop, peer)

    if dest.kind == "command":
        from ._command import Program

        # A program on stdin/stdout: a socket pair, then the same protocol.
        program, sock = await Program.start(dest.argv, peer)
        try:
            _, protocol = await loop.create_unix_connection(factory, sock=sock)
        except BaseException:
            sock.close()
            await program.finish()
            raise
        return protocol, program
    try:
        async with asyncio.timeout(timeouts.connect):
            if dest.is_unix:
                _, protocol = await loop.create_unix_connection(factory, dest.path)
            else:
                _, protocol = await loop.create_connection(factory, dest.host, dest.port)
    except TimeoutError:
        raise ConnectTimeout(
            f"connect to {peer} timed out after {timeouts.connect:g}s") from None
    except OSError as exc:
        raise ConnectError(f"cannot connect to {peer}: {exc.strerror or exc}") from exc
    return protocol, None
