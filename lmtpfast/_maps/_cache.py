"""A cache in front of a network map: TTL, negative TTL, size bound, serve-stale, single-flight.

* A found answer is fresh for ``ttl`` seconds, a "not found" for
  ``negative_ttl`` (shorter by default: a new user should not wait long).
* At most ``size`` keys are kept; the oldest entries go first.
* Serve-stale: when the backend fails, an answer that expired less than
  ``stale`` seconds ago is used instead of a failure (Dovecot's auth cache
  does the same), and counted in :attr:`CacheStats.stale_served`.
* Single-flight: concurrent lookups of one key share one backend query.
* Failures are never cached: the next message asks again.

The clock is injectable (``clock=``) so tests move time without sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._base import NOT_CACHED, LookupResult, Map, MapError, NotCached

__all__ = ["CacheSettings", "CacheStats", "CachedMap"]


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """How a network map's answers are cached (the ``[map_cache]`` table)."""

    ttl: float = 300.0
    negative_ttl: float = 60.0
    size: int = 100_000
    #: How long past expiry an answer may still be used while the backend fails (0: never).
    stale: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("ttl", "negative_ttl", "stale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ValueError(f"map cache {name} must be a number >= 0, got {v!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise ValueError(f"map cache size must be an integer >= 0, got {self.size!r}")


@dataclass
class CacheStats:
    """Counters of one cached map (a live object; copy it for a snapshot)."""

    hits: int = 0
    negative_hits: int = 0
    misses: int = 0
    #: Backend calls (one per batch), keys sent, and of those how many failed.
    backend_calls: int = 0
    backend_keys: int = 0
    backend_failures: int = 0
    #: Keys answered by joining a query already in flight.
    shared: int = 0
    #: Expired answers used because the backend failed.
    stale_served: int = 0
    evictions: int = 0
    size: int = 0


class CachedMap(Map):
    """Wraps a map: same answers, fewer queries (see the module docstring)."""

    def __init__(self, inner: Map, settings: CacheSettings | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(inner.name)
        self.inner = inner
        self.type = inner.type
        self.fixed = inner.fixed
        self.fold = inner.fold
        self.warnings = inner.warnings
        self.settings = settings or CacheSettings()
        self.stats = CacheStats()
        self._clock = clock
        # key -> (expires at, result)
        self._entries: dict[str, tuple[float, list[str] | None]] = {}
        self._inflight: dict[str, asyncio.Future[LookupResult]] = {}

    def lookup_cached(self, key: str) -> LookupResult | NotCached:
        hit = self._entries.get(key)
        if hit is None:
            return NOT_CACHED
        expires, result = hit
        if expires < self._clock():
            return NOT_CACHED
        if result is None:
            self.stats.negative_hits += 1
        else:
            self.stats.hits += 1
        return result

    def _store(self, key: str, result: list[str] | None, now: float) -> None:
        s = self.settings
        ttl = s.ttl if result is not None else s.negative_ttl
        if ttl <= 0 or s.size <= 0:
            return
        entries = self._entries
        if key in entries:
            del entries[key]  # re-insert at the young end
        elif len(entries) >= s.size:
            # Drop the oldest ~1/16 at once: amortised O(1) per insert.
            drop = max(1, s.size // 16)
            for old in list(entries)[:drop]:
                del entries[old]
            self.stats.evictions += drop
        entries[key] = (now + ttl, result)

    async def lookup_many(self, keys: Sequence[str]) -> dict[str, LookupResult]:
        now = self._clock()
        out: dict[str, LookupResult] = {}
        waits: dict[str, asyncio.Future[LookupResult]] = {}
        missing: list[str] = []
        entries = self._entries
        for key in dict.fromkeys(keys):
            hit = entries.get(key)
            if hit is not None and hit[0] >= now:
                out[key] = hit[1]
                if hit[1] is None:
                    self.stats.negative_hits += 1
                else:
                    self.stats.hits += 1
                continue
            fut = self._inflight.get(key)
            if fut is not None:
                waits[key] = fut
                self.stats.shared += 1
                continue
            missing.append(key)
        if missing:
            self.stats.misses += len(missing)
            loop = asyncio.get_running_loop()
            mine = {k: loop.create_future() for k in missing}
            self._inflight.update(mine)
            try:
                self.stats.backend_calls += 1
                self.stats.backend_keys += len(missing)
                try:
                    got = await self.inner.lookup_many(missing)
                except MapError as exc:  # a backend should not raise, but never lose a key
                    got = dict.fromkeys(missing, exc)
                except Exception as exc:
                    err = MapError(self.mapname, f"lookup failed: {type(exc).__name__}: {exc}")
                    got = dict.fromkeys(missing, err)
                now = self._clock()
                for key in missing:
                    result = got.get(key)
                    if isinstance(result, MapError):
                        self.stats.backend_failures += 1
                        stale = self._stale(key, now)
                        if stale is not NOT_CACHED:
                            self.stats.stale_served += 1
                            result = stale  # type: ignore[assignment]
                    else:
                        self._store(key, result, now)
                    out[key] = result
                    mine[key].set_result(result)
            except BaseException:  # cancelled: the sharers must not hang
                err = MapError(self.mapname, "lookup cancelled")
                for f in mine.values():
                    if not f.done():
                        f.set_result(err)
                raise
            finally:
                for k in missing:
                    self._inflight.pop(k, None)
        for key, fut in waits.items():
            out[key] = await asyncio.shield(fut)
        self.stats.size = len(entries)
        return {k: out[k] for k in keys}

    def _stale(self, key: str, now: float) -> list[str] | NotCached | None:
        hit = self._entries.get(key)
        if hit is None or self.settings.stale <= 0:
            return NOT_CACHED
        expires, result = hit
        if now - expires > self.settings.stale:
            return NOT_CACHED
        return result

    def clear(self) -> None:
        self._entries.clear()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def close_soon(self) -> None:
        self.inner.close_soon()

    def __repr__(self) -> str:
        return f"<lmtpfast cached map {self.mapname} ({len(self._entries)} keys)>"
