"""Content encoder benchmarks: compiled vs pure-Python, in GB/s of input.

Two ways to run (neither is part of the default test run, which only
collects ``tests/``):

* ``python bench/bench_content.py [--repeat N]``: prints a table of median
  GB/s per implementation and the compiled/Python ratio, and checks the
  targets (compiled >= 10x Python; compiled >= 1 GB/s on 10 MiB).
* ``python -m pytest bench/bench_content.py --noconftest``: pytest-benchmark
  suites for regression tracking (``--benchmark-autosave``,
  ``--benchmark-compare``).

The message is typical text: lines of about 76 characters, one in 40
starting with a dot, some 8-bit bytes; with LF line ends (what Python's
``email`` package writes by default, so every line end is rewritten) and
with CRLF line ends (already wire form, so only dots change).
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

if __package__ in (None, "") and __name__ == "__main__":
    # Script mode from a checkout: import the in-place build next to this folder.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmtpfast.proto.content import IMPLEMENTATIONS

MIB = 1024 * 1024
CHUNK = 64 * 1024  # a plausible transport write size for big messages

_WORDS = [
    *("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "message", "delivery"),
    *("mailbox", "server", "lmtp", "protocol", "recipient", "header", "body", "line"),
    *("content", "encoder", "naïve", "café"),
]


def make_message(size: int, line_end: bytes = b"\n", seed: int = 2033) -> bytes:
    """About ``size`` bytes of text lines (~76 chars, 1 in 40 dot-led), deterministic."""
    rng = random.Random(seed)
    lines = []
    total = 0
    while total < size:
        words: list[str] = []
        n = 0
        target = rng.randint(60, 76)
        while n < target:
            w = rng.choice(_WORDS)
            words.append(w)
            n += len(w) + 1
        line = " ".join(words).encode()
        if rng.random() < 1 / 40:
            line = b"." + line
        lines.append(line + line_end)
        total += len(lines[-1])
    return b"".join(lines)[:size]


CASES: dict[str, bytes] = {
    "10MiB-lf": make_message(10 * MIB, b"\n"),
    "10MiB-crlf": make_message(10 * MIB, b"\r\n"),
    "1KiB-lf": make_message(1024, b"\n"),
    "1KiB-crlf": make_message(1024, b"\r\n"),
}


def available() -> dict[str, ModuleType]:
    return {name: mod for name, mod in IMPLEMENTATIONS.items() if mod is not None}


def _encode_whole(impl: ModuleType, data: bytes) -> bytes:
    out: bytes = impl.encode_content(data)
    return out


def encode_chunked(impl: ModuleType, data: bytes) -> int:
    """Stream ``data`` through a ContentEncoder in CHUNK-sized memoryview slices."""
    enc = impl.ContentEncoder()
    view = memoryview(data)
    n = 0
    for i in range(0, len(data), CHUNK):
        n += len(enc.encode(view[i : i + CHUNK]))
    return n + len(enc.finish())


# --- pytest-benchmark ---

try:
    import pytest
except ImportError:  # script mode does not need pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.mark.parametrize("impl_name", ["python", "c"])
    @pytest.mark.parametrize("case", list(CASES))
    def test_encode_content(benchmark: Any, impl_name: str, case: str) -> None:
        impl = IMPLEMENTATIONS[impl_name]
        if impl is None:
            pytest.skip("compiled lmtpfast.proto._ccontent not built")
        data = CASES[case]
        benchmark.group = f"encode_content {case}"
        benchmark.extra_info["bytes"] = len(data)
        out = benchmark(impl.encode_content, data)
        assert len(out) >= len(data)

    @pytest.mark.parametrize("impl_name", ["python", "c"])
    def test_encode_chunked_10mib(benchmark: Any, impl_name: str) -> None:
        impl = IMPLEMENTATIONS[impl_name]
        if impl is None:
            pytest.skip("compiled lmtpfast.proto._ccontent not built")
        data = CASES["10MiB-lf"]
        benchmark.group = "ContentEncoder 10MiB-lf in 64KiB chunks"
        benchmark(encode_chunked, impl, data)


# --- script mode ---


def median_seconds(fn: Callable[[], object], repeat: int, min_time: float = 0.02) -> float:
    """Median wall time of one call; each sample loops enough calls to last ``min_time``."""
    fn()  # warm up caches and the allocator
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-9)
    loops = max(1, int(min_time / once))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        samples.append((time.perf_counter() - t0) / loops)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15, help="samples per measurement")
    args = parser.parse_args(argv)

    impls = available()
    print(f"implementations: {', '.join(impls)}   samples: {args.repeat} (median)")
    header = "".join(f"{name + ' GB/s':>14}" for name in impls)
    print(f"{'case':<28}{header}{'c/python':>10}")
    rows: dict[str, dict[str, float]] = {}
    work: list[tuple[str, bytes, Callable[[ModuleType, bytes], object]]] = [
        (f"encode_content {case}", data, _encode_whole) for case, data in CASES.items()
    ]
    work.append(("chunked 64KiB 10MiB-lf", CASES["10MiB-lf"], encode_chunked))
    for label, data, call in work:
        speeds = {}
        for name, mod in impls.items():
            secs = median_seconds(functools.partial(call, mod, data), args.repeat)
            speeds[name] = len(data) / secs / 1e9
        rows[label] = speeds
        ratio = speeds["c"] / speeds["python"] if "c" in speeds else float("nan")
        print(f"{label:<28}" + "".join(f"{speeds[n]:>14.3f}" for n in impls) + f"{ratio:>9.1f}x")

    if "c" not in impls:
        print("compiled module not built: targets not checked")
        return 1
    big = [r for label, r in rows.items() if "10MiB" in label]
    ok_speed = all(r["c"] >= 1.0 for r in big)
    ok_ratio = all(r["c"] >= 10 * r["python"] for r in rows.values())
    print(f"target compiled >= 1 GB/s on 10 MiB: {'met' if ok_speed else 'NOT met'}")
    print(f"target compiled >= 10x python:       {'met' if ok_ratio else 'NOT met (see table)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
