"""Test set-up shared by every suite.

Every ``async def`` test runs twice: on asyncio's default loop and on uvloop
(the house rule from uvloop/httptools: one suite, both loops). Real-peer
fixtures (Dovecot, Postfix's smtp-sink) come from ``lmtpfast._testing``.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import lmtpfast

pytest_plugins = ["lmtpfast._testing.fixtures"]

# Child processes (``python -m lmtpfast ...``, the proxy and sink peers) run the
# tree under test, whatever is or is not installed in site-packages meanwhile.
_TREE = str(Path(lmtpfast.__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_TREE, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _TREE)])

LOOPS = ["asyncio", "uvloop"]


def _factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if kind == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if inspect.iscoroutinefunction(metafunc.function) and "loop_kind" not in metafunc.fixturenames:
        metafunc.fixturenames.append("loop_kind")
        metafunc.parametrize("loop_kind", LOOPS)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    func = pyfuncitem.obj
    if not inspect.iscoroutinefunction(func):
        return None
    kind = pyfuncitem.callspec.params.get("loop_kind", "asyncio")
    names = pyfuncitem._fixtureinfo.argnames
    kwargs: dict[str, Any] = {n: pyfuncitem.funcargs[n] for n in names}
    with asyncio.Runner(loop_factory=_factory(kind)) as runner:
        runner.run(asyncio.wait_for(func(**kwargs), timeout=120))
    return True


ENGINES = ["python", "c"]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """The core a test runs on: the pure-Python reference or the compiled one.

    Tests pass it on (``connect(..., engine=engine)``, ``Agent(engine=...)``,
    ``Pool(engine=...)``, ``Replayer`` through its agent); nothing is patched.
    A missing compiled core skips locally but fails under CI, where the build
    must have produced it.
    """
    import os

    from lmtpfast.proto import get_engine

    kind: str = request.param
    try:
        get_engine(kind)
    except ValueError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    return kind
