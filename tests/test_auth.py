"""SASL AUTH (RFC 4954): mechanisms against the RFC test vectors, password maps, and a
real Cyrus lmtpd that requires authentication over TCP (sasldb, ``lmtp_admins``).

Every password used here is random per run and registered in ``SECRETS``;
everything the tests see (log records, captured output, results, exception
texts, reprs) is collected in ``SEEN``, and the last test greps it all for
the passwords. Async tests run on asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import pickle
import secrets
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from lmtpfast import (
    Agent,
    AuthenticationError,
    ConfigurationError,
    PasswordMap,
    ReplyError,
    TLSPolicy,
    Transport,
    connect,
    load_config,
)
from lmtpfast._sasl import (
    DEFAULT_MECHANISMS,
    MECHANISMS,
    AuthPolicy,
    CramMD5,
    Credentials,
    Login,
    Plain,
    ScramSHA1,
    ScramSHA256,
    authenticate,
    saslprep,
)
from lmtpfast._testing.cyrus import TempCyrus, find_cyrus
from lmtpfast._testing.fixtures import in_ci
from lmtpfast.proto import Reply

LMTP_USER = "lmtpuser"
LMTP_PASSWORD = "Pw-lmtp-" + secrets.token_urlsafe(12)
OTHER_USER = "frontend2"
OTHER_PASSWORD = "Pw-other-" + secrets.token_urlsafe(12)
NOT_ADMIN = "mailuser"
NOT_ADMIN_PASSWORD = "Pw-notadmin-" + secrets.token_urlsafe(12)
WRONG_PASSWORD = "Pw-wrong-" + secrets.token_urlsafe(12)
SECRETS = (LMTP_PASSWORD, OTHER_PASSWORD, NOT_ADMIN_PASSWORD, WRONG_PASSWORD)

#: Everything the tests of this module saw; the last test greps it for SECRETS.
SEEN: list[str] = []

MSG = b"From: s@example.org\r\nSubject: auth\r\n\r\nafter AUTH\r\n"


def saw(*things: object) -> None:
    for thing in things:
        SEEN.append(thing if isinstance(thing, str) else repr(thing))
        if isinstance(thing, BaseException):
            SEEN.append(str(thing))


@pytest.fixture(autouse=True)
def _collect(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> Iterator[None]:
    caplog.set_level(logging.DEBUG, logger="lmtpfast")
    yield
    out, err = capfd.readouterr()
    SEEN.extend([caplog.text, out, err])
    SEEN.extend(r.getMessage() for r in caplog.records)


# -- mechanisms against the RFC examples ---------------------------------------------


def test_scram_sha1_rfc5802_example() -> None:
    m = ScramSHA1(Credentials("user", "pencil"), nonce="fyko+d2lbbFgONRv9qkxdawL")
    assert m.initial_response() == b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"
    final = m.respond(b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096")
    assert final == (b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,"
                     b"p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=")
    with pytest.raises(AuthenticationError, match="without proving"):
        m.finish()
    assert m.respond(b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=") == b""
    m.finish()


def test_scram_sha256_rfc7677_example() -> None:
    m = ScramSHA256(Credentials("user", "pencil"), nonce="rOprNGfwEbeRWgbNEkqO")
    assert m.initial_response() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    final = m.respond(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                      b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    assert final == (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                     b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    m.respond(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    m.finish()


def _scram_first(nonce: str = "abc", salt: str = "QSXCR+Q6sek8bf92", i: int = 4096) -> bytes:
    return f"r={nonce}SERVER,s={salt},i={i}".encode()


def test_scram_refuses_a_server_that_cannot_prove_the_password() -> None:
    m = ScramSHA256(Credentials("user", "pencil"), nonce="abc")
    m.initial_response()
    m.respond(_scram_first())
    wrong = base64.b64encode(b"\0" * 32)
    with pytest.raises(AuthenticationError, match="signature does not verify") as err:
        m.respond(b"v=" + wrong)
    saw(err.value)
    for bad, why in [
        (_scram_first(nonce="xyz"), "nonce does not extend ours"),
        (b"r=abc,s=QSXCR+Q6sek8bf92,i=4096", "nonce does not extend ours"),
        (_scram_first(i=1024), "1024 iterations"),
        (_scram_first(salt="***"), "bad salt"),
        (b"m=ext," + _scram_first(), "unsupported extension"),
        (b"garbage", "malformed"),
    ]:
        m = ScramSHA1(Credentials("user", "pencil"), nonce="abc")
        m.initial_response()
        with pytest.raises(AuthenticationError, match=why):
            m.respond(bad)
    m = ScramSHA1(Credentials("user", "pencil"), nonce="abc")
    m.initial_response()
    m.respond(_scram_first())
    with pytest.raises(AuthenticationError, match="server reported error 'invalid-proof'"):
        m.respond(b"e=invalid-proof")


def test_scram_escapes_names_and_authzid() -> None:
    m = ScramSHA256(Credentials("a,b=c", "pw", authzid="ad=min"), nonce="n0")
    assert m.initial_response() == b"n,a=ad=3Dmin,n=a=2Cb=3Dc,r=n0"


def test_cram_md5_rfc2195_example() -> None:
    m = CramMD5(Credentials("tim", "tanstaaftanstaaf"))
    assert m.initial_response() is None
    assert m.respond(b"<1896.697170952@postoffice.reston.mci.net>") == \
        b"tim b913a602c7eda7a495b4e6e7334d3890"


def test_plain_and_login() -> None:
    p = Plain(Credentials("tim", "tanstaaf", authzid="boss"))
    assert p.initial_response() == b"boss\0tim\0tanstaaf"
    lg = Login(Credentials("tim", "tanstaaf"))
    assert lg.initial_response() is None
    assert lg.respond(b"Username:") == b"tim"
    assert lg.respond(b"whatever the prompt says") == b"tanstaaf"
    with pytest.raises(AuthenticationError):
        lg.respond(b"again?")


def test_saslprep_rfc4013_examples() -> None:
    assert saslprep("I\u00adX") == "IX"  # soft hyphen mapped to nothing
    assert saslprep("user") == "user"
    assert saslprep("USER") == "USER"
    assert saslprep("\u00aa") == "a"  # NFKC
    assert saslprep("\u2168") == "IX"
    assert saslprep("a\u00a0b") == "a b"  # non-ASCII space mapped to space
    with pytest.raises(AuthenticationError, match="U\\+0007"):
        saslprep("\u0007")
    with pytest.raises(AuthenticationError, match="bidirectional"):
        saslprep("\u0627\u0031")


def test_mechanism_selection() -> None:
    creds = Credentials("u", "p")
    cyrus = ["SCRAM-SHA-512", "SCRAM-SHA-256", "SCRAM-SHA-1", "DIGEST-MD5", "CRAM-MD5", "NTLM",
             "PLAIN", "LOGIN"]
    pick = AuthPolicy(creds).select
    assert pick(cyrus, encrypted=False, unix=False).name == "SCRAM-SHA-256"
    assert pick(["scram-sha-1", "plain"], encrypted=False, unix=False).name == "SCRAM-SHA-1"
    assert pick(["PLAIN", "LOGIN", "CRAM-MD5"], encrypted=False, unix=False).name == "CRAM-MD5"
    # noplaintext: PLAIN/LOGIN only on unix sockets and under TLS by default.
    with pytest.raises(AuthenticationError, match="not used over unencrypted TCP") as err:
        pick(["PLAIN", "LOGIN"], encrypted=False, unix=False)
    saw(err.value)
    assert pick(["LOGIN", "PLAIN"], encrypted=True, unix=False).name == "PLAIN"
    assert pick(["LOGIN"], encrypted=False, unix=True).name == "LOGIN"
    forced = AuthPolicy(creds, allow_plaintext=True).select
    assert forced(["PLAIN"], encrypted=False, unix=False).name == "PLAIN"
    never = AuthPolicy(creds, allow_plaintext=False).select
    with pytest.raises(AuthenticationError):
        never(["PLAIN"], encrypted=True, unix=True)
    # A filter that is also the preference order.
    only = AuthPolicy(creds, ("cram-md5", "SCRAM-SHA-1")).select
    assert only(cyrus, encrypted=False, unix=False).name == "CRAM-MD5"
    with pytest.raises(AuthenticationError, match="it offers EXTERNAL, allowed here"):
        only(["EXTERNAL"], encrypted=False, unix=True)
    with pytest.raises(ConfigurationError, match="unsupported SASL mechanism 'DIGEST-MD5'"):
        AuthPolicy(creds, ("DIGEST-MD5",))
    assert AuthPolicy(creds, "PLAIN, login").mechanisms == ("PLAIN", "LOGIN")  # type: ignore[arg-type]
    assert tuple(MECHANISMS) == DEFAULT_MECHANISMS


def test_credentials_never_show_the_password() -> None:
    creds = Credentials(LMTP_USER, LMTP_PASSWORD)
    policy = AuthPolicy(creds)
    transport = Transport(destination="127.0.0.1:24", sasl_credentials=creds)
    for text in (repr(creds), str(creds), repr(policy), repr(transport),
                 repr(ScramSHA256(creds)), repr(transport.auth_for("127.0.0.1:24"))):
        saw(text)
        assert LMTP_PASSWORD not in text
    assert "<redacted>" in repr(creds)
    assert creds == Credentials(LMTP_USER, LMTP_PASSWORD)
    assert creds != Credentials(LMTP_USER, WRONG_PASSWORD)
    assert hash(creds) == hash(Credentials(LMTP_USER, WRONG_PASSWORD))
    with pytest.raises(TypeError):
        pickle.dumps(creds)
    with pytest.raises(ConfigurationError, match="password contains NUL") as err:
        Credentials("u", "a\0" + LMTP_PASSWORD)
    saw(err.value)


# -- the AUTH exchange with a scripted server ----------------------------------------


def _replies(*lines: str) -> Callable[[str, str | None], Awaitable[Reply]]:
    """A fake ``command`` that records what was sent and answers from ``lines``."""
    queue = list(lines)
    sent: list[tuple[str, str | None]] = []

    async def command(verb: str, arg: str | None = None) -> Reply:
        sent.append((verb, arg))
        line = queue.pop(0)
        return Reply(int(line[:3]), None, (line[4:],))

    command.sent = sent  # type: ignore[attr-defined]
    return command


async def test_exchange_plain_and_cancel() -> None:
    cmd = _replies("235 2.7.0 ok")
    reply = await authenticate(cmd, Plain(Credentials("u", "p")))
    assert reply.code == 235
    assert cmd.sent == [("AUTH", "PLAIN " + base64.b64encode(b"\0u\0p").decode())]  # type: ignore[attr-defined]
    # A challenge that is not base64: the exchange is cancelled with "*".
    cmd = _replies("334 not*base64", "501 5.7.0 cancelled")
    with pytest.raises(AuthenticationError, match="not base64"):
        await authenticate(cmd, CramMD5(Credentials("u", "p")))
    assert cmd.sent[-1] == ("AUTH-RESPONSE", "*")  # type: ignore[attr-defined]
    # A refusal is a ReplyError at stage auth with the server's words only.
    cmd = _replies("334 " + base64.b64encode(b"<1.2@x>").decode(), "535 5.7.8 bad credentials")
    with pytest.raises(ReplyError) as err:
        await authenticate(cmd, CramMD5(Credentials("u", WRONG_PASSWORD)))
    assert err.value.stage == "auth" and err.value.code == 535
    saw(err.value)
    # LOGIN answers prompts by position; an empty challenge gets an empty line.
    cmd = _replies("334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "235 ok")
    await authenticate(cmd, Login(Credentials("u", "p")))
    assert [a for _, a in cmd.sent] == ["LOGIN", "dQ==", "cA=="]  # type: ignore[attr-defined]


# -- password maps ---------------------------------------------------------------------


def _write_map(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_password_map_keys_and_lookup(tmp_path: Path) -> None:
    pm = PasswordMap.from_file(_write_map(tmp_path / "sasl_passwd", f"""\
