"""The package's layers, checked: a module may import only from its own layer or below.

core <- protocol <- session <- pool <- agent <- {spool/replay, compat, server} <- cli
(ARCHITECTURE.md draws it). The rules, as asyncpg's ``test__sourcecode.py`` checks its own:

* no module imports one of a higher layer (type-checking imports included: a
  type-level cycle is a cycle);
* the sans-IO core and the base modules never import asyncio, sockets or selectors;
* the CLI imports only public names: the ``lmtpfast`` facade and the public
  subpackages, plus its own modules;
* nothing in the package imports the test beds (``lmtpfast._testing``);
* package modules do not import the ``lmtpfast`` facade (they import the private
  module that defines a name), so the facade can stay lazy.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lmtpfast"

#: Layer of each top-level module or subpackage of ``lmtpfast``.
LAYERS: dict[str, int] = {
    # 0 base: plain data and the error tree
    "_errors": 0, "_results": 0, "_failures": 0, "_settings": 0, "_destination": 0,
    "_dsn": 0, "_loop": 0, "_lazy": 0, "_metrics": 0,
    # 1 core: the sans-IO engine and the request it is given
    "proto": 1, "_delivery": 1,
    # 2 policy: pure decisions (TLS, SASL), maps, routing, configuration
    "_tls": 2, "_sasl": 2, "_saslserver": 2, "_passwords": 2, "_maps": 2, "_routing": 2,
    "_config": 2,
    # 3 protocol: the asyncio.Protocol over the engine; a program as a socket; the
    # blocking twin of the protocol (lmtpfast send)
    "_protocol": 3, "_blocking": 3,
    "_cprotocol": 3, "_command": 3,
    # 4 session: connect and set-up, one Client
    "_session": 4, "_csession": 4,
    # 5 pool
    "_pool": 5, "_shaping": 5,
    # 6 agent
    "_agent": 6, "_sync": 6, "_verify": 6,
    # 7 front ends
    "spool": 7, "compat": 7, "server": 7,
    # 8 command line
    "cli": 8,
}
NAMES = {0: "base", 1: "core", 2: "policy", 3: "protocol", 4: "session", 5: "pool",
         6: "agent", 7: "front", 8: "cli"}
#: What the CLI may import: the facade and the public subpackages.
PUBLIC = {"lmtpfast", "lmtpfast.spool", "lmtpfast.server", "lmtpfast.proto", "lmtpfast.compat",
          "lmtpfast.proto.content"}
#: Modules no code below the protocol layer may import.
IO_MODULES = {"asyncio", "socket", "selectors", "ssl", "uvloop"}

#: Known violations, each to be removed by the change that fixes it. The test
#: fails when one disappears too, so this list stays true.
KNOWN: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "_testing" not in p.parts)


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports (relative imports resolved), type-checking ones included."""
    tree = ast.parse(path.read_text(), str(path))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append(target)
            # "from . import _exit" / "from lmtpfast import spool": submodules by name
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists() or (
                        PACKAGE.parent / candidate.replace(".", "/") / "__init__.py").exists():
                    found.append(candidate)
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "lmtpfast" or len(parts) < 2:
        return None
    return LAYERS.get(parts[1])


def _violations() -> set[tuple[str, str]]:
    bad: set[tuple[str, str]] = set()
    for path in _sources():
        me = _module_name(path)
        if me == "lmtpfast" or me == "lmtpfast.__main__":
            continue  # the facade re-exports every layer, lazily
        mine = _layer(me)
        for target in _imports(path):
            if target.split(".")[0] != "lmtpfast":
                continue
            theirs = _layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                bad.add((me, ".".join(target.split(".")[:2])))
    return bad


def test_every_module_has_a_layer() -> None:
    unplaced = sorted({_module_name(p).split(".")[1] for p in _sources()
                       if _module_name(p).count(".") >= 1
                       and _module_name(p).split(".")[1] not in LAYERS
                       and _module_name(p).split(".")[1] != "__main__"})
    assert not unplaced, f"place these in LAYERS (tests/test_layers.py): {unplaced}"


def test_no_import_goes_up_a_layer() -> None:
    found = _violations()
    new = sorted(found - KNOWN)
    assert not new, "imports against the layers:\n" + "\n".join(
        f"  {a} ({NAMES[_layer(a) or 0]}) imports {b} ({NAMES[_layer(b) or 0]})" for a, b in new)
    gone = sorted(KNOWN - found)
    assert not gone, f"fixed, remove from KNOWN in tests/test_layers.py: {gone}"


@pytest.mark.parametrize("path", [p for p in _sources()
                                  if (_layer(_module_name(p)) or 9) <= 1],
                         ids=lambda p: _module_name(p))
def test_core_and_base_do_no_io(path: Path) -> None:
    io = sorted({t for t in _imports(path) if t.split(".")[0] in IO_MODULES})
    assert not io, f"{_module_name(path)} imports {io}: the core is sans-IO"


@pytest.mark.parametrize("path", sorted((PACKAGE / "cli").glob("*.py")),
                         ids=lambda p: p.name)
def test_cli_uses_only_public_names(path: Path) -> None:
    private = sorted({t for t in _imports(path)
                      if t.startswith("lmtpfast") and t not in PUBLIC
                      and not t.startswith("lmtpfast.cli")})
    assert not private, f"cli/{path.name} imports private modules {private}: export the names"


def test_nothing_imports_the_test_beds() -> None:
    users = sorted(_module_name(p) for p in _sources()
                   if any(t.startswith("lmtpfast._testing") for t in _imports(p)))
    assert not users, f"package modules import lmtpfast._testing: {users}"


def test_package_modules_do_not_import_the_facade() -> None:
    users = sorted(_module_name(p) for p in _sources()
                   if _layer(_module_name(p)) not in (None, 8)
                   and "lmtpfast" in _imports(p))
    assert not users, f"import the defining private module instead of lmtpfast: {users}"


def test_the_facade_exports_what_it_lists() -> None:
    import lmtpfast

    assert sorted(lmtpfast.__all__) == sorted([*lmtpfast._EXPORTS, "__version__"])
    for name in lmtpfast.__all__:
        assert getattr(lmtpfast, name) is not None
