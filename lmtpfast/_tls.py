"""STARTTLS (RFC 3207) policy: security levels, SSL contexts, what the session negotiated.

Security levels follow Postfix's ``lmtp_tls_security_level``:

``none``
    Never STARTTLS, even when the server offers it.
``may``
    Opportunistic: STARTTLS when the server offers it, otherwise plain text.
    The certificate is not checked (there is no policy to check it against:
    a verified ``may`` would only turn an attack into plain text). A failed
    handshake makes the client reconnect once in plain text, as Postfix does.
``encrypt``
    TLS is mandatory: a server that does not offer STARTTLS (or refuses it)
    is a configuration error for that destination, and its recipients are
    deferred. **Unlike Postfix**, the certificate *is* verified by default
    (against ``ca_file``/``ca_path`` or the system store, and the host name
    against ``server_hostname``): encryption without authentication does not
    stop an active attacker, and lmtpfast's rule is that verification is on
    whenever encryption is required. ``verify=False`` gives Postfix's
    unauthenticated ``encrypt`` when that is really wanted (a back end with a
    self-signed certificate on a trusted network).
``verify``
    TLS is mandatory and the certificate must verify: chain to a trusted CA
    and ``server_hostname`` (default: the destination's host) in the
    certificate. ``verify=False`` is refused at this level.

TLS 1.2 is the minimum by default. Contexts are cached per policy, so a pool
opening many connections loads the CA store once.

Facts checked against Dovecot 2.3.19 (``ssl = yes``, a throwaway CA made with
``trustme``): LHLO over TCP *and* over the unix socket ends with ``STARTTLS``;
``STARTTLS`` is answered ``220 2.0.0 Begin TLS negotiation now.``; the
handshake is TLS 1.3; a client trusting another CA fails with
``[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get
local issuer certificate``; the post-TLS LHLO no longer lists ``STARTTLS``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from ._errors import ConfigurationError, ReplyError, TLSError
from ._lazy import get_logger

if TYPE_CHECKING:
    import ssl

    from .proto import Reply

__all__ = [
    "SECURITY_LEVELS",
    "SecurityLevel",
    "TLSInfo",
    "TLSPolicy",
    "check_starttls_reply",
    "make_context",
    "server_context",
    "tls_info",
    "wants_starttls",
]


SecurityLevel = Literal["none", "may", "encrypt", "verify"]
#: The levels, weakest first.
SECURITY_LEVELS: tuple[SecurityLevel, ...] = ("none", "may", "encrypt", "verify")

# ssl is imported only when a context is made: `lmtpfast send` in plain text
# (one process per message) does not pay for OpenSSL's start-up.
_VERSIONS = ("TLSv1.2", "TLSv1.3")


class TLSPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How to use STARTTLS with one destination (hashable: it is part of a pool's key).

    ``TLSPolicy()`` is level ``none``; ``TLSPolicy.parse("verify")`` or
    ``TLSPolicy(level="verify", ca_file="/etc/ssl/lmtp-ca.pem")`` build others.
    """

    #: ``none``, ``may``, ``encrypt`` or ``verify`` (see the module docstring).
    level: SecurityLevel = "none"
    #: PEM file of trusted CAs; with neither this nor ``ca_path``, the system store.
    ca_file: str | None = None
    #: Folder of hashed CA certificates (``c_rehash``), as OpenSSL's ``-CApath``.
    ca_path: str | None = None
    #: Client certificate (PEM) to present, and its key (``key_file`` may be
    #: omitted when the certificate file holds the key too).
    cert_file: str | None = None
    key_file: str | None = None
    #: The name the certificate must carry and the SNI sent. Default: the
    #: destination's host. Needed for unix sockets when the certificate is verified.
    server_hostname: str | None = None
    #: Verify the certificate. ``None``: yes for ``encrypt`` and ``verify`` (only
    #: ``encrypt`` accepts ``False``); ``may`` never verifies.
    verify: bool | None = None
    #: Oldest protocol version accepted.
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"

    def __post_init__(self) -> None:
        if self.level not in SECURITY_LEVELS:
            raise ConfigurationError(
                f"unknown TLS security level {self.level!r} (use one of: "
                f"{', '.join(SECURITY_LEVELS)})", field="tls_security_level")
        if self.level == "verify" and self.verify is False:
            raise ConfigurationError(
                "level 'verify' always verifies the certificate; use 'encrypt' with "
                "verify = false for unauthenticated encryption", field="tls_verify")
        if self.level in ("none", "may") and self.verify:
            raise ConfigurationError(
                f"level {self.level!r} does not verify certificates (a failed check would only "
                "fall back to plain text); use 'verify'", field="tls_verify")
        if self.key_file is not None and self.cert_file is None:
            raise ConfigurationError("a client key needs its certificate (tls_cert_file)",
                                     field="tls_key_file")
        if self.min_version not in _VERSIONS:
            raise ConfigurationError(f"must be 'TLSv1.2' or 'TLSv1.3', got {self.min_version!r}",
                                     field="tls_min_version")
        for name in ("ca_file", "ca_path", "cert_file", "key_file", "server_hostname"):
            value = getattr(self, name)
            if value is not None and (not value or "\0" in value):
                raise ConfigurationError(f"must not be empty, got {value!r}", field=f"tls_{name}")

    @classmethod
    def parse(cls, value: TLSPolicy | str | None, **options: Any) -> TLSPolicy:
        """A policy from a level name (or ``None`` for ``none``), or ``value`` as is."""
        if isinstance(value, TLSPolicy):
            if options:
                return msgspec.structs.replace(value, **options)
            return value
        if value is None:
            value = "none"
        if not isinstance(value, str):
            raise ConfigurationError(f"TLS policy must be a level name or a TLSPolicy, "
                                     f"not {type(value).__name__}", field="tls_security_level")
        return cls(level=value.strip().lower(), **options)  # type: ignore[arg-type]

    @property
    def enabled(self) -> bool:
        """STARTTLS is attempted when offered."""
        return self.level != "none"

    @property
    def required(self) -> bool:
        """The session must not go on without TLS."""
        return self.level in ("encrypt", "verify")

    @property
    def verifies(self) -> bool:
        """The server's certificate is checked (chain and host name)."""
        if self.level == "verify":
            return True
        if self.level == "encrypt":
            return self.verify is not False
        return False

    def hostname_for(self, host: str) -> str | None:
        """The name to verify and send as SNI for a destination whose host is ``host``."""
        name = self.server_hostname or host or None
        if name is None and self.verifies:
            raise ConfigurationError(
                f"TLS level {self.level!r} verifies the certificate, but a unix socket has no "
                "host name to check it against: set tls_server_hostname",
                field="tls_server_hostname")
        return name

    def context(self) -> ssl.SSLContext:
        """The (cached) client SSL context for this policy."""
        return make_context(self)

    def __str__(self) -> str:
        return self.level


