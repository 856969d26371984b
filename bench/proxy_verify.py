"""What ``[proxy] verify_recipients`` costs: the proxy with and without it, same load.

One process: lmtpfast sinks as back ends, the proxy in front, an lmtpfast
client sending messages of R recipients spread over the back ends, one
message at a time per session (as Postfix's lmtp(8) does). Rounds alternate
verify off / on; for each the CPU time of the whole process per message
(client + proxy + sinks: the difference is the proxy's) and the wall time per
message are printed, with back-end connections opened and transactions (one
per back end per message either way), medians over the rounds.

    PYTHONPATH=. python3 bench/proxy_verify.py --messages 500 --rounds 3 --rcpts 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from lmtpfast import Agent, connect
from lmtpfast.server import Proxy, ProxySettings, Sink

MSG = b"From: a@example.org\r\nSubject: bench\r\n\r\n" + b"x" * 1000 + b"\r\n"


async def one_round(verify: bool, messages: int, rcpts: int, backends: int,
                    sessions: int) -> dict[str, float]:
    sinks = [Sink("127.0.0.1:0") for _ in range(backends)]
    for s in sinks:
        await s.start()
    routes = {f"b{i}.example": f"lmtp:{s.destinations[0]}" for i, s in enumerate(sinks)}
    proxy = Proxy(Agent(transport_map=routes), ProxySettings(verify_recipients=verify),
                  listen="127.0.0.1:0")
    await proxy.start()
    recipients = [f"u{j}@b{j % backends}.example" for j in range(rcpts)]
    per = messages // sessions

    async def client() -> None:
        async with await connect(proxy.destinations[0]) as c:
            for _ in range(per):
                results = await c.send("s@example.org", recipients, MSG)
                assert all(r.status == "delivered" for r in results), results

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(sessions)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    n = per * sessions
    stats = proxy.agent_stats
    out = {"cpu_us": cpu / n * 1e6, "wall_us": wall / n * 1e6,
           "opened": stats.connections_opened, "txn_per_msg": stats.transactions / n}
    await proxy.shutdown(5)
    for s in sinks:
        await s.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rcpts", type=int, default=10)
    ap.add_argument("--backends", type=int, default=4)
    ap.add_argument("--sessions", type=int, default=4)
    args = ap.parse_args()
    got: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for _ in range(args.rounds):
        for verify in (False, True):
            got[verify].append(asyncio.run(one_round(
                verify, args.messages, args.rcpts, args.backends, args.sessions)))
    print(f"load average {os.getloadavg()[0]:.1f}; {args.messages} messages x "
          f"{args.rcpts} rcpts over {args.backends} sinks, {args.sessions} sessions, "
          f"{args.rounds} rounds alternating (medians)")
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in got.items()}
    for v in (False, True):
        m = med[v]
        print(f"verify={'on ' if v else 'off'}: {m['cpu_us']:8.0f} us CPU/msg (whole process), "
              f"{m['wall_us']:8.0f} us wall/msg, {m['opened']:.0f} back-end connections, "
              f"{m['txn_per_msg']:.2f} back-end transactions/msg")
    print(f"ratio on/off: CPU {med[True]['cpu_us'] / med[False]['cpu_us']:.2f}x, "
          f"wall {med[True]['wall_us'] / med[False]['wall_us']:.2f}x")


if __name__ == "__main__":
    main()
