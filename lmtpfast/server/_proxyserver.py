"""``Proxy``: the proxy handler on the server engine, its agent, its life cycle.

>>> async with Proxy.from_file("proxy.toml") as proxy:     # doctest: +SKIP
...     await proxy.serve_until(stop_event)

Start refuses a configuration whose routes lead back to one of the proxy's
own listeners (a loop, found before any mail arrives). ``shutdown()`` is the
SIGTERM path: stop accepting, let open transactions finish within the
deadline, then 421 4.3.2; ``reload()`` is the SIGHUP path: new maps and
transports for new transactions, open sessions and back-end deliveries carry
on untouched.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType, TracebackType
from typing import Any

from .._agent import Agent, AgentStats
from .._config import AgentConfig, config_from_dict
from .._destination import Destination
from .._errors import ConfigurationError
from .._saslserver import SaslUsers, check_mechanisms
from .._tls import server_context
from ._backends import Backends
from ._common import SessionConfig, SinkStats
from ._proxy import ProxyHandler, ProxyRecord, ProxyStats, loops_to
from ._proxyconf import ProxySettings, check_verify, load_proxy_config
from ._server import Server, parse_listen

__all__ = ["Proxy"]

#: Where the CLI listens when neither --listen nor the file says (unprivileged, loopback).
DEFAULT_LISTEN = "127.0.0.1:2424"


def local_names() -> frozenset[str]:
    """Names and addresses a wildcard listener on this machine answers on."""
    names = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "::"}
    for name in (socket.gethostname(), socket.getfqdn()):
        names.add(name.lower())
        with contextlib.suppress(OSError):
            for info in socket.getaddrinfo(name, None):
                names.add(str(info[4][0]).lower())
    return frozenset(names)


def static_destinations(config: AgentConfig) -> list[tuple[str, Destination]]:
    """Every back end a configuration names without asking a network map (and where)."""
    out: list[tuple[str, Destination]] = []
    for name, transport in config.transports.items():
        if transport.dest is not None:
            out.append((f"transports.{name}.destination", transport.dest))
        for member in transport.destinations:
            assert isinstance(member, Destination)
            out.append((f"transports.{name}.destinations", member))
    default = config.default
    if default is not None and default.destination is not None:
        out.append(("default", default.destination))
    if config.transport_map is not None:
        for entry, route in config.transport_map.routes():
            if route.destination is not None:
                where = (f"{entry.source}:{entry.line}" if entry.line
                         else f"transport_map.{entry.key}")
                out.append((where, route.destination))
    return out


def _agent_config(agent: Agent | AgentConfig | Mapping[str, Any] | str | os.PathLike[str]
                  ) -> Agent:
    if isinstance(agent, Agent):
        return agent
    if isinstance(agent, AgentConfig):
        return Agent(config=agent)
    if isinstance(agent, Mapping):
        return Agent(config=config_from_dict(agent))
    return Agent.from_config(agent)


class Proxy:
    """An LMTP proxy: routes each recipient to its back end (``docs/proxy.md``).

    ``agent`` is what delivers: an :class:`~lmtpfast.Agent`, its
    :class:`~lmtpfast.AgentConfig`, the config data or a config file.
    ``settings`` is the ``[proxy]`` table (:class:`ProxySettings`); ``listen``
    replaces its listeners. ``on_result`` hears of every recipient's final
    outcome (:class:`ProxyRecord`). ``engine`` picks the server engine
    (``"c"``/``"python"``). ``listen_sockets`` and ``reuse_port`` are for
    worker processes (``lmtpfast proxy --workers``): unix listeners a parent
    bound, TCP listeners bound with ``SO_REUSEPORT`` (see :class:`Server`).
    """

    def __init__(
        self,
        agent: Agent | AgentConfig | Mapping[str, Any] | str | os.PathLike[str],
        settings: ProxySettings | None = None,
        *,
        listen: str | Sequence[str] | None = None,
        on_result: Callable[[ProxyRecord], None] | None = None,
        engine: str | ModuleType | None = None,
        ssl_context: ssl.SSLContext | None = None,
        listen_sockets: Mapping[str, socket.socket] | None = None,
        reuse_port: bool = False,
    ) -> None:
        settings = settings if settings is not None else ProxySettings()
        self.settings = settings
        if listen is not None:
            dests = [listen] if isinstance(listen, str) else list(listen)
        else:
            dests = list(settings.listen) or [DEFAULT_LISTEN]
        self._listen = [parse_listen(d) for d in dests]
        self._backends = Backends(_agent_config(agent))
        self.stats = ProxyStats()
        hostname = settings.name
        self._local_names = local_names()
        auth = {"none": "none", "optional": "none", "required": "always", "tcp": "tcp"}
        users = None
        mechanisms: tuple[str, ...] = ()
        if settings.auth != "none":
            assert settings.sasl_users is not None  # checked by ProxySettings
            users = SaslUsers.from_file(settings.sasl_users)
            mechanisms = check_mechanisms(settings.sasl_mechanisms)
        if ssl_context is None and settings.tls_cert_file is not None:
            assert settings.tls_key_file is not None
            ssl_context = server_context(settings.tls_cert_file, settings.tls_key_file)
        self.handler = ProxyHandler(
            self._backends, hostname=hostname, stats=self.stats, listen=self._listen,
            local_names=self._local_names, hopcount_limit=settings.hopcount_limit,
            spool_threshold=settings.spool_threshold, spool_dir=settings.spool_dir,
            received_header=settings.received_header, auth_required=auth[settings.auth],
            sasl_users=users, sasl_mechanisms=mechanisms,
            sasl_plaintext=settings.sasl_allow_plaintext, on_result=on_result,
            verify_recipients=settings.verify_recipients)
        check_verify(settings, self.agent.config)
        extensions = list(settings.extensions)
        if ssl_context is not None:
            extensions.append("STARTTLS")
        if users is not None:
            extensions.append("AUTH " + " ".join(mechanisms))
        self.session_config = SessionConfig(
            hostname=hostname, extensions=extensions, max_size=settings.max_size,
            max_line_length=settings.max_line_length, max_recipients=settings.max_recipients,
            max_commands=settings.max_commands, greeting_text="LMTP lmtpfast proxy ready",
            delivered_text="Delivered", too_big_text="Message too big for this proxy",
            tls_required=settings.tls_required)
        self.server = Server(
            dests, self.handler, self.session_config, max_connections=settings.max_connections,
            ssl_context=ssl_context, engine=engine,
            idle_timeout=settings.timeouts.idle or None,
            command_timeout=settings.timeouts.command or None,
            tls_timeout=settings.timeouts.tls or None, unix_mode=settings.unix_mode,
            sockets=listen_sockets, reuse_port=reuse_port)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kwargs: Any) -> Proxy:
        """A proxy from one TOML file: ``[proxy]`` plus the agent's configuration."""
        settings, config = load_proxy_config(path)
        return cls(config, settings, **kwargs)

    # --- state --------------------------------------------------------------

    @property
    def agent(self) -> Agent:
        """The agent delivering now (a reload replaces it)."""
        return self._backends.agent

    @property
    def destinations(self) -> list[str]:
        """The real listen destinations, once started."""
        return self.server.destinations

    @property
    def server_stats(self) -> SinkStats:
        """The server's counters: connections, RCPT replies, final replies by code."""
        return self.server.stats

    @property
    def agent_stats(self) -> AgentStats:
        """The back-end side: connections opened and reused, transactions."""
        return self._backends.stats

    def check_loops(self, config: AgentConfig | None = None) -> None:
        """Raise :class:`ConfigurationError` if a static route leads to our own listener."""
        cfg = config if config is not None else self.agent.config
        for where, dest in static_destinations(cfg):
            if loops_to(dest, self._listen, self._local_names):
                raise ConfigurationError(
                    f"{where} routes to {dest}, which is this proxy's own listener: mail "
                    "would loop", source=cfg.source)

    # --- life cycle -----------------------------------------------------------

    async def start(self) -> None:
        """Check for loops, then listen on every destination."""
        self.check_loops()
        await self.server.start()
        # Port 0 listeners have their real port now: check (and guard) against those.
        self._listen = [parse_listen(d) for d in self.server.destinations]
        self.handler.set_listen(self._listen)
        try:
            self.check_loops()
        except ConfigurationError:
            await self.server.stop()
            raise

    async def shutdown(self, timeout: float | None = None) -> None:
        """Graceful stop (SIGTERM): stop accepting; open transactions get ``timeout``
        seconds (``shutdown_timeout``) to finish, then 421 4.3.2; then the back-end
        connections are QUIT."""
        limit = self.settings.shutdown_timeout if timeout is None else timeout
        await self.server.shutdown(limit)
        await self.handler.wait_idle()
        await self._backends.close(limit)

    async def stop(self) -> None:
        """Stop at once: every client connection is cut, back-end connections closed."""
        await self.server.stop()
        await self._backends.close(0)

    def reload(self, agent: Agent | AgentConfig | Mapping[str, Any] | str | os.PathLike[str]
               ) -> None:
        """Use new maps and transports (SIGHUP) for transactions routed from now on.

        Open sessions are kept; deliveries in flight finish on the old agent,
        which then closes. A new configuration that loops is refused
        (:class:`ConfigurationError`) and the old one stays.
        """
        new = _agent_config(agent)
        self.check_loops(new.config)
        check_verify(self.settings, new.config)
        self._backends.replace(new, close_timeout=self.settings.shutdown_timeout or 30.0)

    async def __aenter__(self) -> Proxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.shutdown()
        else:
            await self.stop()

    def __repr__(self) -> str:
        where = " ".join(self.destinations) or " ".join(
            f"unix:{w}" if k == "unix" else f"{w}:{p}" for k, w, p in self._listen)
        return f"<lmtpfast.server.Proxy {where}>"
