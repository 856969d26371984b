"""ESMTP extensions a delivery must get right: SMTPUTF8, 8BITMIME, SIZE, DSN (RFC 6531,
6152, 1870, 3461), against smtp-sink (which records the parameters it was sent) and
the lmtpfast sink (which offers SMTPUTF8 and SIZE)."""

from __future__ import annotations

import pytest

from lmtpfast import LocalProtocolError, connect
from lmtpfast._dsn import DSN, xtext
from lmtpfast._testing.postfix import split_capture
from lmtpfast.server import Sink

ASCII = b"Subject: plain\r\n\r\nhello\r\n"
EIGHT_BIT = "Subject: caf\u00e9\r\n\r\nd\u00e9j\u00e0 vu\r\n".encode()


async def test_smtputf8_address_to_server_without_it(smtp_sink, engine: str) -> None:
    sink = smtp_sink(capture=True)  # smtp-sink does not offer SMTPUTF8
    async with await connect(sink.destination, engine=engine) as conn:
        assert not conn.capabilities.smtputf8
        results = await conn.send("s@example.org", ["ok@example.com", "j\u00f6rg@example.com"],
                                  ASCII)
        refused_sender = await conn.send("s\u00e9@example.org", ["ok@example.com"], ASCII)
    assert results[0].delivered
    bad = results[1]
    assert (bad.status, bad.code, bad.enhanced, bad.stage) == ("permanent", 553, "5.6.7", "local")
    assert "SMTPUTF8" in bad.text and bad.address == "j\u00f6rg@example.com"
    assert refused_sender[0].permanent and refused_sender[0].enhanced == "5.6.7"
    # Only the ASCII recipient reached the server, unmangled.
    (meta, _), = [split_capture(d) for d in sink.captures()]
    assert meta["X-Rcpt-Args"] == ["<ok@example.com>"]


async def test_smtputf8_used_when_offered(engine: str) -> None:
    async with Sink("127.0.0.1:0", collect=True) as sink:
        async with await connect(sink.destinations[0], engine=engine) as conn:
            assert conn.capabilities.smtputf8
            results = await conn.send("s@example.org", ["j\u00f6rg@example.com"], EIGHT_BIT)
        assert results[0].delivered
        assert sink.messages[0].recipients == ["j\u00f6rg@example.com"]
        assert sink.messages[0].content == EIGHT_BIT


async def test_8bitmime_and_size_parameters(smtp_sink, engine: str) -> None:
    sink = smtp_sink(capture=True)  # offers 8BITMIME, not SIZE
    async with await connect(sink.destination, chunking=False, engine=engine) as conn:
        await conn.send("a@example.org", ["b@example.com"], EIGHT_BIT)
        await conn.send("a@example.org", ["b@example.com"], ASCII)
    args = sorted(split_capture(d)[0]["X-Mail-Args"][0] for d in sink.captures())
    assert args == ["<a@example.org>", "<a@example.org> BODY=8BITMIME"]


async def test_size_checked_before_sending(engine: str) -> None:
    async with Sink("127.0.0.1:0", max_size=1000) as sink:
        async with await connect(sink.destinations[0], engine=engine) as conn:
            assert conn.capabilities.size == 1000
            big = await conn.send("a@b.org", ["c@d.org", "e@d.org"], b"x" * 2000)
            small = await conn.send("a@b.org", ["c@d.org"], b"x" * 100)
        assert [r.code for r in big] == [552, 552]
        assert all(r.permanent and r.local and r.enhanced == "5.3.4" for r in big)
        assert "1000" in big[0].text
        assert small[0].delivered
        assert sink.stats.transactions == 1  # the big one never left


async def test_dsn_passed_when_offered(smtp_sink, engine: str) -> None:
    sink = smtp_sink(capture=True)  # offers DSN
    dsn = DSN(ret="HDRS", envid="id+1=x y", notify=("SUCCESS", "FAILURE"),
              orcpt=("orig@example.com", None))
    async with await connect(sink.destination, engine=engine) as conn:
        assert conn.capabilities.dsn
        results = await conn.send("a@example.org", ["b@example.com", "c@example.com"], ASCII,
                                  dsn=dsn)
    assert all(r.delivered for r in results)
    (meta, _), = [split_capture(d) for d in sink.captures()]
    assert meta["X-Mail-Args"] == ["<a@example.org> RET=HDRS ENVID=id+2B1+3Dx+20y"]
    assert meta["X-Rcpt-Args"] == [
        "<b@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig@example.com",
        "<c@example.com> NOTIFY=SUCCESS,FAILURE",
    ]


async def test_dsn_dropped_when_not_offered(engine: str) -> None:
    only = ("PIPELINING", "ENHANCEDSTATUSCODES")
    async with Sink("127.0.0.1:0", extensions=only) as sink, await connect(
        sink.destinations[0], engine=engine
    ) as conn:
        assert not conn.capabilities.dsn
        results = await conn.send("a@b.org", ["c@d.org"], ASCII, dsn=DSN(ret="FULL"))
    assert results[0].delivered  # the sink would refuse RET= without DSN


def test_dsn_validation() -> None:
    assert xtext("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"
    with pytest.raises(LocalProtocolError):
        DSN(notify=("NEVER", "SUCCESS"))
    with pytest.raises(LocalProtocolError):
        DSN(orcpt=("a",)).rcpt_params(["x", "y"])
