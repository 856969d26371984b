"""The failure table: one row per local event, the same result through the agent, replay and send.

``docs/reliability.md`` carries the table; the first test holds it to the
module. Then every row is played: the event is provoked against the lmtpfast
sink (a fault plan, a missing capability, a closed socket...) and the result
is compared, through ``Agent.deliver``, through a replay of a spooled copy
and through ``lmtpfast send`` (where the event can happen there: routing
exists only in the agent and replay), with the table's code, enhanced code
and stage. Both engines, both loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lmtpfast import (
    FAILURES,
    Agent,
    ContentError,
    Credentials,
    Failure,
    LocalProtocolError,
    Map,
    MapError,
    RecipientResult,
    Timeouts,
)
from lmtpfast._failures import markdown_table
from lmtpfast.server import DEFAULT_EXTENSIONS, FaultPlan, Sink
from lmtpfast.spool import BadEnvelope, Observer, Outcome, Replayer, RetryPolicy, Spool

try:
    from .fault_matrix import _fill_backlog
except ImportError:  # run from tests/ itself
    from fault_matrix import _fill_backlog  # type: ignore[no-redef]

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
MSG = b"From: s@example.org\r\nSubject: failure table\r\n\r\nHello.\r\n"
SENDER = "s@example.org"
RCPT = "alice@example.org"
SCALE = 0.002  # every stage timeout x SCALE: 0.6 s for MAIL


def test_the_docs_carry_the_table() -> None:
    text = DOC.read_text()
    start = text.index("## Failure table")
    section = text[start:text.index("\n## ", start + 1)]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|")) + "\n"
    assert table == markdown_table(), "regenerate: python -c 'from lmtpfast._failures import " \
                                      "markdown_table; print(markdown_table())'"
    assert len(FAILURES) == len({f.event for f in FAILURES.values()})
    for f in FAILURES.values():
        assert f.enhanced[0] == str(f.code)[0], f  # the classes agree
        assert f.status in ("transient", "permanent")


# -- scenarios ---------------------------------------------------------------------------


@dataclass
class Scenario:
    """One way to provoke a row, and what each front end needs for it."""

    entry: Failure
    code: int
    enhanced: str
    stage: str
    sink: dict[str, Any] | None = field(default_factory=dict)  # None: no server
    agent: dict[str, Any] = field(default_factory=dict)
    send: list[str] | None = field(default_factory=list)  # None: send cannot meet it
    #: False: a spool never holds it (the spool refuses the address at enqueue).
    replay: bool = True
    recipients: tuple[str, ...] = (RCPT,)
    message: bytes = MSG
    sender: str = SENDER
    tcp: bool = False
    possibly_delivered: bool = False
    setup: Callable[[Path], Any] | None = None  # makes the destination itself


class FailingMap(Map):
    """A transport map whose back end is down (what a pgsql: map gives then)."""

    type = "down"

    async def lookup_many(self, keys: Any) -> dict[str, Any]:
        return {k: MapError(self.mapname, "connection refused") for k in keys}


def _backlog(tmp: Path) -> tuple[str, list[socket.socket]]:
    """A listener whose backlog is full: connecting to it times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    return f"127.0.0.1:{port}", [listener, *_fill_backlog(port)]


def _plan(*specs: str, advertise: tuple[str, ...] = ()) -> FaultPlan:
    return FaultPlan.parse(list(specs), advertise=advertise)


def _without(*names: str) -> tuple[str, ...]:
    return tuple(e for e in DEFAULT_EXTENSIONS if e not in names)


