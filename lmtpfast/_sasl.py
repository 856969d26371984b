"""SASL client authentication for LMTP (RFC 4954 AUTH), stdlib only.

Mechanisms, best first (:data:`DEFAULT_MECHANISMS`):

``SCRAM-SHA-256`` (RFC 7677) and ``SCRAM-SHA-1`` (RFC 5802)
    Challenge-response; the password never crosses the wire and the server
    proves it knows it too: the server signature is checked before the
    session is used, and a mismatch is an :class:`AuthenticationError`. No
    channel binding (``n,,``). User name and password are prepared with
    SASLprep (RFC 4013, via :mod:`stringprep`).
``CRAM-MD5`` (RFC 2195)
    Challenge-response with HMAC-MD5; the password does not cross the wire
    but the server must store it in the clear.
``PLAIN`` (RFC 4616) and ``LOGIN`` (draft-murchison-sasl-login)
    The password crosses the wire (base64 is not encryption). Like Postfix's
    default ``smtp_sasl_security_options = noplaintext``, they are not used
    over an unencrypted TCP connection; they are allowed on unix sockets and
    once TLS is active (``AuthPolicy.allow_plaintext`` overrides both ways).

The mechanism is the first of ``AuthPolicy.mechanisms`` (a filter and a
preference order) that the server advertises and the policy allows. A server
that advertises no AUTH gets no AUTH (Postfix does the same); one whose AUTH
list has nothing usable is an :class:`AuthenticationError` naming both lists.

Credentials never appear in reprs, logs, exceptions or results: only the
user name is ever shown, and the exchange's lines are never quoted in an
error (a server's refusal is a :class:`ReplyError` with the server's own
words, at ``stage == "auth"``).

Facts checked against Cyrus lmtpd 3.6.1 (Debian 12, sasldb auxprop):
``AUTH SCRAM-SHA-512 SCRAM-SHA-384 SCRAM-SHA-256 SCRAM-SHA-224 SCRAM-SHA-1
DIGEST-MD5 CRAM-MD5 NTLM PLAIN LOGIN`` is advertised over TCP (the
libsasl2-modules of Debian 12 add the SHA-2 SCRAMs to what older notes
list); success is ``235 Authenticated!``; a wrong password, whatever the
mechanism, is ``501 5.5.4 undefined error!`` (the reason only reaches
syslog); a second AUTH is ``503 5.5.0 already authenticated``; after STARTTLS the
list adds PLAIN and LOGIN (with ``allowplaintext: no``) and the ``-PLUS``
(channel binding) SCRAM variants, which are not implemented here: the plain
SCRAM of the same hash is chosen, which TLS protects anyway; the SASL realm
is the server's ``servername``, so sasldb users must be created with
``saslpasswd2 -u SERVERNAME`` and authenticate with the bare user name.

hashlib, hmac, secrets and the SASLprep tables are imported where a mechanism
needs them: ``lmtpfast send`` without AUTH (one process per message) does not
load OpenSSL's digests for nothing.
"""

from __future__ import annotations

# base64 and binascii are imported by the code that runs an AUTH exchange:
# `lmtpfast send` without SASL (one process per message) does not load them.
from collections.abc import Awaitable, Callable, Iterable
from typing import ClassVar

import msgspec

from ._errors import AuthenticationError, ConfigurationError, LMTPError, ReplyError
from .proto import Reply

__all__ = [
    "DEFAULT_MECHANISMS",
    "MECHANISMS",
    "PLAINTEXT_MECHANISMS",
    "AuthPolicy",
    "Credentials",
    "Mechanism",
    "authenticate",
    "parse_mechanisms",
    "saslprep",
]

#: Every mechanism implemented here, best first: the default preference order.
DEFAULT_MECHANISMS: tuple[str, ...] = ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN")
#: Mechanisms that send the password itself (refused on plain TCP by default).
PLAINTEXT_MECHANISMS = frozenset({"PLAIN", "LOGIN"})

