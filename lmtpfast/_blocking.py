"""The sans-IO engine over a blocking socket: one session, no event loop.

``lmtpfast send`` runs once per message under an MTA (Postfix pipe(8),
procmail, Exim's pipe transport), so its cost is mostly start-up: importing
asyncio, ssl and an event loop costs several times what the delivery does.
:class:`BlockingProtocol` offers what :class:`~lmtpfast._protocol.LMTPProtocol`
offers the session (``command``, ``transaction``, ``start_tls``, ``abort``
...), each call doing its I/O before it returns. Its results are wrapped in
:class:`Ready`, an awaitable that never suspends, so the one set-up sequence
and ``Client.send`` in ``_session`` run over it unchanged: :func:`run_now`
drives such a coroutine to its end without a loop.

Time limits are Postfix's, per stage, as in the asyncio protocol: a stage
fails when no byte came (or could be written) for its limit.
"""

from __future__ import annotations

# _socket, not socket: the socket module imports enum and selectors, a large
# share of a one-message process's start-up; ssl (TLS only) brings it back.
import _socket
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._delivery import STREAM_CHUNK, StreamedContent, start_transaction
from ._errors import (
    ConfigurationError,
    ConnectError,
    ConnectTimeout,
    LMTPError,
    ReadTimeout,
    ServerDisconnected,
    TLSError,
)
from .proto import NEED_DATA, CommandReply, ConnectionBroken, ReadyForData, TransactionDone

if TYPE_CHECKING:
    import ssl

    from ._destination import Destination
    from ._results import RecipientResult
    from ._settings import Timeouts
    from ._tls import TLSInfo
    from .proto import Connection, Reply, Transaction

__all__ = ["BlockingProtocol", "Ready", "open_blocking", "run_now"]

T = TypeVar("T")
_RECV = 65536


def _seconds(limit: float) -> float | None:
    """A socket timeout: an infinite limit (no timer) is ``None``."""
    return None if limit == float("inf") else limit


class Ready(Generic[T]):
    """An awaitable whose value is already there: ``await`` never suspends."""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, None, T]:
        return self.value
        yield  # pragma: no cover - makes this a generator that never suspends