# comment

[backend1.example.org]:24   front:{LMTP_PASSWORD}
Backend2.Example.org:2003   front2:with:colons
backend2.example.org        any-port:pw
unix:/var/imap/socket/lmtp  cyrus:sockpw
[::1]:24                    six:pw6
"""))
    assert len(pm) == 5
    assert pm.lookup("backend1.example.org:24") == Credentials("front", LMTP_PASSWORD)
    assert pm.lookup("[backend1.example.org]:24") == Credentials("front", LMTP_PASSWORD)
    assert pm.lookup("backend1.example.org") == Credentials("front", LMTP_PASSWORD)  # port 24
    assert pm.lookup("backend1.example.org:2003") is None
    assert pm.lookup("backend2.example.org:2003") == Credentials("front2", "with:colons")
    assert pm.lookup("BACKEND2.example.org:25") == Credentials("any-port", "pw")
    assert pm.lookup("unix:/var/imap/socket/lmtp") == Credentials("cyrus", "sockpw")
    assert pm.lookup("unix:/other") is None
    assert pm.lookup("[::1]:24") == Credentials("six", "pw6")
    assert "backend1.example.org" in pm and "nowhere" not in pm
    saw(pm)
    assert LMTP_PASSWORD not in repr(pm)


@pytest.mark.parametrize("line,why", [
    (f"front:{LMTP_PASSWORD}", "the line has one field"),
    (f"host.example {LMTP_PASSWORD}", "USERNAME:PASSWORD"),
    (f"host.example :{LMTP_PASSWORD}", "USERNAME:PASSWORD"),
    (f"  host.example u:{LMTP_PASSWORD}", "white space"),
    (f"[host u:{LMTP_PASSWORD}", "bad key"),
])
def test_password_map_errors_never_quote_the_line(tmp_path: Path, line: str, why: str) -> None:
    path = _write_map(tmp_path / "m", "# first\n" + line + "\n")
    with pytest.raises(ConfigurationError, match=why) as err:
        PasswordMap.from_file(path)
    assert err.value.line == 2 and err.value.source == str(path)
    saw(err.value)
    assert LMTP_PASSWORD not in str(err.value)


def test_password_map_duplicate(tmp_path: Path) -> None:
    path = _write_map(tmp_path / "m", "h.example:24 a:b\n[h.example]:24 c:d\n")
    with pytest.raises(ConfigurationError, match="listed twice"):
        PasswordMap.from_file(path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_password_map_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = _write_map(tmp_path / "sasl_passwd", f"h.example a:{LMTP_PASSWORD}\n", mode)
    with pytest.raises(ConfigurationError) as err:
        PasswordMap.from_file(path)
    text = str(err.value)
    saw(err.value)
    assert str(path) in text and f"chmod 600 {path}" in text and f"{mode:04o}" in text
    assert LMTP_PASSWORD not in text
    path.chmod(0o600)
    assert PasswordMap.from_file(path).lookup("h.example") is not None
    path.chmod(0o400)
    assert PasswordMap.from_file(path).lookup("h.example") is not None


def test_password_map_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read password map"):
        PasswordMap.from_file(tmp_path / "nope")
    with pytest.raises(ConfigurationError, match="not a regular file"):
        PasswordMap.from_file(tmp_path)


def test_config_keys(tmp_path: Path) -> None:
    _write_map(tmp_path / "sasl_passwd", f"backend.example.org:24 {LMTP_USER}:{LMTP_PASSWORD}\n")
    (tmp_path / "ca.pem").write_text("")
    conf = tmp_path / "lmtpfast.toml"
    conf.write_text("""
