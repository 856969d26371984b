# cython: language_level=3, auto_pickle=False
"""The compiled hot path of the asyncio protocol (asyncpg's protocol.pyx over coreproto.pyx).

:class:`ProtocolCore` holds the per-message work of ``_protocol.LMTPProtocol``
in compiled code: ``data_received`` -> the engine -> per-transaction
decisions -> the waiter's wake-up, the writer, the submission of a
transaction and the stage timer's re-arming. ``_protocol.CLMTPProtocol``
puts it in front of the pure-Python ``LMTPProtocol``, which keeps everything
that runs once per connection (set-up commands, STARTTLS, streaming big
messages, breaks, timer expiry) and stays the reference: each method here
does what the method of the same name there does, line for line.

:class:`Batch` is the compiled twin of ``_protocol.Batch`` (``send_many``'s
collector of decided transactions).
"""

import asyncio
from collections import deque

from lmtpfast.proto._common import (
    NEED_DATA,
    CommandReply,
    ConnectionBroken,
    ReadyForData,
    TransactionDone,
)

__all__ = ["Batch", "ProtocolCore"]

from lmtpfast._metrics import TRACE
from lmtpfast.proto._cproto cimport Connection

cdef object _Future = asyncio.Future
cdef object _TRACE = TRACE
cdef object _StreamedContent = None
cdef tuple _DATA_PLAN = ()
cdef tuple _BDAT_PLAN = ()


def _bind(streamed_content, data_plan, bdat_plan):
    # _protocol hands over what it defines (StreamedContent, the traced stage plans).
    global _StreamedContent, _DATA_PLAN, _BDAT_PLAN
    _StreamedContent = streamed_content
    _DATA_PLAN = data_plan
    _BDAT_PLAN = bdat_plan


cdef class Batch:
    """Collects decided transactions for one consumer, waking it once per many."""

    def __init__(self, loop, Py_ssize_t wake_at=1):
        self._loop = loop
        self._waiter = None
        self.done = deque()
        self.in_flight = 0
        self.wake_at = wake_at

    def transaction_done(self, txn):
        self._append(txn)

    cdef int _append(self, object txn) except -1:
        self.done.append(txn)
        self.in_flight -= 1
        waiter = self._waiter
        if (waiter is not None and (self.in_flight <= 0 or len(self.done) >= self.wake_at)
                and not waiter.done()):
            waiter.set_result(None)
        return 0

    async def wait(self):
        """Return once ``wake_at`` decisions wait or none is in flight (at once if so)."""
        if len(self.done) >= self.wake_at or self.in_flight <= 0:
            return
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


