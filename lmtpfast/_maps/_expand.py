"""Postfix's ``%`` expansions for SQL and LDAP maps (db_common_expand), and the skip rules.

``query``/``query_filter``/``search_base`` templates: ``%s`` the key, ``%u``
its local part (the whole key when it has no ``@``), ``%d`` its domain,
``%S %U %D`` the same, ``%1``..``%9`` the domain's labels from the right
(``%1`` = ``com`` in ``user@mail.example.com``), ``%%`` a ``%``.
``result_format``: ``%s %u %d`` are the *result* value's parts, the upper
case and digit forms the *key's*.

A lookup is skipped ("not found", no query sent) when the key lacks a part a
template uses: ``%d``/``%D``/``%1``.. and no domain (or an empty one); ``%u``/``%U``
and an empty local part (``@domain``); fewer labels than the highest ``%N``.
The flags gather over the query *and* the result template, as in Postfix,
so ``result_format = %U`` also skips domain-less... keys with no local part.
A result value lacking a part ``result_format`` uses is dropped, and so is
an empty value (Postfix warns "empty lookup result").

A query that uses a partial form (``%u %d %U %D %1``..) makes the map a
pattern map: routing asks it the full address only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .._errors import ConfigurationError

__all__ = ["Expander", "Template", "parse_template"]

_KEY_USER = 1
_KEY_DOMAIN = 2
_KEY_PARTIAL = 4
_VALUE_USER = 8
_VALUE_DOMAIN = 16

# A token is a literal string or a one-character variable ("s", "u", "1", ...).
Token = tuple[bool, str]  # (is_variable, text)


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template: literal and variable tokens, and what it needs of the key."""

    text: str
    tokens: tuple[Token, ...]
    flags: int
    nparts: int

    @property
    def dynamic(self) -> bool:
        return any(var for var, _ in self.tokens)


def parse_template(text: str, *, query: bool, source: str = "", line: int | None = None,
                   field: str = "") -> Template:
    """Parse a query (``query=True``) or result template; a bad ``%`` is a ConfigurationError."""
    tokens: list[Token] = []
    lit: list[str] = []
    flags = 0
    nparts = 0
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c != "%":
            lit.append(c)
            i += 1
            continue
        if i + 1 >= n:
            raise ConfigurationError(f"invalid {'query' if query else 'result'} template "
                                     f"{text!r}: '%' at the end", source=source or None,
                                     line=line, field=field or None)
        v = text[i + 1]
        i += 2
        if v == "%":
            lit.append("%")
            continue
        if v == "u":
            flags |= (_KEY_USER | _KEY_PARTIAL) if query else _VALUE_USER
        elif v == "d":
            flags |= (_KEY_DOMAIN | _KEY_PARTIAL) if query else _VALUE_DOMAIN
        elif v in "sS":
            pass
        elif v == "U":
            flags |= _KEY_PARTIAL | _KEY_USER
        elif v == "D":
            flags |= _KEY_PARTIAL | _KEY_DOMAIN
        elif v in "123456789":
            flags |= _KEY_PARTIAL | _KEY_DOMAIN
            nparts = max(nparts, int(v))
        else:
            raise ConfigurationError(
                f"invalid {'query' if query else 'result'} template {text!r}: unknown "
                f"expansion '%{v}' (use %s %u %d %S %U %D %1-%9 or %%)",
                source=source or None, line=line, field=field or None)
        if lit:
            tokens.append((False, "".join(lit)))
            lit = []
        tokens.append((True, v))
    if lit:
        tokens.append((False, "".join(lit)))
    return Template(text, tuple(tokens), flags, nparts)


def _split(addr: str) -> tuple[str, str | None]:
    """(local part, domain or None) split at the last ``@``."""
    at = addr.rfind("@")
    if at < 0:
        return addr, None
    return addr[:at], addr[at + 1 :]


class Expander:
    """The shared context of one map's templates (Postfix's DB_COMMON_CTX)."""

    def __init__(self, *templates: Template) -> None:
        flags = 0
        nparts = 0
        for t in templates:
            flags |= t.flags
            nparts = max(nparts, t.nparts)
        self.flags = flags
        self.nparts = nparts

    @property
    def partial(self) -> bool:
        """True when a template uses part of the key (the map is then a pattern map)."""
        return bool(self.flags & _KEY_PARTIAL)

    def key_vars(self, key: str) -> dict[str, str] | None:
        """The expansions of a lookup key, or ``None`` when the lookup is skipped."""
        flags = self.flags
        user, domain = _split(key)
        if flags & _KEY_DOMAIN and not domain:
            return None
        if flags & _KEY_USER and domain is not None and not user:
            return None
        out = {"s": key, "S": key, "u": user if domain is not None else key}
        out["U"] = out["u"]
        if domain is not None:
            out["d"] = out["D"] = domain
        if self.nparts:
            assert domain is not None
            labels = [p for p in domain.split(".") if p]
            if len(labels) < self.nparts:
                return None
            for k in range(1, self.nparts + 1):
                out[str(k)] = labels[-k]
        return out

    def expand(self, template: Template, variables: dict[str, str],
               quote: Callable[[str], str] | None = None) -> str:
        """Expand a query template with the key's variables (each quoted by *quote*)."""
        parts = []
        for is_var, text in template.tokens:
            if not is_var:
                parts.append(text)
            else:
                value = variables[text]
                parts.append(quote(value) if quote is not None else value)
        return "".join(parts)

    def result(self, template: Template, value: str, key_vars: dict[str, str]) -> str | None:
        """One result value through ``result_format``; ``None`` when it is dropped."""
        if not value:
            return None
        if len(template.tokens) == 1 and template.tokens[0] == (True, "s"):
            return value  # the default "%s"
        user, domain = _split(value)
        if self.flags & _VALUE_DOMAIN and not domain:
            return None
        if self.flags & _VALUE_USER and domain is not None and not user:
            return None
        parts = []
        for is_var, text in template.tokens:
            if not is_var:
                parts.append(text)
            elif text == "s":
                parts.append(value)
            elif text == "u":
                parts.append(user if domain is not None else value)
            elif text == "d":
                assert domain is not None
                parts.append(domain)
            else:
                parts.append(key_vars[text])
        return "".join(parts)
