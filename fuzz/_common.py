"""Shared by the fuzz harnesses: both implementations, and byte-splitting helpers.

The harnesses are plain functions ``check(data: bytes) -> None`` that raise
``AssertionError`` when an oracle fails; atheris drives them in the long runs
(``python fuzz/fuzz_X.py``) and hypothesis in CI (``tests/test_fuzz_smoke.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

__all__ = ["CONTENT", "ENGINES", "chunks", "header", "require_both", "run_atheris", "splits"]

# Run from a checkout: make the package importable without installing it.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def _under_atheris() -> bool:
    """True when a harness runs as the fuzzer's main program (not under pytest)."""
    if not Path(sys.argv[0]).name.startswith("fuzz_"):
        return False
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


if _under_atheris():
    import atheris

    # Coverage feedback for lmtpfast's Python code only (instrumenting every
    # loaded module costs a long start-up). The compiled twins run without
    # feedback: that needs clang's -fsanitize=fuzzer, and gcc is what we have.
    with atheris.instrument_imports(include=["lmtpfast"]):
        import lmtpfast._errors
        import lmtpfast.proto
        import lmtpfast.proto._pycontent
        import lmtpfast.proto._pyproto
        import lmtpfast.proto.content
        import lmtpfast.server._data  # noqa: F401

from lmtpfast.proto import IMPLEMENTATIONS as ENGINES  # noqa: E402
from lmtpfast.proto.content import IMPLEMENTATIONS as _CONTENT  # noqa: E402

CONTENT: dict[str, ModuleType] = {k: v for k, v in _CONTENT.items() if v is not None}


def require_both() -> None:
    """Parity needs the compiled twin: refuse to 'pass' a run that compared Python with itself."""
    if "c" not in ENGINES or "c" not in CONTENT:
        raise SystemExit("the compiled core is not built: python setup.py build_ext --inplace")


def splits(data: bytes, seed: bytes) -> list[bytes]:
    """``data`` cut into non-empty pieces at offsets drawn from ``seed`` (deterministic).

    Never an empty piece: to an engine ``receive_data(b"")`` means end of stream.
    """
    if not data:
        return []
    cuts = sorted({(b * 7919 + i * 104729) % (len(data) + 1) for i, b in enumerate(seed[:16])})
    pieces, last = [], 0
    for c in cuts:
        pieces.append(data[last:c])
        last = c
    pieces.append(data[last:])
    return [p for p in pieces if p]


def header(data: bytes, n: int) -> tuple[bytes, bytes]:
    """The first ``n`` bytes (control values for the harness) and the rest."""
    return data[:n].ljust(n, b"\0"), data[n:]


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def run_atheris(check: object) -> None:
    """``python fuzz/fuzz_X.py [libFuzzer flags]``: fuzz ``check`` with atheris."""
    import atheris

    require_both()
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
