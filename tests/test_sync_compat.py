"""The blocking facade (lmtpfast._sync) and the smtplib.LMTP drop-in (lmtpfast.compat)."""

from __future__ import annotations

import email.message
import smtplib
import threading
from collections.abc import Callable
from typing import Any

import pytest

from lmtpfast import SyncAgent, compat, deliver_sync

MSG = "From: s@example.org\r\nSubject: compat\r\n\r\nHello.\r\n"

# Dovecot with a quota of one message per mailbox: a user who has one is
# refused *after the final dot* (552 5.2.2), while the others are accepted.
QUOTA = """
mail_plugins = $mail_plugins quota
plugin {
  quota = count:User quota
  quota_vsizes = yes
  quota_rule = *:messages=1
}
"""

Factory = Callable[..., Any]


# -- compat: the same assertions as smtplib.LMTP ------------------------------------------

def _one_recipient_session(cls: Factory, dovecot: Any) -> list[Any]:
    """A typical smtplib.LMTP session; everything it returns, for comparison."""
    seen: list[Any] = []
    s = cls(str(dovecot.unix_path), local_hostname="client.example")
    seen.append(s.ehlo())
    seen.append(sorted(s.esmtp_features.items()))
    seen.append((s.has_extn("PIPELINING"), s.has_extn("size"), s.does_esmtp))
    seen.append(s.noop())
    seen.append(s.sendmail("s@example.org", "alice@example.com", MSG))
    seen.append(s.sendmail("s@example.org", ["Alice <alice@example.com>"], MSG.encode()))
    seen.append(s.rset())
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        s.sendmail("s@example.org", ["nosuch@example.com"], MSG)
    seen.append(info.value.recipients)
    m = email.message.EmailMessage()
    m["From"], m["To"], m["Subject"] = "s@example.org", "bob@example.com", "m"
    m.set_content("body\n")
    seen.append(s.send_message(m))
    seen.append(s.noop())  # in step with the server
    seen.append(s.quit())
    with pytest.raises(smtplib.SMTPServerDisconnected):
        s.noop()
    with cls(str(dovecot.unix_path)) as s2:
        seen.append(s2.sendmail("", ["carol@example.com"], MSG))
    with cls("127.0.0.1", dovecot.tcp_port) as s3:
        seen.append(s3.ehlo("tcp.example")[0])
        seen.append(s3.sendmail("s@example.org", ["dave@example.com"], MSG))
    s4 = cls()
    seen.append(s4.connect(f"127.0.0.1:{dovecot.tcp_port}"))
    s4.close()
    with pytest.raises(OSError) as err:
        cls(str(dovecot.unix_path) + ".missing")
    seen.append(type(err.value))
    return seen


def test_compat_matches_smtplib_with_one_recipient(dovecot) -> None:
    theirs = _one_recipient_session(smtplib.LMTP, dovecot)
    counts = {u: len(dovecot.messages(u)) for u in ("alice", "bob", "carol", "dave")}
    assert counts == {"alice": 2, "bob": 1, "carol": 1, "dave": 1}
    dovecot.reset_mail()
    ours = _one_recipient_session(compat.LMTP, dovecot)
    assert ours == theirs
    assert {u: len(dovecot.messages(u)) for u in counts} == counts
    # what those assertions were about
    assert theirs[0][0] == 250 and theirs[3] == (250, b"2.0.0 OK")
    assert theirs[4] == {} and theirs[7]["nosuch@example.com"][0] == 550
    assert theirs[10][0] == 221


