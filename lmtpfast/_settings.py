"""Settings as plain data: per-stage timeouts and pool limits, with Postfix's defaults.

Nothing here does I/O; every layer that needs a limit reads it from these objects.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import msgspec

from ._errors import ConfigurationError

__all__ = ["PoolSettings", "Probe", "ShapingSettings", "Timeouts"]

Probe = Literal["none", "rset", "noop"]

class Timeouts(msgspec.Struct, frozen=True):
    """Time limits in seconds per protocol stage, with Postfix's lmtp(8) defaults.

    Each limit is the longest wait for the next byte of the reply (or, for
    ``content``, for the socket to accept more of the message), as Postfix
    applies them.
    """

    connect: float = 30.0  # lmtp_connect_timeout
    greeting: float = 300.0  # lmtp_helo_timeout covers the greeting too
    lhlo: float = 300.0  # lmtp_lhlo_timeout
    starttls: float = 300.0  # lmtp_starttls_timeout
    auth: float = 300.0
    mail: float = 300.0  # lmtp_mail_timeout
    rcpt: float = 300.0  # lmtp_rcpt_timeout
    data: float = 120.0  # lmtp_data_init_timeout
    content: float = 180.0  # lmtp_data_xfer_timeout
    final: float = 600.0  # lmtp_data_done_timeout
    rset: float = 20.0  # lmtp_rset_timeout
    quit: float = 300.0  # lmtp_quit_timeout
    command: float = 300.0  # NOOP and other session commands

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            # NaN passes "<= 0"; inf is "no limit" (a timer that never fires).
            if not isinstance(value, int | float) or math.isnan(value) or value <= 0:
                raise ConfigurationError(f"timeout must be a positive number, got {value!r}",
                                         field=name)

    def for_stage(self, stage: str) -> float:
        # "auth-response" (the SASL exchange after AUTH) counts as "auth".
        value = getattr(self, stage.partition("-")[0], None)
        return float(value) if isinstance(value, int | float) else self.command

    @classmethod
    def scaled(cls, factor: float) -> Timeouts:
        """Every default multiplied by ``factor`` (tests use small ones)."""
        default = cls()
        return cls(**{name: getattr(default, name) * factor for name in cls.__struct_fields__})



class PoolSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How one pool treats its destination; Postfix's parameter names in the comments."""

    #: Open connections at most (``lmtp_destination_concurrency_limit``, default 20).
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 20
    #: Seconds after which a connection is no longer reused (``lmtp_connection_reuse_time_limit``).
    reuse_time_limit: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    #: Seconds an unused connection stays open (``lmtp_connection_cache_time_limit`` is 2 s;
    #: a library that sees bursts gains from a little more).
    idle_timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    #: Transactions per connection at most, 0 for no limit (``lmtp_connection_reuse_count_limit``).
    max_transactions: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: Check an idle connection with RSET or NOOP before reusing it (Postfix does not).
    probe: Probe = "none"
    #: Transactions in flight on one connection once ``max_connections`` are open.
    pipeline_depth: Annotated[int, msgspec.Meta(ge=1)] = 8
    #: Seconds :meth:`Pool.close` waits for deliveries in flight before cutting them off.
    close_timeout: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    #: Seconds after a failed connect during which callers that need a new
    #: connection get that failure at once instead of each waiting for its own
    #: connect timeout (Postfix marks the destination dead likewise); 0 = off.
    connect_backoff: Annotated[float, msgspec.Meta(ge=0)] = 1.0

    def __post_init__(self) -> None:
        for name in ("max_connections", "pipeline_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"must be an integer >= 1, got {value!r}", field=name)
        value = self.max_transactions
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigurationError(f"must be an integer >= 0, got {value!r}",
                                     field="max_transactions")
        for name in ("reuse_time_limit", "idle_timeout", "close_timeout"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not value > 0):
                raise ConfigurationError(f"must be a positive number of seconds, got {value!r}",
                                         field=name)
        value = self.connect_backoff
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigurationError(f"must be a number of seconds >= 0, got {value!r}",
                                     field="connect_backoff")
        if self.probe not in ("none", "rset", "noop"):
            raise ConfigurationError(f"must be 'none', 'rset' or 'noop', got {self.probe!r}",
                                     field="probe")


class ShapingSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Traffic shaping for one destination, as Postfix's queue manager does it (``_shaping.py``).

    Concurrency here counts transactions in flight to the destination (the
    pool turns them into connections, at most ``PoolSettings.max_connections``).
    Recipients per transaction are the transport's ``recipient_limit``.
    """

    #: Transactions in flight at most (``lmtp_destination_concurrency_limit``);
    #: 0: no limit beyond the pool's. With a limit, the window starts at
    #: ``initial_concurrency`` and moves with Postfix's feedback: +1 after a
    #: window's worth of transactions that reached the server, -1 after a
    #: window's worth that could not get a session (never below 1).
    concurrency_limit: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: Where the window starts, and restarts after a dead spell
    #: (``initial_destination_concurrency``).
    initial_concurrency: Annotated[int, msgspec.Meta(ge=1)] = 5
    #: Seconds between the end of one transaction and the start of the next
    #: (``lmtp_destination_rate_delay``); > 0 sends one transaction at a time.
    rate_delay: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    #: Transactions (messages) per second at most, 0 for no limit; starts are
    #: spaced ``1 / message_rate`` seconds apart whatever the concurrency.
    message_rate: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    #: Consecutive transactions that could not get a session (connect refused
    #: or timed out, greeting, LHLO, STARTTLS or AUTH refused) after which the
    #: destination is marked dead; 0: never.
    dead_after: Annotated[int, msgspec.Meta(ge=0)] = 5
    #: Seconds a dead destination's mail is deferred without connecting before
    #: one transaction probes it (Postfix waits ``minimal_backoff_time``).
    dead_time: Annotated[float, msgspec.Meta(gt=0)] = 60.0

    def __post_init__(self) -> None:
        for name in ("concurrency_limit", "dead_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(f"must be an integer >= 0, got {value!r}", field=name)
        value = self.initial_concurrency
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"must be an integer >= 1, got {value!r}",
                                     field="initial_concurrency")
        for name in ("rate_delay", "message_rate"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or math.isnan(value) or math.isinf(value) or value < 0):
                raise ConfigurationError(f"must be a number >= 0, got {value!r}", field=name)
        value = self.dead_time
        if (isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value)
                or math.isinf(value) or value <= 0):
            raise ConfigurationError(f"must be a positive number of seconds, got {value!r}",
                                     field="dead_time")
