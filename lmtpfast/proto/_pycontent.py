"""Message content encoder, pure-Python reference (the spec, and the fallback).

Makes message bytes safe to send after ``DATA`` (RFC 5321 4.5.2, RFC 2033) or
in ``BDAT`` chunks (RFC 3030), so nothing in a message can end the data early
(SMTP smuggling, CVE-2023-51764/5/6):

* CRLF stays CRLF; a bare CR and a bare LF each become CRLF
  (``b"\\r\\r\\n"`` is a bare CR then a CRLF: two line ends);
* with ``dot_stuff`` (DATA), a line that starts with ``.`` gets one more ``.``;
* :meth:`ContentEncoder.finish` adds CRLF if non-empty content does not end
  with a line end (the caller then sends ``b".\\r\\n"`` for DATA);
* a NUL byte is refused with :class:`~lmtpfast.ContentError`, whose
  ``offset`` is the NUL's position in the whole message.

The input may arrive in chunks split anywhere; the output is the same as for
the whole message at once. ``_ccontent`` is the compiled twin and must behave
identically, byte for byte and error for error.
"""

from __future__ import annotations

from .._errors import ContentError

__all__ = ["ContentEncoder", "encode_content"]

_CR = 0x0D
_LF = 0x0A


def _nul_error(offset: int) -> ContentError:
    """The error both implementations raise for a NUL at ``offset`` of the message."""
    err = ContentError(
        f"NUL byte at offset {offset} of the message content: "
        "NUL cannot be sent in LMTP DATA or BDAT (encode the body, e.g. base64)"
    )
    err.offset = offset  # type: ignore[attr-defined]
    return err


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes | bytearray:
    if isinstance(data, bytes | bytearray):
        return data
    # Any other buffer (memoryview, array, mmap): its raw bytes in C order,
    # the same bytes the compiled twin reads through the buffer protocol.
    return memoryview(data).tobytes()


class ContentEncoder:
    """Streaming encoder for one message: feed chunks to :meth:`encode`, then call :meth:`finish`.

    ``dot_stuff=True`` for DATA, ``False`` for BDAT (same line-end
    normalisation, no dot-stuffing). A chunk holding a NUL raises
    :class:`~lmtpfast.ContentError` and is refused as a whole: the
    encoder's state is as before the call. Not thread-safe: one encoder per message.
    """

    __slots__ = ("_after_cr", "_at_line_start", "_dot_stuff", "_in", "_out", "_saw_8bit")

    def __init__(self, *, dot_stuff: bool = True) -> None:
        self._dot_stuff = bool(dot_stuff)
        self._at_line_start = True  # the next byte starts a line
        self._after_cr = False  # the last byte was a CR, already sent as CRLF
        self._saw_8bit = False
        self._in = 0
        self._out = 0

    @property
    def dot_stuff(self) -> bool:
        """Whether lines starting with ``.`` are stuffed (DATA) or not (BDAT)."""
        return self._dot_stuff

    @property
    def bytes_in(self) -> int:
        """Bytes of message content accepted so far."""
        return self._in

    @property
    def bytes_out(self) -> int:
        """Bytes produced so far by :meth:`encode` and :meth:`finish`."""
        return self._out

    @property
    def saw_8bit(self) -> bool:
        """Whether some accepted byte was >= 0x80 (the message needs ``BODY=8BITMIME``)."""
        return self._saw_8bit

    def encode(self, data: bytes | bytearray | memoryview) -> bytes:
        """Encode one chunk of the message; returns the bytes to send (maybe ``b""``)."""
        buf = _as_bytes(data)
        n = len(buf)
        if n == 0:
            return b""
        nul = buf.find(b"\0")
        if nul >= 0:
            raise _nul_error(self._in + nul)

        s = buf
        if self._after_cr and s[0] == _LF:
            s = s[1:]  # ends the line the previous chunk's CR already ended
        if _CR in s:
            # Every line end becomes one LF; CRLF first so it stays one line end.
            s = s.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._dot_stuff:
            s = s.replace(b"\n.", b"\n..")
            if self._at_line_start and s[:1] == b".":
                s = b"." + s
        s = s.replace(b"\n", b"\r\n")
        out = s if type(s) is bytes else bytes(s)

        if not self._saw_8bit and not buf.isascii():
            self._saw_8bit = True
        last = buf[-1]
        # A swallowed lone LF leaves us where the CR left us: at a line start.
        self._at_line_start = last in (_LF, _CR)
        self._after_cr = last == _CR
        self._in += n
        self._out += len(out)
        return out

    def finish(self) -> bytes:
        """``b"\\r\\n"`` if the content so far is non-empty and lacks a final line end, else
        ``b""``."""
        if self._at_line_start:  # also true for empty content: that stays empty
            return b""
        self._at_line_start = True
        self._out += 2
        return b"\r\n"


def encode_content(data: bytes | bytearray | memoryview | str, *, dot_stuff: bool = True) -> bytes:
    """Encode a whole message (:meth:`ContentEncoder.encode` then ``finish``).

    A ``str`` is encoded as UTF-8. ``b""`` gives ``b""``. For DATA, send the
    result followed by ``b".\\r\\n"``.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    enc = ContentEncoder(dot_stuff=dot_stuff)
    body = enc.encode(data)
    tail = enc.finish()
    return body + tail if tail else body
