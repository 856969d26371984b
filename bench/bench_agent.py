"""What the agent layer (routing + pool) costs: deliveries/s through ``Agent.deliver``
against plain ``connect().send()`` on the same workload.

    python bench/bench_agent.py [--messages N] [--runs R] [--connections K]
                                [--concurrency C] [--size BYTES] [--loop uvloop|asyncio]
                                [--server lmtpfast|smtp-sink] [--policy] [--maps]

The server (``lmtpfast sink``, or Postfix's ``smtp-sink -L``) runs in a
subprocess on a unix socket, so it does not share the client's event loop.
Both sides of the comparison use K connections and C concurrent callers
(and BDAT, which the lmtpfast sink offers; ``--data`` hides it):

* ``plain``: K connections opened up front with ``lmtpfast.connect()``;
  caller j always sends on connection j mod K (``Client.send`` pipelines
  the callers that share a connection);
* ``agent``: ``Agent.for_server(dest, max_connections=K,
  pipeline_depth=ceil(C/K))``, so both sides have as many transactions in
  flight per connection; the callers call ``agent.deliver()`` and the pool
  hands out connections (warm-up: one delivery before the clock starts, the
  pool opens the rest as needed).

Each figure is the median of R runs; ``ratio`` is agent/plain throughput;
the CPU columns are the client process's CPU time per message (robust when
other processes compete for the cores, unlike throughput). ``--policy``
adds a table of pool pipelining settings (``pipeline_depth``) for choosing
the default. ``--maps`` adds the routing-map comparison: the same agent
workload routed by a text transport map and by a ``pgsql:`` transport map on
a private PostgreSQL (cache warm: one delivery per recipient before the
clock starts); ``ratio`` is pgsql/text. Every delivery is checked (all
recipients must get 250).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmtpfast import Agent, connect, loop_factory  # noqa: E402
from lmtpfast._testing.postfix import postfix_env, smtp_tool  # noqa: E402
from lmtpfast.proto import IMPLEMENTATION  # noqa: E402


class Server:
    """The LMTP server under test, in a subprocess."""

    def __init__(self, kind: str, workdir: Path, chunking: bool = True) -> None:
        self.path = workdir / "lmtp.sock"
        self.destination = f"unix:{self.path}"
        if kind == "lmtpfast":
            ready = workdir / "ready"
            cmd = [sys.executable, "-m", "lmtpfast", "sink", "--listen", self.destination,
                   "--ready-file", str(ready), "--quiet"]
            if not chunking:
                cmd += ["--hide", "CHUNKING"]
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            self._wait(lambda: ready.exists())
        else:
            sink = smtp_tool("smtp-sink")
            if sink is None:
                sys.exit("smtp-sink not found (scripts/install-test-deps.sh)")
            env = postfix_env()
            user = ["-u", "nobody"] if os.geteuid() == 0 else []
            os.chmod(workdir, 0o777)
            self.proc = subprocess.Popen([str(sink), "-L", *user, self.destination, "4096"],
                                         env=env)
            self._wait(lambda: self.path.exists())

    def _wait(self, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 15
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("the server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _message(size: int) -> bytes:
    head = b"From: bench@example.org\r\nTo: rcpt@example.org\r\nSubject: bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


# CPU seconds of this process (the client) during the last timed run: unlike
# wall-clock rates, robust when other processes compete for the cores.
_last_cpu = [0.0]


async def _drive(n: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> float:
    counter = iter(range(n))

    async def worker(j: int) -> None:
        for _ in counter:
            await one(j)

    cpu = time.process_time()
    start = time.perf_counter()
    await asyncio.gather(*(worker(j) for j in range(concurrency)))
    elapsed = time.perf_counter() - start
    _last_cpu[0] = time.process_time() - cpu
    return elapsed


async def run_plain(dest: str, args: argparse.Namespace, rcpts: list[str], msg: bytes) -> float:
    conns = [await connect(dest) for _ in range(args.connections)]
    await conns[0].send("bench@example.org", rcpts, msg)  # warm-up

    async def one(j: int) -> None:
        results = await conns[j % len(conns)].send("bench@example.org", rcpts, msg)
        if not all(r.code == 250 for r in results):
            raise SystemExit(f"plain: delivery failed: {results[0].line()}")

    elapsed = await _drive(args.messages, args.concurrency, one)
    for c in conns:
        await c.quit()
    return elapsed


async def run_agent(dest: str, args: argparse.Namespace, rcpts: list[str], msg: bytes,
                    depth: int) -> float:
    agent = Agent.for_server(dest, max_connections=args.connections, pipeline_depth=depth,
                             recipient_limit=max(50, len(rcpts)))
    await agent.deliver(msg, sender="bench@example.org", recipients=rcpts)  # warm-up

    async def one(j: int) -> None:
        results = await agent.deliver(msg, sender="bench@example.org", recipients=rcpts)
        if not all(r.code == 250 for r in results):
            raise SystemExit(f"agent: delivery failed: {results[0].line()}")

    elapsed = await _drive(args.messages, args.concurrency, one)
    peak = agent.stats.peak_connections
    await agent.close()
    if peak > args.connections:
        raise SystemExit(f"agent opened {peak} connections, limit {args.connections}")
    return elapsed


async def run_mapped(dest: str, args: argparse.Namespace, rcpts: list[str], msg: bytes,
                     depth: int, transport_map: str) -> float:
    from lmtpfast import PoolSettings, Transport

    transport = Transport(pool=PoolSettings(max_connections=args.connections,
                                            pipeline_depth=depth),
                          recipient_limit=max(50, len(rcpts)))
    agent = Agent(transports={"lmtp": transport}, transport_map=transport_map)
    await agent.deliver(msg, sender="bench@example.org", recipients=rcpts)  # warm-up + cache

    async def one(j: int) -> None:
        results = await agent.deliver(msg, sender="bench@example.org", recipients=rcpts)
        if not all(r.code == 250 for r in results):
            raise SystemExit(f"agent ({transport_map}): delivery failed: {results[0].line()}")

    elapsed = await _drive(args.messages, args.concurrency, one)
    await agent.close()
    return elapsed


def maps_table(server: Server, args: argparse.Namespace, msg: bytes, depth: int,
               workdir: Path) -> None:
    from lmtpfast._testing.postgres import TempPostgres

    text = workdir / "transport"
    text.write_text(f"example.org lmtp:{server.destination}\n")
    with TempPostgres() as pg:
        pg.create_user("bench", "bench-pw")
        pg.create_database("maps", owner="bench")
        pg.psql("CREATE TABLE transport (k text PRIMARY KEY, v text); "
                f"INSERT INTO transport VALUES ('example.org', 'lmtp:{server.destination}'); "
                "ALTER TABLE transport OWNER TO bench;", database="maps")
        cf = workdir / "transport.cf"
        cf.write_text(f"hosts = inet:127.0.0.1:{pg.port}\nuser = bench\npassword = bench-pw\n"
                      "dbname = maps\nquery = SELECT v FROM transport WHERE k='%s'\n")
        print("\nrouting maps: text transport map vs pgsql: transport map (cache warm), "
              "msg/s")
        print(f"{'recipients':>10} {'text map':>10} {'pgsql map':>10} {'ratio':>6} "
              f"{'text CPU us':>12} {'pgsql CPU us':>13}")
        for nrcpt in args.recipients:
            rcpts = [f"user{i}@example.org" for i in range(nrcpt)]
            t, p, tc, pc = [], [], [], []
            for _ in range(args.runs):  # interleaved, so load changes hit both alike
                t.append(args.messages / _run(run_mapped(server.destination, args, rcpts, msg,
                                                         depth, str(text)), args.loop))
                tc.append(_last_cpu[0] / args.messages * 1e6)
                p.append(args.messages / _run(run_mapped(server.destination, args, rcpts, msg,
                                                         depth, f"pgsql:{cf}"), args.loop))
                pc.append(_last_cpu[0] / args.messages * 1e6)
            mt, mp = statistics.median(t), statistics.median(p)
            print(f"{nrcpt:>10} {mt:>10,.0f} {mp:>10,.0f} {mp / mt:>6.2f} "
                  f"{statistics.median(tc):>12.1f} {statistics.median(pc):>13.1f}")


def _run(coro: Awaitable[float], loop: str) -> float:
    factory = loop_factory() if loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--connections", type=int, default=20, help="K (the pool's max_connections)")
    p.add_argument("--concurrency", type=int, default=200, help="C concurrent callers")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--recipients", type=int, nargs="+", default=[1, 10])
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--server", choices=("lmtpfast", "smtp-sink"), default="lmtpfast")
    p.add_argument("--policy", action="store_true", help="also compare pipeline_depth settings")
    p.add_argument("--maps", action="store_true",
                   help="only the routing-map table: text map vs pgsql: map (local PostgreSQL)")
    p.add_argument("--data", action="store_true",
                   help="make the lmtpfast sink hide CHUNKING, so DATA is used instead of BDAT")
    args = p.parse_args()
    msg = _message(args.size)
    workdir = Path(tempfile.mkdtemp(prefix="lmtpfast-bench-agent-"))
    server = Server(args.server, workdir, not args.data)
    try:
        chunk = "BDAT" if not args.data and args.server == "lmtpfast" else "DATA"
        print(f"server {args.server} ({chunk}), loop {args.loop}, engine {IMPLEMENTATION}, "
              f"{args.messages} messages of {len(msg)} bytes, {args.connections} connections, "
              f"{args.concurrency} concurrent callers, median of {args.runs} runs\n")
        # As many transactions in flight per connection as plain has, so the
        # difference is the agent layer, not the pipelining depth.
        depth = max(1, -(-args.concurrency // args.connections))
        print(f"agent: pipeline_depth {depth} (plain has {depth} callers per connection)\n")
        if args.maps:
            maps_table(server, args, msg, depth, workdir)
            return
        print(f"{'recipients':>10} {'plain msg/s':>12} {'agent msg/s':>12} "
              f"{'agent rcpt/s':>13} {'ratio':>6} {'plain CPU us/msg':>17} "
              f"{'agent CPU us/msg':>17} {'CPU ratio':>9}")
        for nrcpt in args.recipients:
            rcpts = [f"user{i}@example.org" for i in range(nrcpt)]
            plain, agent, plain_cpu, agent_cpu = [], [], [], []
            for _ in range(args.runs):
                plain.append(args.messages / _run(run_plain(server.destination, args, rcpts, msg),
                                                  args.loop))
                plain_cpu.append(_last_cpu[0] / args.messages * 1e6)
                agent.append(args.messages / _run(
                    run_agent(server.destination, args, rcpts, msg, depth), args.loop))
                agent_cpu.append(_last_cpu[0] / args.messages * 1e6)
            mp, ma = statistics.median(plain), statistics.median(agent)
            cp, ca = statistics.median(plain_cpu), statistics.median(agent_cpu)
            print(f"{nrcpt:>10} {mp:>12,.0f} {ma:>12,.0f} {ma * nrcpt:>13,.0f} {ma / mp:>6.2f} "
                  f"{cp:>17.1f} {ca:>17.1f} {ca / cp:>9.2f}")
        if args.policy:
            print(f"\npool policy ({args.recipients[0]} recipient(s)): msg/s by pipeline_depth "
                  "and max_connections")
            rcpts = [f"user{i}@example.org" for i in range(args.recipients[0])]
            depths = (1, 4, 16, 64)
            print(f"{'connections':>11} " + " ".join(f"{'depth ' + str(d):>9}" for d in depths))
            base = args.connections
            for k in (1, 4, base):
                args.connections = k
                row = []
                for d in depths:
                    row.append(statistics.median(
                        args.messages / _run(run_agent(server.destination, args, rcpts, msg, d),
                                             args.loop) for _ in range(args.runs)))
                print(f"{k:>11} " + " ".join(f"{v:>9,.0f}" for v in row))
            args.connections = base
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
