"""The proxy's one door to the delivery agent: routing and delivery to the back ends.

Every call the proxy makes into :class:`~lmtpfast.Agent` is here, so the
proxy's handler (``_proxy.py``) knows nothing about how a delivery request is
built or which agent is current (a reload swaps it). What it offers:

* :meth:`Backends.route_now` — a recipient's routing from memory (file maps,
  cached answers), or None when a map must be asked;
* :meth:`Backends.route_many` — the routings of many recipients in one
  batched round of lookups (a pipelined group of RCPTs);
* :meth:`Backends.deliver` — one message to the recipients of one back end,
  over the agent's pooled, pipelined connections; one result per recipient.

The agent rewrites (virtual map), checks (recipient map) and routes
(transport map) exactly as it does for ``lmtpfast replay``, so the proxy and
replay agree on where every recipient goes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from .._agent import Agent, AgentStats
from .._delivery import Delivery
from .._dsn import DSN
from .._results import RecipientResult
from .._routing import Routing

if TYPE_CHECKING:
    from .._verify import VerifiedTransaction

__all__ = ["Backends"]

log = logging.getLogger("lmtpfast.proxy")


class Backends:
    """The current agent, its routing and its delivery, behind one small interface."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self._retired: list[asyncio.Task[None]] = []

    @property
    def agent(self) -> Agent:
        return self._agent

    def route_now(self, recipient: str) -> Routing | None:
        """The routing of ``recipient`` without I/O, or None when a network map must answer.

        From the agent's route cache (file-map routes for ever, network-map
        routes for the maps' cache TTL; failures never): what replay uses.
        """
        try:
            return self._agent.route(recipient)
        except RuntimeError:
            return None

    async def route_many(self, recipients: Sequence[str]) -> list[Routing]:
        """Route every recipient: one batched round of lookups per step, whatever the count."""
        return await self._agent.route_many(recipients)

    async def deliver(
        self,
        content: bytes | memoryview,
        sender: str,
        routings: Sequence[Routing],
        *,
        mail_params: Sequence[str] = (),
        dsn: DSN | None = None,
    ) -> list[RecipientResult]:
        """Deliver ``content`` to recipients routed to one back end; one result each.

        The routings are those decided at RCPT time (the proxy never routes a
        recipient twice: a map that goes down between RCPT and the dot cannot
        turn an accepted recipient into a failure). Recipients that are the
        same address after rewriting are sent once and share the outcome; the
        transport's ``recipient_limit`` splits the transaction. SIZE, BODY and
        SMTPUTF8 are added per back end by the session, from what it offers.
        """
        # One Delivery for this back end's recipients: checked once, its DSN
        # sent only where the back end offers DSN, then routed as decided.
        delivery = Delivery.build(content, sender=sender,
                                  recipients=[r.recipient for r in routings],
                                  mail_params=mail_params, dsn=dsn)
        return await self._agent.deliver_routed(delivery, routings)

    def prepare(
        self,
        content: bytes | memoryview,
        sender: str,
        recipients: Sequence[str],
        *,
        mail_params: Sequence[str] = (),
        dsn: DSN | None = None,
    ) -> Delivery:
        """One message's :class:`Delivery` for all its recipients, checked once.

        Raises what :meth:`Delivery.build` raises (``ContentError``,
        ``LocalProtocolError``). Its parts (:meth:`deliver_part`) share its
        content and its encoded forms: the content is dot-stuffed once per
        message, not once per back end.
        """
        return Delivery.build(content, sender=sender, recipients=recipients,
                              mail_params=mail_params, dsn=dsn)

    async def deliver_part(
        self, delivery: Delivery, positions: Sequence[int], routings: Sequence[Routing],
    ) -> list[RecipientResult]:
        """Deliver to the recipients at ``positions`` of ``delivery``, routed to one back end.

        The same transaction :meth:`deliver` sends for those recipients:
        SMTPUTF8 is asked for only when this part's own addresses (or the
        sender) need it, as if the part had been built alone.
        """
        part = delivery.subset(positions)
        if part.smtputf8 and delivery.sender.isascii() and all(
                r.isascii() for r in part.recipients):
            part = msgspec.structs.replace(part, smtputf8=False)
        return await self._agent.deliver_routed(part, routings)

    def verified(self, routing: Routing, sender: str, *, eight_bit: bool = False
                 ) -> VerifiedTransaction:
        """A transaction toward ``routing``'s back end whose RCPTs are forwarded as they
        come (``verify_recipients``; ``lmtpfast/_verify.py``)."""
        return self._agent.verified_transaction(routing, sender, eight_bit=eight_bit)

    async def finish_verified(
        self, vt: VerifiedTransaction, content: bytes | memoryview, sender: str,
        routings: Sequence[Routing], positions: Sequence[int],
    ) -> list[RecipientResult]:
        """The content on ``vt``: one result per routing (``positions[i]``: its RCPT in ``vt``).

        A recipient the client gave twice was sent to the back end once and
        both get its reply, as :meth:`deliver` does.
        """
        order: dict[int, int] = {}
        for pos in positions:
            order.setdefault(pos, len(order))
        unique = list(order)
        delivery = Delivery.build(content, sender=sender,
                                  recipients=[vt.addresses[p] for p in unique])
        results = await vt.finish(delivery, unique)
        replace = msgspec.structs.replace
        out = []
        for routing, pos in zip(routings, positions, strict=True):
            r = results[order[pos]]
            out.append(r if r.address == routing.recipient
                       else replace(r, address=routing.recipient))
        return out

    @property
    def stats(self) -> AgentStats:
        """The agent's counters (connections opened, reused, transactions ...)."""
        return self._agent.stats

    def replace(self, agent: Agent, *, close_timeout: float = 30.0) -> None:
        """Switch to ``agent`` (a reload); the old one finishes what it has and closes."""
        old, self._agent = self._agent, agent
        task = asyncio.ensure_future(old.close(close_timeout))
        self._retired.append(task)
        task.add_done_callback(self._retired.remove)

    async def close(self, timeout: float | None = None) -> None:
        """Close the agent (its deliveries in flight finish first, up to ``timeout``)."""
        await self._agent.close(timeout)
        if self._retired:
            await asyncio.gather(*self._retired, return_exceptions=True)
