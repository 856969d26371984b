#!/usr/bin/env bash
# Install the real peers that lmtpfast's tests talk to (system level only;
# Python packages are the caller's business: pip install -e ".[test]").
#
#   - Dovecot's LMTP server: dovecot-core + dovecot-lmtpd.
#   - Postfix: the full MTA package (postfix) with the map types the tests
#     compare against `postmap -q` (postfix-pgsql, -ldap, -mysql, -cdb, -lmdb);
#     smtp-sink / smtp-source are then /usr/sbin/smtp-sink and
#     /usr/sbin/smtp-source. Installing postfix removes exim4 where
#     cyrus-common pulled it in as the default MTA.
#   - Cyrus lmtpd (SASL over TCP): cyrus-imapd cyrus-common cyrus-admin
#     cyrus-clients sasl2-bin libsasl2-modules.
#   - PostgreSQL 15 (postgresql), OpenLDAP (slapd, ldap-utils), MariaDB
#     (mariadb-server, mariadb-client), iproute2 (ip netns), and python3 +
#     python3-venv: the venv pipe(8) runs `lmtpfast send` from is made of
#     /usr/bin/python3 (a pyenv Python under /root cannot be run by nobody).
#   - Build headers for the LDAP map client (pip's bonsai compiles against
#     libldap and libsasl2): libldap-dev, libsasl2-dev, gcc.
#
# Tests run private instances of every server from their own config in temp
# folders (lmtpfast/_testing/). No Debian service is ever started: a
# policy-rc.d that refuses service starts is in place while apt runs, and any
# system instance an earlier install started is stopped (and, under systemd,
# disabled) at the end.
#
# Debian 12, root. Idempotent: when everything is already in place it does no
# apt work at all and finishes in well under a second.
set -euo pipefail

DEB_PKGS=(dovecot-core dovecot-lmtpd openssl
          cyrus-imapd cyrus-common cyrus-admin cyrus-clients sasl2-bin libsasl2-modules
          postfix postfix-pgsql postfix-ldap postfix-mysql postfix-cdb postfix-lmdb
          postgresql slapd ldap-utils mariadb-server mariadb-client
          iproute2 python3 python3-venv libldap-dev libsasl2-dev gcc)

log() { printf 'install-test-deps: %s\n' "$*"; }
die() { printf 'install-test-deps: ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (apt-get, dpkg)"
command -v apt-get >/dev/null || die "apt-get not found: this script targets Debian 12"

start_ns=$(date +%s%N)
created_policy=0
cleanup() {
    # Remove policy-rc.d only if we created it: a container image may ship its own.
    if [[ $created_policy -eq 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi
}
trap cleanup EXIT

pkg_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]
}

missing_pkgs=()
for p in "${DEB_PKGS[@]}"; do pkg_installed "$p" || missing_pkgs+=("$p"); done

if [[ ${#missing_pkgs[@]} -eq 0 ]]; then
    log "all peers already present; nothing to install"
else
    export DEBIAN_FRONTEND=noninteractive
    # Keep package services (dovecot, postgresql, slapd, mariadb, postfix) from
    # being started by their postinst.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\n# temporary, from lmtpfast scripts/install-test-deps.sh\nexit 101\n' \
            >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    # Postfix's postinst asks what kind of mail system this is; "Local only"
    # writes a main.cf that listens on loopback only (never started anyway).
    if command -v debconf-set-selections >/dev/null; then
        printf '%s\n' \
            "postfix postfix/main_mailer_type select Local only" \
            "postfix postfix/mailname string lmtpfast-test.invalid" \
            | debconf-set-selections
    fi

    log "apt-get update"
    apt-get update -qq

    # Only packages that are missing: naming an installed one would upgrade it
    # (and whatever shares its source, e.g. libssl3 with openssl) as a side effect.
    log "apt-get install ${missing_pkgs[*]}"
    apt_start=$(date +%s%N)
    # Lock timeout: wait for another apt/dpkg run on this machine instead of failing.
    apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 \
        "${missing_pkgs[@]}" >/dev/null
    apt_ms=$((($(date +%s%N) - apt_start) / 1000000))
    log "apt-get install took $((apt_ms / 1000)).$(printf '%03d' $((apt_ms % 1000)))s"
fi

# No system instance of any server may run: tests start private instances only.
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
    for unit in dovecot.service dovecot.socket cyrus-imapd.service postfix.service \
        postgresql.service 'postgresql@15-main.service' slapd.service mariadb.service; do
        if systemctl list-unit-files "$unit" >/dev/null 2>&1; then
            systemctl disable --now "$unit" >/dev/null 2>&1 || true
        fi
    done
fi
# Without systemd (containers) a server started by an earlier install is
# recorded in its system pid file; stop only that process, and only when its
# command name is the expected one (a stale pid file may name anything).
# stop_system NAME PIDFILE COMM [COMMAND...]: COMMAND stops it cleanly, else SIGTERM.
stop_system() {
    local name=$1 pidfile=$2 comm=$3 pid i
    shift 3
    [[ -s $pidfile ]] || return 0
    pid=$(head -n1 "$pidfile" | tr -dc '0-9')
    [[ -n $pid ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 0
    log "stopping the system $name (pid $pid)"
    if [[ $# -gt 0 ]]; then "$@" >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
    else kill "$pid" 2>/dev/null || true; fi
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    log "the system $name (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}
stop_system dovecot /run/dovecot/master.pid dovecot /usr/sbin/dovecot stop
stop_system "cyrus master" /run/cyrus-master.pid cyrmaster
stop_system "postfix master" /var/spool/postfix/pid/master.pid master /usr/sbin/postfix stop
stop_system "PostgreSQL 15 main" /var/lib/postgresql/15/main/postmaster.pid postgres \
    pg_ctlcluster 15 main stop -m fast
stop_system slapd /run/slapd/slapd.pid slapd
stop_system mariadb /run/mysqld/mysqld.pid mariadbd

# Summary.
for p in "${DEB_PKGS[@]}"; do
    pkg_installed "$p" || die "$p is not installed"
done
dv=$(/usr/sbin/dovecot --version 2>/dev/null || echo '?')
ver() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo '?'; }
log "dovecot        $dv (/usr/sbin/dovecot, lmtp: $(ls /usr/lib/dovecot/lmtp 2>/dev/null || echo missing))"
log "postfix        $(ver postfix) (smtp-sink, smtp-source, postmap in /usr/sbin; map types: $(/usr/sbin/postconf -m 2>/dev/null | tr '\n' ' '))"
log "cyrus lmtpd    $(ls /usr/lib/cyrus/bin/lmtpd 2>/dev/null || echo missing) ($(ver cyrus-imapd))"
log "postgresql     $(ver postgresql-15) (/usr/lib/postgresql/15/bin)"
log "slapd          $(ver slapd)"
log "mariadb        $(ver mariadb-server)"
log "openssl        $(openssl version)"
ms=$((($(date +%s%N) - start_ns) / 1000000))
log "done in $((ms / 1000)).$(printf '%03d' $((ms % 1000)))s"