# SCRAM iteration counts accepted from a server: RFC 7677 asks for at least
# 4096 (fewer is a downgrade an impostor could use to crack the password
# faster); the upper bound keeps a hostile server from making us spin.
SCRAM_MIN_ITERATIONS = 4096
SCRAM_MAX_ITERATIONS = 10_000_000
# Challenge/response rounds after AUTH before the exchange is cancelled.
_MAX_ROUNDS = 8


class Credentials:
    """A user name and password for SASL, with an optional authorization identity.

    The password is kept out of ``repr()``/``str()``; equality compares it in
    constant time, and the hash uses only the identity.
    """

    __slots__ = ("_password", "authzid", "username")

    def __init__(self, username: str, password: str, authzid: str = "") -> None:
        if not isinstance(username, str) or not isinstance(password, str) \
                or not isinstance(authzid, str):
            raise TypeError("username, password and authzid must be str")
        if not username:
            raise ConfigurationError("empty SASL user name")
        for what, value in (("user name", username), ("password", password),
                            ("authorization identity", authzid)):
            if "\0" in value or "\r" in value or "\n" in value:
                raise ConfigurationError(f"the SASL {what} contains NUL, CR or LF")
        self.username = username
        self._password = password
        self.authzid = authzid

    @property
    def password(self) -> str:
        return self._password

    @property
    def identity(self) -> str:
        """Who the session authenticates as: ``user`` or ``user (as authzid)``."""
        return self.username if not self.authzid else f"{self.username} (as {self.authzid})"

    def __repr__(self) -> str:
        authz = f", authzid={self.authzid!r}" if self.authzid else ""
        return f"Credentials(username={self.username!r}, password=<redacted>{authz})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Credentials):
            return NotImplemented
        import hmac

        return (self.username == other.username and self.authzid == other.authzid
                and hmac.compare_digest(self._password.encode(), other._password.encode()))

    def __hash__(self) -> int:
        return hash((self.username, self.authzid))

    def __reduce__(self) -> str:
        # Pickling would copy the secret into files or queues unnoticed.
        raise TypeError("Credentials cannot be pickled")


def parse_mechanisms(mechanisms: str | Iterable[str]) -> tuple[str, ...]:
    """Mechanism names (a list, or one string separated by spaces or commas), checked and
    upper-cased, duplicates dropped, order kept."""
    if isinstance(mechanisms, str):
        mechanisms = mechanisms.replace(",", " ").split()
    out: list[str] = []
    for m in mechanisms:
        name = str(m).strip().upper()
        if name not in MECHANISMS:
            raise ConfigurationError(
                f"unsupported SASL mechanism {m!r} (supported: {', '.join(DEFAULT_MECHANISMS)})",
                field="sasl_mechanisms")
        if name not in out:
            out.append(name)
    if not out:
        raise ConfigurationError("no SASL mechanism left", field="sasl_mechanisms")
    return tuple(out)


class AuthPolicy(msgspec.Struct, frozen=True):
    """How to authenticate to one destination.

    ``mechanisms`` filters and orders the mechanisms (default: every one,
    best first). ``allow_plaintext``: ``None`` (default) refuses PLAIN and
    LOGIN on unencrypted TCP and allows them on unix sockets and under TLS
    (Postfix's ``noplaintext``); ``True`` always allows them, ``False`` never.
    """

    credentials: Credentials
    mechanisms: tuple[str, ...] = DEFAULT_MECHANISMS
    allow_plaintext: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.credentials, Credentials):
            raise TypeError("credentials must be a lmtpfast.Credentials")
        msgspec.structs.force_setattr(self, "mechanisms", parse_mechanisms(self.mechanisms))

    @classmethod
    def parse(cls, value: AuthPolicy | Credentials | None) -> AuthPolicy | None:
        if value is None or isinstance(value, AuthPolicy):
            return value
        if isinstance(value, Credentials):
            return cls(value)
        raise TypeError(f"auth must be Credentials or AuthPolicy, not {type(value).__name__}")

    @property
    def identity(self) -> str:
        return self.credentials.identity

    def plaintext_ok(self, *, encrypted: bool, unix: bool) -> bool:
        if self.allow_plaintext is not None:
            return self.allow_plaintext
        return encrypted or unix

    def select(self, offered: Iterable[str], *, encrypted: bool, unix: bool,
               peer: str = "the server") -> Mechanism:
        """The mechanism to use with a server that advertised ``offered``."""
        offer = [m.upper() for m in offered]
        plain_ok = self.plaintext_ok(encrypted=encrypted, unix=unix)
        for name in self.mechanisms:
            if name in offer and (plain_ok or name not in PLAINTEXT_MECHANISMS):
                return MECHANISMS[name](self.credentials)
        why = (f"no usable SASL mechanism for {peer}: it offers {' '.join(offer) or 'none'}, "
               f"allowed here: {' '.join(self.mechanisms)}")
        if not plain_ok and any(m in PLAINTEXT_MECHANISMS for m in offer
                                if m in self.mechanisms):
            why += ("; PLAIN and LOGIN are not used over unencrypted TCP (noplaintext): "
                    "use STARTTLS (tls_security_level), a unix socket, or allow plaintext")
        raise AuthenticationError(why)


