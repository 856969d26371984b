#!/usr/bin/env bash
# Install the real LMTP peers that lmtpfast's tests talk to (system level only;
# Python packages are the caller's business: pip install -e ".[test]").
#
#   - Dovecot's LMTP server: Debian packages dovecot-core + dovecot-lmtpd. The
#     tests run private instances from their own config; the Debian service is
#     kept from starting and is stopped (and, under systemd, disabled) here.
#   - Postfix's smtp-sink / smtp-source: the Debian `postfix` package is only
#     downloaded and unpacked into $LMTPFAST_PEERS_DIR/postfix (default
#     /opt/lmtpfast-peers/postfix); no Postfix MTA is installed. The shared
#     libraries that postfix's binaries link against (its lib* Depends) are
#     installed with apt so the unpacked tools run.
#   - Cyrus lmtpd (SASL over TCP): cyrus-imapd cyrus-common cyrus-admin
#     cyrus-clients sasl2-bin libsasl2-modules. Tests run private instances
#     (lmtpfast/_testing/cyrus.py); the Debian cyrus-imapd service is kept from
#     starting and stopped here if an earlier install started it.
#
# Debian 12, root. Idempotent: when everything is already in place it does no
# apt work at all and finishes in well under a second.
set -euo pipefail

PEERS_DIR="${LMTPFAST_PEERS_DIR:-/opt/lmtpfast-peers}"
POSTFIX_DIR="$PEERS_DIR/postfix"
DEB_PKGS=(dovecot-core dovecot-lmtpd openssl
          cyrus-imapd cyrus-common cyrus-admin cyrus-clients sasl2-bin libsasl2-modules)

