"""The proxy between real peers (issue 14's tests): Postfix in front, Dovecots and smtp-sink behind.

* Postfix's own lmtp(8) (a private Postfix MTA) and Postfix's smtp-source ->
  ``lmtpfast proxy`` (the CLI, as an operator runs it) -> two Dovecots and
  an smtp-sink, recipients spread over them: every recipient's reply is its
  own back end's (Postfix logs it per recipient), each copy stored once, one
  transaction per back end per message.
* A back end killed, or stalled, while Postfix drains its queue through the
  proxy: only that back end's recipients are deferred; after it comes back
  and Postfix retries, every recipient has the message, none is lost, and a
  copy stored twice is one the proxy logged as possibly delivered.
* Affinity over a set of two Dovecots: each user stored on its member only;
  with one member down its users are deferred, not moved.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from lmtpfast._testing._procs import session_pids, wait_for
from lmtpfast._testing.dovecot import TempDovecot
from lmtpfast._testing.fixtures import DovecotFactory, PostfixFactory, require_peer
from lmtpfast._testing.postfix import run_smtp_source, split_capture

MESSAGE = b"From: s@example.org\r\nSubject: through the proxy\r\n\r\nOne copy per mailbox.\r\n"


def _config(routes: dict[str, str], *, recipient_map: bool = False, extra: str = "") -> str:
    lines = ["[transport_map]", *(f'"{k}" = "lmtp:{v}"' for k, v in routes.items())]
    top = ['recipient_map = "texthash:recipients"'] if recipient_map else []
    return "\n".join([*top, extra, *lines]) + "\n"


def _stored(dv: TempDovecot, user: str) -> int:
    return len(dv.message_paths(user))


def _session_ids(dv: TempDovecot, user: str) -> list[str]:
    """Dovecot's LMTP session id of each stored copy (its Received: field), in order."""
    out = []
    for m in dv.messages(user):
        found = re.search(rb"with LMTP\s+id (\S+)", m)
        assert found is not None, m[:300]
        out.append(found.group(1).decode())
    return out