# -- SASLprep (RFC 4013) ---------------------------------------------------------------


def saslprep(text: str, what: str = "string") -> str:
    """Prepare a user name or password (RFC 4013; unassigned code points allowed, as for queries).

    Raises :class:`AuthenticationError` (without the text) on a prohibited character.
    """
    if text.isascii() and text.isprintable():
        return text  # nothing maps, nothing is prohibited
    # Imported here: the tables are needed only for non-ASCII names and passwords.
    import stringprep
    import unicodedata

    prohibited = (
        stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3,
        stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6,
        stringprep.in_table_c7, stringprep.in_table_c8, stringprep.in_table_c9,
    )
    mapped = "".join(" " if stringprep.in_table_c12(c) else c
                     for c in text if not stringprep.in_table_b1(c))
    out = unicodedata.normalize("NFKC", mapped)
    for c in out:
        if any(table(c) for table in prohibited):
            raise AuthenticationError(f"the SASL {what} contains a character SASLprep prohibits "
                                      f"(U+{ord(c):04X})")
    if any(stringprep.in_table_d1(c) for c in out) and (
            any(stringprep.in_table_d2(c) for c in out)
            or not (stringprep.in_table_d1(out[0]) and stringprep.in_table_d1(out[-1]))):
        raise AuthenticationError(f"the SASL {what} breaks SASLprep's bidirectional rules")
    return out


# -- mechanisms --------------------------------------------------------------------------


class Mechanism:
    """One client-side SASL exchange (sans-IO): initial response, then a reply per challenge."""

    name: ClassVar[str] = ""
    #: Sends the password itself.
    plaintext: ClassVar[bool] = False

    def __init__(self, credentials: Credentials) -> None:
        self._creds = credentials
        self._round = 0

    def __repr__(self) -> str:
        return f"<SASL {self.name} as {self._creds.username!r}>"

    def initial_response(self) -> bytes | None:
        """Data for the AUTH command itself (RFC 4954), or ``None`` to wait for a challenge."""
        return None

    def respond(self, challenge: bytes) -> bytes:
        """The response to one 334 challenge (decoded)."""
        raise AuthenticationError(f"unexpected SASL challenge in {self.name}")

    def finish(self) -> None:
        """The server said 235: raise if the exchange is not complete from our side."""


class Plain(Mechanism):
    name = "PLAIN"
    plaintext = True

    def _message(self) -> bytes:
        c = self._creds
        return f"{c.authzid}\0{c.username}\0{c.password}".encode()

    def initial_response(self) -> bytes | None:
        self._round = 1
        return self._message()

    def respond(self, challenge: bytes) -> bytes:
        # A server may ignore the initial response and send an empty challenge.
        if self._round > 1 or challenge:
            raise AuthenticationError("unexpected SASL challenge in PLAIN")
        self._round = 2
        return self._message()


class Login(Mechanism):
    name = "LOGIN"
    plaintext = True

    def respond(self, challenge: bytes) -> bytes:
        # Answer by position, not by the prompt's words ("Username:" varies).
        self._round += 1
        if self._round == 1:
            return self._creds.username.encode()
        if self._round == 2:
            return self._creds.password.encode()
        raise AuthenticationError("unexpected third SASL challenge in LOGIN")


