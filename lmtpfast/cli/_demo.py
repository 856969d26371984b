"""The demo spool of ``lmtpfast replay --demo``: 20 small messages, made on the spot.

Generated rather than shipped as files, so it always matches the spool format
of this version. ``python -m lmtpfast.cli._demo DIR`` writes it into DIR
(``scripts/demo.sh`` does that).
"""

from __future__ import annotations

import sys

from lmtpfast.spool import NewMessage, SQLiteStore, new_envelope

__all__ = ["DEMO_MESSAGES", "write_demo_spool"]

_SENDERS = ("boss@example.org", "ci@example.org", "friend@example.net", "news@example.org")

# (subject, recipients, envelope options) per message, in order.
DEMO_MESSAGES: tuple[tuple[str, tuple[str, ...], dict[str, str]], ...] = (
    ("Quarterly report", ("alice",), {}),
    ("Lunch on Friday?", ("bob",), {}),
    ("Build is green again", ("alice", "bob"), {}),
    ("Re: the LMTP migration", ("carol",), {}),
    ("Invoice 2024-117", ("nobody",), {"envid": "demo-5", "ret": "HDRS"}),
    ("Holiday rota", ("alice",), {}),
    ("Password reset", ("bob", "nobody"), {}),
    ("Meeting notes", ("dave",), {}),
    ("New laptop", ("alice", "carol"), {}),
    ("Re: Re: coffee machine", ("bob",), {}),
    ("Welcome aboard", ("alice",), {}),
    ("Backup finished", ("nobody", "ghost"), {}),
    ("Server maintenance tonight", ("dave", "alice"), {}),
    ("Your order has shipped", ("bob",), {}),
    ("Minutes of the board meeting", ("alice", "bob", "dave"), {}),
    ("Weekly digest", ("alice",), {}),
    ("Re: spool format", ("ghost",), {}),
    ("Conference tickets", ("dave",), {}),
    ("Reminder: timesheets", ("bob",), {}),
    ("Goodbye and thanks", ("alice",), {}),
)


def _message(n: int, sender: str, subject: str, recipients: list[str]) -> bytes:
    to = ", ".join(f"<{r}>" for r in recipients)
    return (
        f"From: <{sender}>\n"
        f"To: {to}\n"
        f"Subject: {subject}\n"
        f"Date: Mon, 1 Jan 2024 09:{n:02d}:00 +0000\n"
        f"Message-ID: <example-{n:02d}@lmtpfast.example>\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "\n"
        "Hello,\n"
        "\n"
        f"this is example message {n} of the lmtpfast demo spool.\n"
        ".\n"
        "A line with only a dot above, to check dot-stuffing.\n"
        "\n"
        "-- \n"
        "lmtpfast\n"
    ).encode()


def write_demo_spool(path: str) -> SQLiteStore:
    """Create a spool at *path* holding the 20 demo messages (never tried yet).

    Written in one group (one flush), as ``lmtpfast enqueue`` writes; returned closed.
    """
    store = SQLiteStore(path, create=True)
    with store:
        batch = []
        for n, (subject, users, options) in enumerate(DEMO_MESSAGES, 1):
            sender = _SENDERS[(n - 1) % len(_SENDERS)]
            recipients = [f"{u}@example.com" for u in users]
            env = new_envelope(sender, recipients, **options)  # type: ignore[arg-type]
            batch.append(NewMessage(env, _message(n, sender, subject, recipients)))
        store.enqueue_many(batch)
    return store


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m lmtpfast.cli._demo DIR", file=sys.stderr)
        sys.exit(64)
    write_demo_spool(sys.argv[1])