def test_postfix_lmtp_through_the_proxy_to_two_dovecots_and_smtp_sink(
    dovecot_factory: DovecotFactory, smtp_sink: Any, postfix_mta: PostfixFactory,
    lmtp_proxy: Any,
) -> None:
    require_peer("postfix-mta")
    dv1 = dovecot_factory(users=["alice", "carol"])
    dv2 = dovecot_factory(users=["bob", "dave"])
    sink = smtp_sink(capture=True)
    bounces = smtp_sink(capture=True)
    known = ["alice", "bob", "carol", "dave", "erin", "nosuch"]
    proxy = lmtp_proxy(_config(
        {"alice@example.com": dv1.destination_tcp, "carol@example.com": dv1.destination_tcp,
         "nosuch@example.com": dv1.destination_tcp,
         "bob@example.com": dv2.destination_unix, "dave@example.com": dv2.destination_unix,
         "erin@example.com": sink.destination}, recipient_map=True),
        files={"recipients": "".join(f"{u}@example.com ok\n" for u in known)})
    mta = postfix_mta()
    mta.add_lmtp_transport("toproxy")
    mta.add_lmtp_transport("tobounces")
    mta.route("example.com", f"toproxy:inet:{proxy.destination}")
    mta.route("example.org", f"tobounces:{bounces.destination}")
    mta.reload()
    rcpts = ["alice@example.com", "bob@example.com", "erin@example.com", "carol@example.com",
             "dave@example.com", "nosuch@example.com", "stranger@example.com"]
    qids = [mta.sendmail(MESSAGE, "s@example.org", rcpts) for _ in range(3)]
    mta.wait_until_empty(timeout=60)
    log = mta.log_text()
    for qid in qids:
        for user in ("alice", "carol"):
            # The back end's own reply, relayed per recipient in RCPT order: Dovecot
            # names the recipient in its text, so a reply given to the wrong
            # recipient would show here.
            assert re.search(rf"{qid}: to=<{user}@example.com>, relay=[^,]*, .*status=sent "
                             rf"\(250 2\.0\.0 <{user}@example\.com> \S+ Saved\)", log), log
        for user in ("bob", "dave"):
            assert re.search(rf"{qid}: to=<{user}@example.com>, .*status=sent "
                             rf"\(250 2\.0\.0 <{user}@example\.com> \S+ Saved\)", log), log
        assert re.search(rf"{qid}: to=<erin@example.com>, .*status=sent \(250 2\.2\.0 Ok\)", log)
        # Unknown to Dovecot (after the dot) and unknown to the proxy's recipient map (RCPT).
        assert re.search(rf"{qid}: to=<nosuch@example.com>, .*status=bounced .*550 5\.1\.1 "
                         r"<nosuch@example\.com> User doesn't exist", log), log
        assert re.search(rf"{qid}: to=<stranger@example.com>, .*status=bounced .*550 5\.1\.1 .*"
                         r"in reply to RCPT TO", log), log
    # Each copy stored once; one transaction per back end per message: the two
    # users of one Dovecot got each message in the same LMTP session.
    for dv, (u1, u2) in ((dv1, ("alice", "carol")), (dv2, ("bob", "dave"))):
        assert _stored(dv, u1) == 3 and _stored(dv, u2) == 3
        assert _session_ids(dv, u1) == _session_ids(dv, u2)
        assert len(set(_session_ids(dv, u1))) == 3
    captures = sink.captures()
    assert len(captures) == 3
    for c in captures:
        meta, body = split_capture(c)
        assert meta["X-Rcpt-Args"] == ["<erin@example.com>"]
        assert body.endswith(b"One copy per mailbox.\n")
    stats = proxy.stats()
    assert stats["proxy"]["backend_deliveries"] == 9  # 3 messages x 3 back ends
    assert stats["proxy"]["messages"] == 3
    # The proxy's own per-recipient log: one line per recipient it accepted
    # (complete once it has stopped: lines are written after the replies).
    assert proxy.stop() == 0
    lines = proxy.recipient_lines()
    assert len([ln for ln in lines if "status=sent" in ln]) == 15
    assert len([ln for ln in lines if "to=<nosuch@example.com>" in ln
                and "status=bounced" in ln]) == 3


def test_smtp_source_through_the_proxy(
    dovecot_factory: DovecotFactory, smtp_sink: Any, lmtp_proxy: Any,
) -> None:
    require_peer("smtp-source")
    # smtp-source -r 6 numbers its recipients: u, 2u, 3u ... 6u.
    dv1 = dovecot_factory(users=["u", "2u"])
    dv2 = dovecot_factory(users=["3u", "4u"])
    sink = smtp_sink(tcp=True, capture=True)
    routes = {"u@example.com": dv1.destination_unix, "2u@example.com": dv1.destination_unix,
              "3u@example.com": dv2.destination_tcp, "4u@example.com": dv2.destination_tcp,
              "5u@example.com": sink.destination, "6u@example.com": sink.destination}
    proxy = lmtp_proxy(_config(routes))
    n = 40
    run = run_smtp_source(proxy.destination, messages=n, sessions=4, recipients=6,
                          extra_args=("-t", "u@example.com", "-f", "s@example.org"))
    assert run.ok, run.output
    for dv, users in ((dv1, ("u", "2u")), (dv2, ("3u", "4u"))):
        for u in users:
            assert _stored(dv, u) == n
        assert sorted(_session_ids(dv, users[0])) == sorted(_session_ids(dv, users[1]))
    captures = sink.captures()
    assert len(captures) == n
    assert all(sorted(split_capture(c)[0]["X-Rcpt-Args"]) ==
               ["<5u@example.com>", "<6u@example.com>"] for c in captures)
    stats = proxy.stats()
    assert stats["proxy"]["backend_deliveries"] == 3 * n
    assert stats["proxy"]["delivered"] == 6 * n


