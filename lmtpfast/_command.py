"""LMTP over a program's stdin and stdout: the ``command:`` destination.

What Cyrus's ``deliver -l`` from inetd, Exim's lmtp transport ``command``
option and Dovecot's ``lmtp`` binary run standalone do: the mailbox server is
a program, started per connection, that speaks LMTP on its standard input and
output. The program gets one end of a socket pair as both (what inetd gives,
so programs that expect a socket work as well as those that read a pipe); the
other end is an ordinary connection for the protocol layer, so set-up, stage
timeouts, pipelining, pooling and failures are exactly a socket's:

* the process lives as long as its connection: the pool reuses it for
  several transactions and QUITs it when idle; once the connection is closed
  the program has :data:`EXIT_GRACE` seconds to exit, then gets SIGTERM, then
  SIGKILL (its whole process group: it runs in a session of its own);
* a program that cannot be started, or exits before its greeting, is a
  connect failure (``451 4.4.1``, naming its exit status and last stderr line);
* a program that dies mid-transaction is a lost connection: its recipients
  are transient, "possibly delivered" once the final dot was written;
* its stderr goes to the ``lmtpfast.command`` log, a line at a time; a
  non-zero exit status (or death by a signal) is logged as a warning;
* it runs with a small environment (``PATH``, ``HOME``, ``LANG``, ``LC_*``,
  ``TZ``, ``USER``, ``LOGNAME``, ``TMPDIR`` from ours), as Postfix's pipe(8)
  does: the agent's secrets (database passwords in its environment) are not
  handed to a mailbox program.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections import deque
from collections.abc import Sequence

from ._errors import ConnectError

__all__ = ["EXIT_GRACE", "Program"]

log = logging.getLogger("lmtpfast.command")

#: Seconds a program has to exit once its connection is closed, and again after SIGTERM.
EXIT_GRACE = 5.0
_KEPT_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "USER",
             "LOGNAME", "TMPDIR")
_STDERR_LINE = 2000  # a longer stderr line is cut in the log
_TAIL = 5  # stderr lines kept for error messages
# Finishing programs, kept referenced until they are reaped.
_finishing: set[asyncio.Task[int | None]] = set()


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in _KEPT_ENV}


class Program:
    """One running LMTP program: its process, its stderr, its end of life.

    Made by :meth:`start`; :func:`lmtpfast.connect` does that for a
    ``command:`` destination and the :class:`~lmtpfast.Client` waits for
    :meth:`finish` when it is closed.
    """

    __slots__ = ("_finished", "_stderr", "_tail", "grace", "peer", "process")

    def __init__(self, process: asyncio.subprocess.Process, peer: str, grace: float) -> None:
        self.process = process
        self.peer = peer
        self.grace = grace
        self._tail: deque[str] = deque(maxlen=_TAIL)
        assert process.stderr is not None
        self._stderr = asyncio.ensure_future(self._read_stderr(process.stderr))
        self._finished: asyncio.Task[int | None] | None = None

    @classmethod
    async def start(cls, argv: Sequence[str], peer: str, *, grace: float = EXIT_GRACE
                    ) -> tuple[Program, socket.socket]:
        """Run ``argv`` on one end of a socket pair; the program and the other end.

        Raises :class:`ConnectError` when the program cannot be run.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=theirs.fileno(), stdout=theirs.fileno(),
                stderr=asyncio.subprocess.PIPE, env=_environment(), close_fds=True,
                start_new_session=True)
        except OSError as exc:
            ours.close()
            raise ConnectError(f"cannot run {peer}: {exc.strerror or exc}") from exc
        finally:
            theirs.close()  # the child has its copies
        ours.setblocking(False)
        return cls(process, peer, grace), ours

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: killed by that signal); ``None`` while it runs."""
        return self.process.returncode

    @property
    def last_words(self) -> str:
        """The last line the program wrote to stderr ("" when none)."""
        return self._tail[-1] if self._tail else ""

    def status_text(self) -> str:
        rc = self.returncode
        if rc is None:
            return "still running"
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            return f"killed by {name}"
        return f"exit status {rc}"

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        pending = b""
        while True:
            chunk = await stream.read(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._line(line)
            if len(pending) > _STDERR_LINE:
                self._line(pending)
                pending = b""
        if pending:
            self._line(pending)

    def _line(self, raw: bytes) -> None:
        text = raw[:_STDERR_LINE].decode("utf-8", "replace").rstrip("\r")
        if text:
            self._tail.append(text)
            log.info("%s[%d]: %s", self.peer, self.process.pid, text)

    def finish(self) -> asyncio.Future[int | None]:
        """Wait for the program to end (its connection must be closed); its exit status.

        Bounded: :attr:`grace` seconds to exit on its own, as long again after
        SIGTERM, then SIGKILL. Starting it twice waits for the same end;
        cancelling the waiter does not stop the reaping.
        """
        if self._finished is None:
            self._finished = asyncio.ensure_future(self._finish())
            _finishing.add(self._finished)
            self._finished.add_done_callback(_finishing.discard)
        return asyncio.shield(self._finished)

    async def _finish(self) -> int | None:
        process = self.process
        sent: str | None = None
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and process.returncode is None:
                sent = sig.name
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, sig)  # its own session: it and its children
            try:
                async with asyncio.timeout(self.grace):
                    await process.wait()
                break
            except TimeoutError:
                continue
        try:
            async with asyncio.timeout(self.grace):
                await self._stderr  # a child that kept stderr open is not waited for
        except TimeoutError:
            self._stderr.cancel()
        rc = process.returncode
        if sent is not None:
            log.warning("%s[%d] did not exit when its connection closed: sent %s; %s",
                        self.peer, process.pid, sent, self.status_text())
        elif rc:
            log.warning("%s[%d] ended with %s%s", self.peer, process.pid, self.status_text(),
                        f": {self.last_words}" if self.last_words else "")
        else:
            log.debug("%s[%d] ended with %s", self.peer, process.pid, self.status_text())
        return rc

    def __repr__(self) -> str:
        return f"<lmtpfast Program {self.peer} pid={self.process.pid} {self.status_text()}>"
