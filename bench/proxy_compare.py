"""lmtpfast proxy beside Dovecot's LMTP proxy, in front of the same back ends (issue 14).

    python bench/proxy_compare.py [--messages 20000] [--rounds 3] [--quick]

Four ``smtp-sink -L`` back ends over TCP; recipients ``u@example.com``,
``2u@...`` .. ``10u@...`` (what ``smtp-source -r 10`` sends) spread over them
round-robin (3, 3, 2, 2); 1 KiB messages. Per round, in turn (the order
rotates from round to round):

* **direct**: four ``smtp-source -L -d -s 2`` processes at once, each
  straight to its own back end with its share of the recipients: the same
  back-end work as behind a proxy, without one. Rate = messages / slowest.
* **lmtpfast**: ``smtp-source -L -d -s 8 -r 10`` -> ``lmtpfast proxy`` (the
  CLI, uvloop, per-recipient log to a file) -> the back ends.
* **lmtpfast-wN** (``--workers N``, default 2): the same through
  ``lmtpfast proxy --workers N`` (N processes, SO_REUSEPORT); its CPU is
  that of all its processes.
* **dovecot**: the same client -> Dovecot's proxy (``lmtp_proxy = yes``, a
  passdb answering ``proxy=y host= port=`` per user) -> the same back ends.

Also per round: the CPU the proxy used per message (for Dovecot: every
process of the instance, reaped workers included), back-end connections
opened and reused (lmtpfast: its counters), and the latency a proxy adds: a
pipelining probe client sends messages one at a time (10 recipients)
through each proxy, and straight to one back end with the largest share
(3 recipients, what the slowest of the four parallel back-end transactions
carries); the added latency is the difference of the percentiles.

Prints a table per round and the medians; ratios are within one run. The
machine is shared: run it when nothing else runs, and quote the
conditions (``uptime`` is printed).

``--faults N`` instead measures what a back end that dies mid-DATA does to
the other back ends' recipients, through each proxy: three ``smtp-sink -L``
back ends, one of them started with ``-q .`` (it hangs up after the final
dot without replying: it may have stored the message), N messages of 9
recipients (3 per back end) sent one after another by the lmtpfast client.
Counted per proxy: recipients of the healthy back ends that did not get a
success (a retry duplicates them: they were stored), recipients of the
failing back end reported delivered (falsely), and those deferred.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmtpfast._testing._procs import session_pids  # noqa: E402
from lmtpfast._testing.dovecot import TempDovecot  # noqa: E402
from lmtpfast._testing.lmtpproxy import TempProxy, dovecot_proxy_config  # noqa: E402
from lmtpfast._testing.postfix import SmtpSink, run_smtp_source  # noqa: E402

USERS = ["u"] + [f"{i}u" for i in range(2, 11)]
SOURCE_ARGS = ("-t", "u@example.com", "-f", "s@example.org")


def _spread(sinks: list[SmtpSink]) -> dict[str, SmtpSink]:
    return {u: sinks[i % len(sinks)] for i, u in enumerate(USERS)}


def _shares(sinks: list[SmtpSink]) -> list[int]:
    spread = _spread(sinks)
    return [sum(1 for u in USERS if spread[u] is s) for s in sinks]


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process tree's session: live processes plus reaped children."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for p in session_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15]) / tick
    return total


def run_direct(sinks: list[SmtpSink], n: int, size: int) -> dict[str, Any]:
    """Four smtp-source processes, each to its own back end with its share."""
    out: dict[int, Any] = {}

    def one(i: int, sink: SmtpSink, share: int) -> None:
        out[i] = run_smtp_source(sink.destination, messages=n, sessions=2, recipients=share,
                                 size=size, extra_args=SOURCE_ARGS, timeout=600)

    threads = [threading.Thread(target=one, args=(i, s, k))
               for i, (s, k) in enumerate(zip(sinks, _shares(sinks), strict=True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.ok for r in out.values()), [r.output[-300:] for r in out.values()]
    slowest = max(r.elapsed for r in out.values())
    return {"rate": n / slowest}


def run_through(dest: str, n: int, size: int, cpu: Any) -> dict[str, Any]:
    before = cpu()
    r = run_smtp_source(dest, messages=n, sessions=8, recipients=10, size=size,
                        extra_args=SOURCE_ARGS, timeout=900)
    used = cpu() - before
    assert r.ok, r.output[-500:]
    return {"rate": n / r.elapsed, "cpu_ms": used / n * 1000}


async def _probe(dest: str, rcpts: list[str], count: int, size: int) -> list[float]:
    """Per-message latency of a pipelining client: MAIL+RCPT*+DATA, 354, content, finals."""
    if dest.startswith("unix:"):
        reader, writer = await asyncio.open_unix_connection(dest[5:])
    else:
        host, _, port = dest.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
    await reader.readline()
    writer.write(b"LHLO probe\r\n")
    while not (await reader.readline()).startswith(b"250 "):
        pass
    head = (b"MAIL FROM:<s@example.org>\r\n" + b"".join(b"RCPT TO:<%s>\r\n" % r.encode()
                                                      for r in rcpts) + b"DATA\r\n")
    body = b"Subject: probe\r\n\r\n" + b"x" * size + b"\r\n.\r\n"
    out = []
    for _ in range(count):
        t = time.perf_counter()
        writer.write(head)
        for _ in range(len(rcpts) + 1):
            await reader.readline()
        line = await reader.readline()
        assert line.startswith(b"354"), line
        writer.write(body)
        for _ in rcpts:
            line = await reader.readline()
            assert line.startswith(b"250"), line
        out.append(time.perf_counter() - t)
    writer.write(b"QUIT\r\n")
    await reader.readline()
    writer.close()
    return out


def probe(dest: str, rcpts: list[str], count: int, size: int) -> list[float]:
    return asyncio.run(_probe(dest, rcpts, count, size))


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _fault_run(dest: str, healthy: list[str], failing: list[str], count: int,
                     size: int) -> dict[str, int]:
    from lmtpfast import LMTPError, Timeouts, connect

    # Short client timeouts: a proxy that never answers must not stall the run.
    limits = Timeouts(**{f: 10.0 for f in ("connect", "greeting", "lhlo", "mail", "rcpt",
                                           "data", "content", "final", "quit")})
    rcpts = [r for trio in zip(healthy[:3], failing, healthy[3:], strict=True) for r in trio]
    body = b"Subject: fault\r\n\r\n" + b"x" * size + b"\r\n"
    counts = {"messages": count, "healthy_failed": 0, "failing_delivered": 0,
              "failing_deferred": 0, "connections": 0, "no_reply": 0, "sent": 0}
    client = None
    refused = 0
    try:
        for _ in range(count):
            if client is None or not client.usable:
                if client is not None:
                    client.abort()
                    client = None
                try:
                    client = await connect(dest, timeouts=limits)
                except (LMTPError, OSError) as exc:
                    refused += 1
                    counts["no_connection"] = counts.get("no_connection", 0) + 1
                    if refused >= 3:
                        print(f"  {dest}: no session three times in a row ({exc}): stopped "
                              f"after {counts['sent']} messages", flush=True)
                        break
                    continue
                refused = 0
                counts["connections"] += 1
            counts["sent"] += 1
            results = await client.send("s@example.org", rcpts, body)
            # Replies the client made up: the proxy hung up or went silent.
            counts["no_reply"] += any(r.local for r in results)
            for r in results:
                if r.address in failing:
                    counts["failing_delivered" if r.delivered else "failing_deferred"] += 1
                elif not r.delivered:
                    counts["healthy_failed"] += 1
    finally:
        if client is not None:
            await client.quit()
    return counts


def faults(args: argparse.Namespace) -> None:
    """One back end hangs up after every final dot: what happens to the others' recipients."""
    print(os.popen("uptime").read().strip())
    good = [SmtpSink(tcp=True).start() for _ in range(2)]
    bad = SmtpSink("-q", ".", tcp=True).start()
    proxy = dovecot = None
    try:
        users = {f"h{i}": good[i % 2] for i in range(6)} | {f"f{i}": bad for i in range(3)}
        transport = "".join(f"{u}@example.com lmtp:{s.destination}\n" for u, s in users.items())
        proxy = TempProxy('transport_map = "texthash:transport"\n'
                          "[defaults.pool]\nconnect_backoff = 0\n",
                          files={"transport": transport}).start()
        dovecot = TempDovecot(users=())
        dovecot.extra_config = dovecot_proxy_config(
            {u: s.destination for u, s in users.items()}, dovecot.base / "proxy-passdb")
        dovecot.start()
        healthy = [f"{u}@example.com" for u in users if u.startswith("h")]
        failing = [f"{u}@example.com" for u in users if u.startswith("f")]
        print(f"{args.faults} messages, 9 recipients each (6 on two healthy back ends, 3 on "
              "one that hangs up after the dot):")
        print("| proxy | healthy recipients not given a success (duplicated on retry) | "
              "failing back end's reported delivered | deferred | messages without the "
              "proxy's replies (it hung up or went silent) | client connections |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, dest in (("lmtpfast", proxy.destination), ("dovecot", dovecot.destination_tcp)):
            c = asyncio.run(_fault_run(dest, healthy, failing, args.faults, args.size))
            print(f"| {name} | {c['healthy_failed']} of {6 * c['sent']} | "
                  f"{c['failing_delivered']} | {c['failing_deferred']} of {3 * c['sent']} | "
                  f"{c['no_reply']} | {c['connections']} |", flush=True)
        crashes = dovecot.log_text().count("killed with signal")
        print(f"Dovecot's log: {crashes} lmtp process(es) killed with a signal "
              "(its own crashes: the client connection goes with them)")
        print(os.popen("uptime").read().strip())
    finally:
        for p in (proxy, dovecot):
            if p is not None:
                p.close()
        for s in (*good, bad):
            s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--probe", type=int, default=1000, help="probe messages per proxy per round")
    ap.add_argument("--pool", type=int, default=2, help="lmtpfast: connections per back end")
    ap.add_argument("--workers", type=int, default=2, metavar="N",
                    help="also run lmtpfast proxy --workers N (0 or 1: not)")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also run lmtpfast proxy from this checkout (lmtpfast-before)")
    ap.add_argument("--no-dovecot", action="store_true")
    ap.add_argument("--quick", action="store_true", help="2,000 messages, 1 round, 200 probes")
    ap.add_argument("--faults", type=int, default=0, metavar="N",
                    help="instead: N messages with one back end hanging up after the dot")
    args = ap.parse_args()
    if args.faults:
        faults(args)
        return
    if args.quick:
        args.messages, args.rounds, args.probe = 2000, 1, 200
    n = args.messages
    print(os.popen("uptime").read().strip())
    sinks = [SmtpSink(tcp=True).start() for _ in range(4)]
    proxies: dict[str, TempProxy] = {}
    dovecot = None
    try:
        spread = _spread(sinks)
        transport = "".join(f"{u}@example.com lmtp:{spread[u].destination}\n" for u in USERS)
        proxy_config = ('transport_map = "texthash:transport"\n'
                        f"[defaults.pool]\nmax_connections = {args.pool}\n")
        proxy = TempProxy(proxy_config, files={"transport": transport}).start()
        proxies = {"lmtpfast": proxy}
        if args.baseline:  # another checkout (built in place): before/after in one run
            proxies["lmtpfast-before"] = TempProxy(
                proxy_config, files={"transport": transport},
                env={"PYTHONPATH": os.path.abspath(args.baseline)}).start()
        if args.workers > 1:
            proxies[f"lmtpfast-w{args.workers}"] = TempProxy(
                proxy_config, files={"transport": transport},
                extra_args=["--workers", str(args.workers)]).start()
        if not args.no_dovecot:
            dovecot = TempDovecot(users=())
            dovecot.extra_config = dovecot_proxy_config(
                {u: spread[u].destination for u in USERS}, dovecot.base / "proxy-passdb")
            dovecot.start()
        busiest = max(sinks, key=lambda s: _shares(sinks)[sinks.index(s)])
        direct_rcpts = [f"{u}@example.com" for u in USERS if spread[u] is busiest]
        all_rcpts = [f"{u}@example.com" for u in USERS]
        variants = ["direct", *proxies] + ([] if dovecot is None else ["dovecot"])
        rows: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        lat: dict[str, list[list[float]]] = {v: [] for v in variants}
        for rnd in range(args.rounds):
            order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
            for v in order:
                if v == "direct":
                    res = run_direct(sinks, n, args.size)
                    lat[v].append(probe(busiest.destination, direct_rcpts, args.probe,
                                        args.size))
                elif v in proxies:
                    proxy = proxies[v]
                    before = proxy.stats()["backends"]
                    res = run_through(proxy.destination, n, args.size, proxy.cpu_seconds)
                    after = proxy.stats()["backends"]
                    opened = after["connections_opened"] - before["connections_opened"]
                    txns = after["transactions"] - before["transactions"]
                    res["opened"] = opened
                    res["reuse"] = 1 - opened / txns if txns else 0.0
                    lat[v].append(probe(proxy.destination, all_rcpts, args.probe, args.size))
                else:
                    assert dovecot is not None and dovecot._proc is not None
                    pid = dovecot._proc.pid
                    res = run_through(dovecot.destination_tcp, n, args.size,
                                      lambda pid=pid: _tree_cpu(pid))
                    lat[v].append(probe(dovecot.destination_tcp, all_rcpts, args.probe,
                                        args.size))
                rows[v].append(res)
                extra = "".join(f" {k}={val:.4g}" for k, val in res.items() if k != "rate")
                print(f"round {rnd + 1} {v:9s} {res['rate']:8.0f} msg/s{extra}", flush=True)
        base = statistics.median(r["rate"] for r in rows["direct"])
        dlat = [x for ls in lat["direct"] for x in ls]
        print(f"\nmedians over {args.rounds} round(s), {n} messages each, "
              f"{args.size} B, 10 recipients over 4 back ends:")
        print("| path | msg/s | vs direct | CPU ms/msg | back-end conns opened | reuse | "
              "p50 ms | p99 ms | added p50 ms | added p99 ms |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for v in variants:
            rate = statistics.median(r["rate"] for r in rows[v])
            cpu = [r["cpu_ms"] for r in rows[v] if "cpu_ms" in r]
            opened = [r["opened"] for r in rows[v] if "opened" in r]
            reuse = [r["reuse"] for r in rows[v] if "reuse" in r]
            ls = [x for r in lat[v] for x in r]
            p50, p99 = pct(ls, 0.5) * 1000, pct(ls, 0.99) * 1000
            added = "" if v == "direct" else (
                f"{p50 - pct(dlat, 0.5) * 1000:.2f} | {p99 - pct(dlat, 0.99) * 1000:.2f}")
            print(f"| {v} | {rate:.0f} | {rate / base:.2f} | "
                  f"{statistics.median(cpu):.3f} | " if cpu else f"| {v} | {rate:.0f} | "
                  f"{rate / base:.2f} | - | ", end="")
            print(f"{statistics.median(opened):.0f} | {statistics.median(reuse):.4f} | "
                  if opened else "- | - | ", end="")
            print(f"{p50:.2f} | {p99:.2f} | {added or '- | -'} |")
        print(os.popen("uptime").read().strip())
    finally:
        for p in proxies.values():
            p.close()
        if dovecot is not None:
            dovecot.close()
        for s in sinks:
            s.close()
        subprocess.run(["true"], check=False)


if __name__ == "__main__":
    main()
