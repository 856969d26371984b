"""Address syntax: one check in the core, used by the engine, the agent and the spool (issue
10 item 6).

RFC 5321 4.1.2 allows a quoted local part (``"john doe"@example.com``,
sent by Postfix); it is accepted everywhere. What could end a command or
inject another one stays refused: CR, LF, NUL (any control character),
an unbalanced quote or bracket, ``<``, ``>`` or a space outside quotes.
"""

from __future__ import annotations

from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtpfast import Agent, LocalProtocolError
from lmtpfast.proto._common import address_problem, encode_address
from lmtpfast.server import Sink
from lmtpfast.spool import BadEnvelope, check_address

from .test_engine import FROM, Cut, Script, both, impl, mail_burst, session  # noqa: F401

GOOD = [
    "john@example.com",
    '"john doe"@example.com',
    '"john.doe"@example.com',
    '""@example.com',
    '"a\\"b"@example.com',  # an escaped quote
    '"a\\\\"@example.com',  # an escaped backslash, then the closing quote
    '"<tag> x"@example.com',  # anything printable inside the quotes
    '"weird@local"@example.com',
    "user@[192.0.2.1]",
    "user@[IPv6:2001:db8::1]",
    '"john doe"@[192.0.2.1]',
    '"postmaster"',  # a quoted local part alone, like a bare "postmaster"
    "postmaster",
    "a+tag@example.com",
]

BAD = [
    ('"john doe@example.com', "unbalanced quote"),
    ('john doe"@example.com', "unbalanced quote"),
    ('"john"doe@example.com', "quoted local part"),
    ('jo"hn"@example.com', "unbalanced quote"),
    ('"john\\"@example.com', "unbalanced quote"),  # the closing quote is escaped
    ('"john\\', "unbalanced quote"),
    ('"jo\rhn"@example.com', "forbidden character"),
    ('"jo\nhn"@example.com', "forbidden character"),
    ('"jo\0hn"@example.com', "forbidden character"),
    ('"jo\thn"@example.com', "forbidden character"),
    ("user@[192.0.2.1", "unbalanced bracket"),
    ("user@192.0.2.1]", "unbalanced bracket"),
    ("user@[1.2.3.4]x", "unbalanced bracket"),
    ("us[er@example.com", "unbalanced bracket"),
    ('"x"@exa"mple.com', "unbalanced quote"),
    ("john doe@example.com", "forbidden character"),
    ("<john@example.com>", "forbidden character"),
    ('"john"@exa mple.com', "forbidden character"),
    ("a\r\nRSET", "forbidden character"),
]


@pytest.mark.parametrize("address", GOOD)
def test_address_accepted(address: str) -> None:
    assert address_problem(address) is None
    assert encode_address(address) == address.encode()


@pytest.mark.parametrize(("address", "why"), BAD)
def test_address_refused(address: str, why: str) -> None:
    problem = address_problem(address)
    assert problem is not None and why in problem, problem
    with pytest.raises(LocalProtocolError, match=why):
        encode_address(address)


def test_empty_and_non_str() -> None:
    assert address_problem("", allow_empty=True) is None
    assert address_problem("") is not None
    assert address_problem(None) == "must be str, not NoneType"  # type: ignore[arg-type]
    assert encode_address('"jörg smith"@example.org', utf8=True) == (
        '"jörg smith"@example.org'.encode())
    with pytest.raises(LocalProtocolError, match="not ASCII"):
        encode_address('"jörg smith"@example.org')


def t_quoted_local_parts_sent(s: Script) -> None:
    c = session(s)
    rcpts = ['"john doe"@example.com', '"a\\"b"@example.com', "x@[192.0.2.1]"]
    c.start_transaction('"the sender"@example.org', rcpts)
    assert s.sent() == mail_burst('"the sender"@example.org', *rcpts)
    assert s.server(b"250 ok\r\n" * 4 + b"354 go\r\n") == [("ready", 1)]


def t_unbalanced_refused_nothing_sent(s: Script) -> None:
    c = session(s)
    for sender, rcpt in [(FROM, '"john doe@example.com'), ('"x@example.org', "a@example.com"),
                         (FROM, "a@[1.2.3.4")]:
        with pytest.raises(LocalProtocolError, match="unbalanced"):
            c.start_transaction(sender, ["ok@example.com", rcpt])
    assert s.sent() == b"" and c.idle and c.usable


@pytest.mark.parametrize("transcript",
                         [t_quoted_local_parts_sent, t_unbalanced_refused_nothing_sent])
def test_engine_addresses(impl: ModuleType, transcript) -> None:  # noqa: F811
    transcript(Script(impl, Cut("whole")))


@pytest.mark.parametrize("address", GOOD[:12])
def test_spool_accepts_what_the_engine_sends(address: str) -> None:
    assert check_address(address) == address
    assert check_address(address, sender=True) == address


@pytest.mark.parametrize(("address", "why"), BAD)
def test_spool_refuses_what_the_engine_refuses(address: str, why: str) -> None:
    with pytest.raises(BadEnvelope, match=why):
        check_address(address)


def test_agent_routes_quoted_local_part() -> None:
    agent = Agent.for_server("unix:/nonexistent")
    assert agent.route('"john doe"@example.com').failure is None
    failure = agent.route('"john doe@example.com').failure
    assert failure is not None and (failure.code, failure.enhanced) == (501, "5.1.3")


async def test_quoted_local_part_delivered(tmp_path, engine: str) -> None:
    """End to end through the agent: delivered and stored, not refused 501 5.1.3."""
    async with Sink(f"unix:{tmp_path}/s", collect=True) as sink:
        async with Agent.for_server(sink.destinations[0]) as agent:
            results = await agent.deliver(
                b"Subject: q\r\n\r\nhi\r\n", sender='"the sender"@example.org',
                recipients=['"john doe"@example.com', "plain@example.com",
                            '"broken@example.com'])
        assert [(r.status, r.code) for r in results] == [
            ("delivered", 250), ("delivered", 250), ("permanent", 501)]
        assert results[2].local
        (msg,) = sink.messages
        assert msg.sender == '"the sender"@example.org'
        assert msg.recipients == ['"john doe"@example.com', "plain@example.com"]
    with pytest.raises(LocalProtocolError, match="bad sender address"):
        await Agent.for_server("unix:/nonexistent").deliver(
            b"x\r\n", sender='"unbalanced@example.org', recipients=["a@example.com"])


_ALPHABET = st.sampled_from([*'ab.@+-"\\[]<> \t\r\n\0\x7f\x01é~', "postmaster", "x@y"])


@settings(max_examples=500, deadline=None)
@given(st.lists(_ALPHABET, max_size=12).map("".join), st.booleans())
def test_engines_check_addresses_as_the_one_function_does(
        both: tuple[ModuleType, ModuleType], address: str, utf8: bool) -> None:  # noqa: F811
    """The compiled fast path accepts nothing ``address_problem`` refuses, and vice versa."""
    try:
        expected: object = b"RCPT TO:<" + encode_address(address, utf8=utf8) + b">\r\n"
    except LocalProtocolError as exc:
        expected = str(exc)
    for mod in both:
        s = Script(mod, Cut("whole"))
        c = session(s)
        try:
            c.start_transaction(FROM, [address], smtputf8=utf8)
            got: object = s.sent().split(b"\r\n", 1)[1].removesuffix(b"DATA\r\n")
        except LocalProtocolError as exc:
            got = str(exc)
        assert got == expected, (mod.__name__, address)