def run_now(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that only awaits :class:`Ready` values; its result (or exception)."""
    try:
        coro.send(None)
    except StopIteration as done:
        # Typed through a variable: mypy and stubtest's mypy disagree on whether
        # StopIteration.value is Any here, and an ignore fails one of them.
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("a blocking session awaited something that is not ready")


def open_blocking(
    conn: Connection, timeouts: Timeouts, dest: Destination, peer: str, engine_name: str = "",
) -> Ready[tuple[BlockingProtocol, None]]:
    """Connect (within ``timeouts.connect``) and wrap the socket; the errors ``connect`` raises.

    A ``command:`` destination (a program to run) needs the asyncio session
    (:func:`~lmtpfast.connect`): it is refused here with :class:`ConfigurationError`.
    """
    if dest.kind == "command":
        raise ConfigurationError(f"{peer}: a command destination needs connect(), "
                                 "not connect_sync()")
    try:
        if dest.is_unix:
            sock = _connected(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, dest.path,
                              timeouts.connect)
        else:
            sock = _connect_tcp(dest.host, dest.port, timeouts.connect)
            try:
                # Pipelined groups must not wait for Nagle's delayed ACK.
                sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            except OSError:
                pass
    except TimeoutError:
        raise ConnectTimeout(f"connect to {peer} timed out after {timeouts.connect:g}s") from None
    except OSError as exc:
        raise ConnectError(f"cannot connect to {peer}: {exc.strerror or exc}") from exc
    return Ready((BlockingProtocol(conn, timeouts, sock, peer), None))


def _connected(family: int, kind: int, proto: int, address: Any,
               limit: float) -> _socket.socket:
    sock = _socket.socket(family, kind, proto)
    try:
        sock.settimeout(_seconds(limit))
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _connect_tcp(host: str, port: int, limit: float) -> _socket.socket:
    """``socket.create_connection``: each address of ``host`` in turn; the first error if none.

    Each address gets the whole limit, as ``create_connection`` gives it.
    """
    errors: list[OSError] = []
    for family, kind, proto, _, address in _socket.getaddrinfo(host, port, 0,
                                                               _socket.SOCK_STREAM):
        try:
            return _connected(family, kind, proto, address, limit)
        except OSError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
    raise OSError(f"no address for {host!r}")


class BlockingProtocol:
    """One LMTP connection on a blocking socket; the session's view of it is LMTPProtocol's."""

    def __init__(self, engine: Connection, timeouts: Timeouts, sock: _socket.socket,
                 peer: str = "") -> None:
        self.engine = engine
        self.timeouts = timeouts
        self.peer = peer
        self._sock: _socket.socket | None = sock
        self.setup_stage: str | None = "greeting"
        self._greeting: Reply | None = None
        # Stages of the session commands sent and not answered, in order, and
        # the replies that came (taken by the command waiting for them).
        self._pending: list[str] = []
        self._replies: list[Reply] = []
        self.error: Exception | None = None
        self.tls: TLSInfo | None = None
        self._want_read: type[BaseException] | None = None  # ssl.SSLWantReadError under TLS

    # -- what the session calls ----------------------------------------------------

    def wait_greeting(self) -> Ready[Reply]:
        self._pump(lambda: self._greeting is not None or self.error is not None)
        if self._greeting is None:
            raise self.error or ServerDisconnected(f"connection to {self.peer} lost")
        return Ready(self._greeting)

    def command(self, verb: str, argument: str | None = None) -> Ready[Reply]:
        """Send a session command and wait for its reply (whatever the code)."""
        self._check_usable()
        if verb.upper() == "LHLO":
            self.engine.lhlo()
        else:
            self.engine.command(verb, argument)
        stage = verb.lower().partition("-")[0]  # "AUTH-RESPONSE" lines are the AUTH stage
        self._pending.append(stage)
        if self.setup_stage is not None:
            self.setup_stage = stage
        self._write(self.engine.data_to_send())
        # One command at a time here: the set-up sequence waits for each reply.
        self._pump(lambda: bool(self._replies) or self.error is not None)
        if self._replies:
            return Ready(self._replies.pop(0))
        raise self.error or ServerDisconnected(f"connection to {self.peer} lost")

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
    ) -> Ready[list[RecipientResult]]:
        """Run one transaction to its end; one result per recipient."""
        self._check_usable()
        txn, owed_now = start_transaction(
            self.engine, sender, recipients, content, mail_params=mail_params,
            rcpt_params=rcpt_params, smtputf8=smtputf8, chunking=chunking)
        txn.waiter = None
        if owed_now:
            self._process()  # a streamed BDAT transaction is ready for content at once
        else:
            self._write(self.engine.data_to_send())
        self._pump(lambda: txn.waiter is not None)
        return Ready(txn.results)

    def start_tls(self, context: ssl.SSLContext, server_hostname: str | None,
                  verified: bool) -> Ready[TLSInfo]:
        """The handshake after the server's 220 to STARTTLS, within the ``starttls`` limit."""
        import socket
        import ssl

        from ._tls import tls_info

        sock = self._sock
        if self.error is not None or sock is None:
            raise self.error or ServerDisconnected(f"connection to {self.peer} lost before TLS")
        limit = self.timeouts.starttls
        try:
            # ssl wraps a socket.socket (and imports that module anyway).
            plain = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
            self._sock = plain
            plain.settimeout(_seconds(limit))
            tls = context.wrap_socket(plain, server_hostname=server_hostname,
                                      do_handshake_on_connect=False)
            self._sock = tls
            tls.do_handshake()
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError) and "handshake" not in reason:
                reason = f"handshake not done within {limit:g}s ({reason})"
            error = TLSError(f"TLS handshake with {self.peer} failed: {reason}")
            self.abort(error)
            raise error from exc
        self._want_read = ssl.SSLWantReadError
        self.engine.start_tls_done()
        self._process()  # a refusal of bytes injected in the clear surfaces here
        if not self.usable:
            raise self.error or ServerDisconnected(f"connection to {self.peer} lost after TLS")
        self.tls = tls_info(tls, verified, server_hostname)
        return Ready(self.tls)

    def abort(self, error: Exception) -> None:
        """Give up on the connection: open transactions get transient results."""
        if self.error is None:
            self.error = error
        if self._waiting():
            self.engine.fail(error)
            self._process()
        self.close()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def wait_closed(self) -> Ready[None]:
        return Ready(None)

    @property
    def usable(self) -> bool:
        return self.error is None and self.engine.usable and self._sock is not None

    def peer_silent(self) -> bool:
        """True unless the socket has something to read right now (see LMTPProtocol)."""
        sock = self._sock
        if sock is None:
            return False
        try:
            sock.settimeout(0.0)
            return not sock.recv(1, _socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False

    # -- internals -------------------------------------------------------------------

    def _check_usable(self) -> None:
        if not self.usable:
            raise self.error or ServerDisconnected(f"connection to {self.peer} is closed")

    def _waiting(self) -> bool:
        engine = self.engine
        return engine.error is None and not engine.closed

    def _stage(self) -> str:
        return self.engine.waiting_for or "command"

    def _pump(self, done: Callable[[], bool]) -> None:
        """Read and process replies until ``done()`` or the connection breaks."""
        while not done():
            if not self._waiting() or self._sock is None:
                if self._waiting():
                    self._lost(None)
                return
            self._read(block=True)

    def _read(self, *, block: bool) -> None:
        sock = self._sock
        assert sock is not None
        stage = self._stage()
        limit = self.timeouts.for_stage(stage)
        try:
            sock.settimeout(_seconds(limit) if block else 0.0)
            data = sock.recv(_RECV)
        except BlockingIOError:
            return
        except TimeoutError:
            if not block:
                return
            self.abort(ReadTimeout(f"conversation with {self.peer} timed out after {limit:g}s "
                                   f"while waiting for the {stage.upper()} reply", stage))
            return
        except OSError as exc:
            if self._want_read is not None and isinstance(exc, self._want_read):
                return  # TLS: nothing to read yet
            self._lost(exc)
            return
        self.engine.receive_data(data)  # b"": the server closed the connection
        self._process()

    def _lost(self, exc: BaseException | None) -> None:
        if self._waiting():
            self.engine.fail(ServerDisconnected(
                f"connection to {self.peer} lost" + (f": {exc}" if exc else "")))
            self._process()
        if self.error is None:
            self.error = ServerDisconnected(f"connection to {self.peer} lost")
        self._fail_waiters(self.error)
        self.close()

    def _write(self, data: bytes) -> None:
        sock = self._sock
        if not data or sock is None:
            return
        limit = self.timeouts.for_stage("content")
        try:
            sock.settimeout(_seconds(limit))
            sock.sendall(data)
        except TimeoutError:
            self.abort(ReadTimeout(f"conversation with {self.peer} timed out after {limit:g}s "
                                   "while sending message content", "content"))
        except OSError as exc:
            # What the server said before it went (a 421) is read first.
            if self._sock is not None:
                self._read(block=False)
            self._lost(exc)

    def _process(self) -> None:
        engine = self.engine
        out: list[bytes] = []
        while True:
            ev = engine.next_event()
            if ev is NEED_DATA:
                break
            if isinstance(ev, TransactionDone):
                ev.transaction.waiter = True
            elif isinstance(ev, ReadyForData):
                txn = ev.transaction
                content = txn.content
                if content is None:
                    txn.content = True  # streaming: the reply to the last chunk came
                elif isinstance(content, bytes | bytearray):
                    # Content, dot and what follows leave in one write.
                    out.append(bytes(content))
                    txn.content = None
                    engine.end_data(txn)
                elif isinstance(content, StreamedContent):
                    self._write(b"".join(out))
                    out.clear()
                    self._stream(txn, content)
            elif isinstance(ev, CommandReply):
                if ev.command == "greeting":
                    self._greeting = ev.reply
                elif self._pending:
                    self._pending.pop(0)
                    self._replies.append(ev.reply)
            elif isinstance(ev, ConnectionBroken):
                if self.error is None:
                    self.error = ev.error
                for txn in ev.transactions:
                    txn.waiter = True
                self._fail_waiters(ev.error)
                self.close()
        wire = engine.data_to_send()
        if wire:
            out.append(wire)
        if out:
            self._write(b"".join(out))

    def _fail_waiters(self, error: Exception) -> None:
        # Which session stage the failure interrupted, for the results made from it.
        if self._greeting is None:
            stage = "greeting"
        elif self._pending:
            stage = self._pending[0]
        else:
            stage = self.setup_stage or ""
        if stage and isinstance(error, LMTPError) and not getattr(error, "stage", ""):
            setattr(error, "stage", stage)  # noqa: B010 - not every LMTPError declares it
        self._pending.clear()

    def _stream(self, txn: Transaction, content: StreamedContent) -> None:
        """A large message, a chunk at a time (BDAT chunks or DATA content and the dot)."""
        txn.content = None
        engine = self.engine
        bdat = content.chunking
        one_by_one = bdat and not engine.pipelining  # each chunk waits for its reply
        encoder = content.encoder(dot_stuff=not bdat)
        raw = content.raw
        try:
            for start in range(0, len(raw), STREAM_CHUNK):
                # Stop once the transaction is decided (a refused chunk) or the
                # connection broke: the last chunk or the dot is never sent then.
                if engine.content_owed is not txn or self._sock is None:
                    return
                piece = encoder.encode(raw[start : start + STREAM_CHUNK])
                if not piece:
                    continue
                if bdat:
                    engine.send_chunk(txn, piece)
                    piece = engine.data_to_send()
                self._write(piece)
                if one_by_one:
                    self._pump(lambda: txn.content is True or txn.waiter is not None)
                    if txn.content is not True:
                        return
                    txn.content = None
                elif self._sock is not None:
                    self._read(block=False)  # an early refusal stops the stream
            if engine.content_owed is not txn or self._sock is None:
                return
            tail = encoder.finish()
            if bdat:
                engine.send_chunk(txn, tail, last=True)
                self._write(engine.data_to_send())
                return
            self._write(tail)
        except LMTPError as exc:
            # A NUL found only now: the server has part of the message, so only
            # dropping the connection is safe.
            self.abort(exc)
            return
        if self.engine.content_owed is txn:
            self.engine.end_data(txn)