[transports.cyrus]
destination = "backend.example.org:24"
tls_security_level = "verify"
tls_ca_file = "ca.pem"
tls_server_hostname = "backend.example.org"
sasl_password_maps = "sasl_passwd"
sasl_mechanisms = ["SCRAM-SHA-256", "cram-md5"]

[transports.plainly]
destination = "unix:/run/lmtp"
sasl_password_maps = ["sasl_passwd"]
sasl_allow_plaintext = true
""")
    cfg = load_config(conf)
    t = cfg.transports["cyrus"]
    assert t.tls.level == "verify" and t.tls.ca_file == str(tmp_path / "ca.pem")
    assert t.tls.server_hostname == "backend.example.org"
    assert t.sasl_mechanisms == ("SCRAM-SHA-256", "CRAM-MD5")
    policy = t.auth_for("backend.example.org:24")
    assert policy is not None and policy.credentials == Credentials(LMTP_USER, LMTP_PASSWORD)
    assert t.auth_for("other.example.org:24") is None
    plainly = cfg.transports["plainly"]
    assert plainly.tls.level == "none" and plainly.sasl_allow_plaintext is True
    assert cfg.transports["lmtp"].sasl_password_maps == ()
    saw(cfg)

    for body, where, why in [
        ('tls_security_level = "secure"', "transports.x.tls_security_level", "unknown TLS"),
        ('sasl_mechanisms = ["NTLM"]', "transports.x.sasl_mechanisms", "unsupported SASL"),
        ('tls_security_level = "verify"\ntls_verify = false', "transports.x.tls_verify",
         "always verifies"),
        ('tls_ca_file = ""', "transports.x.tls_ca_file", "empty path"),
    ]:
        conf.write_text(f"[transports.x]\n{body}\n")
        with pytest.raises(ConfigurationError, match=why) as err:
            load_config(conf)
        assert err.value.field == where, err.value
    _write_map(tmp_path / "open", f"h a:{LMTP_PASSWORD}\n", 0o644)
    conf.write_text('[transports.x]\nsasl_password_maps = "open"\n')
    with pytest.raises(ConfigurationError, match="chmod 600") as err:
        load_config(conf)
    assert err.value.source == str(tmp_path / "open")
    saw(err.value)


# -- Cyrus lmtpd: SASL required over TCP ----------------------------------------------


@pytest.fixture(scope="module")
def cyrus() -> Iterator[TempCyrus]:
    why = find_cyrus()
    if why is not None:
        if in_ci():
            pytest.fail(f"Cyrus unavailable under CI (never skipped there): {why}",
                        pytrace=False)
        pytest.skip(f"Cyrus unavailable: {why}")
    users = {LMTP_USER: LMTP_PASSWORD, OTHER_USER: OTHER_PASSWORD,
             NOT_ADMIN: NOT_ADMIN_PASSWORD}
    with TempCyrus(users, lmtp_admins=(LMTP_USER, OTHER_USER),
                   mailboxes=("alice", "bob", "carol")) as cy:
        yield cy


@pytest.mark.parametrize("mechanism", DEFAULT_MECHANISMS)
async def test_each_mechanism_then_delivery(cyrus: TempCyrus, mechanism: str,
                                            engine: str) -> None:
    policy = AuthPolicy(Credentials(LMTP_USER, LMTP_PASSWORD), (mechanism,),
                        allow_plaintext=True)
    before = len(cyrus.messages("alice"))
    async with await connect(cyrus.destination_tcp, auth=policy, engine=engine) as c:
        assert (c.authenticated_as, c.auth_mechanism) == (LMTP_USER, mechanism)
        assert mechanism in c.capabilities.auth
        results = await c.send("s@example.org", ["alice@example.com", "nobody@example.com"],
                               MSG)
        saw(results, c)
    assert results[0].delivered and results[0].text.startswith("Success")
    assert results[1].code == 550 and "User unknown" in results[1].text
    stored = cyrus.messages("alice")
    assert len(stored) == before + 1 and stored[-1].endswith(b"after AUTH\r\n")


async def test_default_picks_the_best_mechanism(cyrus: TempCyrus) -> None:
    async with await connect(cyrus.destination_tcp,
                             auth=Credentials(LMTP_USER, LMTP_PASSWORD)) as c:
        assert c.auth_mechanism == "SCRAM-SHA-256"


async def test_without_auth_cyrus_refuses_mail(cyrus: TempCyrus) -> None:
    async with await connect(cyrus.destination_tcp) as c:
        assert c.authenticated_as is None
        (r,) = await c.send("s@example.org", ["alice@example.com"], MSG)
    assert (r.code, r.stage, r.status) == (430, "mail", "transient")
    assert r.text == "Authentication required"


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "CRAM-MD5", "PLAIN"])
async def test_wrong_password(cyrus: TempCyrus, mechanism: str,
                              caplog: pytest.LogCaptureFixture) -> None:
    policy = AuthPolicy(Credentials(LMTP_USER, WRONG_PASSWORD), (mechanism,),
                        allow_plaintext=True)
    with pytest.raises(ReplyError) as err:
        await connect(cyrus.destination_tcp, auth=policy)
    saw(err.value)
    assert err.value.stage == "auth" and err.value.code == 501
    assert str(err.value) == "auth: 501 5.5.4 undefined error!"
    assert f"as {LMTP_USER} with {mechanism} failed: auth: 501 5.5.4" in caplog.text


async def test_wrong_password_defers_recipients(cyrus: TempCyrus,
                                                caplog: pytest.LogCaptureFixture) -> None:
    async with Agent.for_server(cyrus.destination_tcp,
                                sasl_credentials=Credentials(LMTP_USER, WRONG_PASSWORD)) as agent:
        results = await agent.deliver(MSG, sender="s@example.org",
                                      recipients=["alice@example.com", "bob@example.com"])
    saw(results, msgspec.json.encode(results).decode(), agent)
    for r in results:
        assert r.transient and r.local
        assert (r.code, r.enhanced, r.stage) == (454, "4.7.0", "auth")
        assert r.text == (f"SASL authentication to {cyrus.destination_tcp} failed; server "
                          "said: 501 5.5.4 undefined error!")
    assert f"as {LMTP_USER} with SCRAM-SHA-256 failed" in caplog.text
    assert WRONG_PASSWORD not in caplog.text


async def test_only_lmtp_admins_may_authenticate(cyrus: TempCyrus) -> None:
    with pytest.raises(ReplyError) as err:
        await connect(cyrus.destination_tcp, auth=Credentials(NOT_ADMIN, NOT_ADMIN_PASSWORD))
    saw(err.value)
    assert err.value.code == 501


async def test_plaintext_refused_over_cleartext_tcp(cyrus: TempCyrus,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    creds = Credentials(LMTP_USER, LMTP_PASSWORD)
    with pytest.raises(AuthenticationError, match="not used over unencrypted TCP") as err:
        await connect(cyrus.destination_tcp, auth=AuthPolicy(creds, ("PLAIN", "LOGIN")))
    saw(err.value)
    assert "not attempted" in caplog.text
    async with Agent.for_server(cyrus.destination_tcp, sasl_credentials=creds,
                                sasl_mechanisms=("PLAIN", "LOGIN")) as agent:
        (r,) = await agent.deliver(MSG, sender="s@example.org", recipients=["bob@example.com"])
    saw(r)
    assert r.transient and r.stage == "auth" and "noplaintext" in r.text


async def test_unix_socket_delivers_without_auth(cyrus: TempCyrus) -> None:
    async with await connect(cyrus.destination_unix) as c:
        assert c.capabilities.auth == {"EXTERNAL"}
        (r,) = await c.send("s@example.org", ["carol@example.com"], MSG)
    assert r.delivered


async def test_agent_with_a_password_map_and_two_identities(cyrus: TempCyrus,
                                                            tmp_path: Path) -> None:
    _write_map(tmp_path / "front1", f"{cyrus.destination_tcp} {LMTP_USER}:{LMTP_PASSWORD}\n")
    _write_map(tmp_path / "front2", f"127.0.0.1 {OTHER_USER}:{OTHER_PASSWORD}\n")
    conf = tmp_path / "lmtpfast.toml"
    conf.write_text(f"""
