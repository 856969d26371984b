"""Replay through one ``Agent.deliver_many`` stream (issue 12 items 2 and 3), against real peers.

The pipelined path (several transactions in flight per connection, no task
per entry) must decide exactly as the path of one ``deliver()`` task per
entry: the same outcomes, nothing lost, nothing delivered twice unless it is
reported ``possibly_duplicated`` -- also when connections break mid-stream.
Both engines and both event loops (conftest); the peers are the in-process
sink with faults and Postfix's ``smtp-sink``.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lmtpfast import Agent, Delivery
from lmtpfast._testing.postfix import split_capture
from lmtpfast.server import DEFAULT_EXTENSIONS, FaultPlan, Sink
from lmtpfast.spool import NewMessage, Observer, Outcome, Replayer, RetryPolicy, new_envelope
from lmtpfast.spool._replay import exit_status
from lmtpfast.spool._sqlite import SQLiteQueue, SQLiteStore

MSGID = re.compile(rb"^Message-ID: <([^>]+)@", re.M | re.I)
NO_CHUNKING = tuple(e for e in DEFAULT_EXTENSIONS if e != "CHUNKING")


def message(tag: str) -> bytes:
    return (f"From: s@example.org\r\nSubject: {tag}\r\nMessage-ID: <{tag}@pipe.test>\r\n\r\n"
            f"body of {tag}\r\n").encode()


def tag_of(data: bytes) -> str:
    m = MSGID.search(data)
    assert m is not None, data[:200]
    return m.group(1).decode()


class Recorder(Observer):
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.errors: list[tuple[str, str]] = []

    def outcome(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def error(self, id: str, problem: str) -> None:
        self.errors.append((id, problem))


def fill(spool: Path, specs: list[tuple[str, list[str]]]) -> dict[str, str]:
    """Enqueue one message per (tag, recipients); returns id -> tag."""
    with SQLiteStore(spool, create=True) as store:
        ids = store.enqueue_many([NewMessage(new_envelope("s@example.org", rcpts), message(tag))
                                  for tag, rcpts in specs])
    return {id: tag for id, (tag, _) in zip(ids, specs, strict=True)}


async def replay(spool: Path, dest: str, engine: str, *, pipelined: bool,
                 connections: int = 4, concurrency: int = 32) -> tuple[Recorder, Any, Agent]:
    rec = Recorder()
    q = SQLiteQueue(spool)
    try:
        async with Agent.for_server(dest, max_connections=connections, engine=engine) as agent:
            r = Replayer(q, agent, concurrency=concurrency, observer=rec, pipelined=pipelined,
                         policy=RetryPolicy(min_backoff=0))
            assert r.pipelined is pipelined
            totals = await r.run()
    finally:
        await q.close()
    return rec, totals, agent


MIXED = ("rcpt:nobody@*=550 5.1.1 User unknown", "dot@times=5:bob@*=452 4.2.2 Mailbox full",
         "rcpt:carol@*=451 4.3.0 Try later")


def mixed_specs(n: int) -> list[tuple[str, list[str]]]:
    specs = []
    for i in range(n):
        rcpts = [["alice@example.com"], ["alice@example.com", "bob@example.com"],
                 ["nobody@example.com"], ["carol@example.com", "alice@example.com"]][i % 4]
        specs.append((f"m{i}", rcpts))
    return specs


async def test_pipelined_replay_decides_as_one_task_per_entry(tmp_path: Path,
                                                              engine: str) -> None:
    """Same spool, same faults: the same outcome per recipient on both paths."""
    seen: dict[bool, tuple[Counter[tuple[str, str]], Counter[str]]] = {}  # outcomes, stored
    for pipelined in (False, True):
        spool = tmp_path / f"spool-{pipelined}"
        tags = fill(spool, mixed_specs(120))
        async with Sink(f"unix:{tmp_path}/lmtp-{pipelined}", faults=FaultPlan.parse(MIXED),
                        collect=True, extensions=NO_CHUNKING) as sink:
            rec, totals, _ = await replay(spool, sink.destinations[0], engine,
                                          pipelined=pipelined)
            stored = Counter(f"{tag_of(m.content)} {r}" for m in sink.messages
                             for r in m.recipients)
        assert exit_status(totals) == 75 and not rec.errors
        outcomes = Counter((o.recipient, o.outcome) for o in rec.outcomes)
        assert all(o.id in tags for o in rec.outcomes)
        # Which of bob's messages met the 5 refusals depends on the order: not compared.
        seen[pipelined] = outcomes, Counter(k.split(" ")[1] for k in stored)
        assert set(stored.values()) == {1}  # nobody got anything twice
    assert seen[True] == seen[False]
    assert seen[True][0] == {("alice@example.com", "delivered"): 90,
                             ("bob@example.com", "delivered"): 25,
                             ("bob@example.com", "deferred"): 5,
                             ("nobody@example.com", "failed"): 30,
                             ("carol@example.com", "deferred"): 30}


@pytest.mark.parametrize("fault", ["data@rate=0.05:seed=7=disconnect",
                                   "dot@rate=0.05:seed=3=disconnect",
                                   "rcpt@rate=0.03:seed=5=reset"])
async def test_pipelined_replay_loses_nothing_when_connections_break(
        tmp_path: Path, engine: str, fault: str) -> None:
    """Connections dropped mid-stream (at DATA, after the dot, at RCPT): every recipient ends
    delivered, at least once; each further copy is an attempt reported ``possibly_duplicated``
    (a final reply not proven by the next one, or lost with the connection)."""
    spool = tmp_path / "spool"
    specs = [(f"b{i}", ["alice@example.com"] if i % 3 else
              ["alice@example.com", "bob@example.com"]) for i in range(300)]
    tags = fill(spool, specs)
    want = Counter(f"{tag} {r}" for tag, rcpts in specs for r in rcpts)
    dups: Counter[str] = Counter()
    async with Sink(f"unix:{tmp_path}/lmtp", faults=FaultPlan.parse([fault]), collect=True,
                    extensions=NO_CHUNKING) as sink:
        for _ in range(20):
            rec, totals, _ = await replay(spool, sink.destinations[0], engine, pipelined=True)
            assert not rec.errors
            for o in rec.outcomes:
                assert o.outcome in ("delivered", "deferred"), o
                if o.possibly_duplicated:  # this attempt, or the one before, may be a copy
                    dups[f"{tags[o.id]} {o.recipient}"] += 1
            if exit_status(totals) == 0:
                break
        else:
            pytest.fail("still queued after 20 replays")
        stored = Counter(f"{tag_of(m.content)} {r}" for m in sink.messages for r in m.recipients)
    assert set(stored) == set(want)  # nothing lost
    for key, n in stored.items():
        assert n == 1 or n <= 1 + dups[key], (key, n, dups[key])  # duplicates are reported


async def test_deliver_many_pipelines_on_the_pools_connections(tmp_path: Path,
                                                              engine: str) -> None:
    """One send_many per pooled connection: no more connections than the pool allows, each
    delivery decided once, by its server."""
    todo = [Delivery.build(message(f"d{i}"), sender="s@example.org",
                           recipients=[f"u{i}@example.org"]) for i in range(400)]
    async with Sink(f"unix:{tmp_path}/lmtp", collect=True, extensions=NO_CHUNKING) as sink:
        async with Agent.for_server(sink.destinations[0], max_connections=3,
                                    engine=engine) as agent:
            got = [item async for item in agent.deliver_many(todo, concurrency=60)]
            (pool,) = agent.pools().values()
            assert pool.stats.connections_opened <= 3
            assert agent.stats.deliveries == 400
        assert len(sink.messages) == 400
        dest = sink.destinations[0]
    assert sorted(id(d) for d, _ in got) == sorted(id(d) for d in todo)
    assert all(r.delivered and r.destination == dest for _, rs in got for r in rs)


async def test_deliver_many_errors_turn_a_refused_delivery_into_results(
        tmp_path: Path, engine: str) -> None:
    """A delivery deliver() raises for (here: not a Delivery at all) ends the stream without
    ``errors=``, and becomes its results with it; the others are delivered either way."""
    good = [Delivery.build(message(f"e{i}"), sender="s@example.org",
                           recipients=[f"u{i}@example.org"]) for i in range(5)]
    bad: Any = "not a delivery"
    seen = []

    def errors(d: Any, exc: Exception) -> list[Any]:
        seen.append((d, type(exc)))
        return []

    async with Sink(f"unix:{tmp_path}/lmtp", extensions=NO_CHUNKING) as sink, \
            Agent.for_server(sink.destinations[0], engine=engine) as agent:
        with pytest.raises(TypeError):
            async for _ in agent.deliver_many([*good, bad], concurrency=4):
                pass
        got = [item async for item in agent.deliver_many([*good, bad], concurrency=4,
                                                         errors=errors)]
    assert seen == [(bad, TypeError)]
    assert len(got) == 6 and (bad, []) in got


@pytest.mark.postfix
async def test_pipelined_replay_into_smtp_sink(smtp_sink: Any, tmp_path: Path,
                                               engine: str) -> None:
    """Postfix's smtp-sink (no CHUNKING, answers in batches): every message stored once."""
    sink = smtp_sink(capture=True)
    spool = tmp_path / "spool"
    specs = [(f"s{i}", [f"r{i % 7}@sink.test"]) for i in range(500)]
    fill(spool, specs)
    rec, totals, agent = await replay(spool, sink.destination, engine, pipelined=True,
                                      connections=4, concurrency=64)
    assert exit_status(totals) == 0 and not rec.errors
    assert Counter(o.outcome for o in rec.outcomes) == {"delivered": 500}
    (pool,) = agent.pools().values()
    assert pool.stats.connections_opened <= 4
    stored = Counter(tag_of(split_capture(dump)[1]) for dump in sink.captures())
    assert stored == Counter(tag for tag, _ in specs)