@functools.lru_cache(maxsize=64)
def make_context(policy: TLSPolicy) -> ssl.SSLContext:
    """A client context for ``policy``: TLS >= ``min_version``, verification as the level says.

    Raises :class:`ConfigurationError` naming the file when a CA, certificate
    or key file cannot be loaded.
    """
    import ssl

    try:
        if policy.verifies:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=policy.ca_file,
                                             capath=policy.ca_path)
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    except (OSError, ssl.SSLError) as exc:
        where = policy.ca_file or policy.ca_path
        raise ConfigurationError(f"cannot load trusted CAs: {_why(exc)}", source=where,
                                 field="tls_ca_file") from None
    ctx.minimum_version = _tls_version(policy.min_version)
    if policy.cert_file is not None:
        try:
            ctx.load_cert_chain(policy.cert_file, policy.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"cannot load the client certificate or key: {_why(exc)}",
                                     source=policy.cert_file, field="tls_cert_file") from None
    return ctx


def server_context(cert_file: str, key_file: str, *,
                   min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """A server context (STARTTLS offered by the proxy): this certificate and key, TLS >= min.

    Raises :class:`ConfigurationError` naming the file when they cannot be loaded.
    """
    import ssl

    if min_version not in _VERSIONS:
        raise ConfigurationError(f"unknown TLS version {min_version!r}", field="tls_min_version")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = _tls_version(min_version)
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load the server certificate or key: {_why(exc)}",
                                 source=cert_file, field="tls_cert_file") from None
    return ctx


