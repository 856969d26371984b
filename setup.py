"""Builds the compiled protocol core; all metadata lives in pyproject.toml.

Build switches (environment variables):
  LMTPFAST_DEBUG=1     -O0 -g, Cython line tracing off, assertions on
  LMTPFAST_SANITIZE=1  build with AddressSanitizer and UndefinedBehaviorSanitizer
"""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).parent
DEBUG = os.environ.get("LMTPFAST_DEBUG") == "1"
SANITIZE = os.environ.get("LMTPFAST_SANITIZE") == "1"

compile_args = ["-std=c99", "-Wall", "-Wno-unused-function"]
link_args: list[str] = []
if DEBUG or SANITIZE:
    compile_args += ["-O0", "-g", "-UNDEBUG"]
else:
    compile_args += ["-O2"]
if SANITIZE:
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    compile_args += san
    link_args += san

# (module, its .pyx, the C sources under csrc/ it is built over)
MODULES = [
    ("lmtpfast.proto._ccontent", "lmtpfast/proto/_ccontent.pyx", ["csrc/content.c"]),
    ("lmtpfast.proto._cproto", "lmtpfast/proto/_cproto.pyx", ["csrc/reply.c"]),
    ("lmtpfast.server._cserver", "lmtpfast/server/_cserver.pyx", ["csrc/server.c"]),
    ("lmtpfast._cprotocol", "lmtpfast/_cprotocol.pyx", []),
    ("lmtpfast._csession", "lmtpfast/_csession.pyx", []),
]


def extensions() -> list[Extension]:
    if sys.implementation.name != "cpython" or os.environ.get("LMTPFAST_NO_EXTENSIONS") == "1":
        return []
    from Cython.Build import cythonize

    exts = [
        Extension(
            name,
            sources=[pyx, *csrc],
            include_dirs=["csrc"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
        for name, pyx, csrc in MODULES
        if (ROOT / pyx).exists()
    ]
    return cythonize(
        exts,
        language_level=3,
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
        annotate=os.environ.get("LMTPFAST_ANNOTATE") == "1",
    )


setup(ext_modules=extensions())
