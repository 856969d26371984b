"""Destinations are parsed exactly as Postfix's lmtp(8) writes them."""

from __future__ import annotations

import pytest

from lmtpfast import ConfigurationError, Destination, parse_destination


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/path/name", Destination("unix", path="/path/name")),
        ("unix:/var/imap/socket/lmtp", Destination("unix", path="/var/imap/socket/lmtp")),
        ("/run/dovecot/lmtp", Destination("unix", path="/run/dovecot/lmtp")),
        ("inet:host.example:2424", Destination("inet", host="host.example", port=2424)),
        ("host.example:2424", Destination("inet", host="host.example", port=2424)),
        ("lmtp2host", Destination("inet", host="lmtp2host", port=24)),
        ("inet:lmtp2host", Destination("inet", host="lmtp2host", port=24)),
        ("[::1]:24", Destination("inet", host="::1", port=24)),
        ("[::1]", Destination("inet", host="::1", port=24)),
        ("inet:[2001:db8::1]:2003", Destination("inet", host="2001:db8::1", port=2003)),
        ("inet:localhost:lmtp", Destination("inet", host="localhost", port=24)),
        ("127.0.0.1:smtp", Destination("inet", host="127.0.0.1", port=25)),
    ],
)
def test_postfix_forms(text: str, expected: Destination) -> None:
    assert parse_destination(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "bad destination"),
        ("unix:", "empty socket path"),
        ("host:", "empty port"),
        ("host:0", "out of range"),
        ("host:70000", "out of range"),
        ("host:nosuchservice", "unknown service"),
        ("::1:24", "needs brackets"),
        ("[::1", "missing ']'"),
        ("[::1]x", "junk after"),
        ("host\r\n:24", "bad destination"),
        ("bad host:24", "bad host"),
    ],
)
def test_bad_destinations_say_why(text: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        parse_destination(text)


def test_round_trip_text() -> None:
    for text in ("unix:/a/b", "h:25", "[::1]:24"):
        assert str(parse_destination(text)) == text