def _tls_version(name: str) -> ssl.TLSVersion:
    import ssl

    return ssl.TLSVersion[name.replace(".", "_")]  # "TLSv1.2" -> TLSVersion.TLSv1_2


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


class TLSInfo(msgspec.Struct, frozen=True):
    """What a session negotiated (``Client.tls``; ``None`` there when in plain text)."""

    version: str
    cipher: str
    bits: int
    #: ``CN=...`` style subject of the server's certificate when it was
    #: verified (an unverified certificate is not parsed: see ``fingerprint``).
    peer_subject: str | None
    peer_issuer: str | None
    #: The certificate's subjectAltName entries (``DNS:localhost`` ...), when verified.
    peer_alt_names: tuple[str, ...]
    #: SHA-256 of the server certificate (DER), hex, colon-separated.
    fingerprint: str | None
    #: True when the chain and host name were verified.
    verified: bool
    server_hostname: str | None

    def summary(self) -> str:
        if not self.verified:
            who = "certificate not verified"
        else:
            who = ", ".join(self.peer_alt_names) or self.peer_subject or "?"
        return f"{self.version} {self.cipher} ({self.bits} bits), {who}"


def _name(parts: Any) -> str | None:
    if not parts:
        return None
    out = []
    for rdn in parts:
        for key, value in rdn:
            short = {"commonName": "CN", "organizationName": "O",
                     "organizationalUnitName": "OU", "countryName": "C",
                     "localityName": "L", "stateOrProvinceName": "ST"}.get(key, key)
            out.append(f"{short}={value}")
    return ", ".join(out)


def tls_info(ssl_object: ssl.SSLObject | ssl.SSLSocket, verified: bool,
             server_hostname: str | None) -> TLSInfo:
    """Describe an established TLS session."""
    cipher = ssl_object.cipher() or ("?", "?", 0)
    der = ssl_object.getpeercert(binary_form=True)
    fingerprint = None
    if der:
        import hashlib

        digest = hashlib.sha256(der).hexdigest().upper()
        fingerprint = ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))
    subject = issuer = None
    alt_names: tuple[str, ...] = ()
    if verified:
        cert = ssl_object.getpeercert()
        if cert:
            subject = _name(cert.get("subject"))
            issuer = _name(cert.get("issuer"))
            sans: Any = cert.get("subjectAltName", ())
            alt_names = tuple(f"{kind}:{value}" for kind, value in sans)
    return TLSInfo(version=ssl_object.version() or "?", cipher=cipher[0], bits=int(cipher[2] or 0),
                   peer_subject=subject, peer_issuer=issuer, peer_alt_names=alt_names,
                   fingerprint=fingerprint, verified=verified, server_hostname=server_hostname)


def wants_starttls(policy: TLSPolicy, offered: bool, peer: str) -> bool:
    """Whether the session says STARTTLS after its first LHLO (a pure decision).

    Raises :class:`TLSError` when the policy requires TLS and ``peer`` does not
    offer it.
    """
    if not policy.enabled:
        return False
    if not offered:
        if policy.required:
            raise TLSError(f"TLS is required (tls_security_level = {policy.level}) but {peer} "
                           "does not offer STARTTLS: configure TLS on the server or lower the "
                           "level for this destination")
        return False
    return True


def check_starttls_reply(policy: TLSPolicy, reply: Reply, peer: str) -> bool:
    """True when ``reply`` (to STARTTLS) lets the handshake begin; False: go on in plain text.

    A 421 raises :class:`ReplyError` (the server is closing: going on in plain
    text would send MAIL into a connection that is going away); any other
    refusal raises :class:`TLSError` when TLS is required.
    """
    if reply.code == 220:
        return True
    if reply.code == 421:
        raise ReplyError(reply.code, reply.enhanced, reply.text, "starttls")
    if policy.required:
        raise TLSError(f"TLS is required (tls_security_level = {policy.level}) but {peer} "
                       f"refused STARTTLS: {reply.code} {reply.text}")
    get_logger("lmtpfast.tls").info(
        "%s refused STARTTLS (%d %s); level 'may': going on in plain text",
        peer, reply.code, reply.text)
    return False