cdef class ProtocolCore:
    """The compiled per-message methods of ``LMTPProtocol`` (see the module docstring)."""

    # (The attributes are declared in _cprotocol.pxd.)

    # -- asyncio.Protocol ------------------------------------------------------------

    def data_received(self, data):
        self._last_progress = self._loop.time()
        engine = self.engine
        if type(engine) is Connection:
            (<Connection>engine)._c_receive(data)
        else:
            engine.receive_data(data)
        self._c_process()

    def eof_received(self):
        self.engine.receive_data(b"")
        self._c_process()
        return None

    @property
    def usable(self):
        return self._c_usable()

    cdef bint _c_usable(self) except -1:
        engine = self.engine
        if self.error is not None:
            return False
        if type(engine) is Connection:
            if not (<Connection>engine)._c_usable():
                return False
        elif not engine.usable:
            return False
        return not self._closed.done()

    # -- operations ------------------------------------------------------------------

    def submit(self, waiter, sender, recipients, content, *, mail_params=(),
               rcpt_params=None, smtputf8=False, chunking=False):
        """Queue a transaction whose decision goes to ``waiter`` (a future or a batch)."""
        return self._c_submit(waiter, sender, recipients, content, mail_params, rcpt_params,
                              smtputf8, chunking)

    cdef object _c_submit(self, object waiter, object sender, object recipients, object content,
                          object mail_params, object rcpt_params, bint smtputf8, bint chunking):
        if not self._c_usable():
            self._check_usable()  # raises the reason
        engine = self.engine
        streamed = isinstance(content, _StreamedContent)
        if self._trace is None and engine.waiting_for is None:
            # Alone on the connection: its stages can be timed (when someone asks).
            self._trace = _TRACE.get()
            self._traced_stage = None
            self._traced_plan = _BDAT_PLAN if chunking and not streamed else _DATA_PLAN
        body = content if chunking and not streamed else None
        if type(engine) is Connection:
            txn = (<Connection>engine)._start(sender, recipients, mail_params, rcpt_params,
                                              smtputf8, chunking and streamed, body)
        else:
            txn = engine.start_transaction(
                sender, recipients, mail_params=mail_params, rcpt_params=rcpt_params,
                smtputf8=smtputf8, chunking=chunking and streamed, body=body)
        if not (chunking and not streamed):
            txn.content = content
        txn.waiter = waiter
        if chunking and streamed:
            self._c_process()  # a streamed BDAT transaction is ready for content at once
        else:
            self._c_flush()
        return txn

    def new_batch(self, Py_ssize_t wake_at=1):
        """A collector for :meth:`submit` (``send_many``), of this implementation."""
        return Batch(self._loop, wake_at)

    # -- internals -------------------------------------------------------------------

    def _flush(self):
        self._c_flush()

    def _process(self):
        self._c_process()

    def _resolve(self, txn):
        self._c_resolve(txn)

    def _arm_timer(self):
        self._c_arm_timer()

    cdef int _c_flush(self) except -1:
        engine = self.engine
        if type(engine) is Connection:
            out = (<Connection>engine)._c_data_to_send()
        else:
            out = engine.data_to_send()
        if out and self._transport is not None:
            self._transport.write(out)
        self._c_arm_timer()
        return 0

    cdef int _c_process(self) except -1:
        engine = self.engine
        cdef bint compiled = type(engine) is Connection
        cdef list out = []
        while True:
            ev = (<Connection>engine)._c_next_event() if compiled else engine.next_event()
            if ev is NEED_DATA:
                break
            if isinstance(ev, TransactionDone):
                self._c_resolve((<object>ev).transaction)
            elif isinstance(ev, ReadyForData):
                txn = ev.transaction
                content = txn.content
                if content is None:
                    # Streaming already: the reply to the last chunk came.
                    self._c_chunk_done(txn, True)
                elif isinstance(content, (bytes, bytearray)):
                    # Content, dot and the next group leave in one write.
                    out.append(content if type(content) is bytes else bytes(content))
                    txn.content = None
                    if compiled:
                        (<Connection>engine)._c_end_data(txn)
                    else:
                        engine.end_data(txn)
                else:
                    self._c_flush_list(out)
                    self._start_streaming(txn)
            elif isinstance(ev, CommandReply):
                self._on_command_reply(ev)
            elif isinstance(ev, ConnectionBroken):
                self._on_broken(ev)
        wire = (<Connection>engine)._c_data_to_send() if compiled else engine.data_to_send()
        if wire:
            out.append(wire)
        self._c_flush_list(out)
        self._c_arm_timer()
        return 0

    cdef int _c_flush_list(self, list out) except -1:
        transport = self._transport
        if out and transport is not None and not transport.is_closing():
            if len(out) == 1:
                transport.write(out[0])
            else:
                transport.write(b"".join(out))
        del out[:]
        return 0

    def _chunk_done(self, txn, ready):
        self._c_chunk_done(txn, ready)

    cdef int _c_chunk_done(self, object txn, object ready) except -1:
        waiting = self._chunk_ready
        if waiting is not None and waiting[0] is txn and not waiting[1].done():
            waiting[1].set_result(ready)
        return 0

    cdef int _c_resolve(self, object txn) except -1:
        if self._chunk_ready is not None:
            self._c_chunk_done(txn, False)
        fut = txn.waiter
        if type(fut) is Batch:
            (<Batch>fut)._append(txn)
        elif isinstance(fut, _Future):
            if not fut.done():
                fut.set_result(txn.results)
        elif fut is not None:  # another collector (the Python Batch)
            fut.transaction_done(txn)
        return 0

    # -- timers ------------------------------------------------------------------------

    cdef object _c_current_stage(self):
        stage = self.engine.waiting_for
        if stage is None and self.engine.content_owed is not None and self._content_task:
            return "content"
        return stage

    cdef int _c_arm_timer(self) except -1:
        # One timer per connection, re-armed lazily: data_received only
        # records the time, the timer checks it when it fires.
        engine = self.engine
        if engine.error is not None or engine.closed:
            return 0
        stage = self._c_current_stage()
        if self._trace is not None and stage != self._traced_stage:
            self._trace_stage(stage)
        if stage is None:
            # Idle: nothing is awaited. The next command's clock starts when
            # it is sent, not at the last reply before the gap.
            self._timer_stage = None
            return 0
        timer = self._timer
        if timer is not None and stage == self._timer_stage:
            return 0  # the usual case on a busy connection: nothing to do
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
                return 0  # it fires early and re-arms from _last_progress
            timer.cancel()  # a shorter limit (say RSET after the dot) now applies
        self._timer = self._loop.call_at(due, self._on_timer)
        return 0
