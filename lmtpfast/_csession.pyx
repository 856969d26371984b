# cython: language_level=3, auto_pickle=False
"""The compiled consumer of ``Client.send_many`` (the session layer's hot path).

:func:`send_many` is ``_session.Client._send_many``, line for line, in
compiled code for a session on the compiled protocol (``CLMTPProtocol``):
one loop that takes deliveries, prepares them, submits them to the
protocol without keyword parsing (``ProtocolCore._c_submit`` ->
``Connection._start``) and collects the decided transactions. The common
delivery (every recipient goes to the server, in-memory content, nothing the
server lacks) is prepared here (:func:`_fast`); every other one goes to
``Client._prepare``, the one definition of the per-delivery decisions, so
the two paths cannot disagree. ``_session`` stays the reference and the
fallback (the pure-Python engine runs it; every ``send_many`` test runs on
both engines).
"""

from collections import deque
from collections.abc import AsyncIterable

from lmtpfast._cprotocol cimport Batch, ProtocolCore

from msgspec.structs import astuple

from lmtpfast._delivery import STREAM_THRESHOLD, Delivery
from lmtpfast._errors import LocalProtocolError, ServerDisconnected
from lmtpfast._failures import BAD_CONTENT

__all__ = ["send_many"]

cdef Py_ssize_t _STREAM_THRESHOLD = STREAM_THRESHOLD
cdef object _LocalProtocolError = LocalProtocolError
cdef object _Delivery = Delivery
cdef object _astuple = astuple

# A Delivery's fields read at once (one call, not a lookup each), by position.
_FIELDS = ("sender", "recipients", "content", "mail_params", "rcpt_params", "dsn_mail",
           "dsn_rcpt", "eight_bit", "smtputf8", "refused", "given", "cache")
if tuple(Delivery.__struct_fields__) != _FIELDS:
    raise ImportError("lmtpfast._csession is out of date with Delivery's fields: rebuild it")


cdef tuple _fast(object d, tuple facts, object encode):
    """``Client._prepare(d)`` for the common delivery: (rcpts, content, params, smtputf8, sender).

    ``None`` when ``d`` needs a decision taken only by ``Client._prepare``
    (refused or locally failed recipients, a capability the server lacks,
    per-recipient parameters, streamed content, SIZE over the limit); the
    result is otherwise the same, field for field.
    """
    cdef bint has_smtputf8 = facts[0]
    cdef bint has_8bitmime = facts[1]
    cdef bint has_dsn = facts[2]
    cdef object limit = facts[3]
    cdef bint chunking = facts[4]
    cdef bint smtputf8, eight_bit
    cdef list params
    cdef tuple f
    if type(d) is not _Delivery:
        return None
    f = _astuple(d)
    if f[9]:  # refused
        return None
    smtputf8 = f[8]
    if smtputf8 and not has_smtputf8:
        return None
    eight_bit = f[7]
    if eight_bit and not has_8bitmime:
        return None
    if f[4] is not None or (has_dsn and f[6] is not None):  # rcpt_params, dsn_rcpt
        return None
    if len(f[2]) > _STREAM_THRESHOLD:  # content
        return None
    cache = f[11]
    content = (<dict>cache).get("bdat" if chunking else "data")
    if content is None:
        content = d.encoded(dot_stuff=not chunking, encode=encode)
    mail_params = f[3]
    params = list(mail_params) if mail_params else []
    if has_dsn:
        dsn_mail = f[5]
        if dsn_mail:
            params += dsn_mail
    given = f[10]
    if limit is not None:
        size = (<dict>cache).get("size")
        if size is None:
            size = d.size
        if limit and size > limit:
            return None
        if "SIZE" not in given:
            params.append(f"SIZE={size}")
    if eight_bit and "BODY" not in given:
        params.append("BODY=8BITMIME")
    if smtputf8 and "SMTPUTF8" not in given:
        params.append("SMTPUTF8")
    return (list(f[1]), content, params, smtputf8 or "SMTPUTF8" in given, f[0])


async def send_many(client, ProtocolCore protocol, deliveries, window):
    """``Client.send_many`` on the compiled protocol (see ``_session.Client._send_many``)."""
    cdef Batch batch
    cdef dict pending = {}
    cdef bint more = True
    cdef bint chunking
    cdef Py_ssize_t started = 0
    cdef tuple facts, fast
    cdef Py_ssize_t limit
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    limit = window
    # Woken once per half window of decisions (or when none is left in
    # flight): the connection keeps going on the other half meanwhile.
    batch = <Batch?>protocol.new_batch(max(1, window // 2))
    ready = deque()
    source = None
    asource = None
    if isinstance(deliveries, AsyncIterable):
        asource = aiter(deliveries)
    else:
        source = iter(deliveries)
    facts = client._session_facts()
    chunking = facts[4]
    encode = client.engine.encode_content
    done = batch.done
    try:
        while True:
            # Fill the window, as far as the connection can take more.
            while more and len(pending) < limit and protocol._c_usable():
                try:
                    if source is not None:
                        d = next(source)
                    else:
                        if started:
                            client.transactions += started
                            started = 0
                        d = await anext(asource)
                except (StopIteration, StopAsyncIteration):
                    more = False
                    break
                fast = _fast(d, facts, encode)
                if fast is not None:
                    rcpts, content, params, smtputf8, sender = fast
                    rcpt_params = None
                    entry = d
                else:
                    prep = client._prepare(d)
                    if type(prep) is list:
                        ready.append((d, prep))
                        continue
                    rcpts, content, params, rcpt_params, smtputf8 = prep[:5]
                    sender = d.sender
                    entry = (d, prep) if prep.local else d
                try:
                    txn = protocol._c_submit(batch, sender, rcpts, content, params,
                                             rcpt_params, smtputf8, chunking)
                except _LocalProtocolError as exc:
                    if not protocol._c_usable():
                        raise
                    ready.append((d, [BAD_CONTENT.result(r, detail=exc)
                                      for r in d.recipients]))
                    continue
                started += 1
                pending[txn] = entry
            while done:
                txn = done.popleft()
                entry = pending.pop(txn)
                if type(entry) is tuple:
                    d, prep = entry
                    ready.append((d, client._merge(d, txn.results, prep.send_idx, prep.local)))
                else:
                    ready.append((entry, txn.results))
            if started:
                # (counted here, before anyone else runs: the same as one by one)
                client.transactions += started
                started = 0
            while ready:
                yield ready.popleft()
            if not pending:
                if not more:
                    return
                if not protocol._c_usable():
                    raise protocol.error or ServerDisconnected(
                        f"connection to {client.destination} is closed")
                continue
            # The window is full, the source is drained or the connection is done.
            batch.in_flight = len(pending) - len(done)
            await batch.wait()
    finally:
        if started:
            client.transactions += started
        if pending:
            protocol.abort(ServerDisconnected("send_many() left with deliveries in flight"))


def _prepare_fast(d, facts, encode):
    # For the tests: _fast from Python (compared with Client._prepare).
    return _fast(d, facts, encode)