class CramMD5(Mechanism):
    name = "CRAM-MD5"

    def respond(self, challenge: bytes) -> bytes:
        self._round += 1
        if self._round > 1 or not challenge:
            raise AuthenticationError("unexpected SASL challenge in CRAM-MD5")
        import hashlib
        import hmac

        digest = hmac.new(self._creds.password.encode(), challenge, hashlib.md5).hexdigest()
        return self._creds.username.encode() + b" " + digest.encode()


def _scram_name(text: str) -> str:
    """RFC 5802 saslname: ``=`` and ``,`` escaped."""
    return text.replace("=", "=3D").replace(",", "=2C")


class _Scram(Mechanism):
    hash_name: ClassVar[str] = ""

    def __init__(self, credentials: Credentials, nonce: str | None = None) -> None:
        super().__init__(credentials)
        import secrets

        self._nonce = nonce or secrets.token_urlsafe(24)
        authz = credentials.authzid
        self._gs2 = "n," + (f"a={_scram_name(saslprep(authz, 'authorization identity'))}"
                            if authz else "") + ","
        user = _scram_name(saslprep(credentials.username, "user name"))
        self._client_first_bare = f"n={user},r={self._nonce}"
        self._server_signature: bytes | None = None
        self.verified = False

    def initial_response(self) -> bytes | None:
        self._round = 1
        return (self._gs2 + self._client_first_bare).encode()

    def respond(self, challenge: bytes) -> bytes:
        self._round += 1
        if self._round == 2:
            return self._client_final(challenge)
        if self._round == 3:
            self._check_server_final(challenge)
            return b""
        raise AuthenticationError(f"unexpected SASL challenge in {self.name}")

    def _client_final(self, challenge: bytes) -> bytes:
        import base64
        import binascii

        try:
            server_first = challenge.decode("utf-8")
        except UnicodeDecodeError:
            raise AuthenticationError(f"{self.name}: server-first-message is not UTF-8") from None
        attrs = _scram_attrs(server_first, self.name)
        if "m" in attrs:
            raise AuthenticationError(f"{self.name}: server requires an unsupported extension")
        nonce, salt_b64, count = attrs.get("r"), attrs.get("s"), attrs.get("i")
        if nonce is None or salt_b64 is None or count is None:
            raise AuthenticationError(f"{self.name}: server-first-message lacks r, s or i")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise AuthenticationError(f"{self.name}: server nonce does not extend ours")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
        except binascii.Error:
            raise AuthenticationError(f"{self.name}: bad salt in server-first-message") from None
        if not count.isdigit():
            raise AuthenticationError(f"{self.name}: bad iteration count")
        iterations = int(count)
        if not SCRAM_MIN_ITERATIONS <= iterations <= SCRAM_MAX_ITERATIONS:
            raise AuthenticationError(
                f"{self.name}: server asks for {iterations} iterations, outside "
                f"{SCRAM_MIN_ITERATIONS}..{SCRAM_MAX_ITERATIONS}")
        channel = base64.b64encode(self._gs2.encode()).decode()
        without_proof = f"c={channel},r={nonce}"
        auth_message = f"{self._client_first_bare},{server_first},{without_proof}".encode()
        client_key, _, signature, self._server_signature = scram_proofs(
            self.hash_name, self._creds.password, salt, iterations, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def _check_server_final(self, challenge: bytes) -> None:
        import base64
        import binascii

        try:
            text = challenge.decode("ascii")
        except UnicodeDecodeError:
            raise AuthenticationError(f"{self.name}: server-final-message is not ASCII") from None
        attrs = _scram_attrs(text, self.name)
        if "e" in attrs:
            raise AuthenticationError(f"{self.name}: server reported error {attrs['e']!r}")
        value = attrs.get("v")
        if value is None or self._server_signature is None:
            raise AuthenticationError(f"{self.name}: server-final-message lacks its signature")
        try:
            got = base64.b64decode(value, validate=True)
        except binascii.Error:
            raise AuthenticationError(f"{self.name}: bad server signature encoding") from None
        import hmac

        if not hmac.compare_digest(got, self._server_signature):
            raise AuthenticationError(
                f"{self.name}: the server's signature does not verify: it does not know the "
                "password (an impostor, or a changed password on the server)")
        self.verified = True

    def finish(self) -> None:
        if not self.verified:
            raise AuthenticationError(
                f"{self.name}: the server accepted without proving it knows the password "
                "(no server signature)")


def scram_attrs(message: str) -> dict[str, str] | None:
    """The ``k=value`` attributes of a SCRAM message (RFC 5802; the first of each key).

    ``None`` if a part is not one letter, ``=`` and a value: the caller fails
    the exchange (the client with an error, the server with a refusal).
    """
    attrs: dict[str, str] = {}
    for part in message.split(","):
        key, sep, value = part.partition("=")
        if len(key) != 1 or not sep:
            return None
        attrs.setdefault(key, value)
    return attrs


def scram_proofs(hash_name: str, password: str, salt: bytes, iterations: int,
                 auth_message: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """RFC 5802 section 3 for *password*: client key, stored key, client and server signatures.

    The client sends ``client key XOR client signature`` and checks the
    server signature; the server recomputes both from the password it knows.
    """
    import hashlib
    import hmac

    salted = hashlib.pbkdf2_hmac(hash_name, saslprep(password, "password").encode(), salt,
                                 iterations)
    client_key = hmac.new(salted, b"Client Key", hash_name).digest()
    stored_key = hashlib.new(hash_name, client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hash_name).digest()
    return (client_key, stored_key, hmac.new(stored_key, auth_message, hash_name).digest(),
            hmac.new(server_key, auth_message, hash_name).digest())


def _scram_attrs(message: str, mech: str) -> dict[str, str]:
    attrs = scram_attrs(message)
    if attrs is None:
        raise AuthenticationError(f"{mech}: malformed SCRAM message from the server")
    return attrs


class ScramSHA1(_Scram):
    name = "SCRAM-SHA-1"
    hash_name = "sha1"


class ScramSHA256(_Scram):
    name = "SCRAM-SHA-256"
    hash_name = "sha256"


#: Implemented mechanisms by name.
MECHANISMS: dict[str, type[Mechanism]] = {
    m.name: m for m in (ScramSHA256, ScramSHA1, CramMD5, Plain, Login)
}


# -- the AUTH exchange --------------------------------------------------------------------

def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


async def authenticate(
    command: Callable[[str, str | None], Awaitable[Reply]], mechanism: Mechanism,
) -> Reply:
    """Run one AUTH exchange through ``command(verb, argument)`` (the transport's).

    Returns the 235 reply. A refusal raises :class:`ReplyError` at stage
    ``auth`` with the server's reply; a problem on our side (bad challenge,
    SCRAM signature) cancels the exchange with ``*`` and raises
    :class:`AuthenticationError`.
    """
    import base64
    import binascii

    initial = mechanism.initial_response()
    # RFC 4954: "=" stands for an empty initial response.
    argument = mechanism.name if initial is None else f"{mechanism.name} {_b64(initial) or '='}"
    reply = await command("AUTH", argument)
    rounds = 0
    while reply.code == 334:
        rounds += 1
        try:
            if rounds > _MAX_ROUNDS:
                raise AuthenticationError(f"{mechanism.name}: too many SASL challenges")
            data = reply.lines[0].strip() if reply.lines else ""
            try:
                challenge = base64.b64decode(data, validate=True)
            except binascii.Error:
                raise AuthenticationError(
                    f"{mechanism.name}: the server's challenge is not base64") from None
            response = mechanism.respond(challenge)
        except AuthenticationError:
            # RFC 4954: "*" cancels; the server answers 501. The session stays usable.
            try:
                await command("AUTH-RESPONSE", "*")
            except LMTPError:
                pass
            raise
        reply = await command("AUTH-RESPONSE", _b64(response))
    if reply.code != 235:
        raise ReplyError(reply.code, reply.enhanced, reply.text, "auth")
    mechanism.finish()
    return reply
