"""The fault matrix of docs/reliability.md, one test per row, on both engines and both loops.

The rows are parsed from the document (``tests/fault_matrix.py``), so the
table and the tests cannot drift apart. A row with a "known bug" is a strict
xfail: when the bug is fixed the test starts passing and fails as XPASS,
telling whoever fixed it to clear the row's bug column.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile

import pytest

from lmtpfast import Timeouts, connect
from lmtpfast.server import FaultPlan, Sink

try:  # tests/ may or may not be a package
    from .fault_matrix import DOC, LIMIT, Case, check, load_cases, run_case
except ImportError:
    from fault_matrix import DOC, LIMIT, Case, check, load_cases, run_case  # type: ignore[no-redef]

CASES = load_cases()

# Known bugs, by the label in the table's "known bug" column (docs/reliability.md
# lists them with a reproduction each).
BUGS: dict[str, str] = {}  # K1-K9 are fixed; a new one gets its label and reason here

# Only a guard against a hang (a stall costs one stage timeout, 0.5 s; no
# timing is asserted); a known hang is cut sooner so its xfail stays cheap.
CASE_LIMIT = 60.0
HANG_LIMIT = 4.0


def _param(case: Case) -> object:
    marks = []
    if case.bug:
        reason = BUGS.get(case.bug, case.bug)
        marks.append(pytest.mark.xfail(strict=True, reason=f"{case.bug}: {reason}"))
    return pytest.param(case, id=f"{case.id}-{case.stage}-{case.fault}".replace(" ", "_"),
                        marks=marks)


def test_table_is_complete() -> None:
    """Every stage has every fault the issue names (where it applies), every bug is known."""
    assert len(CASES) >= 80, DOC
    by_stage: dict[str, set[str]] = {}
    for c in CASES:
        by_stage.setdefault(c.stage.split()[0], set()).add(c.fault)
        assert not c.bug or c.bug in BUGS, f"{c.id}: unknown bug label {c.bug}"
    faults = {"disconnect", "421", "stall until timeout", "garbage reply", "oversized reply"}
    for stage in ("greeting", "lhlo", "starttls", "auth", "mail", "rcpt", "data", "final",
                  "between", "rset", "quit"):
        missing = faults - by_stage[stage]
        assert not missing, f"{stage}: no row for {sorted(missing)}"
    for stage in ("final", "between"):
        assert {"too many replies", "too few replies"} <= by_stage[stage]
    assert {"disconnect", "stall until timeout", "421", "reset"} <= by_stage["content"]
    for stage in ("bdat", "bdat content", "bdat final"):
        assert any(c.stage == stage for c in CASES), f"no BDAT row for {stage}"


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
async def test_fault_matrix(case: Case, engine: str) -> None:
    limit = HANG_LIMIT if case.bug in ("K4", "K9") else CASE_LIMIT
    out = await asyncio.wait_for(run_case(case, engine=engine), limit)
    problems = check(case, out)
    assert not problems, f"{case.id} ({case.injection}): " + "; ".join(problems)


# --- bugs found by the matrix that are not in the table ---------------------------


async def test_quit_is_bounded_by_its_timeout(engine: str) -> None:
    async with Sink("127.0.0.1:0", faults=FaultPlan.parse(["quit=stall"])) as sink:
        client = await connect(sink.destinations[0], timeouts=Timeouts(quit=LIMIT), engine=engine)
        (r,) = await client.send("a@example.org", ["b@example.org"], b"Subject: x\r\n\r\nx\r\n")
        assert r.delivered
        try:
            await asyncio.wait_for(client.quit(), 4 * LIMIT + 1)
        finally:
            client.abort()


async def test_sink_closes_stalled_connection_when_client_hangs_up() -> None:
    d = tempfile.mkdtemp(prefix="lmtpfm-", dir="/tmp")
    try:
        async with Sink(f"unix:{d}/s", faults=FaultPlan.parse(["greeting=stall"])) as sink:
            _, writer = await asyncio.open_unix_connection(f"{d}/s")
            for _ in range(100):
                if sink.stats.connections_current == 1:
                    break
                await asyncio.sleep(0.01)
            writer.close()
            for _ in range(200):
                if sink.stats.connections_current == 0:
                    break
                await asyncio.sleep(0.01)
            assert sink.stats.connections_current == 0
    finally:
        shutil.rmtree(d, ignore_errors=True)
