"""``static:VALUE`` and ``inline:{key=value, ...}``, as Postfix has them."""

from __future__ import annotations

from collections.abc import Sequence

from .._errors import ConfigurationError
from ._base import LookupResult, Map, NotCached
from ._file import _MemoryMap

__all__ = ["InlineMap", "StaticMap"]


class StaticMap(Map):
    """``static:VALUE``: every key finds VALUE (``static:{text with spaces}`` too)."""

    type = "static"
    static = True
    fixed = False  # Postfix: a static map is asked the full key only

    def __init__(self, name: str) -> None:
        super().__init__(name)
        value = name
        if value.startswith("{") and value.endswith("}"):
            value = value[1:-1].strip()
        self.value = value

    def lookup_cached(self, key: str) -> LookupResult | NotCached:
        return [self.value]

    async def lookup_many(self, keys: Sequence[str]) -> dict[str, LookupResult]:
        return {k: [self.value] for k in keys}


class InlineMap(_MemoryMap):
    """``inline:{key1=value1, key2=value2, { key3 = text with spaces }}``."""

    type = "inline"

    def __init__(self, name: str) -> None:
        text = name.strip()
        if not (text.startswith("{") and text.endswith("}")):
            raise ConfigurationError("inline: map must be written {key=value, ...}", source=name)
        entries: dict[str, str] = {}
        for item in _split_inline(text[1:-1]):
            if item.startswith("{") and item.endswith("}"):
                item = item[1:-1].strip()
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ConfigurationError(f"inline: entry {item!r} is not key=value", source=name)
            entries.setdefault(key.strip().lower(), value.strip())
        super().__init__(name, entries)


def _split_inline(body: str) -> list[str]:
    items: list[str] = []
    depth = 0
    buf: list[str] = []
    for c in body:
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        if depth == 0 and (c == "," or c.isspace()):
            if buf:
                items.append("".join(buf).strip())
                buf = []
            continue
        buf.append(c)
    if buf and "".join(buf).strip():
        items.append("".join(buf).strip())
    return items

