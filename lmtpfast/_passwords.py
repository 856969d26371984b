"""SASL password maps in Postfix's text syntax (``smtp_sasl_password_maps``).

One destination per line, then ``username:password`` (split at the first
colon, so the password may contain colons; everything after the white space
that ends the key is the value, trailing blanks stripped)::

    # /etc/lmtpfast/sasl_passwd   (mode 0600!)
    [backend1.example.org]:24   lmtp-front:s3cret
    backend2.example.org:2003   lmtp-front:other:secret
    backend3.example.org        lmtp-front:third          # any port
    unix:/var/imap/socket/lmtp  cyrus:fourth

Keys: ``host:port`` and ``[host]:port`` (the same thing for LMTP, which never
looks up MX records), ``host`` or ``[host]`` for every port of that host, and
``unix:/path`` for a unix socket. Host names are case-insensitive. Lookup for
a TCP destination tries ``host:port`` first, then ``host``. ``#`` starts a
comment line; blank lines are skipped.

The file is refused when its group or others have any access (its error
names the file and says ``chmod 600``): a password map others can read is a
leaked password. The permission check is made on the open file, not the path,
so it cannot be raced. Errors about a line give its number, never its text.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

from ._destination import Destination, parse_destination
from ._errors import ConfigurationError
from ._sasl import Credentials

__all__ = ["PasswordMap", "read_private_file"]


def read_private_file(path: str | os.PathLike[str], what: str = "password file") -> str:
    """Text of a file that only its owner may access; :class:`ConfigurationError` otherwise."""
    source = os.fspath(path)
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the open.
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what}: {exc.strerror or exc}",
                                 source=source) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigurationError(f"{what} is not a regular file", source=source)
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise ConfigurationError(
                f"{what} is accessible by group or others (mode {mode:04o}); it holds "
                f"passwords: run 'chmod 600 {source}'", source=source)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what}: {exc.strerror or exc}",
                                 source=source) from None
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigurationError("not valid UTF-8", source=source, line=line) from None


def _key(text: str, source: str, line: int | None) -> str:
    """Canonical lookup key: ``unix:/path``, ``host:port`` or ``host`` (lower-case, no brackets)."""
    if text.startswith("unix:"):
        if len(text) == 5:
            raise ConfigurationError("empty socket path in the key", source=source, line=line)
        return text
    bare = text[5:] if text.startswith("inet:") else text
    has_port = bare.rpartition("]")[2].count(":") == 1 if bare.startswith("[") else ":" in bare
    try:
        dest = parse_destination(bare)
    except ConfigurationError as exc:
        raise ConfigurationError(f"bad key: {exc.problem}", source=source, line=line) from None
    host = dest.host.lower()
    return f"{host}:{dest.port}" if has_port else host


def _dest_keys(dest: Destination) -> Iterator[str]:
    if dest.is_local:
        yield str(dest)  # unix:/path, command:PROGRAM ...
        return
    host = dest.host.lower()
    yield f"{host}:{dest.port}"
    yield host


class PasswordMap:
    """Destination -> :class:`Credentials`, from a Postfix-style password map file.

    >>> pm = PasswordMap.from_file("/etc/lmtpfast/sasl_passwd")   # doctest: +SKIP
    >>> pm.lookup("unix:/var/imap/socket/lmtp")                    # doctest: +SKIP
    Credentials(username='cyrus', password=<redacted>)
    """

    def __init__(self, entries: dict[str, Credentials] | None = None,
                 source: str = "<python>") -> None:
        self.source = source
        self._entries: dict[str, Credentials] = {}
        for key, creds in (entries or {}).items():
            if not isinstance(creds, Credentials):
                raise TypeError("password map values must be Credentials")
            self._entries[_key(key.strip(), source, None)] = creds

    @classmethod
    def parse(cls, text: str, source: str = "<string>") -> PasswordMap:
        pm = cls(source=source)
        for number, raw in enumerate(text.splitlines(), 1):
            stripped = raw.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if raw[0] in " \t":
                raise ConfigurationError(
                    "line starts with white space (continuation lines are not supported in "
                    "password maps)", source=source, line=number)
            parts = stripped.split(None, 1)
            if len(parts) < 2:
                # Never quote the line: it may be a password written without its key.
                raise ConfigurationError("expected 'DESTINATION USERNAME:PASSWORD' (the line has "
                                         "one field)", source=source, line=number)
            key = _key(parts[0], source, number)
            user, sep, password = parts[1].strip().partition(":")
            if not sep or not user:
                raise ConfigurationError("expected 'USERNAME:PASSWORD' after the destination",
                                         source=source, line=number)
            if key in pm._entries:
                raise ConfigurationError(f"destination {key!r} listed twice", source=source,
                                         line=number)
            try:
                pm._entries[key] = Credentials(user, password)
            except ConfigurationError as exc:
                raise ConfigurationError(exc.problem, source=source, line=number) from None
        return pm

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PasswordMap:
        """Read a map file; refused unless only its owner can access it.

        ``path`` may be written ``TYPE:NAME`` as in Postfix's
        ``smtp_sasl_password_maps``: ``texthash:``, ``hash:`` and ``btree:`` read
        the text file NAME (the source of NAME.db; see docs/maps.md). Credentials
        are looked up when a pool opens, without I/O, so network map types are
        refused here.
        """
        source = os.fspath(path)
        head, colon, rest = source.partition(":")
        if colon and head in ("texthash", "hash", "btree"):
            source = rest
        elif colon and head in ("pgsql", "mysql", "ldap", "socketmap", "tcp", "cdb", "lmdb",
                                "proxy", "static", "inline"):
            raise ConfigurationError(
                f"password maps of type {head!r} are not supported (use texthash: or hash: "
                "with a file only its owner can read)", source=source)
        return cls.parse(read_private_file(source, "password map"), source)

    def lookup(self, destination: str | Destination) -> Credentials | None:
        """The credentials for ``destination`` (``host:port`` before ``host``), or ``None``."""
        dest = parse_destination(destination)
        for key in _dest_keys(dest):
            found = self._entries.get(key)
            if found is not None:
                return found
        return None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, destination: object) -> bool:
        if not isinstance(destination, str | Destination):
            return False
        return self.lookup(destination) is not None

    def __repr__(self) -> str:
        return f"<lmtpfast.PasswordMap {self.source} ({len(self._entries)} entries)>"
