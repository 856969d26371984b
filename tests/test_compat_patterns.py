"""Usage patterns of ``smtplib.LMTP`` from public projects, run with ``lmtpfast.compat.LMTP``.

Each helper below is written in the shape such code takes (our own code, not
a copy): a mailing-list manager's bulk delivery, a spam filter re-injecting
mail over LMTP, a Cyrus delivery script with SASL, a mailbox migration that
feeds ``email.message`` objects to Dovecot. They take the client class as a
parameter, so the same code runs with ``smtplib.LMTP`` and with compat; the
tests show where compat keeps smtplib's behaviour and where it corrects it.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from lmtpfast import compat
from lmtpfast._testing.cyrus import TempCyrus
from lmtpfast._testing.fixtures import require_peer

from .test_compat import QUOTA

MSG = "From: list@example.org\r\nSubject: patterns\r\n\r\nHello.\r\n"


# -- a mailing-list manager: one transaction for many members ---------------------------


def list_delivery(cls: Any, where: str, sender: str, members: list[str],
                  text: str) -> dict[str, tuple[int, Any]]:
    """Deliver to every member; the refused members with their (code, reason)."""
    try:
        conn = cls(where)
        try:
            try:
                refused = conn.sendmail(sender, members, text)
            except smtplib.SMTPRecipientsRefused as e:
                refused = e.recipients
            except smtplib.SMTPResponseException as e:
                # the whole message failed: every member shares the code
                refused = {m: (e.smtp_code, e.smtp_error) for m in members}
            conn.quit()
        finally:
            conn.close()
    except (OSError, smtplib.SMTPException) as e:
        refused = {m: (-1, str(e)) for m in members}
    return refused


def test_list_manager_sees_the_over_quota_member(dovecot_factory: Any) -> None:
    dv = dovecot_factory(extra_config=QUOTA)
    where = str(dv.unix_path)
    members = ["alice@example.com", "bob@example.com", "carol@example.com"]
    assert list_delivery(compat.LMTP, where, "list@example.org", ["bob@example.com"], MSG) == {}

    # smtplib.LMTP: bob's refusal after the dot is read as QUIT's reply; the
    # list manager believes every member got the post
    assert list_delivery(smtplib.LMTP, where, "list@example.org", members, MSG) == {}
    dv.reset_mail()
    assert list_delivery(compat.LMTP, where, "list@example.org", ["bob@example.com"], MSG) == {}
    refused = list_delivery(compat.LMTP, where, "list@example.org", members, MSG)
    assert list(refused) == ["bob@example.com"] and refused["bob@example.com"][0] == 552
    # now every member is over quota: each keeps its own reply (a bounce
    # processor must not score a full mailbox as an unknown address)
    refused = list_delivery(compat.LMTP, where, "list@example.org",
                            [*members, "nosuch@example.com"], MSG)
    assert {m: c for m, (c, _) in refused.items()} == {
        "alice@example.com": 552, "bob@example.com": 552, "carol@example.com": 552,
        "nosuch@example.com": 550}


# -- a spam filter re-injecting scanned mail into the LMTP server ----------------------


def reinject(conn: smtplib.LMTP, sender: str, recipients: list[str], data: bytes) -> str:
    """Hand a scanned message on; what to tell the MTA that gave it to us."""
    try:
        refused = conn.sendmail(sender, recipients, data)
    except smtplib.SMTPRecipientsRefused as e:
        return "reject: " + ", ".join(sorted(e.recipients))
    except smtplib.SMTPDataError as e:
        return f"{'defer' if e.smtp_code < 500 else 'reject'}: {e.smtp_code}"
    except smtplib.SMTPServerDisconnected:
        raise
    except smtplib.SMTPException as e:
        return f"defer: {type(e).__name__}"
    return "ok" if not refused else "partial: " + ", ".join(sorted(refused))


def test_spam_filter_survives_a_nul_byte(dovecot: Any) -> None:
    with compat.LMTP(str(dovecot.unix_path), timeout=10) as conn:
        conn.ehlo("filter.example")
        ok = b"Subject: ham\r\n\r\nfine\r\n"
        assert reinject(conn, "a@example.org", ["alice@example.com"], ok) == "ok"
        # binary junk in a spam: an SMTPException, caught like any other, and
        # the connection goes on (it used to wedge, and hang in __exit__)
        junk = b"Subject: spam\r\n\r\nbinary \0 junk\r\n"
        assert reinject(conn, "a@example.org", ["alice@example.com"], junk) == "defer: ContentError"
        assert reinject(conn, "a@example.org", ["bob@example.com", "nosuch@example.com"], ok) == \
            "partial: nosuch@example.com"
        assert reinject(conn, "a@example.org", ["nosuch@example.com"], ok) == \
            "reject: nosuch@example.com"
    assert len(dovecot.messages("alice")) == 1 and len(dovecot.messages("bob")) == 1


# -- a Cyrus delivery script: TCP, SASL, one mailbox --------------------------------------


@pytest.fixture(scope="module")
def cyrus() -> Iterator[TempCyrus]:
    require_peer("cyrus")
    with TempCyrus({"deliver": "s3cret"}, mailboxes=("alice",)) as cy:
        yield cy


def cyrus_deliver(cls: Any, host: str, port: int, user: str, password: str,
                  mailbox: str, raw: bytes) -> int:
    """Exit status for the MTA (sysexits): 0 delivered, 75 try later, 67 no such user."""
    try:
        server = cls(host, port)
    except OSError:
        return 75
    try:
        server.login(user, password)
        server.sendmail("", [mailbox], raw)
    except smtplib.SMTPRecipientsRefused as e:
        code = e.recipients[mailbox][0]
        return 67 if code >= 500 else 75
    except smtplib.SMTPException:
        return 75
    finally:
        server.close()
    return 0


def test_cyrus_delivery_script(cyrus: TempCyrus) -> None:
    raw = b"Subject: to cyrus\r\n\r\nbody\r\n"
    port = cyrus.lmtp_port
    assert cyrus_deliver(compat.LMTP, "127.0.0.1", port, "deliver", "s3cret",
                         "alice@example.com", raw) == 0
    assert cyrus_deliver(compat.LMTP, "127.0.0.1", port, "deliver", "s3cret",
                         "nosuch@example.com", raw) == 67
    assert cyrus_deliver(compat.LMTP, "127.0.0.1", port, "deliver", "wrong",
                         "alice@example.com", raw) == 75
    assert cyrus_deliver(compat.LMTP, "127.0.0.1", socket_free_port(), "deliver", "s3cret",
                         "alice@example.com", raw) == 75
    stored = cyrus.messages("alice")
    assert len(stored) == 1 and stored[0].endswith(b"body\r\n")


def socket_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- a mailbox migration feeding email.message objects to Dovecot --------------------------


def migrate(cls: Any, where: str, user: str, raws: list[bytes]) -> list[str]:
    """Deliver each message to ``user``; a line per message."""
    report = []
    with cls(where) as lmtp:
        for raw in raws:
            msg = email.message_from_bytes(raw, policy=email.policy.SMTP)
            try:
                refused = lmtp.send_message(msg, to_addrs=[user])
            except smtplib.SMTPNotSupportedError as e:
                report.append(f"skipped: {e}")
                continue
            report.append("ok" if not refused else f"refused: {refused}")
    return report


def test_mailbox_migration(dovecot: Any) -> None:
    raws = [
        b"From: a@example.org\r\nSubject: one\r\n\r\nfirst\r\n",
        "From: J\u00f6rg <j\u00f6rg@example.org>\r\nSubject: two\r\n\r\nsecond\r\n".encode(),
        b"From: a@example.org\r\nSubject: three\r\n\r\n.dot line\r\nlast\r\n",
    ]
    for cls in (smtplib.LMTP, compat.LMTP):
        dovecot.reset_mail()
        report = migrate(cls, str(dovecot.unix_path), "carol@example.com", raws)
        # the same report from both: Dovecot offers no SMTPUTF8
        assert report[0] == report[2] == "ok" and report[1].startswith("skipped: ")
        stored = dovecot.messages("carol")
        assert len(stored) == 2 and stored[1].endswith(b"\r\n.dot line\r\nlast\r\n")
