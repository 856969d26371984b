"""The compiled hot path of the asyncio protocol; see ``_cprotocol.pyx``."""

import asyncio
from collections import deque
from typing import Any, final

from typing_extensions import disjoint_base

from .proto import Transaction

__all__ = ["Batch", "ProtocolCore"]

def _bind(streamed_content: type, data_plan: tuple[str, ...],
          bdat_plan: tuple[str, ...]) -> None: ...

@final
class Batch:
    """Collects decided transactions for one consumer, with one wake-up per read."""

    done: deque[Transaction]
    in_flight: int
    wake_at: int

    def __init__(self, loop: asyncio.AbstractEventLoop, wake_at: int = 1) -> None: ...
    def transaction_done(self, txn: Transaction) -> None: ...
    async def wait(self) -> None: ...

@disjoint_base
class ProtocolCore:
    """The compiled per-message methods of ``LMTPProtocol``."""

    engine: Any
    timeouts: Any
    _loop: Any
    _transport: Any
    _timer: Any
    _timer_stage: Any
    _limits: dict[str, float]
    _last_progress: float
    _content_task: Any
    _chunk_ready: Any
    error: Any
    _closed: Any
    _trace: Any
    _traced_stage: Any
    _traced_plan: Any

    @property
    def usable(self) -> bool: ...
    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> None: ...
    def submit(
        self,
        waiter: Any,
        sender: str,
        recipients: list[str],
        content: Any,
        *,
        mail_params: list[str] | tuple[str, ...] = (),
        rcpt_params: list[list[str]] | None = None,
        smtputf8: bool = False,
        chunking: bool = False,
    ) -> Transaction: ...
    def new_batch(self, wake_at: int = 1) -> Batch: ...
    def _flush(self) -> None: ...
    def _process(self) -> None: ...
    def _resolve(self, txn: Transaction) -> None: ...
    def _arm_timer(self) -> None: ...
    def _chunk_done(self, txn: Transaction, ready: bool) -> None: ...
