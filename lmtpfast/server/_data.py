"""Server-side decoder for DATA content (RFC 5321 section 4.5.2).

The decoder is fed the bytes that follow the ``354`` reply, in chunks split
anywhere, and finds the end-of-data line. It is strict on purpose, because the
sink is an oracle for clients:

* Only ``CR LF . CR LF`` ends the content (or ``. CR LF`` as the very first
  line). A bare LF is *not* a line end here: ``\\n.\\n``, ``\\r\\n.\\n`` and
  ``\\n.\\r\\n`` are content, so a client that forgets to normalise line
  ends sees its message run on instead of being silently truncated
  (the "SMTP smuggling" family of bugs comes from lenient servers).
* Un-stuffing removes the first ``.`` of every line that starts with one
  (a line starts at the beginning of the content or after ``CR LF``); the
  CR LF before the final dot belongs to the content.

It never looks at a byte twice in Python: it searches with ``bytes.find`` and
un-stuffs with ``bytes.replace``/``bytes.count`` (C loops), and carries at most
four bytes (a possible start of the end marker) from one chunk to the next,
so a peer dripping one byte at a time costs O(n), not O(n^2). Of those four
bytes, the CR or CR LF they start with is content whatever follows, and is
handed out at once: what is held back is only a line-start dot (never
content) and a CR after it. The compiled twin (``_cserver.DotDecoder``, a
byte-level state machine) holds back exactly the same, so both hand their
handler the same chunks.
"""

from __future__ import annotations

__all__ = ["DotDecoder"]

_END = b"\r\n.\r\n"
_STUFFED = b"\r\n."


class DotDecoder:
    """Finds the end of DATA content in a stream and un-stuffs it.

    ``keep=False`` only measures the content (``size``) without building it:
    the sink's discard mode, where nothing but the end marker matters.
    ``limit`` (0 = none) stops keeping content once ``size`` exceeds it, so an
    oversized message costs no memory; ``overflow`` then says so.
    """

    __slots__ = ("_keep", "_limit", "_out", "_parts", "_tail", "done", "overflow", "size")

    def __init__(self, *, keep: bool = True, limit: int = 0) -> None:
        # A virtual CR LF before the content makes the first line a line
        # start like any other (". CR LF" first, or a stuffed first line).
        # _out counts the leading bytes of _tail already handed out (or, for
        # the virtual one, never content): they are never emitted again.
        self._tail = b"\r\n"
        self._out = 2
        self._keep = keep
        self._limit = limit
        self._parts: list[bytes] = []
        self.size = 0
        self.done = False
        self.overflow = False

    def feed(self, data: bytes, pos: int = 0) -> int:
        """Consume ``data[pos:]``.

        Returns the index in ``data`` just after the end-of-data line (the
        next command starts there) once the end is found, else -1: all of
        ``data[pos:]`` was consumed and more is needed.
        """
        tail = self._tail
        if tail:
            # The held-back tail (at most 4 bytes) plus the next 4 bytes hold
            # every end marker that starts in the tail. Only these few bytes
            # are copied: never data[pos:], which may be a megabyte of
            # pipelined messages.
            probe = tail + data[pos : pos + 4]
            i = probe.find(_END)
            if i >= 0:
                self._emit(probe, 0, i + 2, self._out)
                self._tail = b""
                self.done = True
                return pos + i + 5 - len(tail)
            if len(data) - pos <= 4:
                return self._hold(probe, 0, self._out)  # all there is: keep searching it whole
            pos += self._emit_tail(tail, data, pos)
            self._tail = b""
        i = data.find(_END, pos)
        if i >= 0:
            self._emit(data, pos, i + 2, 0)  # the CR LF before the dot is content
            self.done = True
            return i + 5
        return self._hold(data, pos, 0)

    def _hold(self, buf: bytes, start: int, skip: int) -> int:
        """Emit ``buf[start:]`` except what may begin the end marker after a line end."""
        n = len(buf)
        # Each candidate begins with CR; its CR (LF) is content either way
        # and goes out now, so only a dot (and the CR after it) waits.
        if buf.endswith(b"\r\n.\r", start):
            k = 4
        elif buf.endswith(b"\r\n.", start):
            k = 3
        elif buf.endswith(b"\r\n", start):
            k = 2
        elif buf.endswith(b"\r", start):
            k = 1
        else:
            k = 0
        sent = min(k, 2)
        self._emit(buf, start, n - k + sent, skip)
        self._tail = buf[n - k :] if k else b""
        self._out = sent
        return -1

    def _emit_tail(self, tail: bytes, data: bytes, pos: int) -> int:
        """Finish the held-back tail, now that at least 5 bytes follow it at ``data[pos]``.

        No end marker starts in the tail (the caller checked). Returns how
        many bytes of ``data`` were consumed with it (a stuffing dot).
        """
        # tail is one of CR | CR LF | CR LF . | CR LF . CR (see _hold), and
        # its CR or CR LF is already out.
        if tail == b"\r":
            if data.startswith(b"\n.", pos):
                self._emit_plain(b"\n")  # CR | LF . : a stuffed line start
                return 2
        elif tail == b"\r\n":
            if data.startswith(b".", pos):
                return 1
        elif tail == b"\r\n.\r":
            self._emit_plain(b"\r")  # the stuffing dot goes, the CR was content
        return 0

    def _emit(self, buf: bytes, a: int, b: int, skip: int) -> None:
        """Emit ``buf[a:b]`` un-stuffed, less its first ``skip`` bytes (already out)."""
        if not self._keep or self.overflow:
            n = (b - a) - buf.count(_STUFFED, a, b) - skip
            if n > 0:
                self.size += n
            return
        chunk = buf[a:b].replace(_STUFFED, b"\r\n")
        self._emit_plain(chunk[skip:] if skip else chunk)

    def _emit_plain(self, chunk: bytes) -> None:
        """Account for (and keep) an already un-stuffed chunk."""
        if not chunk:
            return
        self.size += len(chunk)
        if not self._keep or self.overflow:
            return
        if self._limit and self.size > self._limit:
            self.overflow = True
            self._parts.clear()
        else:
            self._parts.append(chunk)

    def take(self) -> bytes:
        """The un-stuffed content decoded since the last ``take()``, and forget it.

        How the server engine streams content to its handler chunk by chunk.
        """
        parts = self._parts
        if not parts:
            return b""
        chunk = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        return chunk

    def content(self) -> bytes:
        """The un-stuffed content received so far (all of it once ``done``).

        Empty when ``keep`` is false or the content overflowed ``limit``.
        """
        parts = self._parts
        if len(parts) == 1:
            return parts[0]
        joined = b"".join(parts)
        self._parts = [joined]
        return joined
