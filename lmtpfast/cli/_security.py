"""TLS and SASL options shared by ``lmtpfast probe``, ``send``, ``replay`` and ``run``.

Passwords never come from the command line (others can read it in ``ps``):
``--sasl-password-file`` (first line, the file must be mode 0600) or a
Postfix-style ``--sasl-password-map`` looked up by the destination.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmtpfast import (
    DEFAULT_MECHANISMS,
    SECURITY_LEVELS,
    AuthPolicy,
    ConfigurationError,
    Credentials,
    Destination,
    PasswordMap,
    TLSPolicy,
    parse_mechanisms,
    read_private_file,
)

if TYPE_CHECKING:
    import argparse

__all__ = ["add_arguments", "policies", "transport_settings"]


def add_arguments(p: Any) -> None:
    g = p.add_argument_group("TLS (STARTTLS)")
    g.add_argument("--tls", metavar="LEVEL", default="none", choices=SECURITY_LEVELS,
                   help="security level: none (default), may, encrypt, verify "
                   "(docs/security.md)")
    g.add_argument("--ca-file", metavar="FILE",
                   help="trusted CAs (PEM) for encrypt/verify; default: the system store")
    g.add_argument("--cert-file", metavar="FILE", help="client certificate (PEM)")
    g.add_argument("--key-file", metavar="FILE", help="client certificate key (PEM)")
    g.add_argument("--tls-server-name", metavar="NAME",
                   help="name the certificate must carry (default: the destination host)")
    g.add_argument("--tls-no-verify", action="store_true",
                   help="with --tls encrypt: do not verify the certificate (Postfix's encrypt)")
    a = p.add_argument_group("SASL AUTH")
    a.add_argument("--sasl-user", metavar="USER",
                   help="authenticate as USER (password from --sasl-password-file or the map)")
    a.add_argument("--sasl-password-file", metavar="FILE",
                   help="file whose first line is the password (mode 0600)")
    a.add_argument("--sasl-password-map", metavar="FILE",
                   help="Postfix-style password map (DEST user:password, mode 0600)")
    a.add_argument("--sasl-mechanisms", metavar="LIST",
                   help=f"allowed mechanisms, best first (default: {' '.join(DEFAULT_MECHANISMS)})")
    a.add_argument("--sasl-allow-plaintext", action="store_true",
                   help="allow PLAIN and LOGIN over unencrypted TCP (off: Postfix's noplaintext)")


def policies(args: argparse.Namespace, dest: Destination) -> tuple[TLSPolicy, AuthPolicy | None]:
    """The TLS policy and the auth policy the options ask for; ConfigurationError if wrong."""
    tls = TLSPolicy(
        level=args.tls, ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file,
        server_hostname=args.tls_server_name, verify=False if args.tls_no_verify else None,
    )
    if args.tls_no_verify and args.tls != "encrypt":
        raise ConfigurationError("--tls-no-verify only goes with --tls encrypt")
    creds: Credentials | None = None
    if args.sasl_password_file is not None:
        if not args.sasl_user:
            raise ConfigurationError("--sasl-password-file needs --sasl-user")
        text = read_private_file(args.sasl_password_file, "password file")
        password = text.splitlines()[0] if text else ""
        creds = Credentials(args.sasl_user, password)
    elif args.sasl_password_map is not None:
        creds = PasswordMap.from_file(args.sasl_password_map).lookup(dest)
        if creds is None:
            raise ConfigurationError(f"no entry for {dest}", source=args.sasl_password_map)
        if args.sasl_user and args.sasl_user != creds.username:
            raise ConfigurationError(
                f"the map's entry for {dest} is for user {creds.username!r}, not "
                f"{args.sasl_user!r}", source=args.sasl_password_map)
    elif args.sasl_user:
        raise ConfigurationError("--sasl-user needs --sasl-password-file or --sasl-password-map")
    if creds is None:
        if args.sasl_mechanisms or args.sasl_allow_plaintext:
            raise ConfigurationError("SASL options given without credentials "
                                     "(--sasl-user with --sasl-password-file, or "
                                     "--sasl-password-map)")
        return tls, None
    mechanisms = (parse_mechanisms(args.sasl_mechanisms) if args.sasl_mechanisms
                  else DEFAULT_MECHANISMS)
    return tls, AuthPolicy(creds, mechanisms, True if args.sasl_allow_plaintext else None)


def given(args: argparse.Namespace) -> bool:
    """True when any TLS or SASL option was given."""
    return (args.tls != "none" or args.tls_no_verify or any(
        getattr(args, k) for k in ("ca_file", "cert_file", "key_file", "tls_server_name",
                                   "sasl_user", "sasl_password_file", "sasl_password_map",
                                   "sasl_mechanisms", "sasl_allow_plaintext")))


def transport_settings(args: argparse.Namespace, dest: Destination | None) -> dict[str, Any]:
    """The options as :class:`~lmtpfast.Transport` fields for ``Agent.for_server``.

    ``dest`` is ``None`` with ``--config`` (TLS and SASL are then set per
    transport in the file): any option given is a usage error.
    """
    if dest is None:
        if given(args):
            raise ConfigurationError("the TLS and SASL options go with --server; with --config "
                                     "they are set per transport in the file (docs/security.md)")
        return {}
    tls, auth = policies(args, dest)
    if auth is None:
        return {"tls": tls}
    return {"tls": tls, "sasl_credentials": auth.credentials,
            "sasl_mechanisms": auth.mechanisms, "sasl_allow_plaintext": auth.allow_plaintext}
