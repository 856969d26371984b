"""The real-peer test beds work: Dovecot LMTP and Postfix smtp-sink/smtp-source.

These tests talk raw LMTP over sockets (no lmtpfast client involved) so that
they check the fixtures and the servers, not the code under test. Run alone
with ``pytest -p lmtpfast._testing.fixtures tests/test_peers.py`` (the root
conftest loads the plugin for the full suite).
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmtpfast._testing._procs import kill_session, session_pids
from lmtpfast._testing.dovecot import PeerStartError, TempDovecot, body_as_sent
from lmtpfast._testing.fixtures import DovecotFactory, SmtpSinkFactory, require_peer
from lmtpfast._testing.postfix import run_smtp_source, split_capture

MESSAGE = (
    b"From: Sender <sender@example.org>\r\n"
    b"To: alice@example.com\r\n"
    b"Subject: real peer check\r\n"
    b"\r\n"
    b"first line\r\n"
    b".a line that starts with a dot\r\n"
    b"caf\xc3\xa9 8-bit\r\n"
    b"last line\r\n"
)


def dot_stuff(message: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency, plus the end-of-data line."""
    lines = message.split(b"\r\n")
    return b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines) + b".\r\n"


class RawLMTP:
    """A minimal blocking LMTP conversation: send bytes, read whole replies."""

    def __init__(self, destination: str, timeout: float = 10.0) -> None:
        self.sock: socket.socket
        if destination.startswith("unix:"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(destination[len("unix:") :])
        else:
            host, _, port = destination.rpartition(":")
            self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        # Own buffer rather than makefile(): a file object is unusable after a timeout.
        self.buf = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readline(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                line = bytes(self.buf)
                self.buf.clear()
                return line
            self.buf += chunk
        end = self.buf.index(b"\n") + 1
        line = bytes(self.buf[:end])
        del self.buf[:end]
        return line

    def reply(self) -> tuple[int, list[str]]:
        """One (possibly multi-line) reply: (code, text lines)."""
        lines: list[str] = []
        while True:
            raw = self.readline()
            if not raw.endswith(b"\r\n"):
                raise ConnectionError(f"connection closed mid-reply after {lines!r}: {raw!r}")
            line = raw[:-2].decode("utf-8", "replace")
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), lines

    def command(self, line: str) -> tuple[int, list[str]]:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def nothing_pending(self, wait: float = 0.2) -> bool:
        """True when the server sent nothing more (not even EOF) within *wait* seconds."""
        if self.buf:
            return False
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return False
        readable, _, _ = select.select([self.sock], [], [], wait)
        return not readable

    def upgrade_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        assert not self.buf, "data after the STARTTLS reply"
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)

    def close(self) -> None:
        self.sock.close()


# -- Dovecot ----------------------------------------------------------------


def destinations(dv: TempDovecot) -> dict[str, str]:
    return {"unix": dv.destination_unix, "tcp": dv.destination_tcp}


@pytest.mark.parametrize("via", ["unix", "tcp"])
def test_dovecot_lhlo_advertises_pipelining(dovecot: TempDovecot, via: str) -> None:
    conn = RawLMTP(destinations(dovecot)[via])
    try:
        code, _ = conn.reply()
        assert code == 220
        code, lines = conn.command("LHLO client.example")
        assert code == 250
        assert {"PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "CHUNKING"} <= set(lines[1:])
        assert "STARTTLS" not in lines  # ssl = no by default
        assert conn.command("QUIT")[0] == 221
    finally:
        conn.close()


@pytest.mark.parametrize("via", ["unix", "tcp"])
@pytest.mark.parametrize(
    "rcpts",
    [
        ["alice@example.com", "nobody9@example.com"],
        ["Alice@Example.COM", "nobody9@example.com", "bob@example.com"],
    ],
    ids=["1ok-1unknown", "2ok-1unknown"],
)
def test_dovecot_one_reply_per_accepted_recipient(
    dovecot: TempDovecot, via: str, rcpts: list[str]
) -> None:
    conn = RawLMTP(destinations(dovecot)[via])
    try:
        assert conn.reply()[0] == 220
        assert conn.command("LHLO client.example")[0] == 250
        # Pipelined: the whole envelope and DATA in one write.
        conn.send(
            b"MAIL FROM:<sender@example.org>\r\n"
            + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts)
            + b"DATA\r\n"
        )
        assert conn.reply() == (250, ["2.1.0 OK"])
        accepted = []
        for r in rcpts:
            code, lines = conn.reply()
            if r.startswith("nobody9"):
                assert code == 550
                assert lines[0].startswith(f"5.1.1 <{r}> User doesn't exist")
            else:
                assert (code, lines) == (250, ["2.1.5 OK"])
                accepted.append(r)
        assert conn.reply()[0] == 354
        conn.send(dot_stuff(MESSAGE))
        for r in accepted:  # exactly one reply per accepted recipient, in RCPT order
            code, lines = conn.reply()
            assert code == 250
            assert lines[0].startswith(f"2.0.0 <{r}> ") and lines[0].endswith(" Saved")
        assert conn.nothing_pending()
        code, lines = conn.command("NOOP")
        assert code == 250 and "Saved" not in lines[0]
        assert conn.command("QUIT")[0] == 221
    finally:
        conn.close()

    for r in accepted:
        stored = dovecot.messages(r)
        assert len(stored) == 1
        assert body_as_sent(stored[0]) == MESSAGE
        assert stored[0].startswith(b"Return-Path: <sender@example.org>\r\n")
        # Dovecot writes Delivered-To only when there is a single accepted recipient.
        delivered_to = f"\r\nDelivered-To: {r}\r\n".encode() in stored[0]
        assert delivered_to == (len(accepted) == 1)
    assert dovecot.messages("nobody9") == []


