"""A private OpenLDAP server for tests: :class:`TempSlapd`.

Use the session fixture ``slapd`` (see :mod:`lmtpfast._testing.fixtures`),
which has :data:`MAIL_DIT` loaded, or the class directly::

    with TempSlapd() as ldap:
        ldap.load_ldif(MAIL_DIT)                      # or TempSlapd(dit=MAIL_DIT)
        ldap.search("(mailLocalAddress=alice@example.com)", "mailRoutingAddress")
        # -> "dn: uid=alice,ou=people,dc=example,dc=com\\nmailRoutingAddress: ..."
        ldap.url, ldap.ldapi_url, ldap.root_dn, ldap.root_password
        ldap.stop(); ldap.start()                     # same port, same data

Each instance writes its own ``slapd.conf`` (``slapd -f``) into a fresh folder
under ``/var/tmp`` and runs ``slapd -d LEVEL`` in the foreground as a child of
the test process, as the ``openldap`` user from the start (under ``setpriv
--pdeathsig``, so it ends with the test process; ``slapd -u`` would drop
privileges itself and clear that signal). The Debian slapd service and its
``cn=config`` in ``/etc/ldap/slapd.d`` are never involved.

Facts checked against OpenLDAP 2.5.13 (Debian 12):

* Backends are modules: ``modulepath /usr/lib/ldap`` + ``moduleload
  back_mdb``. The mdb ``directory`` must be writable by the user slapd runs as;
  ``maxsize`` bounds the memory map (64 MiB here).
* Schemas from ``/etc/ldap/schema``: core, cosine, inetorgperson, nis and misc
  (``inetLocalMailRecipient``: ``mailLocalAddress`` (multi-valued),
  ``mailRoutingAddress``, ``mailHost``), plus this module's small
  ``lmtpfastMailRecipient`` (``lmtpfastTransport``, ``lmtpfastMaildrop``, both
  multi-valued IA5 strings) for transport-map style lookups.
* Listeners: ``ldap://127.0.0.1:PORT/`` and ``ldapi://`` on ``BASE/ldapi``
  (URL-encoded path). A simple bind as :attr:`TempSlapd.root_dn` with
  :attr:`TempSlapd.root_password` works on both; anonymous reads are allowed
  (``access to * by * read``), as a Postfix ldap: table without ``bind``
  expects. Wrong credentials: ``ldap_bind: Invalid credentials (49)``.
* Readiness: both sockets listening in ``/proc``. SIGTERM (or SIGINT) is a
  clean shutdown that takes a few ms.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import tempfile
import urllib.parse
from pathlib import Path
from typing import Self

from ._procs import (
    PeerStartError,
    TempPeer,
    ToolError,
    guarded,
    listening_tcp,
    listening_unix,
    run_tool,
    stop_process,
)

__all__ = ["BASE_DN", "MAIL_DIT", "SCHEMA_DIR", "SLAPD", "PeerStartError", "TempSlapd", "ToolError",
           "find_slapd"]

SLAPD = "/usr/sbin/slapd"
SCHEMA_DIR = Path("/etc/ldap/schema")
_SCHEMAS = ("core", "cosine", "inetorgperson", "nis", "misc")
_TOOLS = ("ldapadd", "ldapsearch", "ldapmodify", "ldapdelete")

# OIDs under 2.25 (UUID-derived, ITU-T X.667): no registration needed.
_LMTPFAST_SCHEMA = """\
# lmtpfast test schema: per-recipient transport and final address.
attributetype ( 2.25.182349873615029771230398115710813921.1.1
    NAME 'lmtpfastTransport'
    DESC 'Postfix-style transport:nexthop for this recipient'
    EQUALITY caseIgnoreIA5Match
    SUBSTR caseIgnoreIA5SubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.26{1024} )

attributetype ( 2.25.182349873615029771230398115710813921.1.2
    NAME 'lmtpfastMaildrop'
    DESC 'Final delivery address of this recipient'
    EQUALITY caseIgnoreIA5Match
    SUBSTR caseIgnoreIA5SubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.26{256} )

objectclass ( 2.25.182349873615029771230398115710813921.2.1
    NAME 'lmtpfastMailRecipient'
    DESC 'lmtpfast test recipient'
    SUP top AUXILIARY
    MAY ( lmtpfastTransport $ lmtpfastMaildrop ) )