def test_refused_after_dot_smtplib_is_wrong_compat_is_right(dovecot_factory) -> None:
    dv = dovecot_factory(extra_config=QUOTA)
    rcpts = ["alice@example.com", "bob@example.com", "carol@example.com"]

    # bob already has his one message
    with compat.LMTP(str(dv.unix_path)) as s:
        assert s.sendmail("s@example.org", ["bob@example.com"], MSG) == {}

    # smtplib.LMTP reads one reply after DATA: bob's refusal is lost...
    s = smtplib.LMTP(str(dv.unix_path))
    assert s.sendmail("s@example.org", rcpts, MSG) == {}
    # ...and the next command reads the stale replies (gh-76984)
    stale = s.noop()
    assert stale[0] == 552 and b"Quota exceeded" in stale[1]
    assert b"carol@example.com" in s.noop()[1]
    s.close()

    dv.reset_mail()
    with compat.LMTP(str(dv.unix_path)) as s:
        assert s.sendmail("s@example.org", ["bob@example.com"], MSG) == {}
        refused = s.sendmail("s@example.org", rcpts, MSG)
        assert list(refused) == ["bob@example.com"]
        code, text = refused["bob@example.com"]
        assert code == 552 and text.startswith(b"5.2.2 <bob@example.com> Quota exceeded")
        assert s.noop() == (250, b"2.0.0 OK")  # in step

    # everyone over quota: smtplib's one-recipient exception, and more
    for cls in (smtplib.LMTP, compat.LMTP):
        with cls(str(dv.unix_path)) as s, pytest.raises(smtplib.SMTPDataError) as info:
            s.sendmail("s@example.org", ["bob@example.com"], MSG)
        assert info.value.smtp_code == 552
    with compat.LMTP(str(dv.unix_path)) as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused_all:
            s.sendmail("s@example.org", ["alice@example.com", "bob@example.com",
                                         "nosuch@example.com"], MSG)
        assert {k: v[0] for k, v in refused_all.value.recipients.items()} == {
            "alice@example.com": 552, "bob@example.com": 552, "nosuch@example.com": 550}
        assert s.noop()[0] == 250


def test_compat_refused_after_dot_with_the_sink(smtp_sink) -> None:
    # smtp-sink -f . refuses every recipient after the dot (5xx), one reply each
    sink = smtp_sink("-f", ".")
    with compat.LMTP(str(sink.unix_path)) as s:
        with pytest.raises(compat.RecipientsRefusedAfterData) as info:
            s.sendmail("s@example.org", ["a@example.com", "b@example.com"], MSG)
        assert set(info.value.recipients) == {"a@example.com", "b@example.com"}
        assert isinstance(info.value, smtplib.SMTPDataError)
        assert s.noop()[0] == 250


def test_compat_sender_refused_and_disconnects(smtp_sink) -> None:
    sink = smtp_sink("-f", "mail")
    with compat.LMTP(str(sink.unix_path)) as s, pytest.raises(smtplib.SMTPSenderRefused) as info:
        s.sendmail("s@example.org", ["a@example.com"], MSG)
    assert info.value.sender == "s@example.org" and info.value.smtp_code >= 500
    dropped = smtp_sink("-q", ".")
    s = compat.LMTP(str(dropped.unix_path))
    with pytest.raises(smtplib.SMTPServerDisconnected):
        s.sendmail("s@example.org", ["a@example.com"], MSG)
    with pytest.raises(smtplib.SMTPServerDisconnected, match="connect"):
        s.noop()
    with pytest.raises(smtplib.SMTPNotSupportedError):
        compat.LMTP().starttls()


# -- sync: many threads, one agent ----------------------------------------------------------

def test_sync_agent_from_many_threads(smtp_sink) -> None:
    sink = smtp_sink()
    errors: list[BaseException] = []
    results: list[Any] = []
    with SyncAgent.for_server(sink.destination, max_connections=4) as agent:

        def worker(n: int) -> None:
            try:
                for i in range(25):
                    results.append(agent.deliver(MSG, sender="s@example.org",
                                                 recipients=[f"t{n}-{i}@example.com"]))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = agent.stats
    assert not errors
    assert len(results) == 400 and all(r[0].delivered for r in results)
    assert stats.peak_connections <= 4 and stats.transactions == 400
    assert agent.closed and not agent._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        agent.deliver(MSG, sender="s@example.org", recipients=["a@example.com"])
    agent.close()  # idempotent


def test_sync_timeout_and_one_shot(smtp_sink) -> None:
    slow = smtp_sink("-w", "30")
    with SyncAgent.for_server(slow.destination) as agent, pytest.raises(TimeoutError):
        agent.deliver(MSG, sender="s@example.org", recipients=["a@example.com"], timeout=0.3)
    fast = smtp_sink()
    results = deliver_sync(MSG, sender="s@example.org", recipients=["a@example.com", "b@example.com"],
                      server=fast.destination, use_uvloop=False)
    assert [r.code for r in results] == [250, 250]
    assert results[0].destination == fast.destination


def test_sync_agent_dropped_without_close_stops_its_thread(smtp_sink) -> None:
    import gc

    sink = smtp_sink()
    agent = SyncAgent.for_server(sink.destination)
    assert agent.deliver(MSG, sender="s@example.org", recipients=["a@example.com"])[0].delivered
    thread = agent._thread
    del agent
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()
