"""STARTTLS (RFC 3207) against a real Dovecot with SSL, and scripted servers for the corners.

Certificates come from a throwaway CA made by ``trustme`` for ``localhost``;
a second CA plays the wrong one. Every async test runs on asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from lmtpfast import Agent, ConfigurationError, Pool, RemoteProtocolError, TLSError, connect
from lmtpfast._testing.dovecot import TempDovecot, body_as_sent
from lmtpfast._testing.fixtures import require_peer
from lmtpfast._tls import TLSPolicy, make_context

trustme = pytest.importorskip("trustme")

MSG = b"From: s@example.org\r\nSubject: tls\r\n\r\nover TLS\r\n"


class Certs:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        ca = trustme.CA()
        cert = ca.issue_cert("localhost")
        self.cert = folder / "server.pem"
        self.key = folder / "server.key"
        self.ca = folder / "ca.pem"
        self.other_ca = folder / "other-ca.pem"
        self.client_cert = folder / "client.pem"
        cert.cert_chain_pems[0].write_to_path(str(self.cert))
        cert.private_key_pem.write_to_path(str(self.key))
        ca.cert_pem.write_to_path(str(self.ca))
        trustme.CA().cert_pem.write_to_path(str(self.other_ca))
        ca.issue_cert("client.example").private_key_and_cert_chain_pem.write_to_path(
            str(self.client_cert))
        # Dovecot reads the key as root at start-up; the folder may stay private.
        self.server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.server_context)


@pytest.fixture(scope="module")
def certs() -> Iterator[Certs]:
    with tempfile.TemporaryDirectory(prefix="lmtpfast-tls-") as d:
        yield Certs(Path(d))


@pytest.fixture(scope="module")
def dovecot_tls(certs: Certs) -> Iterator[TempDovecot]:
    """One Dovecot with ``ssl = yes`` for the module (STARTTLS on TCP and unix)."""
    require_peer("dovecot")
    with TempDovecot(ssl_cert=certs.cert, ssl_key=certs.key) as dv:
        yield dv


@pytest.fixture
def dv(dovecot_tls: TempDovecot) -> TempDovecot:
    dovecot_tls.reset_mail()
    return dovecot_tls


pytestmark = pytest.mark.dovecot


# -- each level against Dovecot with SSL ------------------------------------------------


async def test_none_stays_plain_although_offered(dv: TempDovecot) -> None:
    async with await connect(dv.destination_tcp, tls="none") as c:
        assert c.tls is None
        assert c.capabilities.starttls  # offered, not used
        results = await c.send("s@example.org", ["alice@example.com"], MSG)
    assert results[0].delivered


@pytest.mark.parametrize("via", ["tcp", "unix"])
async def test_may_uses_tls_without_verifying(dv: TempDovecot, via: str, engine: str) -> None:
    dest = dv.destination_tcp if via == "tcp" else dv.destination_unix
    async with await connect(dest, tls="may", engine=engine) as c:
        assert c.tls is not None
        assert c.tls.version in ("TLSv1.2", "TLSv1.3")
        assert not c.tls.verified
        assert c.tls.peer_subject is None and c.tls.fingerprint
        # Capabilities come from the LHLO said again after TLS only: Dovecot
        # lists STARTTLS before TLS and not after.
        assert not c.capabilities.starttls
        assert "STARTTLS" not in c.lhlo_reply.lines
        assert c.capabilities.pipelining and c.capabilities.chunking
        results = await c.send("s@example.org", ["alice@example.com", "nobody@example.com"],
                               MSG)
    assert [r.code for r in results] == [250, 550]
    assert body_as_sent(dv.messages("alice")[0]) == MSG


async def test_encrypt_verifies_by_default(dv: TempDovecot, certs: Certs) -> None:
    # The destination's host is 127.0.0.1, which the certificate does not name.
    with pytest.raises(TLSError, match="CERTIFICATE_VERIFY_FAILED"):
        await connect(dv.destination_tcp, tls=TLSPolicy(level="encrypt", ca_file=str(certs.ca)))
    policy = TLSPolicy(level="encrypt", ca_file=str(certs.ca), server_hostname="localhost")
    async with await connect(dv.destination_tcp, tls=policy) as c:
        assert c.tls is not None and c.tls.verified
        assert (await c.send("s@example.org", ["bob@example.com"], MSG))[0].delivered


async def test_encrypt_without_verification_when_asked(dv: TempDovecot) -> None:
    # Postfix's unauthenticated "encrypt": no CA given, any certificate.
    async with await connect(dv.destination_unix, tls=TLSPolicy(level="encrypt",
                                                                verify=False)) as c:
        assert c.tls is not None and not c.tls.verified
        assert (await c.send("s@example.org", ["bob@example.com"], MSG))[0].delivered


@pytest.mark.parametrize("via", ["tcp", "unix"])
async def test_verify_with_the_right_ca(dv: TempDovecot, certs: Certs, via: str) -> None:
    dest = dv.destination_tcp if via == "tcp" else dv.destination_unix
    policy = TLSPolicy(level="verify", ca_file=str(certs.ca), server_hostname="localhost")
    async with await connect(dest, tls=policy) as c:
        info = c.tls
        assert info is not None
        assert info.verified and info.server_hostname == "localhost"
        assert "DNS:localhost" in info.peer_alt_names
        assert info.peer_issuer and "trustme" in info.peer_issuer
        assert "localhost" in info.summary()
        results = await c.send("s@example.org", ["carol@example.com"], MSG)
    assert results[0].delivered
    assert body_as_sent(dv.messages("carol")[0]) == MSG


async def test_verify_with_the_wrong_ca_fails(dv: TempDovecot, certs: Certs) -> None:
    policy = TLSPolicy(level="verify", ca_file=str(certs.other_ca), server_hostname="localhost")
    with pytest.raises(TLSError) as err:
        await connect(dv.destination_tcp, tls=policy)
    assert "CERTIFICATE_VERIFY_FAILED" in str(err.value)
    assert isinstance(err.value, ConnectionError)  # TLSError is a ConnectError


async def test_verify_with_the_wrong_name_fails(dv: TempDovecot, certs: Certs) -> None:
    policy = TLSPolicy(level="verify", ca_file=str(certs.ca), server_hostname="mx.example.org")
    with pytest.raises(TLSError, match=r"CERTIFICATE_VERIFY_FAILED.*mx\.example\.org"):
        await connect(dv.destination_tcp, tls=policy)


async def test_verify_against_the_system_store_fails_for_a_private_ca(dv: TempDovecot) -> None:
    with pytest.raises(TLSError, match="CERTIFICATE_VERIFY_FAILED"):
        await connect(dv.destination_tcp, tls=TLSPolicy(level="verify",
                                                        server_hostname="localhost"))


async def test_verify_on_a_unix_socket_needs_a_name(dv: TempDovecot, certs: Certs) -> None:
    with pytest.raises(ConfigurationError, match="tls_server_hostname"):
        await connect(dv.destination_unix, tls=TLSPolicy(level="verify", ca_file=str(certs.ca)))


async def test_client_certificate_is_loaded_and_offered(dv: TempDovecot, certs: Certs) -> None:
    policy = TLSPolicy(level="verify", ca_file=str(certs.ca), server_hostname="localhost",
                       cert_file=str(certs.client_cert))
    async with await connect(dv.destination_tcp, tls=policy) as c:
        assert c.tls is not None and c.tls.verified
    missing = TLSPolicy(level="verify", ca_file=str(certs.ca), server_hostname="localhost",
                        cert_file=str(certs.folder / "nope.pem"))
    with pytest.raises(ConfigurationError, match=r"nope\.pem"):
        await connect(dv.destination_tcp, tls=missing)


async def test_agent_defers_on_certificate_failure(dv: TempDovecot, certs: Certs) -> None:
    policy = TLSPolicy(level="verify", ca_file=str(certs.other_ca), server_hostname="localhost")
    async with Agent.for_server(dv.destination_tcp, tls=policy) as agent:
        results = await agent.deliver(MSG, sender="s@example.org",
                                      recipients=["alice@example.com", "bob@example.com"])
    for r in results:
        assert r.transient and r.local
        assert (r.code, r.enhanced, r.stage) == (454, "4.7.5", "starttls")
        assert "CERTIFICATE_VERIFY_FAILED" in r.text
    assert dv.messages("alice") == []


async def test_agent_reuses_verified_tls_connections(dv: TempDovecot, certs: Certs) -> None:
    policy = TLSPolicy(level="verify", ca_file=str(certs.ca), server_hostname="localhost")
    async with Agent.for_server(dv.destination_tcp, tls=policy, max_connections=1) as agent:
        for _ in range(3):
            (r,) = await agent.deliver(MSG, sender="s@example.org",
                                       recipients=["dave@example.com"])
            assert r.delivered, r.line()
            await asyncio.sleep(0.05)  # let TLS 1.3 session tickets arrive while idle
        (pool,) = agent.pools().values()
        assert pool.key == (pool.destination, policy, None)
        assert pool.stats.connections_opened == 1
        async with pool.connection() as c:
            assert c.tls is not None and c.tls.verified
    assert len(dv.messages("dave")) == 3


# -- servers without STARTTLS ---------------------------------------------------------


async def test_encrypt_fails_without_starttls(dovecot: TempDovecot) -> None:
    for level in ("encrypt", "verify"):
        with pytest.raises(TLSError, match="does not offer STARTTLS"):
            await connect(dovecot.destination_tcp,
                          tls=TLSPolicy(level=level, server_hostname="localhost"))  # type: ignore[arg-type]


async def test_agent_defers_when_starttls_is_missing(dovecot: TempDovecot) -> None:
    async with Agent.for_server(dovecot.destination_tcp, tls="encrypt") as agent:
        results = await agent.deliver(MSG, sender="s@example.org",
                                      recipients=["alice@example.com", "bob@example.com"])
        stats = agent.stats
    for r in results:
        assert r.transient and (r.code, r.enhanced, r.stage) == (454, "4.7.5", "starttls")
        assert "TLS is required (tls_security_level = encrypt)" in r.text
        assert "does not offer STARTTLS" in r.text
    assert stats.connect_failures == 1  # one attempt for the whole batch, no retry loop
    assert dovecot.messages("alice") == []


async def test_may_falls_back_to_plain_without_starttls(dovecot: TempDovecot) -> None:
    async with await connect(dovecot.destination_tcp, tls="may") as c:
        assert c.tls is None
        assert (await c.send("s@example.org", ["alice@example.com"], MSG))[0].delivered


# -- scripted servers: handshake failure, injection after the 220 -----------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"127.0.0.1:{port}"


LHLO_TLS = b"250-fake.example\r\n250-PIPELINING\r\n250 STARTTLS\r\n"


async def test_may_retries_in_plain_text_after_a_failed_handshake(
        caplog: pytest.LogCaptureFixture) -> None:
    sessions: list[list[bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen: list[bytes] = []
        sessions.append(seen)
        writer.write(b"220 fake.example LMTP\r\n")
        while line := await reader.readline():
            seen.append(line)
            verb = line.split()[0].upper()
            if verb == b"LHLO":
                writer.write(LHLO_TLS)
            elif verb == b"STARTTLS":
                writer.write(b"220 2.0.0 go ahead\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(b"this is not a TLS record\r\n" * 4)  # the handshake must fail
                await writer.drain()
                writer.close()
                return
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                writer.close()
                return

    server, dest = await _serve(handler)
    async with server:
        with caplog.at_level(logging.WARNING, logger="lmtpfast"):
            c = await connect(dest, tls="may")
        assert c.tls is None
        await c.quit()
        # The same failure is fatal at "encrypt": no plain-text retry there.
        with pytest.raises(TLSError, match=r"TLS handshake with .* failed"):
            await connect(dest, tls=TLSPolicy(level="encrypt", verify=False))
    assert [s[-1].split()[0] for s in sessions] == [b"STARTTLS", b"QUIT", b"STARTTLS"]
    assert b"STARTTLS\r\n" not in sessions[1]
    assert "retrying in plain text" in caplog.text


@pytest.mark.parametrize("injected", [b"250-PIPELINING", b"250 injected reply\r\n"],
                         ids=["partial-line", "whole-reply"])
async def test_bytes_after_the_220_are_refused(certs: Certs, injected: bytes,
                                               engine: str) -> None:
    """CVE-2011-0411: plain-text bytes queued behind the 220 must not count as TLS replies."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 fake.example LMTP\r\n")
        while line := await reader.readline():
            verb = line.split()[0].upper()
            if verb == b"LHLO":
                writer.write(LHLO_TLS)
            elif verb == b"STARTTLS":
                writer.write(b"220 2.0.0 go ahead\r\n" + injected)
                await writer.drain()
                try:
                    await writer.start_tls(certs.server_context)
                except (ssl.SSLError, OSError):
                    pass
                writer.close()
                return

    server, dest = await _serve(handler)
    policy = TLSPolicy(level="may")
    async with server:
        with pytest.raises(RemoteProtocolError):
            await connect(dest, tls=policy, engine=engine)


