"""The proxy's RCPT verification (``[proxy] verify_recipients``, issue 14 item 2).

Each RCPT goes to its back end at RCPT time, on the transaction the message
then goes on (one per back end per message: single-instance store), and the
back end's own reply is the client's. Against real Dovecots and Postfix's
smtp-sink: an unknown user refused at RCPT with Dovecot's own 550 text,
known and unknown users across two back ends, a back end killed between RCPT
and DATA, a client that resets after verified RCPTs, one back-end
transaction per message per back end (counted at the back ends). The engine
half (both client cores) and stalls and after-dot failures against lmtpfast
sinks. Both server engines and both client cores, both loops.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from lmtpfast import Agent, ConfigurationError, Delivery, connect
from lmtpfast._testing.dovecot import TempDovecot
from lmtpfast._testing.fixtures import DovecotFactory, SmtpSinkFactory
from lmtpfast._testing.postfix import split_capture
from lmtpfast.proto import CommandReply, Reply, TransactionDone
from lmtpfast.server import (
    DEFAULT_EXTENSIONS,
    IMPLEMENTATIONS,
    FaultPlan,
    Proxy,
    ProxyRecord,
    ProxySettings,
    Sink,
    proxy_config_from_dict,
)

from .test_engine import _engine
from .test_proxy_peers import _session_ids

MSG = b"From: a@example.org\r\nSubject: verified\r\n\r\nAsked at RCPT time.\r\n"
SERVER_ENGINES = sorted(IMPLEMENTATIONS)
VERIFY = ProxySettings(verify_recipients=True)


@asynccontextmanager
async def proxy(routes: dict[str, str], engine: str, server_engine: str, *,
                settings: ProxySettings = VERIFY, records: list[ProxyRecord] | None = None,
                **agent_kw: Any) -> AsyncIterator[Proxy]:
    agent = Agent(transport_map={k: f"lmtp:{v}" for k, v in routes.items()}, engine=engine,
                  **agent_kw)
    p = Proxy(agent, settings, listen="127.0.0.1:0", engine=server_engine,
              on_result=records.append if records is not None else None)
    await p.start()
    try:
        yield p
    finally:
        await p.shutdown(5)


async def _dovecot_says(dv: TempDovecot, rcpt: str) -> Reply:
    """What Dovecot itself answers to ``RCPT TO:<rcpt>``, asked directly."""
    async with await connect(dv.destination_tcp) as c:
        env = c.open_transaction("s@example.org")
        reply = await env.rcpt(rcpt)
        await env.abandon()
    return reply


# --- real peers ---------------------------------------------------------------------------


@pytest.mark.parametrize("server_engine", SERVER_ENGINES)
async def test_unknown_user_at_dovecot_is_refused_at_rcpt_with_dovecots_own_reply(
    dovecot_factory: DovecotFactory, engine: str, server_engine: str,
) -> None:
    dv = dovecot_factory(users=["alice"])
    direct = await _dovecot_says(dv, "nosuch@example.com")
    assert direct.code == 550 and direct.enhanced == "5.1.1"
    async with proxy({"example.com": dv.destination_tcp}, engine, server_engine) as p:
        async with await connect(p.destinations[0]) as c:
            results = await c.send("s@example.org", ["alice@example.com", "nosuch@example.com"],
                                   MSG)
        alice, nosuch = results
        # Refused at RCPT (the client saw it there), with Dovecot's own code and text.
        assert (nosuch.code, nosuch.enhanced, nosuch.stage) == (550, "5.1.1", "rcpt")
        assert nosuch.text == direct.text
        assert "doesn't exist" in nosuch.text, nosuch
        assert alice.status == "delivered" and re.fullmatch(
            r"<alice@example\.com> \S+ Saved", alice.text), alice
        assert len(dv.message_paths("alice")) == 1
        assert p.stats.verified == 2 and p.stats.refused == 1 and p.stats.delivered == 1
        assert p.stats.backend_deliveries == 1


@pytest.mark.parametrize("server_engine", SERVER_ENGINES)
async def test_known_and_unknown_across_two_dovecots_and_one_transaction_per_back_end(
    dovecot_factory: DovecotFactory, smtp_sink: SmtpSinkFactory, engine: str,
    server_engine: str,
) -> None:
    dv1 = dovecot_factory(users=["alice", "carol"])
    dv2 = dovecot_factory(users=["bob", "dave"])
    sink = smtp_sink(capture=True)
    routes = {"alice@example.com": dv1.destination_tcp, "carol@example.com": dv1.destination_tcp,
              "ghost1@example.com": dv1.destination_tcp,
              "bob@example.com": dv2.destination_unix, "dave@example.com": dv2.destination_unix,
              "ghost2@example.com": dv2.destination_unix, "example.net": sink.destination}
    rcpts = ["alice@example.com", "ghost2@example.com", "bob@example.com", "erin@example.net",
             "ghost1@example.com", "carol@example.com", "dave@example.com", "fay@example.net"]
    records: list[ProxyRecord] = []
    async with proxy(routes, engine, server_engine, records=records) as p:
        async with await connect(p.destinations[0]) as c:
            runs = [await c.send("s@example.org", rcpts, MSG) for _ in range(3)]
        for results in runs:
            by = dict(zip(rcpts, results, strict=True))
            for ghost in ("ghost1@example.com", "ghost2@example.com"):
                r = by[ghost]
                assert (r.code, r.enhanced, r.stage) == (550, "5.1.1", "rcpt"), r
                assert f"<{ghost}> User doesn't exist" in r.text, r
            for user in ("alice", "bob", "carol", "dave"):
                r = by[f"{user}@example.com"]
                assert r.status == "delivered" and r.stage == "final", r
                assert re.fullmatch(rf"<{user}@example\.com> \S+ Saved", r.text), r
            for rcpt in ("erin@example.net", "fay@example.net"):
                assert (by[rcpt].code, by[rcpt].stage) == (250, "final"), by[rcpt]
        # One transaction per back end per message (single-instance store), counted
        # where the mail landed: both users of a Dovecot have each copy from the same
        # LMTP transaction, three transactions for three messages; smtp-sink saw three
        # transactions, each with both of its recipients.
        for dv, (u1, u2) in ((dv1, ("alice", "carol")), (dv2, ("bob", "dave"))):
            assert _session_ids(dv, u1) == _session_ids(dv, u2)
            assert len(set(_session_ids(dv, u1))) == 3
        captures = sink.captures()
        assert len(captures) == 3
        for dump in captures:
            attrs, _ = split_capture(dump)
            rcpts_seen = sorted(attrs["X-Rcpt-Args"])
            assert rcpts_seen == ["<erin@example.net>", "<fay@example.net>"], attrs
        assert p.stats.backend_deliveries == 9
        assert p.stats.verified == 3 * len(rcpts) and p.stats.refused == 6
        assert p.agent_stats.transactions == 9  # and no probe transaction besides
    assert not any(r.result.possibly_delivered for r in records)


@pytest.mark.parametrize("server_engine", SERVER_ENGINES)
async def test_back_end_killed_between_rcpt_and_data(
    dovecot_factory: DovecotFactory, engine: str, server_engine: str,
) -> None:
    dv1 = dovecot_factory(users=["alice", "carol"])
    dv2 = dovecot_factory(users=["bob"])
    routes = {"alice@example.com": dv1.destination_tcp, "carol@example.com": dv1.destination_tcp,
              "bob@example.com": dv2.destination_tcp}
    records: list[ProxyRecord] = []
    async with proxy(routes, engine, server_engine, records=records) as p:
        async with await connect(p.destinations[0]) as c:
            env = c.open_transaction("s@example.org")
            for rcpt in ("alice@example.com", "bob@example.com"):
                reply = await env.rcpt(rcpt)
                assert (reply.code, reply.enhanced) == (250, "2.1.5"), reply  # Dovecot's own
            dv1.stop()  # every process of it, the one serving the proxy's connection too
            await asyncio.sleep(0.3)
            late = await env.rcpt("carol@example.com")
            # The back end is gone: transient, for that recipient only.
            assert late.code == 451 and (late.enhanced or "").startswith("4.4."), late
            results = await env.send(Delivery.build(MSG, sender="s@example.org",
                                                    recipients=env.recipients))
            alice, bob, carol = results
            assert alice.status == "transient" and alice.code == 451, alice
            assert (alice.enhanced or "").startswith("4.4."), alice
            assert bob.status == "delivered" and "Saved" in bob.text, bob
            assert carol.stage == "rcpt" and carol.code == 451
        assert len(dv2.message_paths("bob")) == 1
        assert p.stats.delivered == 1 and p.stats.transient == 1
    # Nothing reported delivered that was not; the dot never went to dv1.
    (rec,) = [r for r in records if r.recipient == "alice@example.com"]
    assert rec.result.status == "transient" and not rec.result.possibly_delivered


@pytest.mark.parametrize("server_engine", SERVER_ENGINES)
@pytest.mark.parametrize("how", ["rset", "quit"])
async def test_client_reset_after_verified_rcpts_resets_the_back_end_and_reuses_it(
    dovecot_factory: DovecotFactory, smtp_sink: SmtpSinkFactory, engine: str,
    server_engine: str, how: str,
) -> None:
    dv = dovecot_factory(users=["alice"])
    sink = smtp_sink(capture=True)
    routes = {"example.com": dv.destination_tcp, "example.net": sink.destination}
    async with proxy(routes, engine, server_engine) as p:
        async with await connect(p.destinations[0]) as c:
            env = c.open_transaction("s@example.org")
            assert (await env.rcpt("alice@example.com")).code == 250
            assert (await env.rcpt("erin@example.net")).code == 250
            if how == "rset":
                await env.abandon()  # the client's RSET
            else:
                c.abort()
        # The back ends' RSETs are answered and their connections back in the pools.
        for _ in range(200):
            if all(pool.idle_connections == 1 for pool in p.agent.pools().values()):
                break
            await asyncio.sleep(0.02)
        opened = p.agent_stats.connections_opened
        assert opened == 2
        async with await connect(p.destinations[0]) as c:
            results = await c.send("s@example.org", ["alice@example.com", "erin@example.net"],
                                   MSG)
        assert [r.code for r in results] == [250, 250]
        # The abandoned transaction stored nothing; the connections came back
        # clean and took the next message.
        assert len(dv.message_paths("alice")) == 1
        assert len(sink.captures()) == 1
        assert p.agent_stats.connections_opened == opened
        assert p.agent_stats.connections_reused >= 2
        assert p.agent_stats.transactions == 4  # two abandoned, two delivered


# --- against lmtpfast sinks: stalls, failures after the dot, limits --------------------


@asynccontextmanager
async def sinks(*plans: FaultPlan | None, **kw: Any) -> AsyncIterator[list[Sink]]:
    made = [Sink("127.0.0.1:0", collect=True, faults=p, **kw) for p in plans]
    for s in made:
        await s.start()
    try:
        yield made
    finally:
        for s in made:
            await s.stop()


@pytest.mark.parametrize("server_engine", SERVER_ENGINES)
async def test_a_back_end_stalling_at_rcpt_times_out_for_its_recipients_only(
    engine: str, server_engine: str,
) -> None:
    async with sinks(FaultPlan.parse(["rcpt:slow@*=stall"]), None) as (a, b):
        routes = {"a.example": a.destinations[0], "b.example": b.destinations[0]}
        async with proxy(routes, engine, server_engine,
                         transports={"lmtp": {"timeouts": {"rcpt": 0.5}}}) as p:
            async with await connect(p.destinations[0]) as c:
                results = await c.send("s@example.org",
                                       ["u@a.example", "slow@a.example", "v@b.example"], MSG)
            u, slow, v = results
            assert u.status == "transient" and u.code == 451 and u.stage == "final", u
            assert (slow.code, slow.enhanced, slow.stage) == (451, "4.4.2", "rcpt"), slow
            assert "timed out" in slow.text
            assert v.status == "delivered"
            assert not a.messages and b.messages[0].recipients == ["v@b.example"]


@pytest.mark.parametrize("server_engine", SERVER_ENGINES)
async def test_after_the_dot_each_keeps_its_own_reply_and_a_lost_dot_is_possibly_delivered(
    engine: str, server_engine: str,
) -> None:
    quota = FaultPlan.parse(["dot:full@*=452 4.2.2 Mailbox full"])
    lost = FaultPlan.parse(["dot:*=disconnect"])
    async with sinks(quota, lost) as (a, b):
        routes = {"a.example": a.destinations[0], "b.example": b.destinations[0]}
        records: list[ProxyRecord] = []
        async with proxy(routes, engine, server_engine, records=records) as p:
            async with await connect(p.destinations[0]) as c:
                results = await c.send("s@example.org",
                                       ["u@a.example", "full@a.example", "v@b.example"], MSG)
            u, full, v = results
            assert u.status == "delivered"
            # Accepted at RCPT, refused after the dot: its own after-dot reply.
            assert (full.code, full.enhanced, full.text) == (452, "4.2.2", "Mailbox full")
            assert v.status == "transient" and v.code == 451, v
            assert p.stats.possibly_delivered == 1
        (rec,) = [r for r in records if r.recipient == "v@b.example"]
        assert rec.result.possibly_delivered


@pytest.mark.parametrize("server_engine", SERVER_ENGINES)
async def test_over_data_and_a_size_limit_checked_at_the_dot(
    engine: str, server_engine: str,
) -> None:
    # Back ends without CHUNKING (the content goes after DATA's 354); b takes 200 bytes.
    plain = [e for e in DEFAULT_EXTENSIONS if e != "CHUNKING"]
    async with sinks(None, extensions=plain) as (a,), sinks(None, extensions=plain,
                                                             max_size=200) as (b,):
        routes = {"a.example": a.destinations[0], "b.example": b.destinations[0]}
        async with proxy(routes, engine, server_engine) as p:
            big = MSG + b"x" * 300 + b"\r\n"
            async with await connect(p.destinations[0]) as c:
                results = await c.send("s@example.org", ["u@a.example", "v@b.example"], big)
                again = await c.send("s@example.org", ["u@a.example", "v@b.example"], MSG)
            u, v = results
            assert u.status == "delivered" and a.messages[0].content.endswith(big)
            # Accepted at RCPT (MAIL had no SIZE: the content was not known yet), too big
            # at the dot: RSET instead of the content, and its own permanent reply.
            assert (v.code, v.enhanced) == (552, "5.3.4"), v
            assert [r.status for r in again] == ["delivered", "delivered"]
            assert [m.recipients for m in b.messages] == [["v@b.example"]]
            assert p.agent_stats.connections_opened == 2  # the RSET one was reused


async def test_with_every_pooled_connection_busy_a_recipient_goes_unverified(
    engine: str,
) -> None:
    one = {"lmtp": {"pool": {"max_connections": 1}}}
    async with (sinks(FaultPlan.parse(["rcpt:bad@*=550 5.1.1 no"])) as (a,),
                proxy({"a.example": a.destinations[0]}, engine, "c", transports=one) as p,
                await connect(p.destinations[0]) as c1,
                await connect(p.destinations[0]) as c2):
        env = c1.open_transaction("s@example.org")
        assert (await env.rcpt("u1@a.example")).code == 250  # holds the one connection
        # The other session does not wait for it at RCPT: routed only.
        results = await asyncio.gather(
            c2.send("s@example.org", ["u2@a.example", "bad@a.example"], MSG),
            env.send(Delivery.build(MSG, sender="s@example.org", recipients=env.recipients)))
        (u2, bad), (u1,) = results
        assert u1.status == "delivered" and u2.status == "delivered"
        assert (bad.code, bad.stage) == (550, "final")  # the sink's refusal, after the dot
        assert p.stats.verify_skipped == 2 and p.stats.verified == 1
        got = sorted(r for m in a.messages for r in m.recipients)
        assert got == ["u1@a.example", "u2@a.example"]


@pytest.mark.parametrize("server_engine", SERVER_ENGINES)
async def test_a_cached_connection_lost_before_any_reply_is_replaced_once(
    engine: str, server_engine: str,
) -> None:
    # The second MAIL the sink sees (on the reused connection) gets a hang-up:
    # nothing reached it, so the transaction goes again on a new connection.
    async with sinks(FaultPlan.parse(["mail@nth=2=disconnect"])) as (a,), proxy(
            {"a.example": a.destinations[0]}, engine, server_engine) as p:
        async with await connect(p.destinations[0]) as c:
            first = await c.send("s@example.org", ["u@a.example", "v@a.example"], MSG)
            second = await c.send("s@example.org", ["u@a.example", "v@a.example"], MSG)
        assert [r.status for r in first + second] == ["delivered"] * 4
        assert p.agent_stats.connections_opened == 2
        assert [m.recipients for m in a.messages] == [["u@a.example", "v@a.example"]] * 2


async def test_recipient_limit_and_transports_not_verified_go_the_plain_way(
    engine: str,
) -> None:
    no = FaultPlan.parse(["rcpt:bad@*=550 5.1.1 no"])
    async with sinks(no, no) as (a, b):
        cfg = {"transport_map": {"a.example": f"lmtp:{a.destinations[0]}",
                                 "b.example": f"plain:{b.destinations[0]}"},
               "transports": {"lmtp": {"recipient_limit": 2}, "plain": {}}}
        settings, config = proxy_config_from_dict({**cfg, "proxy": {
            "verify_recipients": ["lmtp"]}})
        p = Proxy(Agent(config=config, engine=engine), settings, listen="127.0.0.1:0")
        async with p:
            async with await connect(p.destinations[0]) as c:
                results = await c.send(
                    "s@example.org", ["u1@a.example", "bad@a.example", "u3@a.example",
                                      "bad@b.example"], MSG)
            # bad@a: asked (limit 2 reached with it); u3: past the limit, unverified;
            # b.example's transport is not verified: the sink's "no" comes after the dot.
            assert [(r.code, r.stage) for r in results] == [
                (250, "final"), (550, "rcpt"), (250, "final"), (550, "final")]
            assert p.stats.verified == 2 and p.stats.verify_skipped == 1
            assert [m.recipients for m in a.messages] == [["u1@a.example"], ["u3@a.example"]]


def test_verify_recipients_must_name_known_transports() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown transport.*'nosuch'"):
        proxy_config_from_dict({"default": "lmtp:127.0.0.1:24",
                                "proxy": {"verify_recipients": ["nosuch"]}})
    with pytest.raises(ConfigurationError, match="verify_recipients"):
        proxy_config_from_dict({"default": "lmtp:127.0.0.1:24",
                                "proxy": {"verify_recipients": "yes"}})


# --- the engine: a transaction whose envelope grows ---------------------------------


def _drain(conn: Any) -> list[Any]:
    out = []
    while True:
        ev = conn.next_event()
        if ev.__class__.__name__ == "NeedData":
            return out
        out.append(ev)


@pytest.mark.parametrize("impl", ["python", "c"])
@pytest.mark.parametrize("end", ["data", "rset"])
def test_engine_open_transaction_sends_each_rcpt_and_reports_its_reply(
    impl: str, end: str,
) -> None:
    mod = _engine(impl)
    conn = mod.Connection("client.example")
    conn.receive_data(b"220 hi\r\n")
    _drain(conn)
    conn.lhlo()
    conn.data_to_send()
    conn.receive_data(b"250-srv\r\n250 PIPELINING\r\n")
    _drain(conn)
    txn = conn.open_transaction("s@example.org")
    assert conn.data_to_send() == b"MAIL FROM:<s@example.org>\r\n"
    with pytest.raises(Exception, match="open envelope"):
        conn.start_transaction("x@example.org", ["y@example.org"])
    assert conn.add_recipient(txn, "a@example.org") == 0
    assert conn.data_to_send() == b"RCPT TO:<a@example.org>\r\n"
    conn.receive_data(b"250 2.1.0 ok\r\n250 2.1.5 a ok\r\n")
    evs = _drain(conn)
    assert [(e.command, e.reply.code) for e in evs if isinstance(e, CommandReply)] == [
        ("MAIL", 250), ("RCPT", 250)]
    assert conn.add_recipient(txn, "b@example.org") == 1
    assert conn.data_to_send() == b"RCPT TO:<b@example.org>\r\n"
    conn.receive_data(b"550 5.1.1 no b\r\n")
    (ev,) = _drain(conn)
    assert ev.reply.code == 550 and not conn.idle
    if end == "data":
        conn.close_transaction(txn)
        assert conn.data_to_send() == b"DATA\r\n"
        conn.receive_data(b"354 go\r\n")
        (_ready,) = _drain(conn)
        conn.end_data(txn)
        assert conn.data_to_send() == b".\r\n"
        conn.receive_data(b"250 2.0.0 a saved\r\n")
        (done,) = _drain(conn)
        assert isinstance(done, TransactionDone)
        assert [(r.code, r.stage) for r in txn.results] == [(250, "final"), (550, "rcpt")]
    else:
        conn.abandon_transaction(txn)
        assert conn.data_to_send() == b"RSET\r\n"
        conn.receive_data(b"250 2.0.0 reset\r\n")
        (done,) = _drain(conn)
        assert isinstance(done, TransactionDone)
        assert [r.status for r in txn.results] == ["transient", "permanent"]
        assert not any(r.possibly_delivered for r in txn.results)
    assert conn.idle
    # The connection takes an ordinary transaction again.
    conn.start_transaction("s@example.org", ["c@example.org"])
    assert conn.data_to_send().startswith(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<c@")


def test_the_example_in_docs_proxy_md_loads() -> None:
    import tomllib
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "proxy.md").read_text()
    found = re.search(r"## RCPT verification against the back end\n.*?```toml\n(.*?)```", doc,
                      re.S)
    assert found is not None
    data = tomllib.loads(found.group(1))
    settings, _ = proxy_config_from_dict({"default": "lmtp:unix:/run/dovecot/lmtp", **data})
    assert settings.verify_recipients is True
