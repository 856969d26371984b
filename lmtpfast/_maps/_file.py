"""Local file maps: ``texthash:``, ``hash:``/``btree:`` (their source text), ``cdb:``, ``lmdb:``.

``texthash:FILE`` reads FILE as postmap(1) reads a source file: one ``key
value`` per line, ``#`` comment lines, blank lines skipped, a line starting
with white space continues the previous one (joined as Postfix joins them:
the newline removed, the white space kept), keys folded to lower case, the
first of duplicate keys kept (with a warning), a line without a value
ignored (with a warning).

``hash:FILE`` and ``btree:FILE`` are Berkeley DB files (FILE.db) built by
``postmap`` from FILE. No maintained Berkeley DB binding installs from PyPI
without compiling against libdb (and Python's own ``dbm.ndbm`` is not built
into every interpreter), so lmtpfast reads the source text FILE, which is
what FILE.db was built from; a FILE.db newer than FILE (changed by ``postmap
-i``/``-d``) is reported by ``lmtpfast map check``.

``cdb:FILE`` reads FILE.cdb (via ``cdbx``) and ``lmdb:FILE`` reads FILE.lmdb
(via ``lmdb``), the files postmap writes; keys are stored folded, lmdb keys
and values with a trailing NUL as Postfix writes them.

All file maps are ``static``: they answer from memory, with no I/O per key.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._errors import ConfigurationError
from ._base import LookupResult, Map, MapWarning, NotCached

__all__ = ["CdbMap", "LmdbMap", "TextMap", "parse_text_map"]


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what}: {exc.strerror or exc}",
                                 source=path) from None


def parse_text_map(
    text: str, source: str, *, fold: bool = True,
) -> tuple[dict[str, str], dict[str, int], list[MapWarning]]:
    """``(entries, line of each key, warnings)`` of a Postfix source text map."""
    logical: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if raw[0] in " \t" and logical:
            start, prev = logical[-1]
            logical[-1] = (start, prev + raw)
            continue
        logical.append((number, raw.strip() if raw[0] in " \t" else raw))
    entries: dict[str, str] = {}
    lines: dict[str, int] = {}
    warnings: list[MapWarning] = []
    for number, line in logical:
        parts = line.split(None, 1)
        if len(parts) < 2 or not parts[1].strip():
            warnings.append(MapWarning(source, number, "expected format: key whitespace value "
                                       "-- ignoring this line"))
            continue
        key = parts[0].lower() if fold else parts[0]
        if key in entries:
            warnings.append(MapWarning(source, number, f"duplicate entry: {key!r} (the first, "
                                       f"line {lines[key]}, is used)"))
            continue
        entries[key] = parts[1].strip()
        lines[key] = number
    return entries, lines, warnings


class _MemoryMap(Map):
    static = True

    def __init__(self, name: str, entries: dict[str, str]) -> None:
        super().__init__(name)
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, str]]:
        return list(self._entries.items())

    def get(self, key: str) -> str | None:
        return self._entries.get(key.lower() if self.fold else key)

    def lookup_cached(self, key: str) -> LookupResult | NotCached:
        value = self._entries.get(key.lower() if self.fold else key)
        return None if value is None else [value]

    async def lookup_many(self, keys: Sequence[str]) -> dict[str, LookupResult]:
        get = self._entries.get
        out: dict[str, LookupResult] = {}
        for key in keys:
            value = get(key.lower() if self.fold else key)
            out[key] = None if value is None else [value]
        return out


class TextMap(_MemoryMap):
    """``texthash:FILE`` (and ``hash:``/``btree:`` from their source text)."""

    type = "texthash"

    def __init__(self, name: str, *, mtype: str = "texthash",
                 entries: dict[str, str] | None = None) -> None:
        self.type = mtype
        self.lines: dict[str, int] = {}
        warnings: list[MapWarning] = []
        if entries is None:
            data = _read(name, f"{mtype} map file")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = data[: exc.start].count(b"\n") + 1
                raise ConfigurationError("not valid UTF-8", source=name, line=line) from None
            entries, self.lines, warnings = parse_text_map(text, name)
            if mtype in ("hash", "btree"):
                db = name + ".db"
                try:
                    if os.stat(db).st_mtime > os.stat(name).st_mtime + 1:
                        warnings.append(MapWarning(db, None, f"{db} is newer than {name}: "
                                                   f"lmtpfast reads {name}, the source text; "
                                                   "run postmap on it or edit the text"))
                except OSError:
                    pass
        super().__init__(name, entries)
        self.warnings = warnings


class CdbMap(_MemoryMap):
    """``cdb:FILE``: FILE.cdb as postmap writes it (read into memory at open)."""

    type = "cdb"

    def __init__(self, name: str) -> None:
        cdbx = _module("cdbx", "cdb", name)
        path = _postmap_file(name, ".cdb", "cdb")
        try:
            db: Any = cdbx.CDB(path)
            entries = {}
            for k in db.keys():  # noqa: SIM118 - a CDB, not a dict
                v = db[k]
                entries[_text(k)] = _text(v)
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read {path}: {exc}", source=path) from None
        super().__init__(name, entries)


class LmdbMap(_MemoryMap):
    """``lmdb:FILE``: FILE.lmdb as postmap writes it (read into memory at open)."""

    type = "lmdb"

    def __init__(self, name: str) -> None:
        lmdb = _module("lmdb", "lmdb", name)
        path = _postmap_file(name, ".lmdb", "lmdb")
        try:
            env = lmdb.open(path, subdir=False, readonly=True, lock=False)
            try:
                with env.begin() as txn:
                    entries = {_text(k.rstrip(b"\0")): _text(v.rstrip(b"\0"))
                               for k, v in txn.cursor()}
            finally:
                env.close()
        except lmdb.Error as exc:
            raise ConfigurationError(f"cannot read {path}: {exc}", source=path) from None
        super().__init__(name, entries)


def _module(module: str, mtype: str, name: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigurationError(f"{mtype}: maps need the {module!r} package (pip install "
                                 f"'lmtpfast[{mtype}]')", source=name) from None


def _postmap_file(name: str, suffix: str, mtype: str) -> str:
    path = name + suffix
    if not os.path.exists(path):
        raise ConfigurationError(f"cannot open {path}: no such file (run 'postmap "
                                 f"{mtype}:{name}')", source=path)
    return path


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")
