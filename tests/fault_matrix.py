"""The fault matrix: read from docs/reliability.md and run one case against the sink.

The table under "## Fault matrix" in ``docs/reliability.md`` is the
specification; :func:`load_cases` parses it (so the tests cannot drift from
the document) and :func:`run_case` plays one row:

1. a :class:`~lmtpfast.server.Sink` that stores in memory, with the row's
   fault plan, behind a :class:`~lmtpfast._testing.proxy.FaultProxy` when the
   row's fault is below the protocol;
2. an agent for that server with one connection and small timeouts;
3. one message to ``alice``, ``bob`` and ``carol`` (for the ``RSET`` row,
   a clean message first, so the faulty one reuses the connection); the
   three results are compared with the row, and with what the sink really
   stored: ``D`` must be stored, ``T``/``P`` must not, ``T?`` may be; with a
   ``behind`` outcome, a second message to the three is sent at the same
   time, pipelined behind the first on the same connection, and each of its
   results must be that outcome (and agree with what was stored);
4. no broken connection is kept, the server sees no leftover connection,
   and a second message to the three is delivered and stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtpfast import Agent, Credentials, RecipientResult, Timeouts
from lmtpfast._testing.proxy import FaultProxy, ProxyFault
from lmtpfast.server import DEFAULT_EXTENSIONS, FaultPlan, Sink

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
RECIPIENTS = ("alice@example.org", "bob@example.org", "carol@example.org")
SENDER = "sender@example.net"
LIMIT = 0.5  # every stage timeout, seconds

# The DATA path: the sink does not offer CHUNKING, so the client cannot use BDAT.
DATA_EXTENSIONS = tuple(e for e in DEFAULT_EXTENSIONS if e.upper() != "CHUNKING")

# Outcome codes used in the table.
OUTCOMES = {"D", "T", "P", "T?"}


def message(tag: str, size: str = "small") -> bytes:
    """A message whose middle holds a marker the proxy rows cut at.

    ``small`` is about 3 KiB (sent with its final dot in one write);
    ``large`` about 2 MiB (streamed under flow control).
    """
    lines = 40 if size == "small" else 30000
    body = "".join(f"line {i} of the body of {tag}\r\n" for i in range(lines))
    return (f"From: <{SENDER}>\r\nSubject: fault matrix {tag}\r\nMessage-ID: <{tag}@matrix>\r\n"
            f"\r\n{body}MIDDLE-OF-CONTENT\r\n{body}").encode()


@dataclass(frozen=True)
class Case:
    """One row of the fault matrix."""

    id: str
    stage: str
    fault: str
    injection: str
    size: str  # small | large (see message())
    next: str  # new | same: the connection the next delivery uses
    expected: tuple[tuple[str, str], ...]  # (outcome, stage) per recipient
    bug: str  # empty, or the reason the row is a known bug (the test is xfail)
    behind: str = ""  # empty, or the outcome of a message pipelined behind (D, T, P, T?)

    @property
    def extensions(self) -> tuple[str, ...]:
        """The BDAT rows (stage ``bdat ...``) keep CHUNKING; the others use DATA."""
        return tuple(DEFAULT_EXTENSIONS) if self.stage.startswith("bdat") else DATA_EXTENSIONS

    @property
    def kind(self) -> str:
        return self.injection.split(None, 1)[0]

    @property
    def spec(self) -> str:
        parts = self.injection.split(None, 1)
        return parts[1] if len(parts) > 1 else ""


def _cell(text: str) -> str:
    text = text.strip()
    if text.startswith("`") and text.endswith("`"):
        text = text[1:-1]
    return text


def _outcome(text: str, row: str) -> tuple[str, str]:
    m = re.fullmatch(r"(D|T\??|P)\s*/\s*([a-z]+)", _cell(text))
    if m is None:
        raise ValueError(f"row {row}: bad outcome {text!r} (want e.g. D/final, T?/final)")
    return m[1], m[2]


def _behind(text: str, row: str) -> str:
    text = _cell(text)
    if text and text not in OUTCOMES:
        raise ValueError(f"row {row}: bad behind outcome {text!r} (want D, T, P or T?)")
    return text


def load_cases(doc: Path = DOC) -> list[Case]:
    """The rows of the table under ``## Fault matrix``, in order."""
    lines = doc.read_text().splitlines()
    try:
        start = lines.index("## Fault matrix")
    except ValueError:
        raise ValueError(f"{doc}: no '## Fault matrix' section") from None
    cases: list[Case] = []
    header: list[str] | None = None
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if not line.startswith("|"):
            if cases:
                break
            continue
        # Split on pipes not inside backticks (injections may hold '|').
        cells = [c for c in re.split(r"\|(?=(?:[^`]*`[^`]*`)*[^`]*$)", line.strip())[1:-1]]
        if header is None:
            header = [c.strip().lower() for c in cells]
            continue
        if set(line) <= set("|-: "):
            continue
        row = dict(zip(header, cells, strict=True))
        rid = _cell(row["id"])
        cases.append(Case(
            id=rid,
            stage=_cell(row["stage"]),
            fault=_cell(row["fault"]),
            injection=_cell(row["injection"]),
            size=_cell(row.get("msg", "small")) or "small",
            next=_cell(row.get("next", "new")) or "new",
            expected=tuple(_outcome(row[n], rid) for n in ("alice", "bob", "carol")),
            bug=_cell(row.get("known bug", "")).strip("- "),
            behind=_behind(row.get("behind", ""), rid),
        ))
    ids = [c.id for c in cases]
    if len(ids) != len(set(ids)):
        raise ValueError(f"{doc}: duplicate row ids")
    return cases


