"""The compiled LMTP client engine: same API as ``lmtpfast.proto._pyproto``."""

from collections.abc import Iterable, Sequence
from typing import final

from typing_extensions import disjoint_base

from ._common import Capabilities, Event, Reply, Transaction

__all__ = ["Connection", "ReplyParser"]

@final
class ReplyParser:
    """Splits a byte stream into :class:`Reply` objects."""

    max_line_length: int
    max_reply_lines: int

    def __init__(self, max_line_length: int = ..., max_reply_lines: int = ...) -> None: ...
    def feed(self, data: bytes | bytearray | memoryview) -> None: ...
    @property
    def buffered(self) -> int: ...
    @property
    def in_reply(self) -> bool: ...
    def next_reply(self) -> Reply | None: ...
    def take_buffered(self) -> bytes: ...

@disjoint_base
class Connection:
    """The client side of one LMTP connection, without I/O."""

    local_name: str
    ignore_keywords: tuple[str, ...]
    capabilities: Capabilities | None
    pipelining: bool
    error: Exception | None
    closed: bool

    def __init__(
        self,
        local_name: str = "localhost",
        *,
        pipelining: bool = True,
        ignore_keywords: Iterable[str] = (),
        max_line_length: int = ...,
        max_reply_lines: int = ...,
        bdat_burst: int = ...,
    ) -> None: ...
    @property
    def waiting_for(self) -> str | None: ...
    @property
    def content_owed(self) -> Transaction | None: ...
    @property
    def idle(self) -> bool: ...
    @property
    def usable(self) -> bool: ...
    @property
    def open_transactions(self) -> int: ...
    def receive_data(self, data: bytes | bytearray | memoryview) -> None: ...
    def next_event(self) -> Event: ...
    def fail(self, error: Exception, code: int = 451, enhanced: str = "4.4.2") -> None: ...
    def data_to_send(self) -> bytes: ...
    def lhlo(self) -> None: ...
    def command(self, verb: str, argument: str | None = None) -> None: ...
    def start_transaction(
        self,
        sender: str,
        recipients: Sequence[str],
        *,
        mail_params: Sequence[str] = (),
        rcpt_params: Sequence[Sequence[str]] | None = None,
        smtputf8: bool = False,
        chunking: bool = False,
        body: bytes | None = None,
    ) -> Transaction: ...
    def send_chunk(self, txn: Transaction, data: bytes, last: bool = False) -> None: ...
    def end_data(self, txn: Transaction) -> None: ...
    def open_transaction(
        self, sender: str, *, mail_params: Sequence[str] = (), smtputf8: bool = False,
    ) -> Transaction: ...
    def add_recipient(
        self, txn: Transaction, recipient: str, params: Sequence[str] = (), *,
        smtputf8: bool = False,
    ) -> int: ...
    def close_transaction(
        self, txn: Transaction, *, chunking: bool = False, body: bytes | None = None,
    ) -> None: ...
    def abandon_transaction(self, txn: Transaction) -> None: ...
    def start_tls_done(self) -> None: ...
