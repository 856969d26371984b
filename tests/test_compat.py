"""``lmtpfast.compat.LMTP`` against real peers: issue 10, items 10-16.

Dovecot (quota, unknown users, STARTTLS), Cyrus over TCP (SASL required),
Postfix's smtp-sink (``-q``/``-r``/``-f`` faults), lmtpfast's own sink (421,
hang-ups between the replies after the dot) and, for what no real server
does on demand (a 199 greeting, over-long lines, a STARTTLS injection), a
scripted peer on a socketpair reached through a ``_get_socket`` override.
Where smtplib is right, compat must do what ``smtplib.LMTP`` does, and the
tests say so by running both; where it is wrong, they show both.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import inspect
import io
import re
import smtplib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

import lmtpfast
from lmtpfast import compat
from lmtpfast._testing.cyrus import TempCyrus
from lmtpfast._testing.fixtures import require_peer
from lmtpfast.server import FaultPlan, Sink

MSG = "From: s@example.org\r\nSubject: compat\r\n\r\nHello.\r\n"
SENDER = "s@example.org"

# Dovecot with a quota of one message per mailbox: a user who has one is
# refused *after the final dot* (552 5.2.2), the others are accepted.
QUOTA = """
mail_plugins = $mail_plugins quota
plugin {
  quota = count:User quota
  quota_vsizes = yes
  quota_rule = *:messages=1
}
"""

Factory = Callable[..., Any]


# -- a scripted peer: a thread at the other end of a socketpair -----------------------


class Peer:
    """The server side of a socketpair, driven by a script function in a thread."""

    def __init__(self, sock: socket.socket, script: Callable[[Peer], None]) -> None:
        self.sock = sock
        sock.settimeout(10)
        self.reader = sock.makefile("rb")
        self.received: list[bytes] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(script,), daemon=True)
        self.thread.start()

    def _run(self, script: Callable[[Peer], None]) -> None:
        try:
            script(self)
        except BaseException as exc:  # reported by join()
            self.error = exc
        finally:
            self.reader.close()
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        got = self.reader.readline()
        self.received.append(got)
        return got

    def expect(self, prefix: bytes) -> bytes:
        got = self.line()
        assert got.upper().startswith(prefix.upper()), (prefix, got)
        return got

    def join(self) -> None:
        self.thread.join(10)
        assert not self.thread.is_alive(), "scripted peer still running"
        if self.error is not None:
            raise self.error


def scripted(base: type[smtplib.LMTP], script: Callable[[Peer], None],
             **kwargs: Any) -> tuple[Any, Peer]:
    """A ``base`` client connected to ``script`` through an overridden ``_get_socket``."""
    peers: list[Peer] = []

    class Client(base):  # type: ignore[valid-type,misc]
        def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
            ours, theirs = socket.socketpair()
            ours.settimeout(10)
            peers.append(Peer(theirs, script))
            return ours

    kwargs.setdefault("local_hostname", "client.example")
    client = Client("scripted.example", 24, **kwargs)
    return client, peers[0]


LHLO_REPLY = b"250-server.example\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n"


def _greet(peer: Peer, lhlo: bytes = LHLO_REPLY) -> None:
    peer.send(b"220 server.example LMTP\r\n")
    peer.expect(b"LHLO ")
    peer.send(lhlo)


# -- the same answers as smtplib.LMTP with one recipient -------------------------------


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


# -- item 10: nothing is sent before the content is known to be sendable ----------------


def test_nul_byte_raises_before_anything_is_sent(dovecot: Any) -> None:
    with compat.LMTP(str(dovecot.unix_path), timeout=10) as s:
        with pytest.raises(compat.ContentError) as info:
            s.sendmail(SENDER, ["alice@example.com"], "Subject: x\r\n\r\nnul \0 here\r\n")
        err = info.value
        assert isinstance(err, smtplib.SMTPException) and isinstance(err, lmtpfast.ContentError)
        assert isinstance(err, ValueError) and err.offset == 18
        assert s.noop() == (250, b"2.0.0 OK")  # in step: nothing was queued
        # the raw steps: checked before DATA is sent
        assert s.mail(SENDER)[0] == 250 and s.rcpt("alice@example.com")[0] == 250
        with pytest.raises(compat.ContentError):
            s.data(b"nul\0")
        with pytest.raises(UnicodeEncodeError):
            s.data("h\u00e9llo")  # smtplib sends DATA first, then wedges the session here
        assert s.data(MSG)[0] == 250
        assert s.sendmail(SENDER, ["alice@example.com"], MSG) == {}
    # __exit__ said QUIT and returned: the session was never out of step
    assert len(dovecot.messages("alice")) == 2


def test_mangled_addresses_are_refused_before_sending(dovecot: Any) -> None:
    # smtplib's quoteaddr() drops CR/LF: this would be delivered to x@example.com
    bad = "bad\r\nRCPT TO:<bob@example.com>"
    assert smtplib.quoteaddr(bad) == "<bob@example.com>"
    with compat.LMTP(str(dovecot.unix_path), timeout=10) as s:
        for args in ((SENDER, ["alice@example.com", bad]), (bad, ["alice@example.com"]),
                     (SENDER, ["alice\0@example.com"])):
            with pytest.raises(ValueError, match="CR, LF or NUL"):
                s.sendmail(*args, MSG)
        with pytest.raises(ValueError, match="prohibited newline"):
            s.sendmail(SENDER, ["alice@example.com"], MSG, mail_options=["X=1\r\nRSET"])
        with pytest.raises(UnicodeEncodeError):
            s.sendmail(SENDER, ["b\u00f6b@example.com"], MSG)  # no SMTPUTF8 offered
        assert s.noop() == (250, b"2.0.0 OK")
    assert dovecot.messages("bob") == [] and dovecot.messages("alice") == []


def test_newline_in_lhlo_name(dovecot: Any) -> None:
    # CPython's test_issue43124_escape_localhostname, with LMTP's verb
    for cls in (smtplib.LMTP, compat.LMTP):
        s = cls(str(dovecot.unix_path), local_hostname="hi\nX-INJECTED", timeout=10)
        with pytest.raises(ValueError,
                           match=r"prohibited newline characters: lhlo hi\\nX-INJECTED"):
            s.sendmail(SENDER, ["alice@example.com"], MSG)
        assert s.noop()[0] == 250
        s.close()


# -- item 11: smtplib's exception types where smtplib is right ----------------------------


def _over_quota(dv: Any, user: str) -> None:
    with compat.LMTP(str(dv.unix_path), timeout=10) as s:
        assert s.sendmail(SENDER, [f"{user}@example.com"], MSG) == {}


@pytest.mark.parametrize("engine", ["c", "python"])
def test_refused_after_the_dot(dovecot_factory: Factory, engine: str) -> None:
    dv = dovecot_factory(extra_config=QUOTA)
    _over_quota(dv, "bob")
    rcpts = ["alice@example.com", "bob@example.com", "carol@example.com"]

    # one recipient: smtplib's SMTPDataError, not a recipients-refused one
    seen = []
    for cls in (smtplib.LMTP, compat.LMTP):
        kw = {"engine": engine} if cls is compat.LMTP else {}
        with cls(str(dv.unix_path), timeout=10, **kw) as s:
            with pytest.raises(smtplib.SMTPDataError) as info:
                s.sendmail(SENDER, ["bob@example.com", "nosuch@example.com"], MSG)
            assert not isinstance(info.value, smtplib.SMTPRecipientsRefused)
            seen.append((info.value.smtp_code, info.value.smtp_error))
            assert s.noop()[0] == 250
    assert seen[0] == seen[1]
    assert seen[0][0] == 552 and seen[0][1].startswith(b"5.2.2 <bob@example.com> Quota")

    # several: smtplib loses bob's refusal and reads it as NOOP's reply (gh-76984)
    s = smtplib.LMTP(str(dv.unix_path), timeout=10)
    assert s.sendmail(SENDER, rcpts, MSG) == {}
    stale = s.noop()
    assert stale[0] == 552 and b"Quota exceeded" in stale[1]
    s.close()
    dv.reset_mail()
    _over_quota(dv, "bob")
    with compat.LMTP(str(dv.unix_path), timeout=10, engine=engine) as s:
        refused = s.sendmail(SENDER, rcpts, MSG)
        assert list(refused) == ["bob@example.com"] and refused["bob@example.com"][0] == 552
        assert [r.status for r in s.last_results] == ["delivered", "permanent", "delivered"]
        assert s.noop() == (250, b"2.0.0 OK")
        # everyone accepted is over quota: per-recipient replies, catchable both ways
        with pytest.raises(compat.RecipientsRefusedAfterData) as every:
            s.sendmail(SENDER, ["alice@example.com", "bob@example.com", "nosuch@example.com"], MSG)
        assert isinstance(every.value, smtplib.SMTPRecipientsRefused)
        assert isinstance(every.value, smtplib.SMTPDataError) and every.value.smtp_code == 552
        assert {k: v[0] for k, v in every.value.recipients.items()} == {
            "alice@example.com": 552, "bob@example.com": 552, "nosuch@example.com": 550}
        # the raw steps: data() answers for each recipient rcpt() got accepted
        s.mail(SENDER)
        for rcpt in ("alice@example.com", "carol@example.com"):
            assert s.rcpt(rcpt)[0] == 250
        code, text = s.data(MSG)
        assert code == 552 and b"<alice@example.com>" in text  # the first one not delivered
        assert [r.code for r in s.last_results] == [552, 552]
        assert s.noop() == (250, b"2.0.0 OK")


# -- item 12: LHLO when needed ------------------------------------------------------------


def test_helo_then_sendmail(dovecot: Any) -> None:
    # Dovecot refuses HELO; smtplib then sends MAIL unannounced (Dovecot lets it)
    s = compat.LMTP(timeout=10)
    s.connect(str(dovecot.unix_path))
    assert s.helo("client.example")[0] == 500
    refused = s.sendmail(SENDER, ["alice@example.com", "nosuch@example.com", "bob@example.com"],
                         MSG)
    assert list(refused) == ["nosuch@example.com"] and refused["nosuch@example.com"][0] == 550
    assert s.has_extn("pipelining")  # LHLO was said
    assert s.noop() == (250, b"2.0.0 OK")
    s.quit()
    assert len(dovecot.messages("alice")) == len(dovecot.messages("bob")) == 1


async def test_helo_and_reconnect_patterns_say_lhlo() -> None:
    # lmtpfast's sink refuses HELO, and MAIL before LHLO (503), as RFC 2033 asks

    def retry_pattern(cls: type[smtplib.LMTP], host: str, port: int) -> Any:
        s = cls(host, port, local_hostname="client.example", timeout=10)
        try:
            for attempt in range(2):
                try:
                    return s.sendmail(SENDER, ["alice@example.com"], MSG)
                except smtplib.SMTPServerDisconnected:
                    assert attempt == 0
                    s.connect(host, port)
        finally:
            s.close()

    def helo_pattern(cls: type[smtplib.LMTP], host: str, port: int) -> Any:
        s = cls(local_hostname="client.example", timeout=10)
        s.connect(host, port)
        assert s.helo("client.example")[0] == 500
        try:
            return s.sendmail(SENDER, ["bob@example.com"], MSG)
        finally:
            s.close()

    for cls in (compat.LMTP, smtplib.LMTP):
        # the first MAIL hangs up; the retry reconnects
        plan = FaultPlan.parse(["mail@nth=1=disconnect"])
        async with Sink("127.0.0.1:0", collect=True, faults=plan) as sink:
            host, port = sink.destinations[0].rsplit(":", 1)
            if cls is compat.LMTP:
                assert await asyncio.to_thread(retry_pattern, cls, host, int(port)) == {}
                assert await asyncio.to_thread(helo_pattern, cls, host, int(port)) == {}
                assert [m.recipients for m in sink.messages] == [["alice@example.com"],
                                                                  ["bob@example.com"]]
                continue
            # smtplib keeps the old LHLO across connect() and says none after HELO
            for pattern in (retry_pattern, helo_pattern):
                with pytest.raises(smtplib.SMTPSenderRefused) as info:
                    await asyncio.to_thread(pattern, cls, host, int(port))
                assert info.value.smtp_code == 503
            assert sink.messages == []


# -- item 13: the whole API ----------------------------------------------------------------


def test_an_smtplib_lmtp_with_its_signatures() -> None:
    s = compat.LMTP()
    assert isinstance(s, smtplib.LMTP) and isinstance(s, smtplib.SMTP)
    assert s.default_port == smtplib.LMTP.default_port == smtplib.SMTP_PORT  # item 16
    assert s.ehlo_msg == "lhlo" and s.sock is None
    for name, theirs in inspect.getmembers(smtplib.LMTP, callable):
        if name.startswith("__") and name not in ("__init__", "__enter__", "__exit__"):
            continue
        ours = getattr(compat.LMTP, name)
        want = inspect.signature(theirs).parameters
        got = inspect.signature(ours).parameters
        # every parameter of smtplib's, same name, kind and default; extras keyword-only
        assert list(got)[: len(want)] == list(want), name
        for p in want:
            assert (got[p].kind, got[p].default) == (want[p].kind, want[p].default), (name, p)
        extra = list(got)[len(want):]
        assert all(got[p].kind is inspect.Parameter.KEYWORD_ONLY for p in extra), name
    with pytest.raises(smtplib.SMTPServerDisconnected):
        s.noop()
    with pytest.raises(smtplib.SMTPServerDisconnected):
        s.starttls()


def test_autospec_mock_stands_in_for_it() -> None:
    # code written against smtplib.LMTP, tested with an autospec'd compat.LMTP
    def deliver(factory: Any, rcpts: list[str]) -> Any:
        with factory("/run/dovecot/lmtp") as s:
            s.set_debuglevel(0)
            return s.sendmail(SENDER, rcpts, MSG, mail_options=("BODY=8BITMIME",))

    with mock.patch.object(compat, "LMTP", autospec=True) as m:
        m.return_value.__enter__.return_value.sendmail.return_value = {}
        assert deliver(compat.LMTP, ["a@x"]) == {}
        assert isinstance(m.return_value, smtplib.SMTP)
        m.return_value.__enter__.return_value.sendmail.assert_called_once_with(
            SENDER, ["a@x"], MSG, mail_options=("BODY=8BITMIME",))
        with pytest.raises(TypeError):
            m.return_value.sendmail(SENDER)  # the autospec checks smtplib's signature


def test_get_socket_override(smtp_sink: Factory) -> None:
    sink = smtp_sink(tcp=True)

    class Proxied(compat.LMTP):
        """Sends every connection to the sink, whatever host it is given."""

        def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
            return socket.create_connection(("127.0.0.1", sink.tcp_port), timeout)

    with Proxied("lmtp.invalid", 24, timeout=10) as s:
        assert s.sendmail(SENDER, ["a@example.com", "b@example.com"], MSG) == {}
        assert s.noop()[0] == 250


def test_raw_steps_and_sendmail_stay_in_step(dovecot: Any) -> None:
    with compat.LMTP(str(dovecot.unix_path), timeout=10) as s:
        s.ehlo("client.example")
        assert s.mail(SENDER) == (250, b"2.1.0 OK")
        assert s.rcpt("alice@example.com")[0] == 250
        assert s.rcpt("nosuch@example.com")[0] == 550
        assert s.rcpt("bob@example.com")[0] == 250
        code, text = s.data(MSG)  # two replies read, not one
        assert code == 250 and text.startswith(b"2.0.0 <alice@example.com>")
        assert [r.address for r in s.last_results] == ["alice@example.com", "bob@example.com"]
        assert s.sendmail(SENDER, ["carol@example.com", "dave@example.com"], MSG) == {}
        s.putcmd("NOOP")
        assert s.getreply() == (250, b"2.0.0 OK")
        assert s.docmd("RSET") == (250, b"2.0.0 OK")
        assert s.sendmail(SENDER, "alice@example.com", MSG.encode()) == {}
        assert s.noop() == (250, b"2.0.0 OK")
    assert [len(dovecot.messages(u)) for u in ("alice", "bob", "carol", "dave")] == [2, 1, 1, 1]


def _tls_dovecot(dovecot_factory: Factory, tmp_path: Path) -> tuple[Any, Path]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_path, key_path, ca_path = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    return dovecot_factory(users=["erin"], ssl_cert=cert_path, ssl_key=key_path), ca_path


def _try_starttls(s: smtplib.LMTP, warnings: list[str]) -> None:
    """The pattern: STARTTLS when offered, a warning (and go on) when it fails."""
    s.ehlo()
    if s.has_extn("starttls"):
        try:
            s.starttls()
            s.ehlo()
        except (smtplib.SMTPException, ssl.SSLError) as exc:
            warnings.append(f"STARTTLS failed: {exc}")


def test_try_starttls_ends_up_encrypted(dovecot_factory: Factory, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    dv, ca_path = _tls_dovecot(dovecot_factory, tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_path))  # the CA is trusted machine-wide
    for target in (("localhost", dv.tcp_port), (str(dv.unix_path), 0)):
        warnings: list[str] = []
        with compat.LMTP(*target, timeout=10) as s:
            _try_starttls(s, warnings)
            assert warnings == []
            assert isinstance(s.sock, ssl.SSLSocket) and s.sock.version() in ("TLSv1.2", "TLSv1.3")
            assert not s.has_extn("starttls") and s.has_extn("pipelining")  # post-TLS LHLO
            assert s.sendmail(SENDER, ["erin@example.com", "nosuch@example.com"], MSG) == {
                "nosuch@example.com": (550, b"5.1.1 <nosuch@example.com> User doesn't exist: "
                                            b"nosuch@example.com")}
    assert len(dv.messages("erin")) == 2
    # a context as smtplib takes it; STARTTLS then LHLO said by sendmail itself
    ctx = ssl.create_default_context(cafile=str(ca_path))
    with compat.LMTP("localhost", dv.tcp_port, timeout=10) as s:
        assert s.starttls(context=ctx)[0] == 220
        assert s.sendmail(SENDER, ["erin@example.com"], MSG) == {}
        assert s.sock is not None and s.sock.version() is not None


def test_starttls_verifies_by_default(dovecot_factory: Factory, tmp_path: Path) -> None:
    dv, _ca = _tls_dovecot(dovecot_factory, tmp_path)
    warnings: list[str] = []
    s = compat.LMTP("localhost", dv.tcp_port, timeout=10)
    _try_starttls(s, warnings)
    assert len(warnings) == 1 and "CERTIFICATE_VERIFY_FAILED" in warnings[0]
    assert s.sock is None  # closed: it cannot go on in clear text
    with pytest.raises(smtplib.SMTPServerDisconnected):
        s.sendmail(SENDER, ["erin@example.com"], MSG)
    assert dv.messages("erin") == []
    # smtplib's unverified behaviour on request
    with compat.LMTP("localhost", dv.tcp_port, timeout=10) as s:
        s.starttls(context=ssl._create_unverified_context())
        assert s.sendmail(SENDER, ["erin@example.com"], MSG) == {}


def test_starttls_injection_is_refused() -> None:
    def script(peer: Peer) -> None:
        _greet(peer, b"250-server.example\r\n250 STARTTLS\r\n")
        peer.expect(b"STARTTLS")
        # a man in the middle appends a reply that would be read as if under TLS
        peer.send(b"220 2.0.0 Go ahead\r\n250 2.1.0 injected\r\n")
        peer.line()  # b"" once the client hangs up

    s, peer = scripted(compat.LMTP, script, timeout=10)
    with pytest.raises(smtplib.SMTPServerDisconnected, match="STARTTLS injection"):
        s.starttls()
    assert s.sock is None
    peer.join()


@pytest.fixture(scope="module")
def cyrus() -> Iterator[TempCyrus]:
    require_peer("cyrus")
    with TempCyrus({"lmtp": "lmtp-secret"}, mailboxes=("alice", "bob")) as cy:
        yield cy


def test_cyrus_over_tcp_with_login(cyrus: TempCyrus) -> None:
    host, port = "127.0.0.1", cyrus.lmtp_port
    with compat.LMTP(host, port, timeout=10) as s:
        with pytest.raises(smtplib.SMTPSenderRefused) as info:
            s.sendmail(SENDER, ["alice@example.com"], MSG)  # SASL required over TCP
        assert info.value.smtp_code == 430
    with compat.LMTP(host, port, timeout=10) as s:
        with pytest.raises(smtplib.SMTPAuthenticationError) as bad:
            s.login("lmtp", "wrong")
        assert bad.value.smtp_code == 501
    with compat.LMTP(host, port, timeout=10) as s:
        s.set_debuglevel(1)
        with contextlib.redirect_stderr(io.StringIO()) as trace:
            assert s.login("lmtp", "lmtp-secret")[0] == 235
        assert re.search(r"send: 'AUTH SCRAM-SHA-256 ", trace.getvalue())  # the best on offer
        assert "lmtp-secret" not in trace.getvalue()
        s.set_debuglevel(0)
        refused = s.sendmail(SENDER, ["alice@example.com", "nosuch@example.com",
                                      "bob@example.com"], MSG)
        assert list(refused) == ["nosuch@example.com"] and refused["nosuch@example.com"][0] == 550
        assert s.noop()[0] == 250
    # smtplib's own auth_* through auth(), as callers of the low-level API do
    for mechanism in ("PLAIN", "LOGIN", "CRAM-MD5"):
        with compat.LMTP(host, port, timeout=10) as s:
            s.ehlo()
            s.user, s.password = "lmtp", "lmtp-secret"
            method = getattr(s, "auth_" + mechanism.lower().replace("-", "_"))
            assert s.auth(mechanism, method)[0] == 235
            assert s.sendmail(SENDER, ["bob@example.com"], MSG) == {}
    assert len(cyrus.messages("alice")) == 1 and len(cyrus.messages("bob")) == 4


def test_scram_server_must_prove_itself() -> None:
    def script(peer: Peer) -> None:
        _greet(peer, b"250-server.example\r\n250 AUTH SCRAM-SHA-256 PLAIN\r\n")
        first = peer.expect(b"AUTH SCRAM-SHA-256 ")
        import base64

        nonce = base64.b64decode(first.split()[2]).decode().rsplit("r=", 1)[1]
        server_first = f"r={nonce}xyz,s={base64.b64encode(b'salt').decode()},i=4096"
        peer.send(b"334 " + base64.b64encode(server_first.encode()) + b"\r\n")
        peer.line()  # client-final
        # an impostor that does not know the password cannot sign
        peer.send(b"334 " + base64.b64encode(b"v=" + base64.b64encode(b"x" * 32)) + b"\r\n")
        assert peer.line() == b"*\r\n"  # cancelled
        peer.send(b"501 5.0.0 cancelled\r\n")
        peer.line()

    s, peer = scripted(compat.LMTP, script, timeout=10)
    with pytest.raises(compat.AuthenticationError, match="does not verify") as info:
        s.login("user", "secret")  # and no fallback to PLAIN
    assert isinstance(info.value, smtplib.SMTPException)
    assert not isinstance(info.value, smtplib.SMTPAuthenticationError)
    s.close()
    peer.join()
    assert not any(b"AUTH PLAIN" in line for line in peer.received)


# -- item 14: lost between the replies after the dot -----------------------------------


async def test_lost_between_final_replies_reports_what_was_decided() -> None:
    plan = FaultPlan.parse(["dot:bob@*=disconnect"])
    async with Sink("127.0.0.1:0", collect=True, faults=plan) as sink:
        host, port = sink.destinations[0].rsplit(":", 1)
        rcpts = ["alice@example.com", "bob@example.com", "carol@example.com"]

        def send(cls: type[smtplib.LMTP]) -> tuple[Any, Any]:
            s = cls(host, int(port), local_hostname="client.example", timeout=10)
            try:
                return s.sendmail(SENDER, rcpts, MSG), s
            finally:
                s.close()

        refused, s = await asyncio.to_thread(send, compat.LMTP)
        # alice's 250 stands; bob and carol never got a reply: transient, maybe delivered
        assert list(refused) == ["bob@example.com", "carol@example.com"]
        for code, text in refused.values():
            assert code == 451 and text.startswith(b"4.4.2 ")
            assert text.endswith(b"(the message may have been delivered)")
        assert [(r.status, r.possibly_delivered) for r in s.last_results] == [
            ("delivered", False), ("transient", True), ("transient", True)]
        assert [m.recipients for m in sink.messages] == [["alice@example.com"]]
        # smtplib reads alice's reply as the whole answer: bob and carol "delivered"
        theirs, _ = await asyncio.to_thread(send, smtplib.LMTP)
        assert theirs == {}
        assert [m.recipients for m in sink.messages] == [["alice@example.com"]] * 2


async def test_lost_after_the_dot_before_any_reply() -> None:
    plan = FaultPlan.parse(["dot=disconnect"])
    async with Sink("127.0.0.1:0", faults=plan) as sink:
        host, port = sink.destinations[0].rsplit(":", 1)

        def send() -> None:
            with compat.LMTP(host, int(port), timeout=10) as s:
                s.sendmail(SENDER, ["a@example.com", "b@example.com"], MSG)

        # nothing was decided: smtplib's exception
        with pytest.raises(smtplib.SMTPServerDisconnected):
            await asyncio.to_thread(send)


# -- item 15: 421 and close ------------------------------------------------------------------


def _refused(cls: type[smtplib.LMTP], host: str, port: int, rcpts: list[str],
             exc_type: type[BaseException]) -> tuple[Any, Any]:
    s = cls(host, port, local_hostname="client.example", timeout=10)
    try:
        s.sendmail(SENDER, rcpts, MSG)
    except exc_type as exc:
        return exc, s.sock
    raise AssertionError(f"no {exc_type.__name__}")


@pytest.mark.parametrize("pipelining", [True, False])
async def test_421_then_close(pipelining: bool) -> None:
    hide = () if pipelining else ("PIPELINING",)
    rcpts = ["alice@example.com", "bob@example.com", "carol@example.com"]
    cases: list[tuple[str, type[BaseException], Callable[[Any], bool]]] = [
        ("mail=421 4.3.2 Going away", smtplib.SMTPSenderRefused,
         lambda e: (e.smtp_code, e.sender) == (421, SENDER)),
        ("rcpt:bob@*=421 4.3.2 Going away", smtplib.SMTPRecipientsRefused,
         lambda e: e.recipients == {"bob@example.com": (421, b"4.3.2 Going away")}),
        ("data=421 4.3.2 Going away", smtplib.SMTPDataError, lambda e: e.smtp_code == 421),
    ]
    for spec, exc_type, check in cases:
        plan = FaultPlan.parse([spec], hide=hide)
        async with Sink("127.0.0.1:0", faults=plan) as sink:
            host, port = sink.destinations[0].rsplit(":", 1)

            for cls in (compat.LMTP, smtplib.LMTP):
                exc, sock = await asyncio.to_thread(_refused, cls, host, int(port), rcpts,
                                                    exc_type)
                assert check(exc), (cls, spec, exc)
                if cls is smtplib.LMTP and spec.startswith("data"):
                    sock.close()  # smtplib's data() raises before sendmail can close
                    continue
                assert sock is None, (cls, spec)  # closed, no RSET
            if spec.startswith("rcpt") and not pipelining:
                # no RCPT after the 421: alice and bob from compat, then from smtplib
                st = sink.stats
                assert (st.recipients_accepted, st.recipients_refused) == (2, 2)
    # the one accepted recipient answered 421 after the dot
    async with Sink("127.0.0.1:0", faults=FaultPlan.parse(["dot=421 4.3.2 Bye"])) as sink:
        host, port = sink.destinations[0].rsplit(":", 1)

        def one() -> Any:
            s = compat.LMTP(host, int(port), timeout=10)
            with pytest.raises(smtplib.SMTPDataError) as info:
                s.sendmail(SENDER, ["alice@example.com"], MSG)
            return info.value.smtp_code, s.sock

        assert await asyncio.to_thread(one) == (421, None)


# -- the smtp-sink fault cases -------------------------------------------------------------


def test_smtp_sink_faults(smtp_sink: Factory) -> None:
    rcpts = ["a@example.com", "b@example.com"]
    every_dot = smtp_sink("-f", ".")  # every recipient refused after the dot
    with compat.LMTP(str(every_dot.unix_path), timeout=10) as s:
        with pytest.raises(compat.RecipientsRefusedAfterData) as info:
            s.sendmail(SENDER, rcpts, MSG)
        assert set(info.value.recipients) == set(rcpts)
        with pytest.raises(smtplib.SMTPDataError) as one:
            s.sendmail(SENDER, ["a@example.com"], MSG)
        assert not isinstance(one.value, smtplib.SMTPRecipientsRefused)
        assert s.noop()[0] == 250
    soft = smtp_sink("-r", "rcpt")
    for cls in (smtplib.LMTP, compat.LMTP):
        with cls(str(soft.unix_path), timeout=10) as s, \
                pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            s.sendmail(SENDER, rcpts, MSG)
        assert {k: v[0] // 100 for k, v in refused.value.recipients.items()} == {
            "a@example.com": 4, "b@example.com": 4}
    hard_mail = smtp_sink("-f", "mail")
    for cls in (smtplib.LMTP, compat.LMTP):
        with cls(str(hard_mail.unix_path), timeout=10) as s, \
                pytest.raises(smtplib.SMTPSenderRefused) as sender:
            s.sendmail(SENDER, rcpts, MSG)
        assert sender.value.sender == SENDER and sender.value.smtp_code // 100 == 5
    dropped = smtp_sink("-q", ".")
    s = compat.LMTP(str(dropped.unix_path), timeout=10)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        s.sendmail(SENDER, rcpts, MSG)
    with pytest.raises(smtplib.SMTPServerDisconnected, match="connect"):
        s.noop()


# -- item 16: debug output, bad greetings and lines --------------------------------------


def _session(peer: Peer) -> None:
    _greet(peer)
    peer.expect(b"MAIL FROM:<s@example.org>")
    peer.send(b"250 2.1.0 Ok\r\n")
    peer.expect(b"RCPT TO:<a@example.com>")
    peer.send(b"250 2.1.5 Ok\r\n")
    peer.expect(b"DATA")
    peer.send(b"354 Go ahead\r\n")
    while peer.line() != b".\r\n":
        pass
    peer.send(b"250 2.0.0 <a@example.com> Saved\r\n")
    peer.expect(b"QUIT")
    peer.send(b"221 2.0.0 Bye\r\n")


@pytest.mark.parametrize("level", [1, 2])
def test_debug_output_is_smtplibs(level: int) -> None:
    traces = []
    for cls in (smtplib.LMTP, compat.LMTP):
        buf = io.StringIO()
        with contextlib.redirect_stderr(buf):
            s, peer = scripted(cls, _session)  # no PIPELINING: one command at a time
            s.set_debuglevel(level)
            assert s.sendmail(SENDER, ["a@example.com"], MSG) == {}
            assert s.quit()[0] == 221
        peer.join()
        trace = buf.getvalue()
        if level == 2:
            assert re.match(r"\d\d:\d\d:\d\d\.\d{6} send: ", trace)
            trace = re.sub(r"(?m)^\d\d:\d\d:\d\d\.\d{6} ", "", trace)
        # smtplib writes its verbs in lower case, the engine in upper case
        traces.append(re.sub(r"send: '(mail|rcpt|data)", lambda m: "send: '" + m[1].upper(),
                             trace.replace("send: b'", "send: '")))
    assert traces[0].count("\n") > 10
    assert traces[0] == traces[1]


def test_bad_greetings_and_long_lines() -> None:
    def greeting(line: bytes) -> Callable[[Peer], None]:
        def script(peer: Peer) -> None:
            peer.send(line)
            peer.line()
        return script

    for cls in (smtplib.LMTP, compat.LMTP):
        with pytest.raises(smtplib.SMTPConnectError) as info:
            scripted(cls, greeting(b"199 no hello for you!\r\n"), timeout=10)
        assert (info.value.smtp_code, info.value.smtp_error) == (199, b"no hello for you!")


def test_over_long_reply_line() -> None:
    # CPython's testLineTooLong with LMTP's constructor signature
    def long_greeting(peer: Peer) -> None:
        peer.send(b"250 OK" + b"." * smtplib._MAXLINE * 2 + b"\n")  # type: ignore[attr-defined]
        peer.line()

    for cls in (smtplib.LMTP, compat.LMTP):
        with pytest.raises(smtplib.SMTPResponseException) as info:
            scripted(cls, long_greeting, timeout=3)
        assert (info.value.smtp_code, info.value.smtp_error) == (500, "Line too long.")

    # among the replies after the dot: the first recipient's 250 stands
    def long_final(peer: Peer) -> None:
        _greet(peer, LHLO_REPLY.replace(b"250 8BITMIME", b"250-8BITMIME\r\n250 PIPELINING"))
        for _ in range(4):
            peer.line()
        peer.send(b"250 Ok\r\n250 Ok\r\n250 Ok\r\n354 Go\r\n")
        while peer.line() != b".\r\n":
            pass
        peer.send(b"250 2.0.0 <a@example.com> Saved\r\n550 " + b"x" * 9000 + b"\r\n")
        peer.line()

    s, peer = scripted(compat.LMTP, long_final, timeout=10)
    refused = s.sendmail(SENDER, ["a@example.com", "b@example.com"], MSG)
    assert list(refused) == ["b@example.com"] and refused["b@example.com"][0] == 451
    assert s.last_results[1].possibly_delivered and s.sock is None
    peer.join()


def test_send_message_and_null_sender(dovecot: Any) -> None:
    m = email.message.EmailMessage()
    m["From"], m["To"], m["Cc"] = "s@example.org", "alice@example.com", "bob@example.com"
    m["Bcc"], m["Subject"] = "carol@example.com", "m"
    m.set_content("body\n.leading dot\n")
    with compat.LMTP(str(dovecot.unix_path), timeout=10) as s:
        assert s.send_message(m) == {}
        assert s.sendmail("<>", ["dave@example.com"], MSG) == {}
    stored = dovecot.messages("carol")
    assert len(stored) == 1 and b"Bcc" not in stored[0] and b"\r\n.leading dot\r\n" in stored[0]
    assert dovecot.messages("dave")[0].startswith(b"Return-Path: <>")
