"""Message content encoder: normalise line ends, dot-stuff, refuse NUL.

Re-exports the compiled implementation (``_ccontent``) when it is built and
``LMTPFAST_NO_EXTENSIONS=1`` is not set, else the pure-Python reference
(``_pycontent``, which documents the rules). Both behave identically.

>>> encode_content(b"Hi\\n.dot\\nbare\\rend")
b'Hi\\r\\n..dot\\r\\nbare\\r\\nend\\r\\n'
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING

from . import _pycontent

__all__ = [
    "IMPLEMENTATION",
    "IMPLEMENTATIONS",
    "ContentEncoder",
    "encode_content",
]


def _load_compiled() -> ModuleType | None:
    if os.environ.get("LMTPFAST_NO_EXTENSIONS") == "1":
        return None  # not even imported: the pure-Python mode is all Python
    try:
        from . import _ccontent
    except ImportError:  # not built (sdist without a compiler, PyPy...)
        return None
    return _ccontent


_compiled = _load_compiled()

#: Both implementations by name, for tests; ``"c"`` is ``None`` when it is
#: not built or ``LMTPFAST_NO_EXTENSIONS=1``.
IMPLEMENTATIONS: dict[str, ModuleType | None] = {"python": _pycontent, "c": _compiled}

#: ``"c"`` or ``"python"``: which implementation the names here come from.
IMPLEMENTATION: str = "c" if _compiled is not None else "python"

if TYPE_CHECKING:
    # Both have the same API; type checkers see the reference's signatures.
    from ._pycontent import ContentEncoder, encode_content
else:
    ContentEncoder = (_compiled or _pycontent).ContentEncoder
    encode_content = (_compiled or _pycontent).encode_content
