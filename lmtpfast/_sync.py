"""A blocking facade over the agent, safe to call from many threads at once.

>>> with lmtpfast.SyncAgent.from_config("lmtpfast.toml") as agent:   # doctest: +SKIP
...     results = agent.deliver(message, sender="a@example.org", recipients=["b@example.org"])

:class:`SyncAgent` runs one :class:`~lmtpfast.Agent` on an event loop in a
background thread (uvloop when installed). Every call hands its delivery to
that loop and blocks the calling thread until the results are in, so any
number of threads share one set of pools and the concurrency limits hold
across all of them. :meth:`SyncAgent.close` (or leaving the ``with`` block)
lets deliveries in flight finish, QUITs the connections and stops the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from ._agent import Agent, AgentStats
from ._config import AgentConfig
from ._delivery import Delivery, Message
from ._destination import Destination
from ._dsn import DSN
from ._loop import loop_factory
from ._results import RecipientResult

__all__ = ["SyncAgent", "deliver_sync"]

T = TypeVar("T")


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """Finalizer for a SyncAgent dropped without close(): stop its thread."""
    if thread.is_alive() and not loop.is_closed():
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:
            pass


class SyncAgent:
    """An :class:`~lmtpfast.Agent` on a private event loop thread, with a blocking API."""

    def __init__(self, agent: Agent | Callable[[], Agent], *, use_uvloop: bool = True) -> None:
        self._lock = threading.Lock()
        self._closed = False
        factory = loop_factory() if use_uvloop else None
        self._loop: asyncio.AbstractEventLoop = factory() if factory else asyncio.new_event_loop()
        # The thread must not hold a reference to self, or the finalizer
        # below could never run for a SyncAgent dropped without close().
        self._thread = threading.Thread(target=_run_loop, args=(self._loop,),
                                        name="lmtpfast-sync", daemon=True)
        ready = threading.Event()
        self._loop.call_soon(ready.set)
        self._thread.start()
        ready.wait()
        try:
            self.agent: Agent = agent if isinstance(agent, Agent) else self._call(_make(agent))
        except BaseException:
            self._shutdown_loop()
            raise
        self._finalizer = weakref.finalize(self, _stop_loop, self._loop, self._thread)

    @classmethod
    def from_config(
        cls, config: str | os.PathLike[str] | AgentConfig | Mapping[str, Any], **kwargs: Any,
    ) -> SyncAgent:
        """See :meth:`Agent.from_config`."""
        return cls(Agent.from_config(config), **kwargs)

    @classmethod
    def for_server(cls, destination: str | Destination, **settings: Any) -> SyncAgent:
        """See :meth:`Agent.for_server` (``use_uvloop`` is taken out of ``settings``)."""
        use_uvloop = settings.pop("use_uvloop", True)
        return cls(Agent.for_server(destination, **settings), use_uvloop=use_uvloop)

    def _call(
        self, coro: Coroutine[Any, Any, T], timeout: float | None = None, *,
        check_open: bool = False,
    ) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("SyncAgent called from its own event loop thread (use the Agent)")
        # Submitting under the lock orders every delivery before close()'s own
        # call, so close() waits for it instead of stopping the loop under it.
        with self._lock:
            if check_open and self._closed:
                coro.close()
                raise RuntimeError("the SyncAgent is closed")
            fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()  # cancels the delivery on the loop: its connection is dropped
            raise TimeoutError(f"delivery did not finish within {timeout:g}s") from None
        except BaseException:
            fut.cancel()
            raise

    def deliver(
        self,
        message: Message | Delivery,
        *,
        sender: str | None = None,
        recipients: Sequence[str] | None = None,
        mail_params: Sequence[str] = (),
        dsn: DSN | None = None,
        timeout: float | None = None,
    ) -> list[RecipientResult]:
        """Blocking :meth:`Agent.deliver` (a :class:`~lmtpfast.Delivery`, or a message with
        ``sender=`` and ``recipients=``). ``timeout`` bounds the whole call (the
        delivery is cancelled then, and :class:`TimeoutError` raised)."""
        return self._call(self.agent.deliver(message, sender=sender, recipients=recipients,
                                             mail_params=mail_params, dsn=dsn),
                          timeout, check_open=True)

    @property
    def stats(self) -> AgentStats:
        return self.agent.stats

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, timeout: float | None = None) -> None:
        """Let deliveries in flight finish (see :meth:`Agent.close`), QUIT, stop the thread.

        Idempotent; safe from any thread but the agent's own.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self._thread.is_alive():
                self._call(self.agent.close(timeout))  # submitted after every delivery
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        if hasattr(self, "_finalizer"):
            self._finalizer.detach()

    def __enter__(self) -> SyncAgent:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running"
        return f"<lmtpfast.SyncAgent {state} {self.agent!r}>"


async def _make(factory: Callable[[], Agent]) -> Agent:
    return factory()


def deliver_sync(
    message: Message,
    *,
    sender: str,
    recipients: Sequence[str],
    server: str | Destination,
    **settings: Any,
) -> list[RecipientResult]:
    """Deliver one message to one server and close: a blocking one-shot.

    For many messages keep a :class:`SyncAgent` instead (connections are reused).
    """
    with SyncAgent.for_server(server, **settings) as agent:
        return agent.deliver(message, sender=sender, recipients=recipients)
