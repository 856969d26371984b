"""SASL on the server side (RFC 4954 AUTH, as the proxy offers it), stdlib only.

The client side is ``_sasl.py``; this is its other half, for a server that
checks its clients against a table of users: ``PLAIN`` (RFC 4616),
``LOGIN``, ``CRAM-MD5`` (RFC 2195) and ``SCRAM-SHA-1``/``SCRAM-SHA-256``
(RFC 5802, RFC 7677: the server proves it knows the password too). Pure:
an exchange is a small state machine fed the client's decoded responses;
the server engine's ``auth``/``auth_line`` hooks carry it over the wire.

The users table is a file of ``user password`` lines, read as Postfix's
password maps are read (``_passwords.read_private_file``: it must be private,
mode 0600 or 0400, and owned by us), never logged: a failed exchange says
which user tried, never with what.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import ClassVar, Literal

from ._errors import AuthenticationError, ConfigurationError
from ._passwords import read_private_file
from ._sasl import (
    PLAINTEXT_MECHANISMS,
    SCRAM_MIN_ITERATIONS,
    saslprep,
    scram_attrs,
    scram_proofs,
)

__all__ = [
    "SERVER_MECHANISMS",
    "Exchange",
    "SaslUsers",
    "Step",
    "begin",
    "check_mechanisms",
    "offered",
]

#: Mechanisms a server can offer, best first.
SERVER_MECHANISMS: tuple[str, ...] = ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN",
                                      "LOGIN")

Kind = Literal["challenge", "success", "failure"]


class Step:
    """What the server says next: a challenge (334), success (235) or failure (535)."""

    __slots__ = ("data", "kind", "user")

    def __init__(self, kind: Kind, data: bytes = b"", user: str | None = None) -> None:
        self.kind = kind
        self.data = data
        self.user = user

    def __repr__(self) -> str:
        return f"Step({self.kind}, user={self.user!r})"


class SaslUsers:
    """User name -> password, for the server side of AUTH (kept out of reprs)."""

    def __init__(self, users: Mapping[str, str], source: str = "<python>") -> None:
        self._users = {saslprep(u, "user name"): p for u, p in users.items()}
        self.source = source

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SaslUsers:
        """``user password`` lines (``#`` comments, blank lines skipped); mode 0600 required."""
        source = os.fspath(path)
        text = read_private_file(source, "SASL users file")
        users: dict[str, str] = {}
        for n, line in enumerate(text.splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            user, _, password = stripped.partition(" ")
            password = password.strip()
            if not password:
                raise ConfigurationError("expected 'user password'", source=source, line=n)
            if user in users:
                raise ConfigurationError(f"user {user!r} listed twice", source=source, line=n)
            users[user] = password
        if not users:
            raise ConfigurationError("no users", source=source)
        return cls(users, source)

    def password(self, user: str) -> str | None:
        try:
            return self._users.get(saslprep(user, "user name"))
        except AuthenticationError:
            return None

    def __len__(self) -> int:
        return len(self._users)

    def __repr__(self) -> str:
        return f"<SaslUsers {len(self._users)} users from {self.source}>"


def _check(users: SaslUsers, user: str, password: str) -> bool:
    known = users.password(user)
    # Compare even for an unknown user: the time does not say which it was.
    return hmac.compare_digest((known or "\0").encode(), password.encode()) and known is not None


class Exchange:
    """One AUTH exchange, server side: ``start(initial)``, then ``step(response)`` per line."""

    name: ClassVar[str] = ""

    def __init__(self, users: SaslUsers, hostname: str) -> None:
        self.users = users
        self.hostname = hostname
        #: Who tried (for the log line), once known.
        self.user: str | None = None

    def start(self, initial: bytes | None) -> Step:
        raise NotImplementedError

    def step(self, response: bytes) -> Step:
        raise NotImplementedError


class _Plain(Exchange):
    name = "PLAIN"

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Step("challenge")
        return self.step(initial)

    def step(self, response: bytes) -> Step:
        try:
            authz, user, password = response.decode("utf-8").split("\0")
        except (UnicodeDecodeError, ValueError):
            return Step("failure")
        self.user = user
        if authz and authz != user:
            return Step("failure")  # no proxy authorization
        return Step("success", user=user) if _check(self.users, user, password) else Step(
            "failure")


class _Login(Exchange):
    name = "LOGIN"

    def start(self, initial: bytes | None) -> Step:
        if initial is not None:
            return self.step(initial)
        return Step("challenge", b"Username:")

    def step(self, response: bytes) -> Step:
        try:
            text = response.decode("utf-8")
        except UnicodeDecodeError:
            return Step("failure")
        if self.user is None:
            self.user = text
            return Step("challenge", b"Password:")
        return Step("success", user=self.user) if _check(self.users, self.user, text) else Step(
            "failure")


class _CramMD5(Exchange):
    name = "CRAM-MD5"

    def start(self, initial: bytes | None) -> Step:
        if initial is not None:
            return Step("failure")  # the server speaks first
        self._challenge = (f"<{secrets.randbelow(10**12)}.{int(time.time())}"
                           f"@{self.hostname}>").encode()
        return Step("challenge", self._challenge)

    def step(self, response: bytes) -> Step:
        try:
            user, _, digest = response.decode("utf-8").rpartition(" ")
        except UnicodeDecodeError:
            return Step("failure")
        self.user = user
        known = self.users.password(user)
        expect = hmac.new((known or "").encode(), self._challenge, "md5").hexdigest()
        ok = hmac.compare_digest(expect.encode(), digest.lower().encode()) and known is not None
        return Step("success", user=user) if ok else Step("failure")


class _Scram(Exchange):
    hash_name: ClassVar[str] = ""

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            self._state = 0
            return Step("challenge")
        return self._first(initial)

    def step(self, response: bytes) -> Step:
        state = getattr(self, "_state", 0)
        if state == 0:
            return self._first(response)
        if state == 1:
            return self._final(response)
        # The client's empty answer to our server-final-message.
        return Step("success", user=self.user) if not response else Step("failure")

    def _first(self, response: bytes) -> Step:
        try:
            text = response.decode("utf-8")
        except UnicodeDecodeError:
            return Step("failure")
        gs2, _, bare = text.partition(",")
        authz, _, bare = bare.partition(",")
        # No channel binding here (n or y); "p=" asks for it: refused.
        if gs2 not in ("n", "y") or (authz and not authz.startswith("a=")):
            return Step("failure")
        attrs = scram_attrs(bare)
        if attrs is None:
            return Step("failure")
        user, nonce = attrs.get("n"), attrs.get("r")
        if user is None or not nonce or "m" in attrs:
            return Step("failure")
        user = user.replace("=2C", ",").replace("=3D", "=")
        self.user = user
        if authz and authz[2:].replace("=2C", ",").replace("=3D", "=") != user:
            return Step("failure")
        self._gs2 = f"{gs2},{authz},"
        self._client_first_bare = bare
        self._nonce = nonce + secrets.token_urlsafe(18)
        self._salt = secrets.token_bytes(16)
        self._iterations = SCRAM_MIN_ITERATIONS
        self._server_first = (f"r={self._nonce},s={base64.b64encode(self._salt).decode()},"
                              f"i={self._iterations}")
        self._state = 1
        return Step("challenge", self._server_first.encode())

    def _final(self, response: bytes) -> Step:
        try:
            text = response.decode("ascii")
        except UnicodeDecodeError:
            return Step("failure")
        without_proof, _, proof_b64 = text.rpartition(",p=")
        attrs = scram_attrs(without_proof)
        channel = base64.b64encode(self._gs2.encode()).decode()
        if attrs is None or attrs.get("c") != channel or attrs.get("r") != self._nonce:
            return Step("failure")
        try:
            proof = base64.b64decode(proof_b64, validate=True)
        except binascii.Error:
            return Step("failure")
        assert self.user is not None
        known = self.users.password(self.user)
        auth_message = (f"{self._client_first_bare},{self._server_first},"
                        f"{without_proof}").encode()
        try:
            # An unknown user costs the same work as a known one (no timing oracle).
            _, stored_key, signature, verifier = scram_proofs(
                self.hash_name, known or "x", self._salt, self._iterations, auth_message)
        except AuthenticationError:
            return Step("failure")
        if len(proof) != len(signature):
            return Step("failure")
        candidate = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if known is None or not hmac.compare_digest(
                hashlib.new(self.hash_name, candidate).digest(), stored_key):
            return Step("failure")
        self._state = 2
        return Step("challenge", b"v=" + base64.b64encode(verifier))


class _ScramSHA1(_Scram):
    name = "SCRAM-SHA-1"
    hash_name = "sha1"


class _ScramSHA256(_Scram):
    name = "SCRAM-SHA-256"
    hash_name = "sha256"


_EXCHANGES: dict[str, type[Exchange]] = {
    e.name: e for e in (_ScramSHA256, _ScramSHA1, _CramMD5, _Plain, _Login)
}


def offered(mechanisms: Iterable[str], *, plaintext: bool) -> list[str]:
    """The mechanisms to advertise: those configured, PLAIN/LOGIN only where ``plaintext``."""
    return [m for m in mechanisms if plaintext or m not in PLAINTEXT_MECHANISMS]


def begin(mechanism: str, users: SaslUsers, hostname: str) -> Exchange | None:
    """A new exchange for ``mechanism`` (upper case), or None if it is not implemented."""
    cls = _EXCHANGES.get(mechanism)
    return cls(users, hostname) if cls is not None else None


def check_mechanisms(mechanisms: Iterable[str]) -> tuple[str, ...]:
    """Mechanism names checked and upper-cased, duplicates dropped, order kept."""
    out: list[str] = []
    for m in mechanisms:
        name = m.strip().upper()
        if name not in _EXCHANGES:
            raise ConfigurationError(f"unsupported SASL mechanism {m!r} (a server offers: "
                                     f"{', '.join(SERVER_MECHANISMS)})", field="sasl_mechanisms")
        if name not in out:
            out.append(name)
    if not out:
        raise ConfigurationError("no SASL mechanism", field="sasl_mechanisms")
    return tuple(out)
