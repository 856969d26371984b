"""CPython's own ``test_smtplib`` against ``lmtpfast.compat.LMTP`` (issue 10, items 10-16).

``tests/cpython_smtplib.py`` runs the interpreter's ``Lib/test/test_smtplib.py``
with a client in place of ``smtplib.SMTP``/``smtplib.LMTP``, against the suite's
servers as CPython wrote them (SMTP) and taught LMTP (LHLO, one reply per
recipient after the dot). A test is *applicable* when ``smtplib.LMTP`` itself
passes it; the others are listed in :data:`EXCLUDED` with the reason, and
``docs/compat.md`` carries the same table and counts (checked here).

Every applicable test must pass with compat, on both engines. A missing
``test.test_smtplib`` fails under CI (pyenv Pythons ship ``Lib/test``).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from lmtpfast import compat
from lmtpfast._testing.fixtures import in_ci

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "cpython_smtplib.py"
DOC = ROOT / "docs" / "compat.md"

_SIGNATURE = ("calls `smtplib.SMTP(host, port, 'localhost', 3)`: the 4th positional argument is "
              "`timeout` for SMTP but `source_address` for LMTP (`smtplib.LMTP` fails it the "
              "same way); `test_compat.py::test_over_long_reply_line` is the LMTP version")
_LHLO_WORD = ("asserts that the refused command reads `ehlo hi\\nX-INJECTED`; an LMTP client "
              "says `lhlo` (same `ValueError`, nothing sent; "
              "`test_compat.py::test_newline_in_lhlo_name` checks it)")
_NEEDS_EHLO = ("the SMTP test server refuses LHLO, so an LMTP client falls back to HELO and sees "
               "no extensions; runs against the LMTP-taught servers instead")

#: Tests left out, per kind of test server, and why. Exactly the tests
#: smtplib.LMTP itself fails there (checked by the test below).
EXCLUDED: dict[str, dict[str, str]] = {
    "smtp": {
        "TooLongLineTests.testLineTooLong": _SIGNATURE,
        "DebuggingServerTests.test_issue43124_escape_localhostname": _LHLO_WORD,
        "DebuggingServerTests.testELHO": _NEEDS_EHLO,
        "DebuggingServerTests.test_issue43124_escape_options": (
            "after HELO `does_esmtp` is false and smtplib drops MAIL options, so no "
            "`ValueError`; runs against the LMTP-taught servers instead"),
        "SMTPSimTests.testEHLO": _NEEDS_EHLO,
        "SMTPSimTests.test_quit_resets_greeting": _NEEDS_EHLO,
        "SMTPSimTests.test_smtputf8_NotSupportedError_if_no_server_support": _NEEDS_EHLO,
        "SMTPSimTests.testAUTH_PLAIN": _NEEDS_EHLO,
        "SMTPSimTests.testAUTH_LOGIN": _NEEDS_EHLO,
        "SMTPSimTests.testAUTH_LOGIN_initial_response_ok": _NEEDS_EHLO,
        "SMTPSimTests.testAUTH_LOGIN_initial_response_notok": _NEEDS_EHLO,
        "SMTPSimTests.testAUTH_BUGGY": _NEEDS_EHLO,
        "SMTPSimTests.testAUTH_CRAM_MD5": _NEEDS_EHLO,
        "SMTPSimTests.testAUTH_multiple": _NEEDS_EHLO,
        "SMTPSimTests.test_auth_function": _NEEDS_EHLO,
        "SMTPAUTHInitialResponseSimTests.testAUTH_PLAIN_initial_response_login": _NEEDS_EHLO,
        "SMTPUTF8SimTests.test_test_server_supports_extensions": _NEEDS_EHLO,
        "SMTPUTF8SimTests.test_send_unicode_with_SMTPUTF8_via_sendmail": _NEEDS_EHLO,
        "SMTPUTF8SimTests.test_send_unicode_with_SMTPUTF8_via_low_level_API": _NEEDS_EHLO,
        "SMTPUTF8SimTests.test_send_message_uses_smtputf8_if_addrs_non_ascii": _NEEDS_EHLO,
    },
    "lmtp": {
        "TooLongLineTests.testLineTooLong": _SIGNATURE,
        "DebuggingServerTests.test_issue43124_escape_localhostname": _LHLO_WORD,
    },
}
#: Not run at all (each costs the suite's 15 s accept timeout); the reason is
#: structural and checked below without running it.
SKIPPED = ("TooLongLineTests.testLineTooLong",)
PREFIX = "test.test_smtplib."


def _runs() -> list[tuple[str, str, str | None]]:
    runs: list[tuple[str, str, str | None]] = [("smtplib", "smtp", None), ("smtplib", "lmtp", None)]
    from lmtpfast import proto

    engines = list(proto.IMPLEMENTATIONS)
    if in_ci() and "c" not in engines:
        pytest.fail("the compiled engine is not built")
    for engine in engines:
        runs += [("compat", "smtp", engine), ("compat", "lmtp", engine)]
    return runs


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, str | None],
                                                             dict[str, str]]:
    """Every run of the suite, side by side (they mostly wait on sockets)."""
    if importlib.util.find_spec("test.test_smtplib") is None:
        msg = (f"{sys.executable} has no test.test_smtplib (CPython's Lib/test is not "
               "installed): cannot run CPython's smtplib tests against compat")
        if in_ci():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    tmp = tmp_path_factory.mktemp("cpython-smtplib")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {}
    for run in _runs():
        client, peers, engine = run
        out = tmp / f"{client}-{peers}-{engine}.json"
        cmd = [sys.executable, str(RUNNER), "--client", client, "--peers", peers, "--json",
               str(out)]
        if engine is not None:
            cmd += ["--engine", engine]
        for name in SKIPPED:
            cmd += ["--skip", name]
        procs[run] = (subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT), out)
    results = {}
    for run, (proc, out) in procs.items():
        try:
            log, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
            pytest.fail(f"{run}: CPython's suite did not finish:\n{log.decode()[-3000:]}")
        assert proc.returncode == 0, f"{run}: exit {proc.returncode}:\n{log.decode()[-3000:]}"
        got = json.loads(out.read_text())
        results[run] = {k.removeprefix(PREFIX): v for k, v in got.items()}
    return results


@pytest.mark.parametrize("peers", ["smtp", "lmtp"])
def test_every_applicable_cpython_test_passes(outcomes: dict[tuple[str, str, str | None],
                                                             dict[str, str]],
                                              peers: str) -> None:
    baseline = outcomes[("smtplib", peers, None)]
    excluded = EXCLUDED[peers]
    # Applicability is smtplib.LMTP's own result: the table is exactly its failures.
    failing = {t for t, o in baseline.items() if o not in ("pass", "skip")}
    assert failing == set(excluded) - set(SKIPPED)
    assert {t for t, o in baseline.items() if o == "skip"} == set(SKIPPED)
    applicable = sorted(t for t in baseline if t not in excluded)
    assert all(baseline[t] == "pass" for t in applicable)
    for (client, run_peers, engine), got in outcomes.items():
        if client != "compat" or run_peers != peers:
            continue
        assert set(got) == set(baseline)
        broken = [t for t in applicable if got[t] != "pass"]
        assert not broken, f"compat ({engine} engine, {peers} peers) fails: {broken}"
    if sys.version_info[:2] == (3, 11):  # the figures docs/compat.md quotes (3.11.7)
        assert len(baseline) == 82
        assert len(applicable) == {"smtp": 62, "lmtp": 80}[peers]


def test_the_skipped_test_fails_smtplib_lmtp_by_signature() -> None:
    smtp = list(inspect.signature(smtplib.SMTP.__init__).parameters)
    lmtp = list(inspect.signature(smtplib.LMTP.__init__).parameters)
    assert (smtp[4], lmtp[4]) == ("timeout", "source_address")
    assert list(inspect.signature(compat.LMTP.__init__).parameters)[:6] == lmtp


def test_docs_carry_the_table() -> None:
    rows: dict[str, set[str]] = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 6 and cells[1].startswith("`") and "Tests." in cells[1]:
            marks = {"smtp": cells[2], "lmtp": cells[3]}
            assert set(marks.values()) <= {"excluded", "runs"}, line
            rows[cells[1].strip("`")] = {k for k, v in marks.items() if v == "excluded"}
    want: dict[str, set[str]] = {}
    for peers, table in EXCLUDED.items():
        for name in table:
            want.setdefault(name, set()).add(peers)
    assert rows == want
    text = DOC.read_text()
    assert "| SMTP | 62 of 82 | 62 | 20 |" in text and "| LMTP | 80 of 82 | 80 | 2 |" in text