"""

BASE_DN = "dc=example,dc=com"

#: A small mail DIT under ``dc=example,dc=com``: ``ou=people`` with alice, bob
#: and carol (``mail``, ``mailLocalAddress`` aliases, ``mailRoutingAddress``,
#: ``mailHost``, ``lmtpfastTransport``, ``lmtpfastMaildrop``), ``ou=domains``
#: with ``example.com`` and ``example.org`` (``lmtpfastTransport``). Bob has two
#: maildrops (a multi-valued result); carol has no transport.
MAIL_DIT = f"""\
dn: {BASE_DN}
objectClass: dcObject
objectClass: organization
dc: example
o: lmtpfast tests

dn: ou=people,{BASE_DN}
objectClass: organizationalUnit
ou: people

dn: ou=domains,{BASE_DN}
objectClass: organizationalUnit
ou: domains

dn: uid=alice,ou=people,{BASE_DN}
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
objectClass: lmtpfastMailRecipient
uid: alice
cn: Alice Example
sn: Example
mail: alice@example.com
mailLocalAddress: alice@example.com
mailLocalAddress: a.example@example.com
mailRoutingAddress: alice@mail1.example.com
mailHost: mail1.example.com
lmtpfastTransport: lmtp:inet:127.0.0.1:24
lmtpfastMaildrop: alice@mail1.example.com

dn: uid=bob,ou=people,{BASE_DN}
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
objectClass: lmtpfastMailRecipient
uid: bob
cn: Bob Example
sn: Example
mail: bob@example.com
mailLocalAddress: bob@example.com
mailRoutingAddress: bob@mail2.example.com
mailHost: mail2.example.com
lmtpfastTransport: lmtp:unix:/run/lmtp-bob
lmtpfastMaildrop: bob@mail2.example.com
lmtpfastMaildrop: bob-archive@mail2.example.com

dn: uid=carol,ou=people,{BASE_DN}
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
objectClass: lmtpfastMailRecipient
uid: carol
cn: Carol Example
sn: Example
mail: carol@example.org
mailLocalAddress: carol@example.org
mailRoutingAddress: carol@mail1.example.com
mailHost: mail1.example.com

dn: cn=example.com,ou=domains,{BASE_DN}
objectClass: applicationProcess
objectClass: lmtpfastMailRecipient
cn: example.com
lmtpfastTransport: lmtp:inet:127.0.0.1:2424

dn: cn=example.org,ou=domains,{BASE_DN}
objectClass: applicationProcess
objectClass: lmtpfastMailRecipient
cn: example.org
lmtpfastTransport: lmtp:unix:/run/lmtp-org
"""


def find_slapd() -> str | None:
    """Why a :class:`TempSlapd` cannot run here, or ``None`` when it can."""
    if not os.access(SLAPD, os.X_OK):
        return f"{SLAPD} missing (package slapd)"
    for tool in _TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} missing (package ldap-utils)"
    for name in _SCHEMAS:
        if not (SCHEMA_DIR / f"{name}.schema").is_file():
            return f"{SCHEMA_DIR}/{name}.schema missing (package slapd)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("openldap")
        except KeyError:
            return "no 'openldap' user (the slapd package creates it)"
    return None


class TempSlapd(TempPeer):
    """A private slapd with an mdb database for *suffix*, on 127.0.0.1:PORT and ldapi://.

    *dit* (LDIF text, e.g. :data:`MAIL_DIT`) is loaded after the first start.
    *loglevel* is slapd's ``-d`` level (``"stats"`` logs every operation to
    :attr:`log_path`; ``"none"`` only errors). *port* fixes the TCP port.
    """

    def __init__(
        self,
        *,
        suffix: str = BASE_DN,
        dit: str | None = None,
        port: int | None = None,
        loglevel: str = "stats",
        extra_config: str = "",
        start_timeout: float = 20.0,
    ) -> None:
        why = find_slapd()
        if why is not None:
            raise PeerStartError(f"cannot run slapd: {why}; run scripts/install-test-deps.sh")
        self.suffix = suffix
        self.root_dn = f"cn=admin,{suffix}"
        self._root_password = secrets.token_urlsafe(18)
        self.dit = dit
        self.loglevel = loglevel
        self.extra_config = extra_config
        self.start_timeout = start_timeout
        self._fixed_port = port
        self._port: int | None = port
        self._loaded = False
        self.run_as = "openldap" if os.geteuid() == 0 else None
        self.base = Path(tempfile.mkdtemp(prefix="lmtpfast-slapd-", dir="/var/tmp"))
        self.base.chmod(0o755)
        self.db_dir = self.base / "db"
        self.run_dir = self.base / "run"
        self.config_path = self.base / "slapd.conf"
        self.schema_path = self.base / "lmtpfast.schema"
        self.log_path = self.base / "slapd.log"
        self._pwfile = self.base / "rootpw"
        for d in (self.db_dir, self.run_dir):
            d.mkdir(mode=0o700)
        self.schema_path.write_text(_LMTPFAST_SCHEMA)
        self.config_path.write_text(self._config_text())
        self.config_path.chmod(0o600)
        # The password for the ldap* tools' -y (never on a command line).
        self._pwfile.write_text(self._root_password)
        self._pwfile.chmod(0o600)
        if self.run_as is not None:
            pw = pwd.getpwnam(self.run_as)
            for p in (self.db_dir, self.run_dir, self.config_path):
                os.chown(p, pw.pw_uid, pw.pw_gid)

    def _config_text(self) -> str:
        includes = "".join(f"include {SCHEMA_DIR}/{n}.schema\n" for n in _SCHEMAS)
        return f"""\