async def test_starttls_refused_is_fatal_only_when_required() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 fake.example LMTP\r\n")
        while line := await reader.readline():
            verb = line.split()[0].upper()
            if verb == b"LHLO":
                writer.write(LHLO_TLS)
            elif verb == b"STARTTLS":
                writer.write(b"454 4.7.0 TLS not available due to temporary reason\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                writer.close()
                return
            else:
                writer.write(b"250 ok\r\n")

    server, dest = await _serve(handler)
    async with server:
        async with await connect(dest, tls="may") as c:
            assert c.tls is None
            await c.noop()  # the session goes on in plain text
        with pytest.raises(TLSError, match="refused STARTTLS: 454 TLS not available"):
            await connect(dest, tls=TLSPolicy(level="encrypt", verify=False))


# -- policy objects ------------------------------------------------------------------


def test_policy_validation() -> None:
    assert TLSPolicy() == TLSPolicy.parse(None) == TLSPolicy.parse("none")
    assert TLSPolicy.parse(" Verify ").level == "verify"
    assert TLSPolicy.parse("may").enabled and not TLSPolicy.parse("may").required
    assert not TLSPolicy.parse("may").verifies
    assert TLSPolicy.parse("encrypt").verifies and TLSPolicy.parse("encrypt").required
    assert not TLSPolicy(level="encrypt", verify=False).verifies
    assert TLSPolicy.parse("verify").verifies
    with pytest.raises(ConfigurationError, match="unknown TLS security level 'secure'"):
        TLSPolicy.parse("secure")
    with pytest.raises(ConfigurationError, match="always verifies"):
        TLSPolicy(level="verify", verify=False)
    with pytest.raises(ConfigurationError, match="does not verify"):
        TLSPolicy(level="may", verify=True)
    with pytest.raises(ConfigurationError, match="needs its certificate"):
        TLSPolicy(level="may", key_file="/x.key")
    with pytest.raises(ConfigurationError, match=r"TLSv1\.2"):
        TLSPolicy(level="may", min_version="TLSv1.1")  # type: ignore[arg-type]
    # Hashable (part of a pool key) and equal by value.
    assert len({TLSPolicy(level="may"), TLSPolicy(level="may")}) == 1


def test_context_settings_and_cache(certs: Certs) -> None:
    policy = TLSPolicy(level="verify", ca_file=str(certs.ca))
    ctx = make_context(policy)
    assert ctx is policy.context()  # one per policy, not per connection
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    loose = make_context(TLSPolicy(level="may"))
    assert loose.verify_mode == ssl.CERT_NONE and not loose.check_hostname
    assert make_context(TLSPolicy(level="may", min_version="TLSv1.3")).minimum_version == \
        ssl.TLSVersion.TLSv1_3
    with pytest.raises(ConfigurationError, match="cannot load trusted CAs"):
        make_context(TLSPolicy(level="verify", ca_file=str(certs.folder / "missing.pem")))


async def test_pool_key_includes_the_tls_policy() -> None:
    a = Pool("127.0.0.1:1", tls="may")
    b = Pool("127.0.0.1:1", tls=TLSPolicy(level="verify", server_hostname="localhost"))
    assert a.key != b.key and a.key[1].level == "may"


# -- the command line -----------------------------------------------------------------


async def _cli(*args: str) -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lmtpfast", *args, env=env, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(MSG), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_probe_shows_tls_details(dv: TempDovecot, certs: Certs) -> None:
    code, out, err = await _cli("probe", dv.destination_tcp, "--count", "1", "--tls", "verify",
                                "--ca-file", str(certs.ca), "--tls-server-name", "localhost")
    assert code == 0, err
    assert "tls:          TLSv1.3" in out
    assert "(verified, issuer O=trustme" in out
    assert "names:      DNS:localhost" in out
    assert "capability: STARTTLS" not in out  # the post-TLS capabilities
    code, out, err = await _cli("probe", dv.destination_tcp, "--count", "0", "--tls", "verify",
                                "--ca-file", str(certs.other_ca), "--tls-server-name",
                                "localhost")
    assert code == 75 and "CERTIFICATE_VERIFY_FAILED" in err
    code, out, _ = await _cli("probe", dv.destination_tcp, "--count", "0")
    assert code == 0 and "tls:          none (plain text; level none)" in out
    assert "capability: STARTTLS" in out


async def test_send_over_tls(dv: TempDovecot, certs: Certs) -> None:
    code, out, err = await _cli("send", "--server", dv.destination_unix, "--from",
                                "s@example.org", "--rcpt", "alice@example.com", "--tls",
                                "verify", "--ca-file", str(certs.ca), "--tls-server-name",
                                "localhost", "-")
    assert code == 0, err
    assert out.startswith("2.0.0 alice@example.com: 250 2.0.0")
    code, _, err = await _cli("send", "--server", dv.destination_tcp, "--from", "s@example.org",
                              "--rcpt", "alice@example.com", "--tls", "may", "--tls-no-verify",
                              "-")
    assert code == 64 and "--tls-no-verify only goes with --tls encrypt" in err