F = FAILURES
EIGHT_BIT_HEADER = "Subject: Grüße\r\n\r\nbody\r\n".encode()
SCENARIOS: dict[str, Scenario] = {
    "connect-failed": Scenario(F["connect-failed"], 451, "4.4.1", "connect", sink=None),
    "connect-timeout": Scenario(F["connect-timeout"], 451, "4.4.1", "connect", sink=None,
                                setup=_backlog),
    "greeting-refused": Scenario(F["greeting-refused"], 454, "4.3.2", "greeting",
                                 sink={"faults": _plan("greeting=554 5.3.2 No service")}),
    "greeting-refused-strict": Scenario(
        F["greeting-refused"], 554, "5.3.2", "greeting",
        sink={"faults": _plan("greeting=554 5.3.2 No service")},
        agent={"skip_5xx_greeting": False}, send=None),
    "lhlo-refused": Scenario(F["lhlo-refused"], 550, "5.5.0", "lhlo",
                             sink={"faults": _plan("lhlo=550 5.5.0 Go away")}),
    "tls-unavailable": Scenario(F["tls-unavailable"], 454, "4.7.5", "starttls",
                                agent={"tls": "encrypt"}, send=["--tls", "encrypt"]),
    "auth-refused": Scenario(F["auth-refused"], 454, "4.7.0", "auth",
                             sink={"faults": _plan(advertise=("AUTH PLAIN",))},
                             agent={"sasl_credentials": Credentials("u", "secret")},
                             send=["--sasl-user", "u"]),
    "auth-failed": Scenario(F["auth-failed"], 454, "4.7.0", "auth", tcp=True,
                            sink={"faults": _plan(advertise=("AUTH PLAIN",))},
                            agent={"sasl_credentials": Credentials("u", "secret")},
                            send=["--sasl-user", "u"]),
    # Over DATA: with BDAT the content leaves with MAIL, so it would be "possibly delivered".
    "lost-connection": Scenario(F["lost-connection"], 451, "4.4.2", "mail",
                                sink={"faults": _plan("mail=disconnect"),
                                      "extensions": _without("CHUNKING")}),
    "lost-after-dot": Scenario(F["lost-after-dot"], 451, "4.4.2", "final",
                               sink={"faults": _plan("dot=disconnect")},
                               possibly_delivered=True),
    "timeout": Scenario(F["timeout"], 451, "4.4.2", "mail",
                        sink={"faults": _plan("mail=stall"), "extensions": _without("CHUNKING")}),
    "protocol-error": Scenario(F["protocol-error"], 451, "4.5.0", "mail",
                               sink={"faults": _plan("mail=garbage"),
                                     "extensions": _without("CHUNKING")}),
    "bad-content": Scenario(F["bad-content"], 554, "5.6.0", "local", message=b"a\0b\r\n"),
    "bad-sender": Scenario(F["bad-sender"], 553, "5.1.7", "local", sender="a\u2028b@x.org",
                           replay=False),
    "bad-recipient": Scenario(F["bad-recipient"], 501, "5.1.3", "local",
                              recipients=("b\u2028@example.org",), replay=False),
    "no-route": Scenario(F["no-route"], 451, "4.4.4", "route", send=None,
                         agent={"routing": {"transport_map": {"other.org": "lmtp:"}}}),
    "no-route-bounce": Scenario(F["no-route-bounce"], 554, "5.4.4", "route", send=None,
                                agent={"routing": {"transport_map": {"other.org": "lmtp:"},
                                                   "no_route": "bounce"}}),
    "no-destination": Scenario(F["no-destination"], 554, "5.4.4", "route", send=None,
                               recipients=("postmaster",),
                               agent={"routing": {"transport_map": {"*": "bare:"},
                                                  "transports": {"bare": {}}}}),
    "virtual-loop": Scenario(F["virtual-loop"], 554, "5.4.6", "route", send=None,
                             agent={"routing": {"default": "lmtp:", "virtual_map": {
                                 RCPT: "b@example.org", "b@example.org": RCPT}}}),
    "map-failure": Scenario(F["map-failure"], 451, "4.3.0", "route", send=None,
                            agent={"routing": {"default": "lmtp:",
                                               "transport_map": FailingMap("db")}}),
    "unknown-recipient": Scenario(F["unknown-recipient"], 550, "5.1.1", "route", send=None,
                                  agent={"routing": {"default": "lmtp:", "recipient_map":
                                                     "inline:{someone@example.org=ok}"}}),
    "error-transport": Scenario(F["error-transport"], 550, "5.0.0", "route", send=None,
                                agent={"routing": {"transport_map": {"*": "error:gone"}}}),
    "retry-transport": Scenario(F["retry-transport"], 450, "4.0.0", "route", send=None,
                                agent={"routing": {"transport_map": {"*": "retry:later"}}}),
    "size-limit": Scenario(F["size-limit"], 552, "5.3.4", "local", sink={"max_size": 20}),
    "smtputf8-missing": Scenario(F["smtputf8-missing"], 553, "5.6.7", "local",
                                 recipients=("jörg@example.org",),
                                 sink={"extensions": _without("SMTPUTF8")}),
    "8bitmime-missing": Scenario(F["8bitmime-missing"], 554, "5.6.3", "local",
                                 message=EIGHT_BIT_HEADER,
                                 sink={"extensions": _without("8BITMIME")}),
}
# Rows no front end above the agent can provoke on demand, with where they are tested.
ELSEWHERE = {
    "shutdown": "test_shutdown_while_waiting_for_a_connection",
    "destination-dead": "tests/test_shaping.py (a refusing destination, a back end stopped)",
    "local-error": "test_local_error_in_replay",
    "too-big": "tests/test_cli_input.py (send --max-size)",
}


