"""The bare pipelined LMTP loop: the speed limit lmtpfast is measured against.

About sixty lines on uvloop: per connection, write MAIL + RCPT* + DATA, wait
for the 354, write the content and the dot, count the replies. No result
objects, no checks beyond reply counting: what is left is the cost of the
protocol itself. Run: ``python bench/bare_pipelined.py DEST MESSAGES CONNS RCPTS SIZE``.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time


class Bare(asyncio.Protocol):
    def __init__(self, n: int, rcpts: int, body: bytes, done: asyncio.Future[None]) -> None:
        self.left, self.rcpts, self.done = n, rcpts, done
        self.head = b"MAIL FROM:<bench@example.org>\r\n" + b"".join(
            b"RCPT TO:<user%d@example.com>\r\n" % (i + 1) for i in range(rcpts)) + b"DATA\r\n"
        self.body = body + b".\r\n"
        self.buf = b""
        self.state = "greeting"
        self.replies = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (nl := self.buf.find(b"\n")) >= 0:
            line, self.buf = self.buf[: nl + 1], self.buf[nl + 1 :]
            if line[3:4] == b"-":
                continue
            self.on_reply(line)

    def on_reply(self, line: bytes) -> None:
        if self.state == "greeting":
            self.state = "lhlo"
            self.t.write(b"LHLO bare\r\n")  # type: ignore[attr-defined]
        elif self.state == "lhlo":
            self.state, self.replies = "txn", 0
            self.t.write(self.head)  # type: ignore[attr-defined]
        elif self.state == "txn":
            if line.startswith(b"354"):
                self.state, self.replies = "final", 0
                self.left -= 1
                # Content, dot and (if any left) the next transaction in one write.
                self.t.write(self.body + (self.head if self.left else b""))  # type: ignore[attr-defined]
        elif self.state == "final":
            self.replies += 1
            if self.replies == self.rcpts:
                if self.left:
                    self.state, self.replies = "txn", 0
                else:
                    self.t.close()  # type: ignore[attr-defined]
                    self.done.set_result(None)


async def main(dest: str, messages: int, conns: int, rcpts: int, size: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    body = (b"x" * 76 + b"\r\n") * (size // 78) + b"\r\n"
    futs = []
    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(conns):
        share = messages // conns + (1 if i < messages % conns else 0)
        fut: asyncio.Future[None] = loop.create_future()
        futs.append(fut)
        def factory(share: int = share, fut: asyncio.Future[None] = fut) -> Bare:
            return Bare(share, rcpts, body, fut)
        if dest.startswith("unix:"):
            await loop.create_unix_connection(factory, dest[5:])
        else:
            host, _, port = dest.rpartition(":")
            await loop.create_connection(factory, host.strip("[]"), int(port))
    await asyncio.wait_for(asyncio.gather(*futs), 600)
    elapsed = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime
    return {"messages": messages, "elapsed": elapsed, "cpu": cpu}


if __name__ == "__main__":
    import uvloop

    d, m, c, r, s = sys.argv[1], *map(int, sys.argv[2:6])
    print(json.dumps(uvloop.run(main(d, m, c, r, s))))
