"""What operating costs per recipient: the delivery log line (per target) and the metrics.

    python bench/bench_ops.py [--lines N] [--runs R]

Writes N delivery lines (``DeliveryLog.delivery``, the call replay's observer
makes per recipient outcome) through each log target and format, and
counts N metric updates (``Metrics.delivery`` + ``observe``), in one process,
one after the other. Figures are CPU microseconds per line (process time, so
other load on the machine inflates them less than wall time would), medians of
R runs; ``file`` is the buffered handler ``--log-target FILE`` uses, ``file
(unbuffered)`` the ``logging.handlers.WatchedFileHandler`` it replaced (one
stat and one write per line), measured in the same run as the baseline.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmtpfast import Metrics
from lmtpfast.cli import _log


def _lines(log: _log.DeliveryLog, n: int) -> float:
    start = time.process_time()
    for i in range(n):
        log.delivery(f"4F2A{i:06x}", f"user{i}@example.com", "delivered", code=250,
                     enhanced="2.0.0", text=f"<user{i}@example.com> Saved",
                     relay="unix:/run/dovecot/lmtp", delay=0.12,
                     delays=(0.01, 0.02, 0.03, 0.06), attempts=1, stage="final")
    for h in log.logger.handlers:
        h.flush()
    return (time.process_time() - start) / n * 1e6


def _unbuffered(path: Path, fmt: str) -> _log.DeliveryLog:
    log = _log.open_log({"log_target": "none", "log_format": fmt}, "bench")
    handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
    handler.setFormatter(_log._JsonFormatter("bench") if fmt == "json"
                         else _log._PostfixFormatter("bench", with_prefix=True))
    log.logger.disabled = False
    log.logger.addHandler(handler)
    log._info = True
    return log


def _metrics(n: int) -> float:
    m = Metrics()
    start = time.process_time()
    for _ in range(n):
        m.delivery("unix:/run/dovecot/lmtp", "sent", "2.0.0", 250)
        m.observe("unix:/run/dovecot/lmtp", "delivery", 0.003)
    return (time.process_time() - start) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.runs):
            for fmt in ("postfix", "json"):
                for name in ("file (unbuffered)", "file"):
                    path = Path(tmp) / f"{fmt}-{name[:6]}.log"
                    path.unlink(missing_ok=True)
                    log = (_unbuffered(path, fmt) if name != "file" else
                           _log.open_log({"log_target": str(path), "log_format": fmt}, "bench"))
                    results.setdefault(f"{name} {fmt}", []).append(_lines(log, a.lines))
                    log.close()
                    lines = path.read_text().count("\n")
                    assert lines == a.lines, (name, fmt, lines)
            log = _log.open_log({"log_target": "none"}, "bench")
            results.setdefault("none", []).append(_lines(log, a.lines))
            results.setdefault("metrics update", []).append(_metrics(a.lines))
    base = {fmt: statistics.median(results[f"file (unbuffered) {fmt}"])
            for fmt in ("postfix", "json")}
    print(f"{a.lines} lines x {a.runs} runs; CPU us per line (median), ratio to unbuffered")
    for name, xs in results.items():
        med = statistics.median(xs)
        fmt = name.rpartition(" ")[2]
        ratio = f"  {med / base[fmt]:.2f}x" if fmt in base else ""
        print(f"  {name:28s} {med:8.2f}{ratio}")


if __name__ == "__main__":
    main()