def _signal_dovecot(dv: TempDovecot, sig: int) -> None:
    assert dv._proc is not None
    for pid in session_pids(dv._proc.pid):
        os.kill(pid, sig)


@pytest.mark.parametrize("how", ["kill", "stall"])
def test_a_back_end_dies_mid_run_only_its_recipients_wait_nothing_is_lost(
    how: str, dovecot_factory: DovecotFactory, postfix_mta: PostfixFactory, lmtp_proxy: Any,
) -> None:
    require_peer("postfix-mta")
    dv1 = dovecot_factory(users=["alice", "carol"])
    dv2 = dovecot_factory(users=["bob", "dave"])
    routes = {"alice@example.com": dv1.destination_unix, "carol@example.com": dv1.destination_unix,
              "bob@example.com": dv2.destination_unix, "dave@example.com": dv2.destination_unix}
    # Short back-end timeouts so that the stalled back end's recipients are
    # deferred within the test (the defaults are Postfix's minutes); no
    # connect back-off and no dead-destination spell (shaping), so the retry
    # after the back end is back goes to it.
    proxy = lmtp_proxy(_config(routes, extra=(
        "[transports.lmtp]\npool = { connect_backoff = 0 }\nshaping = { dead_after = 0 }\n"
        "[transports.lmtp.timeouts]\nconnect = 2\ngreeting = 2\nlhlo = 2\nmail = 2\nrcpt = 2\n"
        "data = 2\ncontent = 2\nfinal = 2\n")))
    mta = postfix_mta(main={"minimal_backoff_time": "1h", "maximal_backoff_time": "1h"})
    mta.add_lmtp_transport("toproxy")
    mta.route("example.com", f"toproxy:inet:{proxy.destination}")
    mta.reload()
    rcpts = list(routes)
    half = 15
    for _ in range(half):
        mta.sendmail(MESSAGE, "s@example.org", rcpts)
    mta.wait_until_empty(timeout=120)
    # Mid-run: dv2 stops answering (its processes are stopped with the proxy's
    # transactions in them), and Postfix goes on sending through the proxy.
    _signal_dovecot(dv2, signal.SIGSTOP)
    try:
        for _ in range(half):
            mta.sendmail(MESSAGE, "s@example.org", rcpts)
        # dv1's recipients are not held up by dv2.
        wait_for("dv1 to have every message", lambda: _stored(dv1, "alice") == 2 * half
                 and _stored(dv1, "carol") == 2 * half, time.monotonic() + 120,
                 alive=lambda: dv1.running)
        if how == "kill":
            _signal_dovecot(dv2, signal.SIGKILL)  # dies in the middle of whatever it did
            dv2.stop()
        mta.wait_until_empty(timeout=120, include_deferred=False)
        deferred = mta.queue()
        assert deferred, "dv2's recipients should be waiting"
        for entry in deferred:
            assert {r["address"] for r in entry["recipients"]} <= {"bob@example.com",
                                                                   "dave@example.com"}
    finally:
        if how == "kill":
            dv2.start()
        else:
            _signal_dovecot(dv2, signal.SIGCONT)
    mta.flush()
    mta.wait_until_empty(timeout=120)
    assert proxy.stop() == 0  # its log complete
    lines = proxy.recipient_lines()
    for user in ("bob", "dave"):
        stored = _stored(dv2, user)
        possibly = len([ln for ln in lines if f"to=<{user}@example.com>" in ln
                        and "possibly duplicated" in ln])
        # Nothing lost; a second copy only where the proxy said it may have been delivered.
        assert 2 * half <= stored <= 2 * half + possibly, (user, stored, possibly)
    for user in ("alice", "carol"):
        assert _stored(dv1, user) == 2 * half  # never a duplicate on the healthy back end
    log = mta.log_text()
    for user in rcpts:
        assert len(re.findall(rf"to=<{re.escape(user)}>, .*status=sent", log)) == 2 * half


