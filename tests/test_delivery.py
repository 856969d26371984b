"""One request down: the Delivery object, and what it carries to real servers.

* DSN (RFC 3461) from the spool (``lmtpfast enqueue --notify/--ret/--envid``
  and ORCPT), from ``lmtpfast send`` and from ``Agent.deliver`` reaches
  Postfix's ``smtp-sink`` (it advertises DSN and records the MAIL and RCPT
  arguments) intact, and is left out for Dovecot (no DSN), which delivers;
* the facts computed once: RFC 1870 size (issue 10 item 7), 8-bit, SMTPUTF8,
  encoded forms cached and shared by subsets, addresses checked once;
* 8-bit content to a server without 8BITMIME (issue 10 item 8): converted, or
  refused with the failure table's result;
* "452 too many recipients" (issue 10 item 9): the rest go at once in
  follow-up transactions, bounded.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtpfast import DSN, Agent, ContentError, Delivery, LocalProtocolError, connect
from lmtpfast._testing.postfix import split_capture
from lmtpfast.proto import get_engine
from lmtpfast.server import DEFAULT_EXTENSIONS, FaultPlan, Sink
from lmtpfast.spool import Spool

ROOT = Path(__file__).resolve().parent.parent
MSG = b"From: s@example.org\r\nSubject: dsn\r\n\r\nHello.\r\n"
RCPTS = ["alice@example.com", "bob@example.com"]
# What smtp-sink must have recorded for a delivery with the done-when DSN options.
WANT_MAIL = "<s@example.org> RET=HDRS ENVID=X"
WANT_RCPT = ["<alice@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig-alice@example.com",
             "<bob@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig-bob@example.com"]
ORCPTS = ["orig-alice@example.com", "orig-bob@example.com"]


def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lmtpfast", *args], input=stdin,
                          capture_output=True, timeout=120, env=env, check=False)


def recorded(sink) -> list[dict[str, list[str]]]:  # type: ignore[no-untyped-def]
    return [split_capture(d)[0] for d in sink.captures()]


def _enqueue_with_dsn(spool_dir: Path) -> None:
    # The CLI's DSN options, as an operator gives them ...
    # A directory spool (dir:), whose envelope file this test edits.
    out = cli("enqueue", f"dir:{spool_dir}", "--from", "s@example.org", "--rcpt", RCPTS[0],
              "--rcpt", RCPTS[1], "--notify", "SUCCESS,FAILURE", "--ret", "HDRS",
              "--envid", "X", "-", stdin=MSG)
    assert out.returncode == 0, out.stderr.decode()
    # ... and ORCPT, which the Python API takes (each recipient's original address).
    Spool(spool_dir)
    (ident,) = [e for e in os.listdir(spool_dir / "incoming")]
    spool_env = spool_dir / "incoming" / ident
    import json

    data = json.loads(spool_env.read_bytes())
    for r, orig in zip(data["recipients"], ORCPTS, strict=True):
        r["orcpt"] = f"rfc822;{orig}"
    spool_env.write_text(json.dumps(data))


def test_dsn_through_replay_reaches_smtp_sink_and_is_dropped_for_dovecot(
        smtp_sink, dovecot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sink = smtp_sink(capture=True)
    _enqueue_with_dsn(tmp_path / "a")
    out = cli("replay", f"dir:{tmp_path / 'a'}", "--server", sink.destination, "--once", "-q")
    assert out.returncode == 0, out.stderr.decode()
    (meta,) = recorded(sink)
    assert meta["X-Mail-Args"] == [WANT_MAIL]
    assert meta["X-Rcpt-Args"] == WANT_RCPT
    # Dovecot advertises no DSN: the same entry is delivered, without the parameters
    # (Dovecot refuses MAIL/RCPT parameters it does not know).
    _enqueue_with_dsn(tmp_path / "b")
    out = cli("replay", f"dir:{tmp_path / 'b'}", "--server", dovecot.destination_unix,
              "--once", "-q")
    assert out.returncode == 0, out.stderr.decode() + out.stdout.decode()
    assert len(dovecot.messages("alice")) == 1 and len(dovecot.messages("bob")) == 1


def test_dsn_through_send(smtp_sink, dovecot) -> None:  # type: ignore[no-untyped-def]
    sink = smtp_sink(capture=True)
    args = ["--from", "s@example.org", "--rcpt", RCPTS[0], "--rcpt", RCPTS[1],
            "--notify", "SUCCESS,FAILURE", "--ret", "HDRS", "--envid", "X",
            "--orcpt", ORCPTS[0], "--orcpt", ORCPTS[1], "-"]
    out = cli("send", "--server", sink.destination, *args, stdin=MSG)
    assert out.returncode == 0, out.stderr.decode()
    (meta,) = recorded(sink)
    assert meta["X-Mail-Args"] == [WANT_MAIL]
    assert meta["X-Rcpt-Args"] == WANT_RCPT
    out = cli("send", "--server", dovecot.destination_unix, *args, stdin=MSG)
    assert out.returncode == 0, out.stderr.decode() + out.stdout.decode()
    assert len(dovecot.messages("alice")) == 1
    bad = cli("send", "--server", sink.destination, *args[:-1], "--orcpt", "x@y", "-",
              stdin=MSG)
    assert bad.returncode == 64 and b"one --orcpt per --rcpt" in bad.stderr


async def test_dsn_through_the_agent(  # type: ignore[no-untyped-def]
        smtp_sink, dovecot, engine: str) -> None:
    sink = smtp_sink(capture=True)
    dsn = DSN(ret="HDRS", envid="X", notify=("SUCCESS", "FAILURE"), orcpt=tuple(ORCPTS))
    # One agent, two back ends: the DSN-capable one gets the parameters, Dovecot not.
    agent = Agent(transports={"a": {"destination": sink.destination},
                              "b": {"destination": dovecot.destination_unix}},
                  transport_map={"example.com": "a:", "example.net": "b:"}, engine=engine)
    async with agent:
        results = await agent.deliver(
            MSG, sender="s@example.org",
            recipients=[*RCPTS, "alice@example.net", "bob@example.net"],
            dsn=DSN(ret="HDRS", envid="X", notify=("SUCCESS", "FAILURE"),
                    orcpt=(*ORCPTS, "orig-a@example.net", None)))
        assert all(r.delivered for r in results), results
        # A Delivery built once goes as it is, to any number of deliveries.
        d = Delivery.build(MSG, sender="s@example.org", recipients=RCPTS, dsn=dsn)
        assert all(r.delivered for r in await agent.deliver(d))
    first, second = recorded(sink)
    for meta in (first, second):
        assert meta["X-Mail-Args"] == [WANT_MAIL]
        assert meta["X-Rcpt-Args"] == WANT_RCPT
    assert len(dovecot.messages("alice")) == 1 and len(dovecot.messages("bob")) == 1


# -- the facts, computed once ------------------------------------------------------------

async def test_size_counts_crlf_without_dot_stuffing(engine: str) -> None:
    """Issue 10 item 7: 1000 octets with two leading-dot lines fit SIZE 1000."""
    line = b"." + b"x" * 47 + b"\r\n"  # 50 octets, a leading dot DATA doubles
    body = b"Subject: size\r\n\r\n"
    msg = body + line * 2 + b"y" * (1000 - len(body) - 2 * len(line) - 2) + b"\r\n"
    assert len(msg) == 1000
    d = Delivery.build(msg, sender="a@example.org", recipients=["b@example.org"])
    assert d.size == 1000
    assert len(d.encoded(dot_stuff=True)) == 1002  # what DATA sends; not what SIZE counts
    lf = Delivery.build(msg.replace(b"\r\n", b"\n"), sender="a@x.org", recipients=["b@x.org"])
    assert lf.size == 1000  # line ends counted as CRLF
    no_bdat = tuple(e for e in DEFAULT_EXTENSIONS if e != "CHUNKING")
    async with (Sink("127.0.0.1:0", max_size=1000, extensions=no_bdat, collect=True) as sink,
                await connect(sink.destinations[0], engine=engine) as conn):
        assert conn.capabilities.size == 1000 and not conn.chunking
        (r,) = await conn.send(d)
        (big,) = await conn.send("a@example.org", ["b@example.org"], msg + b"z\r\n")
    assert r.delivered, r
    assert (big.code, big.enhanced, big.local) == (552, "5.3.4", True)
    assert sink.messages[0].content == msg


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300).map(lambda b: b.replace(b"\0", b"")))
def test_size_and_forms_agree_with_the_encoder(raw: bytes) -> None:
    for name in ("python", "c"):
        try:
            eng = get_engine(name)
        except ValueError:
            continue
        d = Delivery.build(raw, sender="", recipients=["b@example.org"])
        data = d.encoded(dot_stuff=True, encode=eng.encode_content)
        assert data == eng.encode_content(raw, dot_stuff=True)
        assert d.size == len(eng.encode_content(raw, dot_stuff=False))  # from the DATA form
        fresh = Delivery.build(raw, sender="", recipients=["b@example.org"])
        assert fresh.size == d.size  # from the BDAT form
        assert fresh.eight_bit == (not raw.isascii())


def test_checks_run_once_at_the_edge() -> None:
    with pytest.raises(LocalProtocolError, match="bad sender address"):
        Delivery.build(MSG, sender="a\r\nRCPT TO:<x@y>", recipients=["b@x.org"])
    with pytest.raises(ContentError, match="NUL byte at offset 1"):
        Delivery.build(b"a\0b", sender="a@x.org", recipients=["b@x.org"])
    with pytest.raises(TypeError, match="not one string"):
        Delivery.build(MSG, sender="a@x.org", recipients="b@x.org")
    d = Delivery.build(MSG, sender="a@x.org", recipients=["b@x.org", "c <c@x.org>", "jörg@x.org"])
    assert set(d.refused) == {1}
    assert (d.refused[1].code, d.refused[1].enhanced, d.refused[1].stage) == (501, "5.1.3", "local")
    assert d.smtputf8 and not d.eight_bit
    sub = d.subset([2, 0], ["j@x.org", "b@x.org"])
    assert sub.recipients == ("j@x.org", "b@x.org") and not sub.refused
    assert sub.cache is d.cache  # one encoding for every route
    assert d.encoded(dot_stuff=True) is sub.encoded(dot_stuff=True)
    with pytest.raises(AttributeError):
        d.sender = "x@y"  # type: ignore[misc]


# -- 8-bit content and servers without 8BITMIME ------------------------------------------

NO_8BIT = tuple(e for e in DEFAULT_EXTENSIONS if e != "8BITMIME")
MIME_8BIT = ("MIME-Version: 1.0\r\nSubject: x\r\nContent-Type: text/plain; charset=utf-8\r\n"
             "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln\r\n.dot line\r\n").encode()


async def test_8bit_body_is_converted_for_a_server_without_8bitmime(engine: str) -> None:
    async with (Sink("127.0.0.1:0", extensions=NO_8BIT, collect=True) as sink,
                await connect(sink.destinations[0], engine=engine) as conn):
        assert not conn.capabilities.eightbitmime
        (r,) = await conn.send("a@example.org", ["b@example.org"], MIME_8BIT)
        (bad,) = await conn.send("a@example.org", ["b@example.org"],
                                 "Subject: Grüße\r\n\r\nx\r\n".encode())
    assert r.delivered, r
    stored = sink.messages[0].content
    assert stored.isascii() and b"Content-Transfer-Encoding: quoted-printable" in stored
    parsed = email.message_from_bytes(stored, policy=email.policy.default)
    assert parsed.get_content().replace("\r\n", "\n") == "Grüße aus Köln\n.dot line\n"
    assert (bad.code, bad.enhanced, bad.permanent, bad.local) == (554, "5.6.3", True, True)
    assert "8-bit bytes in the message header" in bad.text
    assert len(sink.messages) == 1


async def test_8bit_goes_as_is_with_body_8bitmime_where_offered(engine: str) -> None:
    async with (Sink("127.0.0.1:0", collect=True) as sink,
                await connect(sink.destinations[0], engine=engine) as conn):
        (r,) = await conn.send("a@example.org", ["b@example.org"], MIME_8BIT)
    assert r.delivered and sink.messages[0].content == MIME_8BIT


# -- 452 too many recipients ---------------------------------------------------------------

async def test_452_too_many_recipients_sends_the_rest_at_once(engine: str) -> None:
    rcpts = [f"r{i}@example.com" for i in range(7)]
    async with (Sink("127.0.0.1:0", max_recipients=3, collect=True) as sink,
                Agent.for_server(sink.destinations[0], engine=engine) as agent):
        results = await agent.deliver(MSG, sender="s@example.org", recipients=rcpts)
        stats = agent.stats
    assert all(r.delivered for r in results), results
    assert [r.address for r in results] == rcpts
    assert sorted(a for m in sink.messages for a in m.recipients) == sorted(rcpts)
    assert [len(m.recipients) for m in sink.messages] == [3, 3, 1]
    assert stats.follow_ups == 2


async def test_452_to_everything_is_not_hammered(engine: str) -> None:
    plan = FaultPlan.parse(["rcpt=452 4.5.3 Too many recipients"])
    async with (Sink("127.0.0.1:0", faults=plan) as sink,
                Agent.for_server(sink.destinations[0], engine=engine) as agent):
        results = await agent.deliver(MSG, sender="s@example.org",
                                      recipients=["a@example.com", "b@example.com"])
        stats = agent.stats
    assert all((r.code, r.enhanced, r.stage) == (452, "4.5.3", "rcpt") for r in results)
    assert all(r.transient for r in results)
    assert stats.follow_ups == 0 and stats.transactions == 1  # no round made progress


async def test_concurrent_deliveries_share_one_encoding(engine: str) -> None:
    d = Delivery.build(MSG, sender="s@example.org", recipients=["a@example.com"])
    async with Sink("127.0.0.1:0", collect=True) as sink, Sink("127.0.0.1:0",
                                                               collect=True) as other:
        agent = Agent(transports={"a": {"destination": sink.destinations[0]},
                                  "b": {"destination": other.destinations[0]}},
                      transport_map={"example.com": "a:", "example.net": "b:"}, engine=engine)
        async with agent:
            multi = Delivery.build(MSG, sender="s@example.org",
                                   recipients=["a@example.com", "b@example.net"])
            results = await asyncio.gather(agent.deliver(d), agent.deliver(multi))
    assert all(r.delivered for batch in results for r in batch)
    assert set(multi.cache) == {"bdat", "size"}  # both back ends took the one BDAT form
