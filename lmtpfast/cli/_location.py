"""Where a command finds its queue when the command line names none: the configuration."""

from __future__ import annotations

import sys

from . import _exit

__all__ = ["configured_queue"]


def configured_queue(prog: str, config: str | None) -> str | int | None:
    """The ``queue`` of the configuration file *config*; ``None`` if it names none.

    An unreadable or invalid file is said on stderr and returned as exit
    status 78 (configuration).
    """
    if config is None:
        return None
    from lmtpfast import ConfigurationError, load_config

    try:
        return load_config(config).queue
    except (ConfigurationError, OSError) as exc:
        print(f"lmtpfast {prog}: {exc}", file=sys.stderr)
        return _exit.EX_CONFIG