log() { printf 'install-test-deps: %s\n' "$*"; }
die() { printf 'install-test-deps: ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (apt-get, dpkg)"
command -v apt-get >/dev/null || die "apt-get not found: this script targets Debian 12"

start_ns=$(date +%s%N)
created_policy=0
tmpdir=""
stage=""
cleanup() {
    # Remove policy-rc.d only if we created it: a container image may ship its own.
    if [[ $created_policy -eq 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi
    if [[ -n $tmpdir ]]; then rm -rf "$tmpdir"; fi
    if [[ -n $stage && -d $stage ]]; then rm -rf "$stage"; fi
}
trap cleanup EXIT

pkg_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]
}

# True when the unpacked smtp-sink/smtp-source exist and all their libraries resolve.
postfix_tools_ok() {
    local b
    for b in smtp-sink smtp-source; do
        [[ -x $POSTFIX_DIR/usr/sbin/$b ]] || return 1
        if LD_LIBRARY_PATH="$POSTFIX_DIR/usr/lib/postfix" ldd "$POSTFIX_DIR/usr/sbin/$b" \
            | grep -q 'not found'; then
            return 1
        fi
    done
}

missing_pkgs=()
for p in "${DEB_PKGS[@]}"; do pkg_installed "$p" || missing_pkgs+=("$p"); done

if [[ ${#missing_pkgs[@]} -eq 0 ]] && postfix_tools_ok; then
    log "all peers already present; nothing to install"
else
    export DEBIAN_FRONTEND=noninteractive
    # Keep package services (dovecot) from being started by their postinst.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\n# temporary, from lmtpfast scripts/install-test-deps.sh\nexit 101\n' \
            >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi

    log "apt-get update"
    apt-get update -qq

    tmpdir=$(mktemp -d)
    # apt downloads as the unprivileged _apt user when it can write the target folder.
    chmod 755 "$tmpdir"
    if id _apt >/dev/null 2>&1; then chown _apt "$tmpdir"; fi

    # Only packages that are missing: naming an installed one would upgrade it
    # (and whatever shares its source, e.g. libssl3 with openssl) as a side effect.
    install_pkgs=("${missing_pkgs[@]}")
    if ! postfix_tools_ok; then
        log "apt-get download postfix"
        (cd "$tmpdir" && apt-get download -qq postfix)
        deb=$(ls "$tmpdir"/postfix_*.deb)
        # The unpacked binaries need postfix's shared-library dependencies (libicu,
        # libdb, libnsl, libsasl2, libssl ...): take the lib* names from its Depends.
        mapfile -t libdeps < <(dpkg-deb -f "$deb" Depends | tr ',' '\n' \
            | sed -e 's/|.*//' -e 's/(.*)//' -e 's/[[:space:]]//g' | grep '^lib' || true)
        for p in "${libdeps[@]}"; do pkg_installed "$p" || install_pkgs+=("$p"); done
    fi

    if [[ ${#install_pkgs[@]} -gt 0 ]]; then
        log "apt-get install ${install_pkgs[*]}"
        # Lock timeout: wait for another apt/dpkg run on this machine instead of failing.
        apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 \
            "${install_pkgs[@]}" >/dev/null
    fi

    if ! postfix_tools_ok; then
        log "unpacking $(basename "$deb") into $POSTFIX_DIR"
        mkdir -p "$PEERS_DIR"
        stage=$(mktemp -d "$PEERS_DIR/.postfix.XXXXXX")
        dpkg -x "$deb" "$stage"
        chmod 755 "$stage"
        rm -rf "$POSTFIX_DIR"
        mv "$stage" "$POSTFIX_DIR"
        stage=""
        postfix_tools_ok || die "smtp-sink/smtp-source in $POSTFIX_DIR do not resolve their libraries"
    fi
fi

# The Debian dovecot and cyrus services must not run: tests start private instances only.
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
    for unit in dovecot.service dovecot.socket cyrus-imapd.service; do
        if systemctl list-unit-files "$unit" >/dev/null 2>&1; then
            systemctl disable --now "$unit" >/dev/null 2>&1 || true
        fi
    done
fi
# Without systemd (containers) a master started by an earlier install would be
# recorded here; stop only that process, via the system config it belongs to.
if [[ -s /run/dovecot/master.pid ]]; then
    pid=$(cat /run/dovecot/master.pid)
    if kill -0 "$pid" 2>/dev/null && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == dovecot ]]; then
        log "stopping the system dovecot (pid $pid)"
        /usr/sbin/dovecot stop || kill "$pid"
    fi
fi
if [[ -s /run/cyrus-master.pid ]]; then
    pid=$(cat /run/cyrus-master.pid)
    if kill -0 "$pid" 2>/dev/null && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == cyrmaster ]]; then
        log "stopping the system cyrus master (pid $pid)"
        kill "$pid"
    fi
fi

# Summary.
for p in "${DEB_PKGS[@]}"; do
    pkg_installed "$p" || die "$p is not installed"
done
dv=$(/usr/sbin/dovecot --version 2>/dev/null || echo '?')
pfv=$(cat "$POSTFIX_DIR/usr/share/doc/postfix/changelog.Debian.gz" 2>/dev/null \
    | gzip -dc 2>/dev/null | head -n1 | sed -n 's/^postfix (\([^)]*\)).*/\1/p' || true)
log "dovecot        $dv (/usr/sbin/dovecot, lmtp: $(ls /usr/lib/dovecot/lmtp 2>/dev/null || echo missing))"
log "smtp-sink      $POSTFIX_DIR/usr/sbin/smtp-sink (postfix ${pfv:-?})"
log "smtp-source    $POSTFIX_DIR/usr/sbin/smtp-source"
log "LD_LIBRARY_PATH for them: $POSTFIX_DIR/usr/lib/postfix"
log "cyrus lmtpd    $(ls /usr/lib/cyrus/bin/lmtpd 2>/dev/null || echo missing) ($(dpkg-query -W -f='${Version}' cyrus-imapd 2>/dev/null || echo '?'))"
log "openssl        $(openssl version)"
ms=$((($(date +%s%N) - start_ns) / 1000000))
log "done in $((ms / 1000)).$(printf '%03d' $((ms % 1000)))s"
