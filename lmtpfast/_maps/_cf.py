"""Postfix's ``.cf`` map files (pgsql_table(5), mysql_table(5), ldap_table(5)), read unchanged.

The format is main.cf's: ``name = value`` lines, ``#`` comment lines, blank
lines, and lines starting with white space continue the previous one. A
later line for the same name wins (Postfix loads the file into a table that
replaces). Postfix ignores names it does not know; so do we, with a
:class:`~lmtpfast._maps._base.MapWarning` naming the file, line and name
(typos are common) that ``lmtpfast map check`` turns into exit status 78.
Values are never echoed in messages: ``password``/``bind_pw`` live here.

lmtpfast's own settings start with ``lmtpfast_`` so Postfix reading the same
file ignores them (Postfix 3.7's SQL maps have no timeout settings).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from .._errors import ConfigurationError
from ._base import MapWarning

__all__ = ["CfFile", "read_cf", "split_list"]

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_LIST_SEP = re.compile(r"[\s,]+")


def split_list(value: str) -> list[str]:
    """A Postfix list value: items separated by commas and/or white space."""
    return [p for p in _LIST_SEP.split(value) if p]


@dataclass
class CfFile:
    """The settings of one ``.cf`` file, with the line each came from."""

    path: str
    values: dict[str, str] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    warnings: list[MapWarning] = field(default_factory=list)
    #: Malformed values found by the typed getters (what ``map check`` reports).
    errors: list[ConfigurationError] = field(default_factory=list)

    def _fail(self, name: str, problem: str) -> ConfigurationError:
        return ConfigurationError(problem, source=self.path, line=self.lines.get(name), field=name)

    def has(self, name: str) -> bool:
        return name in self.values

    def get_str(self, name: str, default: str = "") -> str:
        return self.values.get(name, default)

    def get_int(self, name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        raw = self.values.get(name)
        if raw is None:
            return default
        try:
            value = int(raw, 10)
        except ValueError:
            raise self._fail(name, f"bad numerical value for {name}: expected an integer") from None
        if value < minimum or (maximum is not None and value > maximum):
            top = f" and <= {maximum}" if maximum is not None else ""
            raise self._fail(name, f"{name} must be >= {minimum}{top}, got {value}")
        return value

    def get_float(self, name: str, default: float, minimum: float = 0.0) -> float:
        raw = self.values.get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise self._fail(name, f"bad numerical value for {name}: expected a number") from None
        if value <= minimum:
            raise self._fail(name, f"{name} must be > {minimum:g}, got {raw}")
        return value

    def get_bool(self, name: str, default: bool) -> bool:
        raw = self.values.get(name)
        if raw is None:
            return default
        low = raw.strip().lower()
        if low in ("yes", "true"):
            return True
        if low in ("no", "false"):
            return False
        raise self._fail(name, f"bad boolean value for {name}: expected 'yes' or 'no'")

    def get_choice(self, name: str, default: str, choices: Iterable[str]) -> str:
        raw = self.values.get(name)
        if raw is None:
            return default
        allowed = tuple(choices)
        if raw.lower() not in allowed:
            raise self._fail(name, f"bad value for {name}: expected one of {', '.join(allowed)}")
        return raw.lower()


def read_cf(path: str | os.PathLike[str], known: Iterable[str], mtype: str) -> CfFile:
    """Read a ``.cf`` file; names outside *known* give warnings (with the closest known name)."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {mtype} map file: {exc.strerror or exc}",
                                 source=source) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigurationError("not valid UTF-8", source=source, line=line) from None
    cf = CfFile(source)
    known_set = set(known)
    logical: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if raw[0] in " \t":
            if not logical:
                raise ConfigurationError("continuation line (starts with white space) with no "
                                         "line before it", source=source, line=number)
            start, prev = logical[-1]
            logical[-1] = (start, prev + " " + stripped)
            continue
        logical.append((number, stripped))
    for number, text_line in logical:
        name, eq, value = text_line.partition("=")
        name = name.strip()
        if not eq or not name:
            # Postfix: "fatal: FILE, line N: missing '=' after attribute name".
            raise ConfigurationError("expected 'name = value' (missing '=')", source=source,
                                     line=number)
        if not _NAME.fullmatch(name):
            raise ConfigurationError(f"bad parameter name {name!r}", source=source, line=number)
        cf.values[name] = value.strip()
        cf.lines[name] = number
        if name not in known_set:
            close = difflib.get_close_matches(name, sorted(known_set), n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            cf.warnings.append(MapWarning(
                source, number, f"unknown {mtype} map parameter {name!r}{hint}; Postfix "
                "ignores it, and so does lmtpfast"))
    return cf