def test_dovecot_fixture_starts_with_empty_mailboxes(dovecot: TempDovecot) -> None:
    # Earlier tests delivered to alice through the same shared instance.
    assert dovecot.users == ("alice", "bob", "carol", "dave")
    for user in dovecot.users:
        assert dovecot.messages(user) == []
    assert "starting up for lmtp" in dovecot.log_text()


def test_messages_are_in_delivery_order(dovecot: TempDovecot) -> None:
    conn = RawLMTP(dovecot.destination_unix)
    try:
        conn.reply()
        conn.command("LHLO client.example")
        for i in range(5):
            conn.send(b"MAIL FROM:<>\r\nRCPT TO:<carol@example.com>\r\nDATA\r\n")
            assert [conn.reply()[0] for _ in range(3)] == [250, 250, 354]
            conn.send(f"Subject: {i}\r\n\r\nnumber {i}\r\n.\r\n".encode())
            assert conn.reply()[0] == 250
    finally:
        conn.close()
    bodies = [body_as_sent(m) for m in dovecot.messages("carol@example.com")]
    assert bodies == [f"Subject: {i}\r\n\r\nnumber {i}\r\n".encode() for i in range(5)]


def test_body_as_sent_rejects_unexpected_layout() -> None:
    with pytest.raises(ValueError, match="Return-Path"):
        body_as_sent(b"Subject: x\r\n\r\nbody\r\n")


def test_dovecot_factory_starttls(dovecot_factory: DovecotFactory, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    # Dovecot's unprivileged processes need not read these: the config process (root) does.
    dv = dovecot_factory(users=["erin"], ssl_cert=cert_path, ssl_key=key_path)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    conn = RawLMTP(dv.destination_tcp)
    try:
        conn.reply()
        code, lines = conn.command("LHLO client.example")
        assert "STARTTLS" in lines
        assert conn.command("STARTTLS")[0] == 220
        conn.upgrade_tls(ctx, "localhost")
        code, lines = conn.command("LHLO client.example")
        assert code == 250 and "STARTTLS" not in lines
        conn.send(b"MAIL FROM:<>\r\nRCPT TO:<erin@example.com>\r\nDATA\r\n")
        assert [conn.reply()[0] for _ in range(3)] == [250, 250, 354]
        conn.send(dot_stuff(MESSAGE))
        assert conn.reply()[0] == 250
    finally:
        conn.close()
    assert [body_as_sent(m) for m in dv.messages("erin")] == [MESSAGE]


def test_dovecot_stop_leaves_no_process(dovecot_factory: DovecotFactory) -> None:
    dv = dovecot_factory()
    assert dv._proc is not None
    sid = dv._proc.pid
    assert session_pids(sid)
    dv.stop()  # returns once every process of the instance is gone
    assert session_pids(sid) == []
    assert not dv.running
    dv.stop()  # idempotent


def wait_exited(pids: list[int], limit: float = 30.0) -> None:
    """Wait until each of ``pids`` has exited (its pidfd turns readable); ``limit`` guards a
    hang."""
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            continue
    try:
        deadline = time.monotonic() + limit
        for fd in fds:
            select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    finally:
        for fd in fds:
            os.close(fd)


CHILD = """
import sys, time
from lmtpfast._testing.dovecot import TempDovecot
from lmtpfast._testing.postfix import SmtpSink
dv = TempDovecot().start()
sink = SmtpSink().start()
assert dv._proc is not None and sink._proc is not None
print(dv._proc.pid, sink._proc.pid, dv.base, sink.base, flush=True)
time.sleep(600)
"""


def test_peers_end_when_test_process_is_killed(tmp_path: Path) -> None:
    require_peer("dovecot")
    require_peer("smtp-sink")
    # A test process killed without teardown (SIGKILL, hard timeout) must not
    # leave servers behind: the parent-death signal ends them.
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 30)
        assert ready, "child did not start its peers"
        dv_sid, sink_sid, *dirs = child.stdout.readline().decode().split()
        assert session_pids(int(dv_sid)) and session_pids(int(sink_sid))
    finally:
        child.kill()
        child.wait()
    wait_exited([*session_pids(int(dv_sid)), *session_pids(int(sink_sid))])
    try:
        assert session_pids(int(dv_sid)) == []
        assert session_pids(int(sink_sid)) == []
    finally:
        for sid in (dv_sid, sink_sid):
            kill_session(int(sid), grace=0.5)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def test_dovecot_start_failure_reports_log(dovecot_factory: DovecotFactory) -> None:
    with pytest.raises(PeerStartError, match="no_such_setting"):
        dovecot_factory(extra_config="no_such_setting = 1\n")