def test_every_row_is_played() -> None:
    played = {s.entry.event for s in SCENARIOS.values()} | set(ELSEWHERE)
    assert played == set(FAILURES), sorted(set(FAILURES) ^ played)


# -- the three front ends --------------------------------------------------------------


class Recorder(Observer):
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def outcome(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


@contextlib.asynccontextmanager
async def server(sc: Scenario, tmp: Path) -> AsyncIterator[str]:
    if sc.setup is not None:
        dest, fillers = sc.setup(tmp)
        try:
            yield dest
        finally:
            for s in fillers:
                s.close()
        return
    if sc.sink is None:
        yield f"unix:{tmp}/nobody-listens"
        return
    listen = "127.0.0.1:0" if sc.tcp else f"unix:{tmp}/sink"
    async with Sink(listen, **sc.sink) as sink:
        yield sink.destinations[0]


def make_agent(sc: Scenario, dest: str, engine: str) -> Agent:
    opts = dict(sc.agent)
    routing = opts.pop("routing", None)
    timeouts = Timeouts.scaled(SCALE)
    if routing is None:
        return Agent.for_server(dest, timeouts=timeouts, connect_backoff=0, engine=engine,
                                **opts)
    routing = dict(routing)
    transports = {"lmtp": {"destination": dest}, **routing.pop("transports", {})}
    return Agent(transports=transports, engine=engine, **routing)


async def via_agent(sc: Scenario, dest: str, engine: str) -> list[RecipientResult]:
    async with make_agent(sc, dest, engine) as agent:
        return await agent.deliver(sc.message, sender=sc.sender, recipients=sc.recipients)


async def via_replay(sc: Scenario, dest: str, engine: str, tmp: Path) -> list[Outcome]:
    spool = Spool(tmp / "spool", create=True)
    ident = spool.enqueue(MSG, sc.sender if not sc.replay else SENDER, list(sc.recipients),
                          fsync=False)
    if sc.sender != SENDER or sc.message != MSG:
        # What a spool written by another tool may hold: the replay must cope.
        _rewrite_entry(spool, ident, sc.sender, sc.message)
    rec = Recorder()
    async with make_agent(sc, dest, engine) as agent:
        await Replayer(spool, agent, observer=rec, policy=RetryPolicy(min_backoff=0)).run()
    return rec.outcomes


def _rewrite_entry(spool: Spool, ident: str, sender: str, message: bytes) -> None:
    env_path = spool.path / "incoming" / ident
    data = json.loads(env_path.read_bytes())
    data["sender"] = sender
    env_path.write_text(json.dumps(data))
    msg_path = spool.path / "msg" / ident
    os.chmod(msg_path, 0o600)
    msg_path.write_bytes(message)


async def via_send(sc: Scenario, dest: str, tmp: Path) -> tuple[int, Any, str]:
    args = list(sc.send or [])
    if "--sasl-user" in args:
        pw = tmp / "password"
        pw.write_text("secret\n")
        pw.chmod(0o600)
        args += ["--sasl-password-file", str(pw)]
    argv = ["send", "--server", dest, "--from", sc.sender, "--timeout-scale", str(SCALE),
            "--json", *[a for r in sc.recipients for a in ("--rcpt", r)], *args, "-"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lmtpfast", *argv, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(sc.message), 60)
    assert b"Traceback" not in err, err.decode()
    assert proc.returncode is not None
    return proc.returncode, json.loads(out) if out.strip() else None, err.decode()


def _key(code: int, enhanced: str | None, stage: str) -> tuple[int, str | None, str]:
    return code, enhanced, stage


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_row(name: str, engine: str) -> None:
    sc = SCENARIOS[name]
    want = _key(sc.code, sc.enhanced, sc.stage)
    with tempfile.TemporaryDirectory(prefix="lmtpft-", dir="/tmp") as d:
        tmp = Path(d)
        async with server(sc, tmp) as dest:
            # The agent: a result, or (sender, content) the exception the table's code is for.
            if name == "bad-content":
                with pytest.raises(ContentError):
                    await via_agent(sc, dest, engine)
            elif name == "bad-sender":
                with pytest.raises(LocalProtocolError, match="bad sender address"):
                    await via_agent(sc, dest, engine)
            else:
                (r,) = await via_agent(sc, dest, engine)
                assert _key(r.code, r.enhanced, r.stage) == want, r
                assert r.status == ("transient" if sc.code < 500 else "permanent"), r
                assert r.possibly_delivered == sc.possibly_delivered, r
                assert r.local or sc.entry.from_reply, r
            # Replay of the same message from a spool.
            if not sc.replay:
                # The spool checks addresses with the same rule: it never holds one.
                with pytest.raises(BadEnvelope):
                    await via_replay(sc, dest, engine, tmp)
                return
            (o,) = await via_replay(sc, dest, engine, tmp)
            assert _key(o.code, o.enhanced, o.stage) == want, o
            assert o.outcome == ("deferred" if sc.code < 500 else "failed"), o


def _send_status(enhanced: str) -> int:
    """``lmtpfast send``'s exit status for a recipient's enhanced code (its --help)."""
    if enhanced[0] != "5":
        return 75
    if enhanced.split(".")[1:] == ["1", "2"]:
        return 68
    return {"1": 67, "2": 73, "5": 76, "6": 65, "7": 77}.get(enhanced.split(".")[1], 69)


@pytest.mark.parametrize("name", sorted(n for n, sc in SCENARIOS.items() if sc.send is not None))
def test_row_through_send(name: str) -> None:
    # A subprocess of its own: once per row, not per engine and loop.
    sc = SCENARIOS[name]
    want = _key(sc.code, sc.enhanced, sc.stage)

    async def run() -> tuple[int, Any, str]:
        with tempfile.TemporaryDirectory(prefix="lmtpft-", dir="/tmp") as d:
            async with server(sc, Path(d)) as dest:
                return await via_send(sc, dest, Path(d))

    status, results, err = asyncio.run(asyncio.wait_for(run(), 90))
    if name in ("bad-sender", "bad-recipient"):
        assert status == 64 and "bad" in err, err  # a usage error: nothing is sent
    elif name == "bad-content":
        assert status == 65 and "NUL byte" in err, err
    else:
        (j,) = results
        assert _key(j["code"], j.get("enhanced"), j["stage"]) == want, j
        assert status == _send_status(sc.enhanced), (status, err)


# -- rows that need a particular moment ---------------------------------------------------


async def test_shutdown_while_waiting_for_a_connection(engine: str) -> None:
    async with Sink("127.0.0.1:0", faults=_plan("dot=stall")) as sink:
        agent = Agent.for_server(sink.destinations[0], max_connections=1, pipeline_depth=1,
                                 engine=engine)
        first = asyncio.ensure_future(agent.deliver(MSG, sender=SENDER, recipients=["a@x.org"]))
        waiting = asyncio.ensure_future(agent.deliver(MSG, sender=SENDER, recipients=["b@x.org"]))
        while not agent.pools() or not next(iter(agent.pools().values()))._waiters:
            await asyncio.sleep(0)  # until the second one waits for the only connection
        await agent.close(timeout=0.05)
        (cut,) = await first
        (shut,) = await waiting
    assert cut.transient and cut.possibly_delivered and cut.stage == "final"
    entry = FAILURES["shutdown"]
    assert (shut.code, shut.enhanced, shut.stage, shut.local) == (
        entry.code, entry.enhanced, entry.stage, True), shut


async def test_local_error_in_replay(tmp_path: Path, engine: str) -> None:
    """An envelope another tool wrote with a DSN value nobody can send: deferred, not bounced."""
    spool = Spool(tmp_path / "spool", create=True)
    ident = spool.enqueue(MSG, SENDER, [RCPT], fsync=False)
    env_path = spool.path / "incoming" / ident
    data = json.loads(env_path.read_bytes())
    data["recipients"][0]["notify"] = ["SOMETIMES"]
    env_path.write_text(json.dumps(data))
    rec = Recorder()
    async with Sink(f"unix:{tmp_path}/sink") as sink, \
            Agent.for_server(sink.destinations[0], engine=engine) as agent:
        await Replayer(spool, agent, observer=rec, policy=RetryPolicy(min_backoff=0)).run()
        assert sink.stats.transactions == 0
    (o,) = rec.outcomes
    entry = FAILURES["local-error"]
    assert (o.outcome, o.code, o.enhanced, o.stage) == (
        "deferred", entry.code, entry.enhanced, entry.stage), o
