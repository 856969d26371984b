# Declarations of the compiled asyncio protocol (see _cprotocol.pyx), for the
# compiled session layer (_csession.pyx) that drives it.

cdef class Batch:
    cdef object _loop
    cdef object _waiter
    cdef public object done
    cdef public Py_ssize_t in_flight
    cdef public Py_ssize_t wake_at

    cdef int _append(self, object txn) except -1


cdef class ProtocolCore:
    # Public: the Python half of the class reads and sets them too.
    cdef public object engine
    cdef public object timeouts
    cdef public object _loop
    cdef public object _transport
    cdef public object _timer
    cdef public object _timer_stage
    cdef public dict _limits
    cdef public double _last_progress
    cdef public object _content_task
    cdef public object _chunk_ready
    cdef public object error
    cdef public object _closed
    cdef public object _trace
    cdef public object _traced_stage
    cdef public object _traced_plan

    cdef bint _c_usable(self) except -1
    cdef object _c_submit(self, object waiter, object sender, object recipients, object content,
                          object mail_params, object rcpt_params, bint smtputf8, bint chunking)
    cdef int _c_flush(self) except -1
    cdef int _c_process(self) except -1
    cdef int _c_flush_list(self, list out) except -1
    cdef int _c_chunk_done(self, object txn, object ready) except -1
    cdef int _c_resolve(self, object txn) except -1
    cdef object _c_current_stage(self)
    cdef int _c_arm_timer(self) except -1