# --- running one case ---------------------------------------------------------


#: The session set-up stages: short only in the rows that fault them, so that a
#: loaded machine's slow set-up (the greeting through the fault proxy) is not
#: taken for the fault a later stage's row injects.
SETUP_STAGES = ("connect", "greeting", "lhlo", "starttls", "auth")
SETUP_LIMIT = 10.0


def _timeouts(case: Case) -> Timeouts:
    faulted = case.stage.split()[0] if case.stage else ""
    limits = {name: LIMIT for name in (
        "mail", "rcpt", "data", "content", "final", "rset", "quit", "command")}
    limits.update({name: LIMIT if name == faulted else SETUP_LIMIT for name in SETUP_STAGES})
    return Timeouts(**limits)


@dataclass
class Outcome:
    """What one run of a case gave (for the assertions and for failure messages)."""

    faulty: list[RecipientResult]
    stored: list[str]
    behind: list[RecipientResult]
    stored_behind: list[str]
    after: list[RecipientResult]
    stored_after: list[str]
    leftover_client_connections: int
    reused: bool
    new_connection: bool
    fired: int
    elapsed: float
    settle: float

    def codes(self) -> list[tuple[str, str]]:
        return [(_code(r), r.stage) for r in self.faulty]


def _code(r: RecipientResult) -> str:
    if r.delivered:
        return "D"
    if r.permanent:
        return "P"
    return "T?" if r.possibly_delivered else "T"


def _stored(sink: Sink, tag: str) -> list[str]:
    marker = f"<{tag}@matrix>".encode()
    return [r for m in sink.messages if marker in m.content for r in m.recipients]


async def _settle(cond: Any, seconds: float = 30.0) -> bool:
    """Wait until ``cond()`` holds; ``seconds`` only guards against a hang."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not cond():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.01)
    return True


def _fill_backlog(port: int) -> list[socket.socket]:
    """Connections nobody accepts, so the listener's backlog is full and SYNs go unanswered."""
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError, OSError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    return fillers