# -- smtp-sink / smtp-source ------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_smtp_sink_one_reply_per_recipient(smtp_sink: SmtpSinkFactory, tcp: bool) -> None:
    sink = smtp_sink(tcp=tcp)
    assert sink.destination.startswith("127.0.0.1:" if tcp else "unix:")
    conn = RawLMTP(sink.destination)
    try:
        assert conn.reply()[0] == 220
        code, lines = conn.command("LHLO client.example")
        assert code == 250 and "PIPELINING" in lines
        conn.send(
            b"MAIL FROM:<s@example.org>\r\n"
            b"RCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\n"
            b"DATA\r\n"
        )
        assert [conn.reply()[0] for _ in range(5)] == [250, 250, 250, 250, 354]
        conn.send(dot_stuff(MESSAGE))
        assert [conn.reply() for _ in range(3)] == [(250, ["2.2.0 Ok"])] * 3
        assert conn.nothing_pending()
        assert conn.command("QUIT")[0] == 221
    finally:
        conn.close()


def test_smtp_sink_fault_flags_pass_through(smtp_sink: SmtpSinkFactory) -> None:
    sink = smtp_sink("-f", "rcpt", "-q", ".")
    conn = RawLMTP(sink.destination)
    try:
        conn.reply()
        _, lines = conn.command("LHLO client.example")
        assert "PIPELINING" not in lines  # -f implies -p
        assert conn.command("MAIL FROM:<s@example.org>")[0] == 250
        assert conn.command("RCPT TO:<a@example.com>")[0] // 100 == 5
    finally:
        conn.close()
    sink2 = smtp_sink("-q", ".")
    conn = RawLMTP(sink2.destination)
    try:
        conn.reply()
        conn.command("LHLO client.example")
        conn.send(b"MAIL FROM:<>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n")
        assert [conn.reply()[0] for _ in range(3)] == [250, 250, 354]
        conn.send(dot_stuff(MESSAGE))
        with pytest.raises(ConnectionError):
            conn.reply()  # dropped without a reply after the dot
    finally:
        conn.close()


def test_smtp_sink_capture(smtp_sink: SmtpSinkFactory) -> None:
    sink = smtp_sink(capture=True)
    conn = RawLMTP(sink.destination)
    try:
        conn.reply()
        conn.command("LHLO client.example")
        conn.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n")
        assert [conn.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        conn.send(dot_stuff(MESSAGE))
        assert [conn.reply()[0] for _ in range(2)] == [250, 250]
        assert conn.command("QUIT")[0] == 221
    finally:
        conn.close()
    # smtp-sink writes and closes the dump before it answers the dot: it is there now.
    [dump] = sink.captures()
    meta, message = split_capture(dump)
    assert meta["X-Mail-Args"] == ["<s@example.org>"]
    assert meta["X-Rcpt-Args"] == ["<a@x>", "<b@x>"]
    assert message == MESSAGE.replace(b"\r\n", b"\n")


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_smtp_source_against_sink(smtp_sink: SmtpSinkFactory, tcp: bool) -> None:
    require_peer("smtp-source")
    sink = smtp_sink(tcp=tcp)
    run = run_smtp_source(sink.destination, messages=200, sessions=4, recipients=3, size=1024)
    assert run.ok, run.output
    assert run.returncode == 0 and not run.timed_out
    assert run.elapsed > 0
    assert run.cpu >= 0 and run.cpu == pytest.approx(run.cpu_user + run.cpu_system)
    assert sink.running


def test_smtp_source_against_dovecot(dovecot: TempDovecot) -> None:
    require_peer("smtp-source")
    run = run_smtp_source(
        dovecot.destination_unix,
        messages=20,
        sessions=2,
        extra_args=("-t", "dave@example.com", "-f", "sender@example.org"),
    )
    assert run.ok, run.output
    assert len(dovecot.messages("dave")) == 20


def test_smtp_source_needs_explicit_port() -> None:
    with pytest.raises(ValueError, match="host:port"):
        run_smtp_source("127.0.0.1", messages=1)


# -- require_peer -----------------------------------------------------------


def test_require_peer_skips_locally_fails_in_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LMTPFAST_PEERS_DIR", str(tmp_path))  # nothing unpacked there
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_peer("smtp-sink")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="never skipped"):
        require_peer("postfix")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        require_peer("smtp-source")
    with pytest.raises(ValueError):
        require_peer("exim")
