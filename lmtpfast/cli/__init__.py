"""The ``lmtpfast`` command line (subcommands live in their own modules)."""
