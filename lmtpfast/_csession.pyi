"""The compiled consumer of ``Client.send_many``; see ``_csession.pyx``."""

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

from ._delivery import Delivery
from ._results import RecipientResult

__all__ = ["send_many"]

def send_many(
    client: Any, protocol: Any, deliveries: Iterable[Delivery] | AsyncIterable[Delivery],
    window: int,
) -> AsyncIterator[tuple[Delivery, list[RecipientResult]]]: ...
def _prepare_fast(d: Delivery, facts: tuple[bool, bool, bool, int | None, bool],
                  encode: Any) -> tuple[list[str], bytes, list[str], bool, str] | None: ...
