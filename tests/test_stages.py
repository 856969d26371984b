"""Per-stage latencies (connect, greeting, lhlo, mail, rcpt, data, dot): what the session and
protocol layers report into lmtpfast.TRACE and lmtpfast.METRICS, against real peers.

Only which stages are reported, how often and that they add up are checked;
no assertion is about how long anything took.
"""

from __future__ import annotations

from typing import Any

import pytest

from lmtpfast import METRICS, TRACE, Agent, Metrics, Trace

MSG = b"Subject: stages\r\n\r\nbody\r\n"
SETUP = ("connect", "greeting", "lhlo")


async def _traced(agent: Agent, rcpts: list[str]) -> Trace:
    trace = Trace()
    token = TRACE.set(trace)
    try:
        results = await agent.deliver(MSG, sender="s@example.org", recipients=rcpts)
    finally:
        TRACE.reset(token)
    assert all(r.delivered for r in results), results
    return trace


@pytest.mark.postfix
async def test_stages_of_a_data_transaction(smtp_sink: Any, engine: str) -> None:
    sink = smtp_sink()
    metrics = Metrics()
    token = METRICS.set(metrics)
    try:
        async with Agent.for_server(sink.destination, engine=engine) as agent:
            first = await _traced(agent, ["a@example.org", "b@example.org"])
            second = await _traced(agent, ["c@example.org"])  # on the same connection
    finally:
        METRICS.reset(token)
    dest = sink.destination
    assert [s for _, s, _ in first.stages] == [*SETUP, "mail", "rcpt", "data", "dot"]
    assert {d for d, _, _ in first.stages} == {dest}
    assert all(x >= 0 for _, _, x in first.stages)
    assert first.setup == pytest.approx(sum(x for _, s, x in first.stages if s in SETUP))
    # A reused connection: no set-up, so delays=a/b/c/d has c = 0 then.
    assert [s for _, s, _ in second.stages] == ["mail", "rcpt", "data", "dot"]
    assert second.setup == 0.0
    counts = {s: h.count for (d, s), h in metrics.latency.items() if d == dest}
    assert counts == {"connect": 1, "greeting": 1, "lhlo": 1, "mail": 2, "rcpt": 2, "data": 2,
                      "dot": 2}


@pytest.mark.dovecot
async def test_stages_with_bdat_and_nobody_measuring(dovecot: Any, engine: str) -> None:
    async with Agent.for_server(dovecot.destination_unix, engine=engine) as agent:
        trace = await _traced(agent, ["alice@example.org"])
        # Dovecot offers CHUNKING: the body leaves with MAIL and RCPT (BDAT LAST).
        assert [s for _, s, _ in trace.stages] == [*SETUP, "mail", "rcpt", "dot"]
        # Without a trace nothing is recorded, and the next traced one is whole.
        results = await agent.deliver(MSG, sender="s@example.org", recipients=["bob@example.org"])
        assert results[0].delivered
        again = await _traced(agent, ["carol@example.org"])
        assert [s for _, s, _ in again.stages] == ["mail", "rcpt", "dot"]
