"""Lazy re-exports for a package facade (PEP 562): a name is imported on first use.

Also :func:`get_logger`: the modules ``lmtpfast send`` imports log only when
something goes wrong, so they import :mod:`logging` only then.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging

__all__ = ["get_logger", "lazy_exports"]


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)``, importing :mod:`logging` on the first message."""
    import logging

    return logging.getLogger(name)


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """The ``__getattr__`` of *package*: each name in *exports* comes from its private module."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)  # the next lookup does not come here
        return value

    return __getattr__
