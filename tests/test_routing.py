"""Transport and virtual maps: Postfix syntax, lookup order, errors naming file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmtpfast import ConfigurationError, Destination
from lmtpfast._routing import Route, TransportMap, VirtualMap, parse_route, read_map_lines

# LMTP_README sections 6, 8 and 9, verbatim.
SEED_TRANSPORT = """\
domain1.name lmtp1:unix:/path/name
domain2.name lmtp2:lmtp2host
example.org lmtp:unix:/var/imap/socket/lmtp
foo.com lmtp1:lmtp1host
"""
SEED_VIRTUAL = "mlist@example.org mlist@localhost\n"


def test_seed_transport_examples_verbatim(tmp_path: Path) -> None:
    path = tmp_path / "transport"
    path.write_text(SEED_TRANSPORT)
    tmap = TransportMap.from_file(path)
    assert len(tmap) == 4
    key, route = tmap.lookup("user@domain1.name")  # type: ignore[misc]
    assert (key, route.transport, route.nexthop) == ("domain1.name", "lmtp1", "unix:/path/name")
    assert route.destination == Destination("unix", path="/path/name")
    _, route = tmap.lookup("user@domain2.name")  # type: ignore[misc]
    assert route.transport == "lmtp2"
    assert route.destination == Destination("inet", host="lmtp2host", port=24)
    _, route = tmap.lookup("x@example.org")  # type: ignore[misc]
    assert route == Route("lmtp", "unix:/var/imap/socket/lmtp",
                          Destination("unix", path="/var/imap/socket/lmtp"))
    _, route = tmap.lookup("y@FOO.COM")  # type: ignore[misc]
    assert route.transport == "lmtp1" and route.destination == Destination("inet", "lmtp1host", 24)
    assert tmap.lookup("z@bar.com") is None


def test_seed_virtual_example_verbatim() -> None:
    vmap = VirtualMap.parse(SEED_VIRTUAL, "virtual")
    assert vmap.rewrite("mlist@example.org") == "mlist@localhost"
    assert vmap.rewrite("MList@Example.ORG") == "mlist@localhost"
    assert vmap.rewrite("other@example.org") == "other@example.org"


def test_lookup_order() -> None:
    tmap = TransportMap({
        "*": "lmtp:star",
        ".example.org": "lmtp:parent",
        "example.org": "lmtp:exact",
        "sub.example.org": "lmtp:sub",
        "boss@example.org": "lmtp:boss",
        "boss@sub.example.org": "lmtp:bosssub",
    })

    def hop(addr: str, delim: str = "") -> str:
        found = tmap.lookup(addr, delim)
        assert found is not None
        return found[1].nexthop

    assert hop("boss@example.org") == "boss"  # full address first
    assert hop("Boss@Example.Org") == "boss"  # keys and lookups ignore case
    assert hop("other@example.org") == "exact"  # then the domain
    assert hop("boss@sub.example.org") == "bosssub"
    assert hop("x@sub.example.org") == "sub"
    assert hop("x@deep.sub.example.org") == "parent"  # then parent domains as .domain
    assert hop("x@a.b.example.org") == "parent"
    assert hop("x@example.com") == "star"  # then *
    # a "domain" key does not match subdomains (transport(5) default)
    assert TransportMap({"example.org": "lmtp:x"}).lookup("u@sub.example.org") is None
    # the recipient delimiter strips the extension for a second try
    assert hop("boss+tag@example.org") == "exact"
    assert hop("boss+tag@example.org", "+") == "boss"


def test_route_forms() -> None:
    assert parse_route("lmtp1:") == Route("lmtp1", "", None)
    assert parse_route(":lmtphost") == Route("", "lmtphost", Destination("inet", "lmtphost", 24))
    assert parse_route("lmtp:inet:host:2003").destination == Destination("inet", "host", 2003)
    assert parse_route("lmtp:[::1]:24").destination == Destination("inet", "::1", 24)
    err = parse_route("error:5.1.1 mailbox unavailable")
    assert (err.transport, err.nexthop, err.destination) == ("error", "5.1.1 mailbox unavailable",
                                                             None)


def test_comments_blank_and_continuation_lines() -> None:
    text = (
        "# a comment\n"
        "\n"
        "   # an indented comment\n"
        "a.example    lmtp:\n"
        "    unix:/run/a\n"  # continues the previous line
        "b.example\n"
        "\tlmtp:b-host\n"
        "c.example lmtp:c-host  # not a comment: Postfix has none after data\n"
    )
    lines = list(read_map_lines(text, "t"))
    assert [(n, k) for n, k, _ in lines] == [(4, "a.example"), (6, "b.example"), (8, "c.example")]
    assert lines[0][2] == "lmtp: unix:/run/a"
    tmap = TransportMap.parse(text.replace("c.example lmtp:c-host  # not a comment: Postfix "
                                           "has none after data\n", ""), "t")
    assert tmap.lookup("x@b.example")[1].nexthop == "b-host"  # type: ignore[index]
    # "lmtp: unix:/run/a" (joined with a space) is a next hop with white space: refused
    with pytest.raises(ConfigurationError, match="white space"):
        TransportMap.parse(text, "t")


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("a.example lmtp:x\nb.example\n", 2, "value is missing"),
        ("  lmtp:x\n", 1, "continuation line"),
        ("a.example lmtp:x\nA.EXAMPLE lmtp:y\n", 2, "duplicate key 'A.EXAMPLE' (first on line 1)"),
        ("a.example lmtpx\n", 1, "expected 'transport:nexthop'"),
        ("a.example lmtp:unix:\n", 1, "empty socket path"),
        ("a.example lmtp:host:99999\n", 1, "out of range"),
        ("a.example bad/name:host\n", 1, "bad transport name"),
        ("@a.example lmtp:x\n", 1, "write the domain alone"),
        ("bad..domain lmtp:x\n", 1, "bad domain key"),
        ("# c\n\nu@ lmtp:x\n", 3, "bad domain in key"),
    ],
)
def test_bad_transport_lines_name_file_line_problem(
    tmp_path: Path, text: str, line: int, problem: str
) -> None:
    path = tmp_path / "transport"
    path.write_text(text)
    with pytest.raises(ConfigurationError) as info:
        TransportMap.from_file(path)
    exc = info.value
    assert exc.source == str(path)
    assert exc.line == line
    assert problem in exc.problem
    assert str(exc).startswith(f"{path}:{line}: ")


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("list@example.org a@x, b@y\n", 1, "give exactly one address"),
        ("list@example.org a@x b@y\n", 1, "give exactly one address"),
        ("nodomain x@y\n", 1, "expected 'user@domain' or '@domain'"),
        ("u@example.org\n", 1, "value is missing"),
        ("u@example.org localonly\n", 1, "bad address"),
    ],
)
def test_bad_virtual_lines(tmp_path: Path, text: str, line: int, problem: str) -> None:
    path = tmp_path / "virtual"
    path.write_text(text)
    with pytest.raises(ConfigurationError) as info:
        VirtualMap.from_file(path)
    assert (info.value.source, info.value.line) == (str(path), line)
    assert problem in info.value.problem


def test_missing_and_non_utf8_map_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read map file") as info:
        TransportMap.from_file(tmp_path / "nope")
    assert info.value.source == str(tmp_path / "nope")
    bad = tmp_path / "latin1"
    bad.write_bytes(b"a.example lmtp:x\nb\xe9.example lmtp:y\n")
    with pytest.raises(ConfigurationError, match="UTF-8") as info:
        TransportMap.from_file(bad)
    assert info.value.line == 2


def test_virtual_domain_rewrite_recursion_and_loops() -> None:
    vmap = VirtualMap({
        "@old.example": "@new.example",  # keeps the local part
        "boss@new.example": "ceo@example.org",
        "info@example.org": "info@example.org",  # maps to itself: stops, no loop
        "ping@example.org": "pong@example.org",
        "pong@example.org": "ping@example.org",
    })
    assert vmap.rewrite("alice@old.example") == "alice@new.example"
    assert vmap.rewrite("boss@old.example") == "ceo@example.org"  # rewritten twice
    assert vmap.rewrite("info@example.org") == "info@example.org"
    with pytest.raises(ValueError, match="loop"):
        vmap.rewrite("ping@example.org")
    vmap = VirtualMap({"u@x.example": "v@y.example"})
    assert vmap.rewrite("u+ext@x.example", "+") == "v@y.example"
