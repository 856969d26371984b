"""The LMTP proxy (issue 14) against lmtpfast sinks as back ends: fast, both loops, both engines.

Routing at RCPT (recipient map, error routes, map failures, loops), one
transaction per back end, replies in RCPT order and each the back end's own,
a failing or stalling back end touching only its own recipients, spooling
big messages, the hop limit, client deadlines, graceful shutdown and reload.
Real peers (Postfix, Dovecot, smtp-sink) are in ``test_proxy_peers.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from lmtpfast import Agent, ConfigurationError, RecipientResult, connect
from lmtpfast._maps import CachedMap, LookupResult, Map, MapError
from lmtpfast.server import (
    IMPLEMENTATIONS,
    ClientTimeouts,
    FaultPlan,
    Proxy,
    ProxyRecord,
    ProxySettings,
    Sink,
    proxy_config_from_dict,
)

MSG = b"From: a@example.org\r\nSubject: proxied\r\n\r\nHello through the proxy.\r\n"
SERVER_ENGINES = sorted(IMPLEMENTATIONS)


class FakeMap(Map):
    """A network-like map over a dict: every call is counted; it can fail or wait."""

    type = "fake"

    def __init__(self, data: dict[str, str]) -> None:
        super().__init__("test")
        self.data = dict(data)
        self.calls: list[list[str]] = []
        self.down = False

    async def lookup_many(self, keys: Sequence[str]) -> dict[str, LookupResult]:
        self.calls.append(list(keys))
        await asyncio.sleep(0)  # a real round trip yields to the loop
        if self.down:
            return dict.fromkeys(keys, MapError(self.mapname, "database down"))
        return {k: ([self.data[k]] if k in self.data else None) for k in keys}


@asynccontextmanager
async def backends(*plans: FaultPlan | None, **kw: Any) -> AsyncIterator[list[Sink]]:
    sinks = [Sink("127.0.0.1:0", collect=True, faults=p, **kw) for p in plans]
    for s in sinks:
        await s.start()
    try:
        yield sinks
    finally:
        for s in sinks:
            await s.stop()


def _map(sinks: Sequence[Sink], domains: Sequence[str]) -> dict[str, str]:
    return {d: f"lmtp:{s.destinations[0]}" for d, s in zip(domains, sinks, strict=True)}


@asynccontextmanager
async def proxy(agent: Any, settings: ProxySettings | None = None, *,
                records: list[ProxyRecord] | None = None, **kw: Any) -> AsyncIterator[Proxy]:
    p = Proxy(agent, settings, listen="127.0.0.1:0",
              on_result=records.append if records is not None else None, **kw)
    await p.start()
    try:
        yield p
    finally:
        await p.shutdown(5)


def _lines(results: Sequence[RecipientResult]) -> list[tuple[int, str | None]]:
    return [(r.code, r.enhanced) for r in results]


@pytest.mark.parametrize("server_engine", SERVER_ENGINES)
async def test_one_transaction_per_back_end_replies_in_rcpt_order(server_engine: str) -> None:
    quota = FaultPlan.parse(["dot:full@*=452 4.2.2 Mailbox full"])
    async with backends(None, quota) as (a, b):
        cfg = {"transport_map": {**_map([a, b], ["a.example", "b.example"]),
                                 "gone.example": "error:5.1.2 this domain is gone"}}
        records: list[ProxyRecord] = []
        async with proxy(cfg, records=records, engine=server_engine) as p:
            rcpts = ["u1@a.example", "v1@b.example", "x@gone.example", "u2@a.example",
                     "full@b.example", "u1@a.example", "nowhere@c.example"]
            async with await connect(p.destinations[0]) as c:
                results = await c.send("s@example.org", rcpts, MSG)
            assert _lines(results) == [(250, "2.0.0"), (250, "2.0.0"), (550, "5.1.2"),
                                       (250, "2.0.0"), (452, "4.2.2"), (250, "2.0.0"),
                                       (451, "4.4.4")]
            # Each reply is the back end's own (text included).
            assert results[0].text == "<u1@a.example> Saved"
            assert results[4].text == "Mailbox full"
            assert results[2].text == "this domain is gone"
            # One transaction per back end (single-instance store); a recipient given
            # twice is stored once and both RCPTs get its reply (as the agent does).
            assert a.stats.transactions == 1 and b.stats.transactions == 1
            assert a.messages[0].recipients == ["u1@a.example", "u2@a.example"]
            assert b.messages[0].recipients == ["v1@b.example"]
            # The proxy added its Received: field, then the message as sent.
            content = a.messages[0].content
            assert content.startswith(b"Received: from ") and content.endswith(MSG)
            assert p.stats.backend_deliveries == 2 and p.stats.delivered == 4
            assert p.stats.refused == 1 and p.stats.deferred == 1
        # One log record per recipient accepted at RCPT, with the back end that answered.
        got = sorted((r.recipient, r.result.code, r.result.destination) for r in records)
        assert got == sorted([("u1@a.example", 250, a.destinations[0]),
                              ("u1@a.example", 250, a.destinations[0]),
                              ("u2@a.example", 250, a.destinations[0]),
                              ("v1@b.example", 250, b.destinations[0]),
                              ("full@b.example", 452, b.destinations[0])])


async def test_recipient_map_refuses_unknown_and_a_map_failure_defers_only_its_recipient(
) -> None:
    async with backends(None) as (a,):
        users = FakeMap({"alice@a.example": "ok", "bob@a.example": "ok"})
        agent = Agent(transport_map=_map([a], ["a.example"]), recipient_map=CachedMap(users))
        async with proxy(agent) as p:
            async with await connect(p.destinations[0]) as c:
                results = await c.send("s@example.org",
                                       ["alice@a.example", "nobody@a.example", "bob@a.example"],
                                       MSG)
                assert _lines(results) == [(250, "2.0.0"), (550, "5.1.1"), (250, "2.0.0")]
                # The pipelined RCPTs were looked up together: one batched call (and
                # never again after the dot: the routes decided at RCPT are used).
                assert len(users.calls) == 1 and len(users.calls[0]) >= 3
                users.down = True
                results = await c.send("s@example.org", ["carol@a.example", "alice@a.example"],
                                       MSG)
                # carol needs the database (down): 451 4.3.0 for her only; alice is cached.
                assert _lines(results) == [(451, "4.3.0"), (250, "2.0.0")]
                assert "database down" in results[0].text
            assert a.messages[-1].recipients == ["alice@a.example"]


@pytest.mark.parametrize(("fault", "after_dot"), [
    ("dot=disconnect", True), ("bdat=disconnect", True), ("dot=stall", True),
    # BDAT pipelines MAIL, RCPT and the whole message in one write: a server
    # that never answers MAIL may still have stored it.
    ("mail=stall", True), ("lhlo=421 4.3.2 Going away", False),
    ("greeting=stall", False)])
async def test_a_failing_back_end_affects_only_its_own_recipients(fault: str,
                                                                  after_dot: bool) -> None:
    async with backends(None, FaultPlan.parse([fault]), None) as (a, bad, c):
        cfg = {"transport_map": _map([a, bad, c], ["a.example", "bad.example", "c.example"]),
               "transports": {"lmtp": {"timeouts": {"final": 0.5, "mail": 0.5,
                                                      "greeting": 0.5}}}}
        records: list[ProxyRecord] = []
        async with proxy(cfg, records=records) as p:
            rcpts = ["u@a.example", "x@bad.example", "u@c.example", "y@bad.example"]
            async with await connect(p.destinations[0]) as client:
                results = await client.send("s@example.org", rcpts, MSG)
            assert [r.status for r in results] == ["delivered", "transient", "delivered",
                                                   "transient"]
            # Nothing reported delivered that was not: the healthy back ends have it.
            assert a.messages[0].recipients == ["u@a.example"]
            assert c.messages[0].recipients == ["u@c.example"]
            bad_records = [r for r in records if "bad" in r.recipient]
            # Lost after the dot was sent: the log says it may have been delivered.
            assert all(r.result.possibly_delivered == after_dot for r in bad_records)
            assert p.stats.possibly_delivered == (2 if after_dot else 0)


async def test_client_bdat_and_data_both_arrive_and_sizes_are_checked() -> None:
    async with backends(None, None) as (a, b):
        cfg = {"transport_map": _map([a, b], ["a.example", "b.example"]),
               "proxy": {"max_size": 10_000}}
        settings, config = proxy_config_from_dict(cfg)
        async with proxy(config, settings) as p:
            body = b"Subject: big\r\n\r\n" + b"x" * 5_000 + b"\r\n"
            async with await connect(p.destinations[0]) as c:
                assert c.chunking  # the proxy offers CHUNKING: the client used BDAT
                ok = await c.send("s@example.org", ["u@a.example", "u@b.example"], body)
                too_big = await c.send("s@example.org", ["u@a.example"], body * 3)
            assert [r.code for r in ok] == [250, 250]
            assert too_big[0].code == 552
            assert a.messages[0].content.endswith(body)
            assert len(a.messages) == 1


async def test_big_messages_are_spooled_to_a_private_file_and_arrive_intact(
        tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    async with backends(None, None) as (a, b):
        cfg = {"transport_map": _map([a, b], ["a.example", "b.example"]),
               "proxy": {"spool_threshold": 4096, "spool_dir": str(spool)}}
        settings, config = proxy_config_from_dict(cfg)
        async with proxy(config, settings) as p:
            body = b"Subject: spooled\r\n\r\n" + b"".join(
                b"line %06d .with a dot\r\n.starts with a dot\r\n" % i for i in range(20_000))
            async with await connect(p.destinations[0]) as c:
                results = await c.send("s@example.org", ["u@a.example", "v@b.example"], body)
            assert [r.code for r in results] == [250, 250]
            assert p.stats.spooled == 1
            assert a.messages[0].content.endswith(body) and b.messages[0].content.endswith(body)
        assert list(spool.iterdir()) == []  # the temp file never had a name left behind


@pytest.mark.parametrize("hops", [49, 50])
async def test_hop_limit_refuses_looping_mail(hops: int) -> None:
    async with backends(None) as (a,):
        cfg = {"transport_map": _map([a], ["a.example"])}
        async with proxy(cfg) as p:
            head = b"".join(b"Received: from hop%d by x; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % i
                            for i in range(hops))
            async with await connect(p.destinations[0]) as c:
                results = await c.send("s@example.org", ["u@a.example", "v@a.example"],
                                       head + MSG)
            if hops < 50:
                assert [r.code for r in results] == [250, 250]
            else:
                assert _lines(results) == [(554, "5.4.6"), (554, "5.4.6")]
                assert a.stats.transactions == 0 and p.stats.too_many_hops == 1


async def test_routes_back_to_the_proxy_are_refused_at_start_and_deferred_at_rcpt(
        tmp_path: Path) -> None:
    sock = tmp_path / "proxy.sock"
    with pytest.raises(ConfigurationError, match="loop"):
        p = Proxy({"default": f"lmtp:unix:{sock}"}, listen=f"unix:{sock}")
        await p.start()
    await p.stop()
    # A member of a destination set counts too.
    with pytest.raises(ConfigurationError, match="loop"):
        p = Proxy({"default": "mbox:", "transports": {"mbox": {
            "destinations": ["127.0.0.1:24999", f"unix:{sock}"]}}}, listen=f"unix:{sock}")
        await p.start()
    await p.stop()
    # A network map can only be asked at RCPT: the recipient is deferred there.
    tmap = FakeMap({"a.example": f"lmtp:unix:{sock}"})
    p = Proxy(Agent(transport_map=tmap), listen=f"unix:{sock}")
    await p.start()
    try:
        async with await connect(f"unix:{sock}") as c:
            results = await c.send("s@example.org", ["u@a.example"], MSG)
        assert _lines(results) == [(451, "4.4.6")]
    finally:
        await p.shutdown(5)


@pytest.mark.parametrize("phase", ["command", "content"])
async def test_slow_clients_time_out_with_421(phase: str) -> None:
    async with backends(None) as (a,):
        settings = ProxySettings(timeouts=ClientTimeouts(command=0.3, idle=0))
        async with proxy({"transport_map": _map([a], ["a.example"])}, settings) as p:
            host, port = p.destinations[0].rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            assert (await reader.readline()).startswith(b"220 ")
            writer.write(b"LHLO x\r\n")
            while not (await reader.readline()).startswith(b"250 "):
                pass
            if phase == "content":
                writer.write(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<u@a.example>\r\nDATA\r\n")
                while not (await reader.readline()).startswith(b"354"):
                    pass
            got: list[bytes] = []

            async def read_all() -> None:
                with contextlib.suppress(ConnectionError):
                    while line := await reader.readline():
                        got.append(line)

            reading = asyncio.ensure_future(read_all())
            # A slow-loris client: a byte at a time, never a whole command (or record).
            trickle = b"x" * 1000
            for i in range(len(trickle)):
                try:
                    writer.write(trickle[i : i + 1])
                    await writer.drain()
                except (ConnectionError, RuntimeError):  # uvloop: "the handler is closed"
                    break
                if reading.done():
                    break
                await asyncio.sleep(0.02)  # the client's pace, not a synchronisation
            else:
                pytest.fail("the slow client was never timed out")
            await asyncio.wait_for(reading, 10)
            assert got and got[0].startswith(b"421 4.4.2 ")
            writer.close()
            assert a.stats.transactions == 0


async def test_graceful_shutdown_finishes_the_open_transaction_then_says_421() -> None:
    async with backends(FaultPlan.parse(["dot=delay:0.3"])) as (a,):
        p = Proxy({"transport_map": _map([a], ["a.example"])}, listen="127.0.0.1:0")
        await p.start()
        host, port = p.destinations[0].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        idle_r, idle_w = await asyncio.open_connection(host, int(port))
        await reader.readline()
        await idle_r.readline()
        writer.write(b"LHLO x\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<u@a.example>\r\n"
                     b"DATA\r\n")
        await writer.drain()
        replies = []
        while not (line := await reader.readline()).startswith(b"354"):
            replies.append(line)
        writer.write(MSG + b".\r\n")
        await writer.drain()
        # SIGTERM while the back end is still storing it.
        stopping = asyncio.ensure_future(p.shutdown(10))
        final = await asyncio.wait_for(reader.readline(), 10)
        assert final.startswith(b"250 2.0.0 <u@a.example>")
        bye = await asyncio.wait_for(reader.readline(), 10)
        assert bye.startswith(b"421 4.3.2 ")
        # The idle connection was told at once.
        assert (await asyncio.wait_for(idle_r.readline(), 10)).startswith(b"421 4.3.2 ")
        await stopping
        assert a.messages[0].recipients == ["u@a.example"]
        writer.close()
        idle_w.close()
        # No new connections once stopping.
        with pytest.raises(OSError):
            await asyncio.open_connection(host, int(port))


async def test_reload_switches_maps_without_dropping_sessions() -> None:
    async with backends(None, None) as (a, b):
        p = Proxy({"transport_map": {"x.example": f"lmtp:{a.destinations[0]}"}},
                  listen="127.0.0.1:0")
        await p.start()
        try:
            async with await connect(p.destinations[0]) as c:
                await c.send("s@example.org", ["u@x.example"], MSG)
                p.reload({"transport_map": {"x.example": f"lmtp:{b.destinations[0]}"}})
                # Same client session, new routes.
                results = await c.send("s@example.org", ["u@x.example"], MSG)
                assert results[0].delivered
            with pytest.raises(ConfigurationError):
                p.reload({"default": f"lmtp:{p.destinations[0]}"})  # a loop: refused
            assert len(a.messages) == 1 and len(b.messages) == 1
        finally:
            await p.shutdown(5)


async def test_back_end_connections_are_shared_and_reused_across_client_sessions() -> None:
    async with backends(None, None) as (a, b):
        cfg = {"transport_map": _map([a, b], ["a.example", "b.example"]),
               "defaults": {"pool": {"max_connections": 2}}}
        async with proxy(cfg) as p:

            async def one_client(n: int) -> None:
                async with await connect(p.destinations[0]) as c:
                    for i in range(n):
                        results = await c.send("s@example.org",
                                               [f"u{i}@a.example", f"v{i}@b.example"], MSG)
                        assert all(r.delivered for r in results)

            await asyncio.gather(*(one_client(20) for _ in range(6)))
            stats = p.agent_stats
            assert stats.transactions == 240
            assert a.stats.connections_total <= 2 and b.stats.connections_total <= 2
            assert stats.connections_reused >= 236


def test_proxy_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"proxy\.hopcount_limt"):
        proxy_config_from_dict({"default": "lmtp:unix:/x", "proxy": {"hopcount_limt": 3}})
    with pytest.raises(ConfigurationError, match="RFC 2033"):
        proxy_config_from_dict({"default": "lmtp:unix:/x",
                                "proxy": {"extensions": ["8BITMIME"]}})
    with pytest.raises(ConfigurationError, match="routes nothing"):
        Proxy({}, listen="127.0.0.1:0")


def test_unix_listener_is_usable_by_other_users(tmp_path: Path) -> None:
    async def main() -> int:
        sock = tmp_path / "p.sock"
        p = Proxy({"default": "lmtp:unix:/nonexistent"}, listen=f"unix:{sock}")
        await p.start()
        try:
            return os.stat(sock).st_mode & 0o777
        finally:
            await p.stop()

    assert asyncio.run(main()) == 0o666


def test_loops_to_knows_wildcard_listeners() -> None:
    from lmtpfast import Destination
    from lmtpfast.server._proxy import loops_to

    names = frozenset({"localhost", "127.0.0.1", socket.gethostname().lower()})
    listen = [("inet", "0.0.0.0", 24)]
    assert loops_to(Destination("inet", host="127.0.0.1", port=24), listen, names)
    assert loops_to(Destination("inet", host="localhost", port=24), listen, names)
    assert not loops_to(Destination("inet", host="127.0.0.1", port=25), listen, names)
    assert not loops_to(Destination("inet", host="10.9.9.9", port=24), listen, names)


def test_the_deployment_in_docs_proxy_md_loads(tmp_path: Path) -> None:
    import re

    from lmtpfast.server import load_proxy_config

    doc = (Path(__file__).resolve().parent.parent / "docs" / "proxy.md").read_text()
    toml = re.search(r"`/etc/lmtpfast/proxy.toml`:\n\n```toml\n(.*?)```", doc, re.S)
    cf = re.search(r"read\nunchanged \(`docs/maps.md`\):\n\n```\n(.*?)```", doc, re.S)
    assert toml is not None and cf is not None
    (tmp_path / "pgsql-mailbox.cf").write_text(cf.group(1))
    (tmp_path / "pgsql-mailbox.cf").chmod(0o600)
    path = tmp_path / "proxy.toml"
    path.write_text(toml.group(1).replace("/etc/lmtpfast/", f"{tmp_path}/"))
    settings, config = load_proxy_config(path)
    assert settings.hopcount_limit == 50 and settings.timeouts.command == 300
    assert config.recipient_maps and config.transport_maps


@pytest.mark.parametrize("section", ["Affinity across a set of back ends",
                                     "Back ends that are programs"])
def test_the_examples_in_docs_proxy_md_load(section: str) -> None:
    import re
    import tomllib

    from lmtpfast import DestinationSet, config_from_dict

    doc = (Path(__file__).resolve().parent.parent / "docs" / "proxy.md").read_text()
    found = re.search(rf"## {section}\n.*?```toml\n(.*?)```", doc, re.S)
    assert found is not None
    config = config_from_dict(tomllib.loads(found.group(1)))
    [transport] = config.transports.values() if len(config.transports) == 1 else [
        t for n, t in config.transports.items() if n != "lmtp"]
    if section.startswith("Affinity"):
        assert isinstance(transport.targets, DestinationSet)
    else:
        assert transport.dest is not None and transport.dest.kind == "command"


# -- STARTTLS and AUTH toward the client ----------------------------------------------------

@pytest.fixture
def tls_auth(tmp_path: Path) -> dict[str, Any]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    users = tmp_path / "sasl_users"
    users.write_text("# user password\nalice s3cret\nbob hunter2\n")
    users.chmod(0o600)
    return {"tls_cert_file": str(cert_file), "tls_key_file": str(key_file),
            "sasl_users": str(users), "ca_file": str(ca_file)}


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN",
                                       "LOGIN"])
async def test_starttls_and_auth_required_on_tcp_only(tls_auth: dict[str, Any], tmp_path: Path,
                                                      mechanism: str) -> None:
    from lmtpfast import AuthenticationError, AuthPolicy, Credentials, ReplyError, TLSPolicy

    ca_file = tls_auth.pop("ca_file")
    async with backends(None) as (a,):
        settings, config = proxy_config_from_dict({
            "transport_map": _map([a], ["a.example"]),
            "proxy": {**tls_auth, "auth": "tcp"}})
        sock = tmp_path / "p.sock"
        p = Proxy(config, settings, listen=["127.0.0.1:0", f"unix:{sock}"])
        await p.start()
        try:
            tcp = p.destinations[0]
            verify = TLSPolicy(level="verify", ca_file=ca_file, server_hostname="localhost")
            policy = AuthPolicy(Credentials("alice", "s3cret"), mechanisms=(mechanism,))
            # TCP without AUTH: MAIL is refused (530), nothing delivered.
            async with await connect(tcp) as c:
                results = await c.send("s@example.org", ["u@a.example"], MSG)
                assert (results[0].code, results[0].enhanced) == (530, "5.7.0")
                # PLAIN and LOGIN are not offered before TLS on TCP.
                assert c.capabilities.auth and all(
                    m not in ("PLAIN", "LOGIN") for m in c.capabilities.auth)
            # STARTTLS (the certificate verifies), then AUTH with this mechanism.
            async with await connect(tcp, tls=verify, auth=policy) as c:
                assert c.tls is not None
                results = await c.send("s@example.org", ["u@a.example"], MSG)
                assert results[0].delivered
            # A wrong password: 535, and the session is not authenticated.
            bad = AuthPolicy(Credentials("alice", "wrong"), mechanisms=(mechanism,))
            with pytest.raises((ReplyError, AuthenticationError)) as info:
                await connect(tcp, tls=verify, auth=bad)
            if isinstance(info.value, ReplyError):
                assert info.value.code == 535
            # The unix socket needs no AUTH (auth = "tcp").
            async with await connect(f"unix:{sock}") as c:
                assert (await c.send("s@example.org", ["u@a.example"], MSG))[0].delivered
            assert len(a.messages) == 2
        finally:
            await p.shutdown(5)


async def test_auth_plaintext_before_tls_is_refused_and_brute_force_ends_the_session(
        tls_auth: dict[str, Any]) -> None:
    tls_auth.pop("ca_file")
    async with backends(None) as (a,):
        settings, config = proxy_config_from_dict({
            "transport_map": _map([a], ["a.example"]), "proxy": {**tls_auth, "auth": "required"}})
        async with proxy(config, settings) as p:
            host, port = p.destinations[0].rsplit(":", 1)
            r, w = await asyncio.open_connection(host, int(port))
            w.write(b"LHLO x\r\nAUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n")
            for _ in range(20):
                line = await asyncio.wait_for(r.readline(), 10)
                if line.startswith(b"538"):
                    break
            assert line.startswith(b"538 5.7.11 ")
            w.write(b"AUTH CRAM-MD5\r\n")
            assert (await r.readline()).startswith(b"334 ")
            w.write(b"YWxpY2UgMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDA=\r\n")
            assert (await r.readline()).startswith(b"535 5.7.8 ")
            w.write(b"AUTH CRAM-MD5\r\n*\r\nAUTH CRAM-MD5\r\n")
            assert (await r.readline()).startswith(b"334 ")
            assert (await r.readline()).startswith(b"501 ")  # cancelled: not a failure
            assert (await r.readline()).startswith(b"334 ")
            w.write(b"bm90IHJpZ2h0\r\nAUTH CRAM-MD5\r\n")
            assert (await r.readline()).startswith(b"535 ")
            assert (await r.readline()).startswith(b"334 ")
            w.write(b"bm90IHJpZ2h0\r\n")
            assert (await r.readline()).startswith(b"421 4.7.0 ")  # the third failure
            assert await r.read() == b""
            w.close()


def test_sasl_users_file_must_be_private_and_well_formed(tmp_path: Path) -> None:
    from lmtpfast._saslserver import SaslUsers

    f = tmp_path / "users"
    f.write_text("alice s3cret\n")
    f.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        SaslUsers.from_file(f)
    f.chmod(0o600)
    assert len(SaslUsers.from_file(f)) == 1 and "s3cret" not in repr(SaslUsers.from_file(f))
    f.write_text("alice\n")
    with pytest.raises(ConfigurationError, match="user password"):
        SaslUsers.from_file(f)
    with pytest.raises(ConfigurationError, match="sasl_users"):
        proxy_config_from_dict({"default": "lmtp:unix:/x", "proxy": {"auth": "required"}})
    with pytest.raises(ConfigurationError, match="DIGEST-MD5"):
        proxy_config_from_dict({"default": "lmtp:unix:/x",
                                "proxy": {"sasl_mechanisms": ["DIGEST-MD5"]}})
