"""What every map is: ``TYPE:NAME``, batched async lookups, a sync fast path.

A lookup result is a list of result elements (one per row, attribute value
or file value; Postfix joins them with commas), ``None`` for "not found", or
a :class:`MapError` for a key whose lookup failed (a temporary failure for
the recipients that needed it, never a bounce).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from .._errors import LMTPError

__all__ = [
    "NOT_CACHED",
    "LookupResult",
    "Map",
    "MapError",
    "MapWarning",
    "NotCached",
    "as_text",
]


class MapError(LMTPError):
    """A map lookup failed (database down, timeout, bad reply, expansion limit).

    Always temporary: the recipients that needed the lookup are deferred with
    ``451 4.3.0`` (Postfix's "address resolver failure"), never bounced.
    ``map`` names the map (``pgsql:/etc/postfix/transport.cf``); the text never
    carries a password.
    """

    def __init__(self, mapname: str, problem: str) -> None:
        super().__init__(f"{mapname}: {problem}")
        self.map = mapname
        self.problem = problem


class NotCached:
    """Type of :data:`NOT_CACHED`."""

    _instance: NotCached | None = None

    def __new__(cls) -> NotCached:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NOT_CACHED"


#: What :meth:`Map.lookup_cached` returns when only I/O can answer.
NOT_CACHED: Final = NotCached()

LookupResult = list[str] | None | MapError


@dataclass(frozen=True, slots=True)
class MapWarning:
    """Something in a map's configuration Postfix would accept but that looks wrong."""

    source: str
    line: int | None
    problem: str

    def __str__(self) -> str:
        where = self.source + (f":{self.line}" if self.line is not None else "")
        return f"{where}: {self.problem}"


def as_text(result: list[str]) -> str:
    """The one string Postfix makes of a result (elements joined with commas)."""
    return ",".join(result)


class Map:
    """Base of every map type.

    ``fixed`` is Postfix's ``DICT_FLAG_FIXED``: the map answers exact keys, so
    routing also asks it partial keys (``user@domain`` without the extension,
    ``domain``, ``.parent``, ``@domain``). Pattern-like maps (``tcp:``,
    ``socketmap:``, SQL/LDAP queries that use ``%u``/``%d``/``%1``...) are asked
    the full address only, as Postfix does. ``fold`` says whether keys are
    lower-cased before the lookup (Postfix folds for every type but
    ``tcp:``/``socketmap:``). ``static`` maps (files) never change while
    open, so answers may be remembered forever.
    """

    type: str = ""
    fixed: bool = True
    fold: bool = True
    static: bool = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.warnings: list[MapWarning] = []

    @property
    def mapname(self) -> str:
        """``TYPE:NAME``, as written in main.cf."""
        return f"{self.type}:{self.name}"

    def fold_key(self, key: str) -> str:
        return key.lower() if self.fold else key

    async def lookup_many(self, keys: Sequence[str]) -> dict[str, LookupResult]:
        """Look up every key (one result per distinct key, keys as given).

        Backends batch where they can. A failure of the whole backend is a
        :class:`MapError` value for every key (never raised), so one call
        answers every recipient of a message.
        """
        raise NotImplementedError

    def lookup_cached(self, key: str) -> LookupResult | NotCached:
        """The answer without I/O, or :data:`NOT_CACHED`."""
        return NOT_CACHED

    async def lookup(self, key: str) -> list[str] | None:
        """One key; raises :class:`MapError` on a lookup failure."""
        result = (await self.lookup_many([key]))[key]
        if isinstance(result, MapError):
            raise result
        return result

    async def aclose(self) -> None:
        """Close connections (idempotent)."""

    def close_soon(self) -> None:
        """Close without awaiting, where that is possible (file maps: nothing to do)."""

    async def __aenter__(self) -> Map:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<lmtpfast map {self.mapname}>"


async def gather_lookups(
    pairs: Sequence[tuple[Map, Sequence[str]]],
) -> list[dict[str, LookupResult]]:
    """Run several maps' ``lookup_many`` concurrently."""
    if len(pairs) == 1:
        m, keys = pairs[0]
        return [await m.lookup_many(keys)]
    return list(await asyncio.gather(*(m.lookup_many(k) for m, k in pairs)))
