"""Affinity across a set of back ends (issue 14 item 6): consistent hashing of users.

A transport with ``destinations = [...]`` sends each user to one member by
rendezvous hashing: the same member every time and on every front end, a
fair share each, and a member leaving moves only its own users. A member
that is down defers its users (their mailboxes are there) unless the
transport says ``failover = true``.
"""

from __future__ import annotations

import collections

import pytest

from lmtpfast import Agent, ConfigurationError, DestinationSet, config_from_dict, parse_destination
from lmtpfast.server import Sink

MSG = b"Subject: affinity\r\n\r\nhello\r\n"
USERS = [f"user{i}@example.com" for i in range(3000)]


def _set(*names: str, failover: bool = False) -> DestinationSet:
    return DestinationSet.parse([f"{n}:24" for n in names], failover=failover)


def test_each_user_has_one_member_a_fair_share_and_leaving_moves_only_its_users() -> None:
    full = _set("imap1", "imap2", "imap3", "imap4")
    placed = {u: full.pick(u) for u in USERS}
    # Stable: the same answer every time (a stable hash, not Python's salted one).
    assert all(full.pick(u) == d for u, d in placed.items())
    share = collections.Counter(placed.values())
    assert len(share) == 4 and min(share.values()) > len(USERS) / 4 * 0.8
    # imap3 leaves: only its users move, and they spread over the others.
    smaller = _set("imap1", "imap2", "imap4")
    gone = parse_destination("imap3:24")
    for u, d in placed.items():
        new = smaller.pick(u)
        if d == gone:
            assert new != gone
        else:
            assert new == d
    # Ranking: the first member is the pick; the order is the failover order.
    for u in USERS[:50]:
        ranked = full.ranked(u)
        assert ranked[0] == placed[u] and sorted(map(str, ranked)) == sorted(map(str, full.members))
        if ranked[0] == gone:
            assert ranked[1] == smaller.pick(u)  # failing over = what removal would do
    with pytest.raises(ConfigurationError):
        _set("imap1", "imap1")


def test_routes_through_a_set_and_config_errors() -> None:
    cfg = config_from_dict({
        "default": "mbox:",
        "transports": {"mbox": {"destinations": ["imap1:24", "imap2:24", "[::1]:2424"]}}})
    agent = Agent(config=cfg)
    for u in USERS[:200]:
        r = agent.route(u)
        assert r.transport == "mbox" and r.alternatives == ()
        assert r.destination == cfg.transports["mbox"].targets.pick(u.lower())  # type: ignore[union-attr]
    with pytest.raises(ConfigurationError, match="not both"):
        config_from_dict({"transports": {"x": {"destination": "a:24", "destinations": ["b:24"]}},
                          "default": "x:"})
    with pytest.raises(ConfigurationError, match="destinations"):
        config_from_dict({"transports": {"x": {"destinations": ["a:24", "bad host:24"]}},
                          "default": "x:"})


async def test_the_proxy_sends_each_user_to_its_member_and_a_dead_member_defers() -> None:
    from lmtpfast import connect
    from lmtpfast.server import Proxy

    sinks = [Sink("127.0.0.1:0", collect=True) for _ in range(3)]
    for s in sinks:
        await s.start()
    try:
        members = [s.destinations[0] for s in sinks]
        cfg = {"default": "mbox:", "transports": {"mbox": {
            "destinations": members, "pool": {"connect_backoff": 0},
            "timeouts": {"connect": 2}}}}
        users = USERS[:30]
        expect = DestinationSet.parse(members)
        async with Proxy(cfg, listen="127.0.0.1:0") as p:
            async with await connect(p.destinations[0]) as c:
                results = await c.send("s@example.org", users, MSG)
            assert all(r.delivered for r in results)
            for sink, dest in zip(sinks, members, strict=True):
                got = [r for m in sink.messages for r in m.recipients]
                assert sorted(got) == sorted(u for u in users if str(expect.pick(u)) == dest)
                assert len(sink.messages) <= 1  # one transaction per member
            # One member dies: its users are deferred, never moved to another mailbox.
            dead = sinks[1]
            await dead.stop()
            async with await connect(p.destinations[0]) as c:
                results = await c.send("s@example.org", users, MSG)
            for u, r in zip(users, results, strict=True):
                if str(expect.pick(u)) == members[1]:
                    assert r.transient and r.code == 451
                else:
                    assert r.delivered
            assert sum(len(m.recipients) for s in (sinks[0], sinks[2])
                       for m in s.messages) == sum(1 for u in users
                                                   if str(expect.pick(u)) != members[1]) * 2
    finally:
        for s in sinks:
            await s.stop()


def test_an_address_extension_goes_with_its_user() -> None:
    cfg = config_from_dict({
        "default": "mbox:", "recipient_delimiter": "+",
        "transports": {"mbox": {"destinations": ["imap1:24", "imap2:24", "imap3:24"]}}})
    agent = Agent(config=cfg)
    for u in USERS[:200]:
        local, _, domain = u.partition("@")
        plain = agent.route(u).destination
        assert agent.route(f"{local}+list@{domain}").destination == plain
        assert agent.route(f"{local.upper()}+x@{domain}").destination == plain


async def test_failover_sends_a_dead_members_users_to_their_next_member_only() -> None:
    sinks = [Sink("127.0.0.1:0", collect=True) for _ in range(3)]
    for s in sinks:
        await s.start()
    try:
        members = [s.destinations[0] for s in sinks]
        full = DestinationSet.parse(members, failover=True)
        without = DestinationSet.parse([members[0], members[2]])
        users = USERS[:40]
        cfg = {"default": "mbox:", "transports": {"mbox": {
            "destinations": members, "failover": True, "pool": {"connect_backoff": 0},
            "timeouts": {"connect": 2}}}}
        await sinks[1].stop()  # members[1] is down from the start
        async with Agent.from_config(cfg) as agent:
            results = await agent.deliver(MSG, sender="s@example.org", recipients=users)
            assert all(r.delivered for r in results)
            for u, r in zip(users, results, strict=True):
                # Where its mailbox would be with the member removed from the set.
                assert r.destination == str(without.pick(u))
                if str(full.pick(u)) != members[1]:
                    assert r.destination == str(full.pick(u))  # the others' users stay
            got = sorted(a for s in (sinks[0], sinks[2]) for m in s.messages
                         for a in m.recipients)
            assert got == sorted(users)  # each stored once
            # One recipient alone takes the same path.
            moved = next(u for u in users if str(full.pick(u)) == members[1])
            [one] = await agent.deliver(MSG, sender="s@example.org", recipients=[moved])
            assert one.delivered and one.destination == str(without.pick(moved))
    finally:
        for s in sinks:
            await s.stop()
