"""Run CPython's own ``Lib/test/test_smtplib.py`` with an LMTP client in place of smtplib's.

    python tests/cpython_smtplib.py --client compat --peers smtp --json out.json

The file is the running interpreter's (``test.test_smtplib``; pyenv and
python.org builds ship ``Lib/test``); nothing of it is copied here. Every
``smtplib.SMTP(...)`` in it, and both ``GeneralTests`` classes, get the client
under test: ``smtplib.LMTP`` itself (the baseline that decides which tests are
applicable) or ``lmtpfast.compat.LMTP``. ``--engine`` picks compat's engine.

``--peers`` says what the suite's servers speak:

``smtp``
    As CPython wrote them: SMTP servers (smtpd). They refuse LHLO, so an LMTP
    client falls back to HELO and talks SMTP, one reply after DATA.
``lmtp``
    The same servers taught LMTP: LHLO is answered as their EHLO, and after
    the final dot every reply they give is given once per accepted
    recipient (RFC 2033 4.2). This is where the tests of EHLO features, AUTH,
    SMTPUTF8 and 421 handling apply to an LMTP client.

Writes ``{test id: "pass" | "fail" | "error" | "skip"}`` as JSON (a test with
subtests passes only if all of them do) and exits 0 whatever the outcomes;
2 when the interpreter has no ``test.test_smtplib``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import smtplib
import sys
import unittest
import warnings
from typing import Any


def _teach_lmtp(smtpd: Any, module: Any) -> None:
    """Make the suite's smtpd-based servers speak LMTP (see ``--peers lmtp``)."""
    channel = smtpd.SMTPChannel
    channel.smtp_LHLO = channel.smtp_EHLO
    module.SimSMTPChannel.smtp_LHLO = module.SimSMTPChannel.smtp_EHLO
    original = channel.found_terminator

    def found_terminator(self: Any) -> None:
        if self.smtp_state != self.DATA:
            original(self)
            return
        owed = max(1, len(self.rcpttos))
        pushed: list[str] = []
        self.push = pushed.append  # collect what the end of DATA answers
        try:
            original(self)
        finally:
            del self.push
        for line in pushed:
            for _ in range(owed):
                self.push(line)

    channel.found_terminator = found_terminator


class _Outcomes(unittest.TextTestResult):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outcomes: dict[str, str] = {}

    def _set(self, test: Any, outcome: str) -> None:
        key = test.id()
        # A failed subtest fails its test, whatever the other subtests did.
        if self.outcomes.get(key) not in ("fail", "error"):
            self.outcomes[key] = outcome

    def addSuccess(self, test: Any) -> None:
        super().addSuccess(test)
        self._set(test, "pass")

    def addFailure(self, test: Any, err: Any) -> None:
        super().addFailure(test, err)
        self._set(test, "fail")

    def addError(self, test: Any, err: Any) -> None:
        super().addError(test, err)
        self._set(test, "error")

    def addSkip(self, test: Any, reason: str) -> None:
        super().addSkip(test, reason)
        self._set(test, "skip")

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            self.outcomes[test.id()] = "fail"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--client", choices=["smtplib", "compat"], required=True)
    ap.add_argument("--peers", choices=["smtp", "lmtp"], required=True)
    ap.add_argument("--engine", choices=["c", "python"], default=None)
    ap.add_argument("--json", required=True, help="write the outcomes here")
    ap.add_argument("--skip", action="append", default=[], metavar="CLASS.TEST",
                    help="do not run this test (reported as 'skip'), repeatable")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()

    if importlib.util.find_spec("test.test_smtplib") is None:
        print(f"{sys.executable} has no test.test_smtplib (Lib/test not installed)",
              file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # asyncore, smtpd
        from test import test_smtplib as suite_module

    client: Any
    if args.client == "smtplib":
        client = smtplib.LMTP
    else:
        from lmtpfast import compat

        if args.engine is None:
            client = compat.LMTP
        else:
            engine = args.engine

            class client(compat.LMTP):  # type: ignore[no-redef]
                def __init__(self, *a: Any, **kw: Any) -> None:
                    kw.setdefault("engine", engine)
                    super().__init__(*a, **kw)

    if args.peers == "lmtp":
        _teach_lmtp(suite_module.smtpd, suite_module)
    # The suite names smtplib.SMTP at call time, and binds each GeneralTests
    # client at import time.
    smtplib.SMTP = client  # type: ignore[misc]
    suite_module.SMTPGeneralTests.client = client
    suite_module.LMTPGeneralTests.client = client

    for name in args.skip:
        cls_name, _, test_name = name.partition(".")
        setattr(getattr(suite_module, cls_name), test_name,
                unittest.skip("skipped by --skip")(lambda self: None))
    tests = unittest.defaultTestLoader.loadTestsFromModule(suite_module)
    stream = sys.stderr if args.verbose else open(os.devnull, "w")  # noqa: SIM115
    runner = unittest.TextTestRunner(stream=stream, verbosity=2 if args.verbose else 0,
                                     resultclass=_Outcomes)
    result: Any = runner.run(tests)
    with open(args.json, "w") as out:
        json.dump(result.outcomes, out, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
