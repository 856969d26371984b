"""lmtpfast run by a real Postfix (issue 10, items 24-26).

A private Postfix MTA (``TempPostfix``) with

* a pipe(8) transport that runs ``lmtpfast send`` into a private Dovecot,
  configured with exactly the ``master.cf`` and ``main.cf`` blocks of
  docs/postfix.md: each recipient's DSN (delivered, 5.1.1 unknown user,
  4.2.2 over quota) must be what Postfix logs and puts in the bounce;
* an lmtp(8) transport (user ``postfix``) delivering into ``lmtpfast sink``
  started as root: its unix socket must let Postfix connect by default, and
  ``--socket-mode``/``--socket-owner`` must do what they say.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lmtpfast

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "postfix.md"

# A mailbox holds one message; a full one defers (452 4.2.2) instead of bouncing.
QUOTA_TEMPFAIL = """
mail_plugins = $mail_plugins quota
quota_full_tempfail = yes
plugin {
  quota = count:User quota
  quota_vsizes = yes
  quota_rule = *:messages=1
}
"""


def documented(kind: str) -> str:
    """The fenced block of docs/postfix.md whose info string is *kind* (``master.cf``...)."""
    m = re.search(rf"^```{re.escape(kind)}\n(.*?)^```$", DOC.read_text(), re.M | re.S)
    assert m is not None, f"no ```{kind} block in {DOC}"
    return m.group(1)


def wait_log(mta: Any, pattern: str, timeout: float = 60.0) -> re.Match[str]:
    """The first maillog match of *pattern*, waiting for it (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(pattern, mta.log_text())
        if m is not None:
            return m
        if time.monotonic() > deadline or not mta.running:
            raise AssertionError(f"no log line {pattern!r}:\n{mta.log_text()[-4000:]}")
        time.sleep(0.05)


# -- items 24, 25: pipe(8) runs lmtpfast send ---------------------------------------------


def test_pipe_runs_send_as_documented_and_postfix_records_each_dsn(
        postfix_mta: Any, dovecot_factory: Any, lmtpfast_venv: Path) -> None:
    dv = dovecot_factory(extra_config=QUOTA_TEMPFAIL)

    async def fill_bobs_mailbox() -> None:
        client = await lmtpfast.connect(dv.destination_unix)
        try:
            (r,) = await client.send("x@example.org", ["bob@example.com"],
                                     b"Subject: the one message bob may have\r\n\r\nx\r\n")
            assert r.delivered, r
        finally:
            await client.quit()

    asyncio.run(fill_bobs_mailbox())

    master, main = documented("master.cf"), documented("main.cf")
    put_in = {"/usr/local/bin/lmtpfast": str(lmtpfast_venv / "bin" / "lmtpfast"),
              "unix:/run/dovecot/lmtp": dv.destination_unix, "user=lmtpfast": "user=nobody"}
    for old, new in put_in.items():
        assert master.count(old) == 1, (old, master)
        master = master.replace(old, new)
    mta = postfix_mta(start=False)
    # One master.cf entry: its continuation lines joined (the same entry for Postfix).
    mta.add_service(" ".join(master.split()))
    for line in main.splitlines():
        key, _, value = line.partition("=")
        mta.set_main(key.strip(), value.strip())
    mta.route("example.com", "lmtpfast:")
    mta.start()

    msg = (b"From: s@example.org\r\nSubject: three recipients\r\nMessage-ID: <pipe3@x>\r\n\r\n"
           b"one run per recipient\r\n")
    qid = mta.sendmail(msg, "s@example.org", ["alice@example.com", "zed@example.com",
                                              "bob@example.com"])
    sent = wait_log(mta, rf"{qid}: to=<alice@example\.com>, relay=lmtpfast, .*dsn=2\.0\.0, "
                         r"status=sent \((.*)\)")
    bounced = wait_log(mta, rf"{qid}: to=<zed@example\.com>, relay=lmtpfast, .*dsn=5\.1\.1, "
                            r"status=bounced \((.*)\)")
    deferred = wait_log(mta, rf"{qid}: to=<bob@example\.com>, relay=lmtpfast, .*dsn=4\.2\.2, "
                             r"status=deferred \((.*)\)")
    assert "zed@example.com: 550 5.1.1" in bounced.group(1)
    assert "Quota exceeded" in deferred.group(1)
    assert "alice@example.com: 250 2.0.0" in sent.group(1)
    # Delivered once, to alice only (bob's one message is the one before).
    assert [m.count(b"one run per recipient") for m in dv.messages("alice")] == [1]
    assert all(b"one run per recipient" not in m for m in dv.messages("bob"))

    # The bounce to s@example.org (queued: this MTA sends nothing out) says 5.1.1 for zed.
    def bounce_id() -> str | None:
        for q in mta.queue():
            if q["sender"] in ("", "MAILER-DAEMON") and q["queue_id"] != qid:
                return str(q["queue_id"])
        return None

    deadline = time.monotonic() + 60
    while (bid := bounce_id()) is None:
        assert time.monotonic() < deadline, mta.queue()
        time.sleep(0.05)
    bounce = mta.postcat(bid, "-b")
    assert re.search(r"Final-Recipient: rfc822; ?zed@example\.com", bounce), bounce
    assert "Status: 5.1.1" in bounce and "Action: failed" in bounce
    assert "alice@example.com" not in bounce.split("Final-Recipient", 1)[1]
    # bob is still in the queue, deferred: his retry will not reach alice again.
    (queued,) = [q for q in mta.queue() if q["queue_id"] == qid]
    assert [r["address"] for r in queued["recipients"]] == ["bob@example.com"]


def test_send_help_says_what_one_status_means_for_several_recipients() -> None:
    proc = subprocess.run([sys.executable, "-m", "lmtpfast", "send", "--help"],
                          capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          timeout=60)
    text = " ".join(proc.stdout.decode().split())
    assert "a non-zero status also covers the recipients that were delivered" in text
    assert "TRANSPORT_destination_recipient_limit = 1" in text and "docs/postfix.md" in text


# -- item 26: lmtp(8) into lmtpfast sink ------------------------------------------------------


def _folder() -> Iterator[Path]:
    # Postfix (user postfix) must reach the socket: not under /root or pytest's 0700 tmp.
    d = Path(tempfile.mkdtemp(prefix="lmtpfast-sinksock-", dir="/var/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


folder = pytest.fixture(_folder)


def _start_sink(where: Path, name: str, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    sock, ready = where / f"{name}.sock", where / f"{name}.ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmtpfast", "sink", "--listen", f"unix:{sock}", "--maildir",
         str(where / f"{name}-mail"), "--ready-file", str(ready), "--quiet", *extra],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the sink did not get ready"
        time.sleep(0.02)
    return proc, sock


def _stored(where: Path, name: str, user: str) -> list[bytes]:
    box = where / f"{name}-mail" / user / "new"
    return [p.read_bytes() for p in sorted(box.iterdir())] if box.is_dir() else []


@pytest.mark.skipif(os.geteuid() != 0, reason="the point is a sink started as root")
def test_postfix_lmtp_reaches_a_sink_started_as_root(postfix_mta: Any, folder: Path) -> None:
    procs = []
    try:
        default, sock = _start_sink(folder, "default")
        procs.append(default)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o666
        private, psock = _start_sink(folder, "private", "--socket-mode", "0600")
        procs.append(private)
        st = os.stat(psock)
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)
        owned, osock = _start_sink(folder, "owned", "--socket-mode", "600",
                                   "--socket-owner", "postfix:postfix")
        procs.append(owned)
        st = os.stat(osock)
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, pwd.getpwnam("postfix").pw_uid)

        mta = postfix_mta(start=False)
        mta.add_lmtp_transport("tosink")
        mta.route("default.example", f"tosink:unix:{sock}")
        mta.route("private.example", f"tosink:unix:{psock}")
        mta.route("owned.example", f"tosink:unix:{osock}")
        mta.start()
        msg = b"Subject: into the sink\r\n\r\nvia lmtp(8)\r\n"
        ok = mta.sendmail(msg, "s@example.org", ["a@default.example"])
        wait_log(mta, rf"{ok}: to=<a@default\.example>, relay=.*status=sent")
        mine = mta.sendmail(msg, "s@example.org", ["a@owned.example"])
        wait_log(mta, rf"{mine}: to=<a@owned\.example>, relay=.*status=sent")
        no = mta.sendmail(msg, "s@example.org", ["a@private.example"])
        wait_log(mta, rf"{no}: to=<a@private\.example>, .*status=deferred \(.*Permission denied")
        assert [b"via lmtp(8)" in m for m in _stored(folder, "default", "a")] == [True]
        assert [b"via lmtp(8)" in m for m in _stored(folder, "owned", "a")] == [True]
        assert _stored(folder, "private", "a") == []
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)


def test_sink_socket_options_are_checked() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for args, words in ((["--socket-mode", "999"], "not an octal mode"),
                        (["--socket-mode", "1777"], "not between"),
                        (["--socket-owner", "no-such-user-here"], "no such user")):
        proc = subprocess.run([sys.executable, "-m", "lmtpfast", "sink", "--listen",
                               "unix:/tmp/unused.sock", *args], capture_output=True, env=env,
                              timeout=60)
        assert proc.returncode == 64, (args, proc.stderr)
        assert words in proc.stderr.decode() and b"Traceback" not in proc.stderr
