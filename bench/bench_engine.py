"""Microbenchmarks of the sans-IO engine: compiled (``c``) against pure Python.

Two ways to run it:

    pytest bench/bench_engine.py --noconftest # pytest-benchmark, for regressions
    python bench/bench_engine.py [--quick]    # a comparison table with ratios

What is measured:

  parse      100k one-line replies fed to ReplyParser in 64 KiB chunks
  parse-ml   the same bytes as 25k four-line replies
  txn-1      one full pipelined transaction with 1 recipient: start_transaction,
             data_to_send, the MAIL/RCPT/DATA replies, ReadyForData, end_data,
             the post-dot reply, TransactionDone (results built)
  txn-10     the same with 10 recipients
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

if __package__ in (None, "") and __name__ == "__main__":
    # Script mode from a checkout: import the in-place build next to this folder.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmtpfast import proto
from lmtpfast.proto import NEED_DATA, ReadyForData, TransactionDone

CHUNK = 64 * 1024
N_REPLIES = 100_000

ONE_LINE = b"".join(
    b"250 2.1.5 <user%06d@example.net> Recipient OK\r\n" % i for i in range(N_REPLIES)
)
MULTI_LINE = b"".join(
    b"250-2.0.0 <user%06d@example.net> part one\r\n"
    b"250-2.0.0 part two\r\n"
    b"250-2.0.0 part three\r\n"
    b"250 2.0.0 Saved\r\n" % i
    for i in range(N_REPLIES // 4)
)


def chunks(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


ONE_LINE_CHUNKS = chunks(ONE_LINE)
MULTI_LINE_CHUNKS = chunks(MULTI_LINE)


def parse(mod: ModuleType, pieces: list[bytes]) -> int:
    """Parse every reply in ``pieces``; return how many there were."""
    parser = mod.ReplyParser()
    feed = parser.feed
    next_reply = parser.next_reply
    n = 0
    for piece in pieces:
        feed(piece)
        while next_reply() is not None:
            n += 1
    return n


GREETING = b"220 lmtp.example LMTP ready\r\n"
CAPS = b"250-lmtp.example\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n"
CONTENT = b"Subject: hello\r\n\r\nbody\r\n"


def ready_connection(mod: ModuleType) -> Any:
    conn = mod.Connection("client.example")
    conn.lhlo()
    conn.receive_data(GREETING + CAPS)
    while conn.next_event() is not NEED_DATA:
        pass
    conn.data_to_send()
    assert conn.pipelining
    return conn


def transaction_cycle(mod: ModuleType, n_rcpts: int) -> Callable[[int], None]:
    """A function that runs ``count`` full transactions on one connection."""
    conn = ready_connection(mod)
    rcpts = [f"user{i}@example.net" for i in range(n_rcpts)]
    envelope_replies = (
        b"250 2.1.0 Sender OK\r\n" + b"250 2.1.5 Recipient OK\r\n" * n_rcpts + b"354 Go ahead\r\n"
    )
    final_replies = b"250 2.0.0 <x@example.net> Saved\r\n" * n_rcpts
    start = conn.start_transaction
    receive = conn.receive_data
    next_event = conn.next_event
    end_data = conn.end_data
    to_send = conn.data_to_send

    def run(count: int) -> None:
        for _ in range(count):
            txn = start("sender@example.org", rcpts)
            to_send()
            receive(envelope_replies)
            ev = next_event()
            assert type(ev) is ReadyForData
            end_data(txn)
            to_send()
            receive(final_replies)
            ev = next_event()
            assert type(ev) is TransactionDone
            assert next_event() is NEED_DATA

    return run


# --- pytest-benchmark ---------------------------------------------------------------

try:
    import pytest
except ImportError:  # script mode needs no pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    ENGINES = [name for name in ("python", "c") if name in proto.IMPLEMENTATIONS]

    @pytest.mark.parametrize("engine", ENGINES)
    def test_parse_one_line(benchmark: Any, engine: str) -> None:
        mod = proto.IMPLEMENTATIONS[engine]
        assert benchmark(parse, mod, ONE_LINE_CHUNKS) == N_REPLIES

    @pytest.mark.parametrize("engine", ENGINES)
    def test_parse_multi_line(benchmark: Any, engine: str) -> None:
        mod = proto.IMPLEMENTATIONS[engine]
        assert benchmark(parse, mod, MULTI_LINE_CHUNKS) == N_REPLIES // 4

    @pytest.mark.parametrize("n_rcpts", [1, 10])
    @pytest.mark.parametrize("engine", ENGINES)
    def test_transaction_cycle(benchmark: Any, engine: str, n_rcpts: int) -> None:
        run = transaction_cycle(proto.IMPLEMENTATIONS[engine], n_rcpts)
        benchmark(run, 1000)


# --- script mode ----------------------------------------------------------------------


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """The fastest of ``repeat`` runs, in seconds (the least disturbed one)."""
    times = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    args = ap.parse_args(argv)
    repeat = 3 if args.quick else 7
    txns = 2000 if args.quick else 10_000

    engines = [name for name in ("python", "c") if name in proto.IMPLEMENTATIONS]
    if "c" not in engines:
        print("note: the compiled engine is not built; showing pure Python only")

    cases: list[tuple[str, str, int, Callable[[ModuleType], Callable[[], object]]]] = [
        ("parse", "replies/s", N_REPLIES, lambda m: lambda: parse(m, ONE_LINE_CHUNKS)),
        ("parse-ml", "replies/s", N_REPLIES // 4, lambda m: lambda: parse(m, MULTI_LINE_CHUNKS)),
        ("txn-1", "txns/s", txns, lambda m: partial_run(m, 1, txns)),
        ("txn-10", "txns/s", txns, lambda m: partial_run(m, 10, txns)),
    ]
    print(f"python {sys.version.split()[0]}, engines: {', '.join(engines)}")
    header = f"{'case':<10} {'unit':<10}" + "".join(f"{e:>14}" for e in engines)
    header += f"{'c/python':>10}" if len(engines) == 2 else ""
    print(header)
    print("-" * len(header))
    for name, unit, count, make in cases:
        rates = {}
        for engine in engines:
            fn = make(proto.IMPLEMENTATIONS[engine])
            fn()  # warm up
            rates[engine] = count / best_of(fn, repeat)
        row = f"{name:<10} {unit:<10}" + "".join(f"{rates[e]:>14,.0f}" for e in engines)
        if len(engines) == 2:
            row += f"{rates['c'] / rates['python']:>9.1f}x"
        print(row)
    return 0


def partial_run(mod: ModuleType, n_rcpts: int, count: int) -> Callable[[], None]:
    run = transaction_cycle(mod, n_rcpts)
    return lambda: run(count)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