def test_proxy_cli_refuses_a_loop_and_a_bad_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = tmp_path / "p.toml"
    cfg.write_text('default = "lmtp:127.0.0.1:24999"\n[proxy]\nlisten = ["127.0.0.1:24999"]\n')
    run = subprocess.run([sys.executable, "-m", "lmtpfast", "proxy", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 78 and "loop" in run.stderr
    cfg.write_text("[proxy]\nmax_size = -1\n")
    run = subprocess.run([sys.executable, "-m", "lmtpfast", "proxy", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 78 and "max_size" in run.stderr


def test_proxy_cli_reload_metrics_and_graceful_stop(smtp_sink: Any, lmtp_proxy: Any) -> None:
    import urllib.request

    from lmtpfast._testing._procs import free_tcp_port
    from lmtpfast.compat import LMTP

    one, two = smtp_sink(capture=True), smtp_sink(capture=True)
    port = free_tcp_port()
    proxy = lmtp_proxy(_config({"example.com": one.destination}),
                       extra_args=["--metrics-listen", f"127.0.0.1:{port}"])
    host, _, pport = proxy.destination.rpartition(":")

    def send(rcpt: str) -> None:
        with LMTP(host, int(pport)) as c:
            assert c.sendmail("s@example.org", [rcpt], MESSAGE) == {}

    send("a@example.com")
    proxy.reload(_config({"example.com": two.destination}))
    send("b@example.com")
    # A broken file is refused; the running configuration stays.
    proxy.reload("this is not TOML = = =\n")
    assert "reload refused" in proxy.log_text()
    send("c@example.com")
    assert len(one.captures()) == 1 and len(two.captures()) == 2
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    assert re.search(r'lmtpfast_deliveries_total\{destination="[^"]+",dsn="2\.2",'
                     r'status="sent"\} 2\.0', text), text
    assert "lmtpfast_proxy_messages_total 3.0" in text
    assert 'lmtpfast_reloads_total{result="failed"} 1.0' in text
    assert proxy.stop() == 0
    lines = proxy.recipient_lines()
    assert len([ln for ln in lines if "status=sent (250 2.2.0 Ok)" in ln]) == 3


def test_affinity_over_two_dovecots_and_one_of_them_down(
    dovecot_factory: DovecotFactory, lmtp_proxy: Any,
) -> None:
    """A transport naming a set of two Dovecots (issue 14 item 6): each user's
    mail lands on one of them only, the one rendezvous hashing names; with one
    Dovecot down its users are deferred (not moved), the others' go on."""
    from lmtpfast import DestinationSet, connect

    users = [f"user{i}" for i in range(12)]
    dvs = [dovecot_factory(users=users) for _ in range(2)]
    members = [dv.destination_unix for dv in dvs]
    proxy = lmtp_proxy(
        'default = "mbox:"\n[transports.mbox]\n'
        f"destinations = [{', '.join(repr(m) for m in members)}]\n"
        "pool = { connect_backoff = 0 }\n")
    home = DestinationSet.parse(members)
    owner = {u: members.index(str(home.pick(f"{u}@example.com"))) for u in users}
    assert set(owner.values()) == {0, 1}  # both members hold some users
    rcpts = [f"{u}@example.com" for u in users]

    async def send() -> list[Any]:
        async with await connect(proxy.destination) as c:
            return await c.send("s@example.org", rcpts, MESSAGE)

    results = asyncio.run(send())
    assert all(r.delivered and "Saved" in r.text for r in results)
    for u in users:
        assert [_stored(dv, u) for dv in dvs] == [int(i == owner[u]) for i in range(2)]
    dvs[1].stop()
    results = asyncio.run(send())
    for u, r in zip(users, results, strict=True):
        if owner[u] == 1:
            assert r.transient and r.code == 451, r  # deferred: its mailbox is there
        else:
            assert r.delivered, r
    for u in users:
        assert _stored(dvs[0], u) == (2 if owner[u] == 0 else 0)  # nobody moved
    assert proxy.stop() == 0