default = "one:{cyrus.destination_tcp}"
transport_map = {{ "two.example" = "two:{cyrus.destination_tcp}" }}
[transports.one]
sasl_password_maps = "front1"
[transports.two]
sasl_password_maps = "front2"
sasl_mechanisms = "SCRAM-SHA-1"
""")
    async with Agent.from_config(conf) as agent:
        results = await agent.deliver(MSG, sender="s@example.org",
                                      recipients=["alice@example.com", "bob@two.example"])
        assert [r.delivered for r in results] == [True, True], [r.line() for r in results]
        pools = agent.pools()
        keys = {name: pool.key for (name, _), pool in pools.items()}
        assert keys["one"][2] == LMTP_USER and keys["two"][2] == OTHER_USER
        for (name, _), pool in pools.items():
            async with pool.connection() as c:
                want = (LMTP_USER, "SCRAM-SHA-256") if name == "one" else (OTHER_USER,
                                                                           "SCRAM-SHA-1")
                assert (c.authenticated_as, c.auth_mechanism) == want
        saw(agent, pools, results)


async def test_cyrus_starttls_then_plain(tmp_path: Path) -> None:
    """With allowplaintext: no, Cyrus offers PLAIN only after STARTTLS; the
    post-TLS capabilities are the ones used, and noplaintext allows PLAIN under TLS."""
    trustme = pytest.importorskip("trustme")
    if find_cyrus() is not None:
        pytest.skip("Cyrus unavailable")  # the module fixture reports it (and fails under CI)
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    tls = TLSPolicy(level="verify", ca_file=str(tmp_path / "ca.pem"), server_hostname="localhost")
    plain = AuthPolicy(Credentials(LMTP_USER, LMTP_PASSWORD), ("PLAIN",))
    with TempCyrus({LMTP_USER: LMTP_PASSWORD}, allowplaintext=False,
                   ssl_cert=tmp_path / "cert.pem", ssl_key=tmp_path / "key.pem") as cy:
        async with await connect(cy.destination_tcp) as c:
            assert c.capabilities.starttls
            assert "PLAIN" not in c.capabilities.auth and "CRAM-MD5" in c.capabilities.auth
        with pytest.raises(AuthenticationError, match="it offers SCRAM-SHA-512") as err:
            await connect(cy.destination_tcp, auth=AuthPolicy(plain.credentials, ("PLAIN",),
                                                              allow_plaintext=True))
        saw(err.value)
        async with await connect(cy.destination_tcp, tls=tls, auth=plain) as c:
            assert c.tls is not None and c.tls.verified
            assert {"PLAIN", "LOGIN", "SCRAM-SHA-256-PLUS"} <= c.capabilities.auth
            assert (c.authenticated_as, c.auth_mechanism) == (LMTP_USER, "PLAIN")
            (r,) = await c.send("s@example.org", ["bob@example.com"], MSG)
            saw(r, c)
        assert r.delivered
        # The default order picks SCRAM-SHA-256, not its -PLUS variant (no channel binding).
        async with await connect(cy.destination_tcp, tls=tls,
                                 auth=Credentials(LMTP_USER, LMTP_PASSWORD)) as c:
            assert c.auth_mechanism == "SCRAM-SHA-256"
        assert len(cy.messages("bob")) == 1


async def _cli(*args: str) -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lmtpfast", *args, env=env, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(MSG), 60)
    assert proc.returncode is not None
    saw(out.decode(), err.decode())
    return proc.returncode, out.decode(), err.decode()


async def test_cli_probe_and_send_authenticate(cyrus: TempCyrus, tmp_path: Path) -> None:
    pmap = _write_map(tmp_path / "map", f"{cyrus.destination_tcp} {LMTP_USER}:{LMTP_PASSWORD}\n")
    code, out, err = await _cli("probe", cyrus.destination_tcp, "--count", "1",
                                "--sasl-password-map", str(pmap))
    assert code == 0, err
    assert f"auth:         {LMTP_USER} (SCRAM-SHA-256)" in out
    assert "capability: AUTH SCRAM" in out
    pwfile = _write_map(tmp_path / "pw", LMTP_PASSWORD + "\n")
    code, out, err = await _cli("send", "--server", cyrus.destination_tcp, "--from",
                                "s@example.org", "--rcpt", "bob@example.com", "--sasl-user",
                                LMTP_USER, "--sasl-password-file", str(pwfile),
                                "--sasl-mechanisms", "CRAM-MD5", "-")
    assert code == 0, err
    assert out.startswith("2.1.5 bob@example.com: 250 2.1.5 Success")
    bad = _write_map(tmp_path / "bad", WRONG_PASSWORD + "\n")
    code, out, err = await _cli("send", "--server", cyrus.destination_tcp, "--from",
                                "s@example.org", "--rcpt", "bob@example.com", "--sasl-user",
                                LMTP_USER, "--sasl-password-file", str(bad), "-")
    assert code == 75 and "auth: 501 5.5.4 undefined error!" in err
    pwfile.chmod(0o644)
    code, out, err = await _cli("probe", cyrus.destination_tcp, "--sasl-user", LMTP_USER,
                                "--sasl-password-file", str(pwfile))
    assert code == 78 and f"chmod 600 {pwfile}" in err
    code, out, err = await _cli("probe", cyrus.destination_tcp, "--sasl-user", LMTP_USER)
    assert code == 64 and "--sasl-password-file or --sasl-password-map" in err


# -- last: nothing anywhere contains a password ------------------------------------------


def test_zz_no_password_in_anything_captured() -> None:
    """Grep every log record, output, result, exception text and repr this module saw."""
    assert len(SEEN) > 50  # the collection really ran
    everything = "\n".join(SEEN)
    for secret in SECRETS:
        assert secret not in everything
        # Nor in the encodings a careless log might use.
        for form in (base64.b64encode(secret.encode()).decode(), secret.encode().hex()):
            assert form not in everything
