"""Instructions per message in ``lmtpfast proxy`` (valgrind's callgrind), the issue 14 load.

    python bench/proxy_instructions.py [--small 300] [--large 1500] [--keep DIR]

Four ``smtp-sink -L`` back ends over TCP, recipients spread over them as in
``bench/proxy_compare.py`` (3, 3, 2, 2), ``smtp-source -L -d -s 8 -r 10``
(1 KiB) as the client. The proxy (the CLI, uvloop, per-recipient log to a
file) runs under ``valgrind --tool=callgrind`` twice, with a small and a large
message count, and stops on SIGTERM (graceful: callgrind writes its counts);
the result is (instructions(large) - instructions(small)) / (large - small),
so start-up, imports and connection set-up cancel out. User-space
instructions of the proxy process only: the kernel (socket writes and reads)
and the peers are not counted. With ``--keep DIR`` the two callgrind files
stay there; ``callgrind_annotate --inclusive=yes`` of each, subtracted
function by function, says where the per-message instructions go
(``--functions N`` prints that difference).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from proxy_compare import SOURCE_ARGS, USERS, _spread  # noqa: E402

from lmtpfast._testing.lmtpproxy import TempProxy  # noqa: E402
from lmtpfast._testing.postfix import SmtpSink, run_smtp_source  # noqa: E402


class _GrindProxy(TempProxy):
    def __init__(self, *args: object, out: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.out = out

    def command(self) -> list[str]:
        cmd = super().command()
        at = cmd.index(sys.executable)
        return [*cmd[:at], "valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}",
                *cmd[at:]]


def one_run(n: int, out: str, extra: list[str]) -> int:
    sinks = [SmtpSink(tcp=True).start() for _ in range(4)]
    proxy = None
    try:
        spread = _spread(sinks)
        transport = "".join(f"{u}@example.com lmtp:{spread[u].destination}\n" for u in USERS)
        proxy = _GrindProxy('transport_map = "texthash:transport"\n'
                            "[defaults.pool]\nmax_connections = 2\n",
                            files={"transport": transport}, out=out, start_timeout=300,
                            extra_args=extra).start()
        r = run_smtp_source(proxy.destination, messages=n, sessions=8, recipients=10,
                            size=1024, extra_args=SOURCE_ARGS, timeout=3600)
        assert r.ok, r.output[-500:]
        status = proxy.stop(timeout=600)
        assert status == 0, f"proxy exit status {status}: {proxy.log_text()[-800:]}"
        found = re.findall(r"Collected : (\d+)", proxy.log_text())
        if not found:
            raise RuntimeError("valgrind printed no instruction count:\n"
                               + proxy.log_text()[-800:])
        return int(found[-1])
    finally:
        if proxy is not None:
            proxy.close()
        for s in sinks:
            s.close()


def functions(path: str) -> dict[str, int]:
    """Inclusive instructions per function (callgrind_annotate)."""
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
                          capture_output=True, text=True, check=True).stdout
    out: dict[str, int] = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(\S.*?)(?: \[.*\])?$", line)
        if m:
            out[m.group(2)] += int(m.group(1).replace(",", ""))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=300)
    ap.add_argument("--large", type=int, default=1500)
    ap.add_argument("--keep", metavar="DIR", help="keep the two callgrind files here")
    ap.add_argument("--functions", type=int, default=0, metavar="N",
                    help="print the N functions with the most instructions per message")
    ap.add_argument("proxy_args", nargs="*", help="extra lmtpfast proxy arguments (after --)")
    args = ap.parse_args()
    tmp = args.keep or tempfile.mkdtemp(prefix="proxy-grind-")
    os.makedirs(tmp, exist_ok=True)
    print(os.popen("uptime").read().strip(), flush=True)
    counts = {}
    for n in (args.small, args.large):
        counts[n] = one_run(n, f"{tmp}/callgrind.{n}", args.proxy_args)
        print(f"{n} messages: {counts[n]:,} instructions", flush=True)
    per = (counts[args.large] - counts[args.small]) / (args.large - args.small)
    print(f"instructions per message (10 recipients, 4 back ends): {per:,.0f}")
    if args.functions:
        small = functions(f"{tmp}/callgrind.{args.small}")
        large = functions(f"{tmp}/callgrind.{args.large}")
        diff = {f: (large.get(f, 0) - small.get(f, 0)) / (args.large - args.small)
                for f in large}
        for f, v in sorted(diff.items(), key=lambda kv: -kv[1])[:args.functions]:
            print(f"{v:12,.0f}  {100 * v / per:5.1f}%  {f}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
