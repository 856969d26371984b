"""smtplib.LMTP with one thread per connection: the standard library's speed.

smtplib.LMTP reads one reply after DATA whatever the recipient count
(CPython gh-76984); to keep it in step with several recipients this script
reads the missing replies itself. Run:
``python bench/smtplib_threads.py DEST MESSAGES THREADS RCPTS SIZE``.
"""

from __future__ import annotations

import json
import resource
import smtplib
import sys
import threading
import time


def worker(dest: str, n: int, rcpts: list[str], body: bytes, errors: list[str]) -> None:
    if dest.startswith("unix:"):
        conn = smtplib.LMTP(dest[5:])
    else:
        host, _, port = dest.rpartition(":")
        conn = smtplib.LMTP(host.strip("[]"), int(port))
    try:
        for _ in range(n):
            conn.sendmail("bench@example.org", rcpts, body)
            for _extra in rcpts[1:]:
                code, _msg = conn.getreply()
                if code != 250:
                    errors.append(str(code))
        conn.quit()
    except smtplib.SMTPException as exc:
        errors.append(str(exc))


def main(dest: str, messages: int, threads: int, nrcpt: int, size: int) -> dict[str, float]:
    body = (b"x" * 76 + b"\r\n") * (size // 78) + b"\r\n"
    rcpts = [f"user{i + 1}@example.com" for i in range(nrcpt)]
    errors: list[str] = []
    shares = [messages // threads + (1 if i < messages % threads else 0) for i in range(threads)]
    ts = [threading.Thread(target=worker, args=(dest, s, rcpts, body, errors)) for s in shares]
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime
    return {"messages": messages, "elapsed": elapsed, "cpu": cpu, "errors": len(errors)}


if __name__ == "__main__":
    d, m, c, r, s = sys.argv[1], *map(int, sys.argv[2:6])
    print(json.dumps(main(d, m, c, r, s)))
