"""Private network namespaces for multi-host tests: :class:`NetNamespaces`.

For tests where several "hosts" share one server (issue 15: replayers on two
machines, one PostgreSQL queue). Use the ``netns`` factory fixture (see
:mod:`lmtpfast._testing.fixtures`) or the class directly::

    with NetNamespaces(["db", "a", "b"]) as net:
        net.address("db")                       # "10.77.0.1"
        pg = TempPostgres(host=net.address("db"), netns=net.namespace("db")).start()
        net.run("a", ["psql", pg.dsn_for("u", "pw")])   # from "host" a
        proc = net.popen("b", [sys.executable, "-m", "lmtpfast", ...])
        net.wrap("b", cmd)                      # ["ip", "netns", "exec", NS, *cmd]

Topology: one hidden hub namespace holds a bridge; every named namespace has
``lo`` up and an ``eth0`` (a veth whose peer is on the bridge) with one address
of a private /24 (default ``10.77.0.0/24``: ``.1`` for the first name, ``.2``
for the second ...). Both ends of every veth are created *inside* namespaces
(``ip -n HUB link add ... peer ... netns NS``): nothing is ever added to the
machine's own interfaces, routes or addresses, so the subnet cannot clash with
the host's. Separate :class:`NetNamespaces` are separate networks.

Clean-up always runs (``close()``, the context manager, and an ``atexit`` hook
for a test process that ends without teardown): processes still inside a
namespace are killed (``ip netns pids``), then the namespaces are deleted,
which removes their veths and the bridge. Namespace names carry the creating
process's pid (``lmtpfast-PID-TAG-NAME``); :func:`remove_stale` deletes those
whose creator is gone (called by every new instance).

Facts checked on this machine (Debian 12, root, iproute2 6.1, the same kind
of machine CI runs on): ``ip netns add``, veth pairs and a bridge work in the
container; ``ip netns exec NS CMD`` execs CMD in the same process (no fork), so
a ``setpriv --pdeathsig`` in CMD still has the test process as its parent and
the pid we started is the server's. ``/proc/net/*`` shows the *reader's*
namespace: readiness checks of a server inside one read ``/proc/PID/net/*``.
Pathname unix sockets work across network namespaces (the path lookup is by
filesystem), but ``/proc/net/unix`` lists them per namespace.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import re
import secrets
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from ._procs import ToolError, run_tool

__all__ = ["IP", "NetNamespaces", "ToolError", "find_netns", "namespaces_alive", "remove_stale"]

IP = "/usr/sbin/ip"
_PREFIX = "lmtpfast-"
_NAME = re.compile(r"[a-z][a-z0-9]{0,11}")


def find_netns() -> str | None:
    """Why :class:`NetNamespaces` cannot run here, or ``None`` when it can."""
    if not os.access(IP, os.X_OK):
        return f"{IP} missing (package iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


def _ip(*args: str, timeout: float = 30.0) -> str:
    return run_tool([IP, *args], timeout=timeout).stdout


def _kill_inside(ns: str) -> None:
    """SIGKILL every process in namespace *ns* (bounded: a few rounds)."""
    for _ in range(5):
        proc = run_tool([IP, "netns", "pids", ns], check=False, timeout=30)
        pids = [int(p) for p in proc.stdout.split() if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)


def _delete(ns: str) -> None:
    _kill_inside(ns)
    run_tool([IP, "netns", "delete", ns], check=False, timeout=30)


def remove_stale() -> list[str]:
    """Delete ``lmtpfast-PID-*`` namespaces whose creating process is gone; returns them."""
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return []
    removed = []
    for ns in names:
        m = re.fullmatch(rf"{_PREFIX}(\d+)-[0-9a-f]+-\w+", ns)
        if m is None or Path(f"/proc/{m.group(1)}").exists():
            continue
        _delete(ns)
        removed.append(ns)
    return removed


class NetNamespaces:
    """Named network namespaces on one private /24, joined by a bridge in a hub namespace.

    *names*: short lower-case names (``[a-z][a-z0-9]{0,11}``), one per "host".
    *subnet*: an IPv4 /24 (private addresses only); host ``i`` gets ``.i+1``.
    """

    def __init__(self, names: Sequence[str], *, subnet: str = "10.77.0.0/24") -> None:
        why = find_netns()
        if why is not None:
            raise RuntimeError(f"cannot make network namespaces: {why}")
        net = ipaddress.ip_network(subnet)
        if net.version != 4 or net.prefixlen != 24 or not net.is_private:
            raise ValueError(f"subnet must be a private IPv4 /24, got {subnet!r}")
        if len(set(names)) != len(names) or not names or len(names) > 250:
            raise ValueError("names must be 1-250 distinct names")
        for n in names:
            if not _NAME.fullmatch(n):
                raise ValueError(f"bad namespace name {n!r} (want [a-z][a-z0-9]{{0,11}})")
        remove_stale()
        self.names = tuple(names)
        self.subnet = net
        self.tag = f"{os.getpid()}-{secrets.token_hex(3)}"
        self._hub = f"{_PREFIX}{self.tag}-hub"
        self._made: list[str] = []
        self._children: list[subprocess.Popen[Any]] = []
        self._addresses = {n: str(net.network_address + i + 1) for i, n in enumerate(names)}
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        _ip("netns", "add", self._hub)
        self._made.append(self._hub)
        _ip("-n", self._hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self._hub, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            ns = self.namespace(name)
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            port = f"p{i}"
            # Both ends made inside namespaces: the host's own links never change.
            _ip("-n", self._hub, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", ns)  # fmt: skip
            _ip("-n", self._hub, "link", "set", port, "master", "br0")
            _ip("-n", self._hub, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{self._addresses[name]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    # -- use ---------------------------------------------------------------------

    def namespace(self, name: str) -> str:
        """The real namespace name of *name* (for ``ip netns exec`` / ``ip -n``)."""
        if name not in self._addresses:
            raise KeyError(f"no namespace {name!r} here (have {', '.join(self.names)})")
        return f"{_PREFIX}{self.tag}-{name}"

    def address(self, name: str) -> str:
        """The IPv4 address of *name*'s ``eth0``."""
        self.namespace(name)
        return self._addresses[name]

    def wrap(self, name: str, cmd: Sequence[str]) -> list[str]:
        """*cmd* prefixed to run inside *name*: ``["ip", "netns", "exec", NS, *cmd]``."""
        return [IP, "netns", "exec", self.namespace(name), *cmd]

    def run(
        self, name: str, cmd: Sequence[str], *, timeout: float = 60.0, check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run *cmd* inside *name* and wait (text output; :class:`ToolError` if *check*)."""
        return run_tool(self.wrap(name, cmd), input=input, timeout=timeout, check=check)

    def popen(self, name: str, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start *cmd* inside *name* (``subprocess.Popen`` keyword arguments pass through).

        The process is killed at :meth:`close` if still running.
        """
        proc: subprocess.Popen[Any] = subprocess.Popen(self.wrap(name, cmd), **kwargs)
        # Killed by close() itself too: until `ip netns exec` has entered the
        # namespace, `ip netns pids` cannot see it (a race under load).
        self._children.append(proc)
        return proc

    # -- clean-up ----------------------------------------------------------------

    def close(self) -> None:
        """Kill what runs inside, delete every namespace (and so veths and bridge); idempotent."""
        made, self._made = self._made, []
        children, self._children = self._children, []
        for child in children:
            if child.poll() is None:
                child.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(30)
        for ns in reversed(made):
            _delete(ns)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        hosts = ", ".join(f"{n}={a}" for n, a in self._addresses.items())
        return f"<NetNamespaces {self.tag} {hosts}>"


def namespaces_alive(tag_or_prefix: str) -> list[str]:
    """Namespaces in ``/run/netns`` whose name starts with ``lmtpfast-`` + *tag_or_prefix*."""
    with contextlib.suppress(FileNotFoundError):
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(_PREFIX + tag_or_prefix))
    return []
