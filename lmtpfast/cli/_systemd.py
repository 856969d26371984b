"""systemd's readiness protocol (``sd_notify``), written out: one datagram per state change.

With ``Type=notify`` systemd sets ``NOTIFY_SOCKET`` (a path, or ``@name`` in
the abstract namespace) and waits for ``READY=1``; ``RELOADING=1`` /
``READY=1`` bracket a reload, ``STOPPING=1`` starts the stop, ``STATUS=``
is shown by ``systemctl status``, and ``WATCHDOG=1`` pings a service that
has ``WatchdogSec=`` (``WATCHDOG_USEC``). The protocol is a single
``sendto`` of ``KEY=VALUE`` lines, so no library is needed for it.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["Notifier"]


class Notifier:
    """Sends ``sd_notify`` messages when ``NOTIFY_SOCKET`` is set; does nothing otherwise."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._sock: socket.socket | None = None
        self._address = ""
        if address and address[0] in "/@":
            self._address = "\0" + address[1:] if address[0] == "@" else address
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            except OSError:
                self._sock = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        #: Seconds between watchdog pings (half of WatchdogSec), or None.
        self.watchdog: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog = int(usec) / 2e6

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False if there is nobody to tell."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []),
                         f"MAINPID={os.getpid()}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets Type=notify-reload match the reload to this message.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def ping(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
