"""Waking a replay when new work arrives: inotify (Linux) through ctypes, no polling.

The standard library has no inotify binding and the packages that wrap it
add little over the three calls needed here (``inotify_init1``,
``inotify_add_watch``, ``read``), so this module calls libc directly. The
descriptor is non-blocking and read from the event loop (``add_reader``):
the watcher costs nothing while nothing happens. Where inotify is missing
(another OS, a seccomp profile, ``fs.inotify.max_user_instances`` reached)
:func:`watch_paths` returns ``None`` and the daemon falls back to a bounded
poll (``--interval``).

Only "something changed" is reported, never what: a wake-up is a hint to run
a pass, and a pass decides from the queue itself (events may be coalesced,
and the queue overflow event ``IN_Q_OVERFLOW`` is a wake-up too).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterable

__all__ = ["IN_ATTRIB", "IN_CLOSE_WRITE", "IN_CREATE", "IN_MOVED_TO", "Watch", "watch_paths"]

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC

_libc: ctypes.CDLL | None = None


def _load() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c") or "libc.so.6"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
            lib.inotify_init1.argtypes = [ctypes.c_int]
            lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        except (OSError, AttributeError):
            return None
        _libc = lib
    return _libc


class Watch:
    """An inotify descriptor watching some paths; :meth:`wait` returns on a change."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Wake-ups seen so far (for tests and the debug log).
        self.changes = 0

    def fileno(self) -> int:
        return self._fd

    def _readable(self) -> None:
        got = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                got = True  # a broken descriptor: wake the caller, who falls back to polling
                break
            if not data:
                break
            got = True
        if got:
            self.changes += 1
            if self._event is not None:
                self._event.set()

    def attach(self, event: asyncio.Event) -> None:
        """Set *event* whenever something changes (from the running event loop)."""
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            self._loop.remove_reader(self._fd)
        self._loop, self._event = loop, event
        loop.add_reader(self._fd, self._readable)

    async def wait(self, timeout: float) -> bool:
        """Until a change (True) or *timeout* seconds (False)."""
        event = asyncio.Event()
        self.attach(event)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            self.detach()
        return True

    def detach(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
        self._loop = self._event = None

    def close(self) -> None:
        self.detach()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def watch_paths(paths: Iterable[tuple[str | os.PathLike[str], int]]) -> Watch | None:
    """A :class:`Watch` on each ``(path, mask)``, or ``None`` where inotify is unavailable.

    A path that does not exist yet is skipped (the caller watches its parent).
    """
    lib = _load()
    if lib is None or not hasattr(lib, "inotify_init1"):
        return None
    fd = lib.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        return None
    watched = 0
    for path, mask in paths:
        wd = lib.inotify_add_watch(fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR):
                continue
            os.close(fd)
            return None
        watched += 1
    if not watched:
        os.close(fd)
        return None
    return Watch(fd)
