"""lmtpfast: fast, correct LMTP (RFC 2033) delivery."""

from .errors import *  # noqa: F403
from .results import DELIVERED, PERMANENT, TRANSIENT, RecipientResult

__version__ = "0.1.0"