async def run_case(case: Case, engine: str | None = None) -> Outcome:
    """Play ``case`` (see the module docstring); returns what happened."""
    loop = asyncio.get_running_loop()
    tmp = tempfile.mkdtemp(prefix="lmtpfm-", dir="/tmp")
    # The STARTTLS and AUTH rows: the sink offers what it does not do (it
    # answers 502); the client uses TLS level "may", so a 502 to STARTTLS means
    # plain text, and the proxy answers AUTH itself (235) on clean connections.
    advertise = {"starttls": ("STARTTLS",), "auth": ("AUTH PLAIN LOGIN",)}.get(case.stage, ())
    intercept = [(b"AUTH ", b"235 2.7.0 Authentication successful\r\n")] \
        if case.stage == "auth" else []
    specs = case.spec.split(" ; ") if case.kind == "sink" else []
    plan = FaultPlan.parse(specs, advertise=advertise)
    pool_kw: dict[str, Any] = {"max_connections": 1, "connect_backoff": 0,
                               "close_timeout": 5.0}
    if case.stage == "rset":
        pool_kw["probe"] = "rset"
    if case.stage == "quit":
        pool_kw["max_transactions"] = 1
    if case.stage == "starttls":
        pool_kw["tls"] = "may"
    if case.stage == "auth":
        pool_kw["sasl_credentials"] = Credentials("matrix", "secret")
    sink: Sink | None = None
    proxy: FaultProxy | None = None
    agent: Agent | None = None
    listener: socket.socket | None = None
    fillers: list[socket.socket] = []
    try:
        if case.kind == "connect" and case.spec == "refused":
            dest = f"unix:{tmp}/nobody-listens"
        elif case.kind == "connect" and case.spec == "timeout":
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            port = listener.getsockname()[1]
            fillers = _fill_backlog(port)
            dest = f"127.0.0.1:{port}"
        elif case.kind in ("sink", "proxy"):
            sink = Sink(f"unix:{tmp}/sink", collect=True, faults=plan,
                        extensions=case.extensions)
            await sink.start()
            # Always through the proxy: it also tells whether the client really
            # hung up (the sink keeps a stalled connection open regardless).
            # On a unix socket: small buffers, so a stalled reader blocks the
            # client's writes within a few hundred KiB.
            fault = ProxyFault.parse(case.spec) if case.kind == "proxy" else None
            proxy = FaultProxy(sink.destinations[0], fault=fault, listen=f"unix:{tmp}/proxy",
                               record=True, intercept=intercept)
            await proxy.start()
            dest = proxy.destination
        else:
            raise ValueError(f"row {case.id}: unknown injection {case.injection!r}")

        agent = Agent.for_server(dest, timeouts=_timeouts(case), engine=engine, **pool_kw)
        if case.stage == "rset":
            warm = await agent.deliver(message("warm"), sender=SENDER, recipients=RECIPIENTS)
            assert all(r.delivered for r in warm), warm
        t0 = loop.time()
        behind: list[RecipientResult] = []
        if case.behind:
            # Both at once on the one connection: the second is pipelined
            # behind the first (its commands leave with the first's content).
            faulty, behind = await asyncio.gather(
                agent.deliver(message("m1", case.size), sender=SENDER, recipients=RECIPIENTS),
                agent.deliver(message("m1b"), sender=SENDER, recipients=RECIPIENTS))
        else:
            faulty = await agent.deliver(message("m1", case.size), sender=SENDER,
                                         recipients=RECIPIENTS)
        elapsed = loop.time() - t0

        if sink is None:  # the connect rows: now let a server appear at that address
            if listener is not None:
                for s in fillers:
                    s.close()
                fillers = []
                listener.close()
                listener = None
            sink = Sink(dest, collect=True, extensions=case.extensions)
            await sink.start()

        (pool,) = agent.pools().values()

        def usable() -> int:
            return sum(c.client.usable for c in pool._holders.values())

        # A QUIT in the background ends, and every connection the client no
        # longer uses is closed on its side (the proxy sees the hang-up).
        t1 = loop.time()
        p = proxy
        await _settle(lambda: not pool._closing_tasks
                      and (p is None or p.stats.open == usable()))
        settle = loop.time() - t1
        leftover = p.stats.open - usable() if p is not None else 0
        # The fault fires on the first connection (for RSET: the one the warm-up used).
        mark = len(p.transcript(1, "up")) if p is not None else 0

        after = await agent.deliver(message("m2"), sender=SENDER, recipients=RECIPIENTS)
        # Which connection carried the next message?
        reused = p is not None and b"MAIL FROM" in p.transcript(1, "up")[mark:]
        new_connection = p is None or any(
            b"MAIL FROM" in p.transcript(n, "up") for n in range(2, p.stats.connections + 1))
        return Outcome(
            faulty=faulty, stored=_stored(sink, "m1"), behind=behind,
            stored_behind=_stored(sink, "m1b"), after=after,
            stored_after=_stored(sink, "m2"), leftover_client_connections=leftover,
            reused=reused, new_connection=new_connection,
            fired=(sink.stats.faults_fired if case.kind == "sink"
                   else p.stats.fired if p is not None else 1),
            elapsed=elapsed, settle=settle,
        )
    finally:
        if agent is not None:
            await agent.close(2.0)
        if proxy is not None:
            await proxy.stop()
        if sink is not None:
            await sink.stop()
        for s in fillers:
            s.close()
        if listener is not None:
            listener.close()
        shutil.rmtree(tmp, ignore_errors=True)


def check(case: Case, out: Outcome) -> list[str]:
    """Every way ``out`` differs from what ``case`` promises (empty: the row holds)."""
    problems = []
    got = out.codes()
    if got != list(case.expected):
        problems.append(f"outcomes {got} != expected {list(case.expected)}")
    if out.fired < 1:
        problems.append("the fault never fired")
    if case.behind:
        got_behind = [_code(r) for r in out.behind]
        if got_behind != [case.behind] * len(RECIPIENTS):
            problems.append(f"the message pipelined behind got {got_behind}, expected "
                            f"{case.behind} for each")
    for what, results, stored_list in (("", out.faulty, out.stored),
                                       (" (behind)", out.behind, out.stored_behind)):
        for r in results:
            code = _code(r)
            stored = r.address in stored_list
            if code == "D" and not stored:
                problems.append(f"{r.address}{what} reported delivered but the server did "
                                "not store it")
            if code in ("T", "P") and stored:
                problems.append(f"{r.address}{what} reported {r.status} (not possibly "
                                "delivered) but the server stored it: a retry would duplicate it")
    if out.leftover_client_connections:
        problems.append(f"{out.leftover_client_connections} connection(s) the client "
                        "neither uses nor closed")
    if case.next == "new" and out.reused:
        problems.append("the next transaction was sent on the connection that saw the fault")
    if case.next == "new" and not out.new_connection:
        problems.append("the next transaction did not go over a new connection")
    if case.next == "same" and (not out.reused or out.new_connection):
        problems.append("the next transaction did not reuse the connection, though the server "
                        "only refused (no fault)")
    if not all(r.delivered for r in out.after) or sorted(out.stored_after) != sorted(RECIPIENTS):
        problems.append(f"the next delivery failed: {[r.line() for r in out.after]}")
    return problems