# Written by lmtpfast._testing.slapd.TempSlapd; private test instance.
{includes}include {self.schema_path}
pidfile {self.run_dir}/slapd.pid
argsfile {self.run_dir}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
sizelimit unlimited
access to * by * read

database mdb
maxsize 67108864
suffix "{self.suffix}"
rootdn "{self.root_dn}"
rootpw {self._root_password}
directory {self.db_dir}
index objectClass eq
index uid,mail,mailLocalAddress,cn eq
{self.extra_config}
"""

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> Self:
        """Start slapd, wait for both listeners, load *dit* the first time."""
        if self.running:
            return self
        self._start_on_port(self._start_once, self._fixed_port)
        if self.dit is not None and not self._loaded:
            self.load_ldif(self.dit)
            self._loaded = True
        return self

    def _start_once(self) -> None:
        urls = f"{self.url}/ {self.ldapi_url}"
        cmd = [SLAPD, "-f", str(self.config_path), "-h", urls, "-d", self.loglevel]
        cmd, _ = guarded(cmd, user=self.run_as)
        self._spawn(cmd, self._ready, what="slapd")

    def _ready(self) -> bool:
        return listening_tcp("127.0.0.1", self.port) and listening_unix(self.ldapi_path)

    def stop(self) -> None:
        """Stop slapd (SIGTERM: a clean shutdown; SIGKILL after 2 s); idempotent."""
        if self._proc is not None:
            stop_process(self._proc)

    def close(self) -> None:
        """Stop slapd and delete its folder (config, database, log)."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    # -- addresses ----------------------------------------------------------------

    @property
    def url(self) -> str:
        """``ldap://127.0.0.1:PORT``."""
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldapi_path(self) -> Path:
        """Path of the ldapi unix socket."""
        return self.run_dir / "ldapi"

    @property
    def ldapi_url(self) -> str:
        """``ldapi://%2F...%2Fldapi`` (the socket path URL-encoded)."""
        return "ldapi://" + urllib.parse.quote(str(self.ldapi_path), safe="")

    @property
    def root_password(self) -> str:
        """The root DN's password."""
        return self._root_password

    # -- client tools ---------------------------------------------------------------

    def _tool(
        self, tool: str, args: list[str], *, input: str | None = None, bind: bool = True,
        timeout: float = 30.0, check: bool = True,
    ) -> str:  # fmt: skip
        cmd = [tool, "-x", "-H", self.ldapi_url, "-o", "nettimeout=10"]
        if bind:
            cmd += ["-D", self.root_dn, "-y", str(self._pwfile)]
        cmd += args
        return run_tool(cmd, input=input, timeout=timeout, check=check).stdout

    def load_ldif(self, text: str) -> None:
        """Add the entries in LDIF *text* (``ldapadd`` as the root DN over ldapi)."""
        self._tool("ldapadd", [], input=text)

    def modify_ldif(self, text: str) -> None:
        """Apply LDIF change records (``ldapmodify`` as the root DN over ldapi)."""
        self._tool("ldapmodify", [], input=text)

    def delete(self, *dns: str) -> None:
        """Delete the entries *dns* (``ldapdelete``)."""
        self._tool("ldapdelete", list(dns))

    def search(
        self, filter: str = "(objectClass=*)", *attrs: str, base: str | None = None,
        scope: str = "sub", bind: bool = False,
    ) -> str:  # fmt: skip
        """``ldapsearch -LLL`` (anonymous unless *bind*); returns its LDIF output."""
        args = ["-LLL", "-b", self.suffix if base is None else base, "-s", scope, filter, *attrs]
        return self._tool("ldapsearch", args, bind=bind)
