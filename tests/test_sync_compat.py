"""The blocking facade (lmtpfast._sync); the smtplib.LMTP drop-in is in test_compat*.py."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from lmtpfast import SyncAgent, deliver_sync

MSG = "From: s@example.org\r\nSubject: compat\r\n\r\nHello.\r\n"


# -- sync: many threads, one agent ----------------------------------------------------------

def test_sync_agent_from_many_threads(smtp_sink) -> None:
    sink = smtp_sink()
    errors: list[BaseException] = []
    results: list[Any] = []
    with SyncAgent.for_server(sink.destination, max_connections=4) as agent:

        def worker(n: int) -> None:
            try:
                for i in range(25):
                    results.append(agent.deliver(MSG, sender="s@example.org",
                                                 recipients=[f"t{n}-{i}@example.com"]))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = agent.stats
    assert not errors
    assert len(results) == 400 and all(r[0].delivered for r in results)
    assert stats.peak_connections <= 4 and stats.transactions == 400
    assert agent.closed and not agent._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        agent.deliver(MSG, sender="s@example.org", recipients=["a@example.com"])
    agent.close()  # idempotent


def test_sync_timeout_and_one_shot(smtp_sink) -> None:
    slow = smtp_sink("-w", "30")
    with SyncAgent.for_server(slow.destination) as agent, pytest.raises(TimeoutError):
        agent.deliver(MSG, sender="s@example.org", recipients=["a@example.com"], timeout=0.3)
    fast = smtp_sink()
    results = deliver_sync(MSG, sender="s@example.org",
                           recipients=["a@example.com", "b@example.com"],
                           server=fast.destination, use_uvloop=False)
    assert [r.code for r in results] == [250, 250]
    assert results[0].destination == fast.destination


def test_sync_agent_dropped_without_close_stops_its_thread(smtp_sink) -> None:
    import gc

    sink = smtp_sink()
    agent = SyncAgent.for_server(sink.destination)
    assert agent.deliver(MSG, sender="s@example.org", recipients=["a@example.com"])[0].delivered
    thread = agent._thread
    del agent
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()
