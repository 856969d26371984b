"""One delivery request, built once at the public edge and passed down unchanged.

>>> d = Delivery.build(message, sender="a@example.org",    # doctest: +SKIP
...                    recipients=["b@example.org"])
>>> results = await client.send(d)                        # doctest: +SKIP

``Agent.deliver``, ``Client.send``, ``deliver()`` and replay build a
:class:`Delivery` from what the caller gave, and everything below (agent ->
pool -> session -> protocol -> engine) works on that one object. The facts a
server's capabilities are checked against are computed here, once:

* the addresses are checked (the engine's own rule, ``proto._common``): a bad
  sender raises :class:`LocalProtocolError`, a bad recipient becomes that
  recipient's permanent result (``_failures.BAD_RECIPIENT``) and the others go on;
* a NUL byte in the content raises :class:`ContentError` (it can never be sent);
* 8-bit content and addresses that need SMTPUTF8 are noted;
* the SIZE (RFC 1870 counts the message with CRLF line ends and without the
  dots DATA adds) and each encoded form (dot-stuffed for DATA, CRLF only for
  BDAT, a 7-bit conversion for servers without 8BITMIME) are computed the
  first time a server needs them and cached: one message to four back ends
  is encoded once per form, not four times;
* DSN (RFC 3461) parameters are formatted once; the session adds them only
  where the server advertises DSN.

:meth:`Delivery.subset` gives the part of a delivery one route takes: the
same content, facts and cache, the chosen recipients with their parameters.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from ._dsn import DSN
from ._errors import ContentError, LocalProtocolError
from ._failures import BAD_RECIPIENT
from ._results import RecipientResult
from .proto._common import encode_address
from .proto.content import ContentEncoder, encode_content

__all__ = ["STREAM_CHUNK", "STREAM_THRESHOLD", "BadSender", "Delivery", "Message",
           "MessageFile", "StreamedContent", "message_bytes", "pieces", "start_transaction",
           "to_7bit"]

# Messages up to STREAM_THRESHOLD bytes are encoded whole and sent with their
# final dot (and the next transaction's commands) in one write; larger ones
# are encoded and written STREAM_CHUNK bytes at a time under flow control, so
# a 50 MiB message is never copied whole.
STREAM_CHUNK = 256 * 1024
STREAM_THRESHOLD = 4 * STREAM_CHUNK


class MessageFile:
    """A message in an open file, read a piece at a time: never held whole in memory.

    For messages too large to keep, such as a spool's locked message file:
    ``len()`` is its size, and a slice reads that range with ``os.pread``
    (``f[a:b]`` is ``bytes``), which is all the streaming send path and the
    one-pass checks ask of a large message. The message starts *offset*
    bytes into the file (a store's data file begins with a header) and is
    *size* bytes long (default: the rest of the file). The descriptor must
    stay open, and the file unchanged, while the delivery runs (spool message
    files never change). A read error is an ``OSError``, so the recipients
    are deferred, never refused. Smaller than :data:`STREAM_THRESHOLD`, the
    file is read whole by :func:`message_bytes` (it is sent in one write then).
    """

    __slots__ = ("fd", "offset", "size")

    def __init__(self, fd: int, size: int | None = None, *, offset: int = 0) -> None:
        self.fd = fd
        self.offset = offset
        self.size = os.fstat(fd).st_size - offset if size is None else size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, piece: slice) -> bytes:
        start, stop, step = piece.indices(self.size)
        if step != 1:
            raise ValueError("a MessageFile is read in contiguous pieces")
        want = max(0, stop - start)
        at = self.offset + start
        data = os.pread(self.fd, want, at)
        while len(data) < want:  # a short read: go on from where it stopped
            more = os.pread(self.fd, want - len(data), at + len(data))
            if not more:
                raise OSError(errno.EIO, "message file shorter than when it was opened")
            data += more
        return data

    def __bytes__(self) -> bytes:
        return self[0:self.size]

    def __repr__(self) -> str:
        return f"<MessageFile fd={self.fd} offset={self.offset} size={self.size}>"


if TYPE_CHECKING:
    import email.message
    from typing import TypeAlias

    from .proto import Connection, Transaction

    Message: TypeAlias = (bytes | bytearray | memoryview | str | email.message.Message
                          | MessageFile)


def __getattr__(name: str) -> Any:
    # The email package is imported only by who uses it (``Message`` as a
    # value, a 7-bit conversion): `lmtpfast send` never does.
    if name == "Message":
        import email.message

        value = bytes | bytearray | memoryview | str | email.message.Message | MessageFile
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pieces(content: bytes | memoryview | MessageFile) -> memoryview | MessageFile:
    """What a chunk loop reads: a byte view of *content* (a :class:`MessageFile` is its own)."""
    return content if isinstance(content, MessageFile) else memoryview(content).cast("B")


_NO_REFUSALS: Mapping[int, RecipientResult] = {}
_NOTHING_GIVEN: frozenset[str] = frozenset()


def _refusals(rcpts: tuple[str, ...]) -> dict[int, RecipientResult]:
    """The results of the recipients whose address cannot be sent (the slow path)."""
    refused: dict[int, RecipientResult] = {}
    for i, rcpt in enumerate(rcpts):
        if type(rcpt) is not str:
            raise TypeError(f"recipient must be str, not {type(rcpt).__name__}")
        try:
            encode_address(rcpt, utf8=True)
        except LocalProtocolError as exc:
            refused[i] = BAD_RECIPIENT.result(rcpt, detail=exc)
    return refused


class StreamedContent:
    """A large message, encoded chunk by chunk as it is written.

    With ``chunking`` each encoded piece goes out as a BDAT chunk (RFC 3030,
    no dot-stuffing); otherwise as DATA content ending in the final dot.
    ``encoder`` is the engine's ``ContentEncoder`` class.
    """

    __slots__ = ("chunking", "encoder", "raw")

    def __init__(self, raw: memoryview | MessageFile, chunking: bool = False,
                 encoder: type[ContentEncoder] = ContentEncoder) -> None:
        self.raw = raw
        self.chunking = chunking
        self.encoder = encoder


def start_transaction(
    engine: Connection, sender: str, recipients: list[str], content: bytes | StreamedContent,
    *, mail_params: list[str] | tuple[str, ...], rcpt_params: list[list[str]] | None,
    smtputf8: bool, chunking: bool,
) -> tuple[Transaction, bool]:
    """Queue one transaction on ``engine``; the transaction and whether its content is owed now.

    In-memory BDAT content goes to the engine with the commands (one write);
    DATA content and streamed content wait in ``txn.content`` for the layer
    that writes them (the asyncio or the blocking protocol). The second value
    is true for a streamed BDAT transaction: it is ready for its first chunk at
    once, so the caller processes events instead of flushing.
    """
    streamed = isinstance(content, StreamedContent)
    txn = engine.start_transaction(
        sender, recipients, mail_params=mail_params, rcpt_params=rcpt_params,
        smtputf8=smtputf8, chunking=chunking and streamed,
        body=content if chunking and not streamed else None,  # type: ignore[arg-type]
    )
    if not (chunking and not streamed):
        txn.content = content
    return txn, chunking and streamed


class BadSender(LocalProtocolError):
    """The sender address cannot be sent (the whole delivery is refused)."""

    def __init__(self, address: object, why: str) -> None:
        super().__init__(f"bad sender address {address!r}: {why}")
        self.address = address


def message_bytes(message: Message) -> bytes | memoryview | MessageFile:
    """The raw bytes of a message given as bytes, str, ``email.message.Message`` or a file."""
    if isinstance(message, bytes):
        return message
    if isinstance(message, MessageFile):
        return message if len(message) > STREAM_THRESHOLD else bytes(message)
    if isinstance(message, bytearray | memoryview):
        return memoryview(message).cast("B")
    if isinstance(message, str):
        return message.encode("utf-8")
    # No email.message.Message exists unless its module was imported by someone.
    if "email.message" in sys.modules:
        import email.message
        import email.policy

        if isinstance(message, email.message.Message):
            policy = message.policy
            if isinstance(policy, email.policy.EmailPolicy):
                policy = policy.clone(linesep="\r\n")
            return message.as_bytes(policy=policy)
    raise TypeError(
        f"message must be bytes, str or email.message.Message, not {type(message).__name__}")


def _scan_large(raw: memoryview | MessageFile) -> bool:
    """Raise on a NUL; return whether the message is 7-bit, a chunk at a time (no whole copy)."""
    ascii_only = True
    for start in range(0, len(raw), STREAM_CHUNK):
        piece = bytes(raw[start : start + STREAM_CHUNK])
        if (at := piece.find(b"\0")) >= 0:
            raise ContentError(f"NUL byte at offset {start + at} of the message content: NUL "
                               "cannot be sent in LMTP DATA or BDAT (encode the body, e.g. base64)")
        ascii_only = ascii_only and piece.isascii()
    return ascii_only


class Delivery(msgspec.Struct, frozen=True, gc=False):
    """One message for one sender and its recipients, with everything known about it.

    Build it with :meth:`build` (which checks it); the fields are read-only.
    ``refused`` maps the index of each recipient whose address cannot be sent
    to its permanent result; the session never sends those.
    """

    sender: str
    recipients: tuple[str, ...]
    content: bytes | memoryview | MessageFile
    #: Raw ESMTP parameters the caller gave for MAIL and per recipient.
    mail_params: tuple[str, ...] = ()
    rcpt_params: tuple[tuple[str, ...], ...] | None = None
    #: DSN parameters (RFC 3461), sent only to servers that advertise DSN.
    dsn_mail: tuple[str, ...] = ()
    dsn_rcpt: tuple[tuple[str, ...], ...] | None = None
    #: The content has a byte >= 0x80.
    eight_bit: bool = False
    #: An address is not ASCII: the transaction needs SMTPUTF8 (RFC 6531).
    smtputf8: bool = False
    refused: Mapping[int, RecipientResult] = _NO_REFUSALS
    #: Names of the MAIL parameters the caller gave (upper case): SIZE, BODY or
    #: SMTPUTF8 given there are not added again.
    given: frozenset[str] = _NOTHING_GIVEN
    #: Encoded forms and derived facts, filled on first use (shared by subsets).
    cache: dict[str, Any] = msgspec.field(default_factory=dict)

    @classmethod
    def build(
        cls,
        message: Message,
        *,
        sender: str,
        recipients: Sequence[str],
        mail_params: Sequence[str] = (),
        rcpt_params: Sequence[Sequence[str]] | None = None,
        dsn: DSN | None = None,
    ) -> Delivery:
        """Check and describe a delivery; see the module docstring for what is checked.

        Raises :class:`LocalProtocolError` for a bad sender, no recipients,
        parameters that cannot be sent or that do not match the recipients;
        :class:`ContentError` for a NUL byte; :class:`TypeError` for a
        message or recipient list of the wrong type.
        """
        # Once per message: the common case (bytes, a list of plain addresses) is kept lean.
        if type(recipients) is tuple:
            rcpts = recipients
        elif isinstance(recipients, str):
            raise TypeError("recipients must be a sequence of addresses, not one string")
        else:
            rcpts = tuple(recipients)
        if not rcpts:
            raise LocalProtocolError("no recipients: a delivery needs at least one")
        try:
            encode_address(sender, allow_empty=True, utf8=True)
        except LocalProtocolError as exc:
            raise BadSender(sender, str(exc)) from None
        smtputf8 = not sender.isascii()
        refused: dict[int, RecipientResult] | None = None
        for rcpt in rcpts:
            try:
                encode_address(rcpt, utf8=True)
            except LocalProtocolError:
                refused = _refusals(rcpts)
                break
            if not smtputf8 and not rcpt.isascii():
                smtputf8 = True
        if refused is not None and not smtputf8:
            smtputf8 = not all(type(r) is str and r.isascii() for r in rcpts)
        raw = message if type(message) is bytes else message_bytes(message)
        if type(raw) is bytes and len(raw) <= STREAM_THRESHOLD:
            if (nul := raw.find(b"\0")) >= 0:
                raise ContentError(f"NUL byte at offset {nul} of the message content: NUL "
                                   "cannot be sent in LMTP DATA or BDAT (encode the body, "
                                   "e.g. base64)")
            eight_bit = not raw.isascii()
        else:
            eight_bit = not _scan_large(pieces(raw))
        # The parameters themselves are checked by the engine as it encodes them.
        params: tuple[str, ...] = ()
        given = _NOTHING_GIVEN
        if mail_params:
            params = tuple(mail_params)
            given = frozenset(str(p).split("=", 1)[0].upper() for p in params)
        per_rcpt = None
        if rcpt_params is not None:
            if len(rcpt_params) != len(rcpts):
                raise LocalProtocolError("rcpt_params must have one entry per recipient")
            per_rcpt = tuple(tuple(p) for p in rcpt_params)
        dsn_mail: tuple[str, ...] = ()
        dsn_rcpt = None
        if dsn is not None:
            dsn_mail = tuple(dsn.mail_params())
            each = dsn.rcpt_params(rcpts)
            if any(each):
                dsn_rcpt = tuple(tuple(p) for p in each)
        return cls(sender, rcpts, raw, params, per_rcpt, dsn_mail, dsn_rcpt, eight_bit,
                   smtputf8, refused or _NO_REFUSALS, given)

    # -- facts computed on first use ------------------------------------------------------

    @property
    def streamed(self) -> bool:
        """Too large to encode whole: sent a piece at a time under flow control."""
        return len(self.content) > STREAM_THRESHOLD

    def encoded(self, *, dot_stuff: bool, encode: Any = encode_content) -> bytes:
        """The whole encoded content: dot-stuffed for DATA, CRLF only for BDAT (cached).

        ``encode`` is the engine's ``encode_content`` (both give the same bytes).
        """
        key = "data" if dot_stuff else "bdat"
        form: bytes | None = self.cache.get(key)
        if form is None:
            form = self.cache[key] = encode(self.content, dot_stuff=dot_stuff)
        return form

    @property
    def size(self) -> int:
        """The message size as RFC 1870 counts it: CRLF line ends, no dot-stuffing."""
        cache = self.cache
        size: int | None = cache.get("size")
        if size is None:
            bdat = cache.get("bdat")
            data = cache.get("data")
            if bdat is not None:
                size = len(bdat)
            elif data is not None:
                # Every encoded line that starts with a dot got exactly one added.
                size = len(data) - data.count(b"\n.") - (data[:1] == b".")
            elif self.streamed:
                enc = ContentEncoder(dot_stuff=False)
                raw = pieces(self.content)
                for start in range(0, len(raw), STREAM_CHUNK):
                    enc.encode(raw[start : start + STREAM_CHUNK])
                enc.finish()
                size = enc.bytes_out
            else:
                size = len(self.encoded(dot_stuff=False))
            cache["size"] = size
        return size

    def seven_bit(self) -> Delivery:
        """This delivery with its content converted to 7 bits (for a server without 8BITMIME).

        Bodies that are 8-bit get quoted-printable (text) or base64 (other
        types), as Postfix converts. Raises :class:`ContentError` when that is
        not possible (8-bit header lines, no MIME structure); cached.
        """
        if not self.eight_bit:
            return self
        cached = self.cache.get("7bit")
        if isinstance(cached, Exception):
            raise cached
        if cached is None:
            try:
                converted = to_7bit(bytes(self.content))
            except ContentError as exc:
                self.cache["7bit"] = exc
                raise
            cached = self.cache["7bit"] = msgspec.structs.replace(
                self, content=converted, eight_bit=False, cache={})
        assert isinstance(cached, Delivery)
        return cached

    # -- parts ---------------------------------------------------------------------------

    def subset(self, indexes: Sequence[int], addresses: Sequence[str] | None = None) -> Delivery:
        """The delivery for the recipients at ``indexes`` (same content, facts and cache).

        ``addresses`` replaces their addresses (the agent's virtual map
        rewrites them); their parameters and DSN follow them.
        """
        if addresses is None:
            rcpts = tuple(self.recipients[i] for i in indexes)
        else:
            rcpts = tuple(addresses)
            if len(rcpts) != len(indexes):
                raise ValueError("one address per index")
        per = self.rcpt_params
        dsn = self.dsn_rcpt
        refused: Mapping[int, RecipientResult] = _NO_REFUSALS
        if self.refused:
            refused = {j: self.refused[i] for j, i in enumerate(indexes) if i in self.refused}
        smtputf8 = self.smtputf8
        if addresses is not None and not smtputf8:
            smtputf8 = not all(a.isascii() for a in rcpts)
        return Delivery(
            self.sender, rcpts, self.content, self.mail_params,
            None if per is None else tuple(per[i] for i in indexes),
            self.dsn_mail, None if dsn is None else tuple(dsn[i] for i in indexes),
            self.eight_bit, smtputf8, refused, self.given, self.cache)

    def __repr__(self) -> str:
        return (f"<lmtpfast.Delivery from {self.sender!r} to {len(self.recipients)} "
                f"recipient(s), {len(self.content)} bytes>")


# -- 8-bit to 7-bit ----------------------------------------------------------------------------

def _header_end(raw: bytes) -> int:
    ends = [i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0]
    return min(ends) if ends else len(raw)


def to_7bit(raw: bytes) -> bytes:
    """``raw`` with every 8-bit MIME body re-encoded: quoted-printable for text, else base64.

    Header lines are kept as they are; :class:`ContentError` when they hold
    8-bit bytes (they would need RFC 2047 encoding with a charset nobody
    declared) or when the message has no MIME structure to declare an
    encoding in. The result has CRLF line ends.
    """
    import base64
    import email
    import email.generator
    import email.policy
    import io
    import quopri

    if not raw[: _header_end(raw)].isascii():
        raise ContentError("8-bit bytes in the message header")
    msg = email.message_from_bytes(raw.replace(b"\r\n", b"\n"), policy=email.policy.compat32)
    if msg.get("MIME-Version") is None:
        raise ContentError("8-bit body without MIME headers (no MIME-Version)")
    for part in msg.walk():
        if part.is_multipart():
            continue
        cte = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
        if cte not in ("7bit", "8bit", "binary"):
            continue  # already encoded (quoted-printable, base64): ASCII
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes) or data.isascii():
            continue
        del part["Content-Transfer-Encoding"]
        if part.get_content_maintype() == "text":
            part.set_payload(quopri.encodestring(data).decode("ascii"))
            part["Content-Transfer-Encoding"] = "quoted-printable"
        else:
            part.set_payload(base64.encodebytes(data).decode("ascii"))
            part["Content-Transfer-Encoding"] = "base64"
    out = io.BytesIO()
    email.generator.BytesGenerator(
        out, mangle_from_=False, maxheaderlen=0,
        policy=email.policy.compat32.clone(linesep="\r\n")).flatten(msg)
    result = out.getvalue()
    if not result.isascii():
        raise ContentError("8-bit bytes outside any MIME body (preamble or epilogue)")
    return result
