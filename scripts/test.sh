#!/usr/bin/env bash
# Install everything the tests need (real LMTP peers included) and run them.
#
#   bash scripts/test.sh [pytest args...]
#
# Run as root on a fresh Debian 12 machine: Dovecot's LMTP server and
# Postfix's smtp-sink/smtp-source come from Debian packages (no service is
# started), the package is built with its compiled core, then ruff, mypy,
# stubtest and the whole pytest suite run (on both engines and both event
# loops). Without root or apt: python3 -m pytest -m "not peers" (CONTRIBUTING.md).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-test-deps.sh

python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"
# The editable install must have built the compiled core: fail loudly if not.
python3 -c 'import lmtpfast.proto._cproto, lmtpfast.proto._ccontent' 2>/dev/null || {
    echo "compiled core missing after install; building in place" >&2
    python3 setup.py -q build_ext --inplace
    python3 -c 'import lmtpfast.proto._cproto, lmtpfast.proto._ccontent'
}

python3 -m ruff check lmtpfast tests bench
python3 -m mypy lmtpfast
# Every .pyi against the compiled module it describes.
python3 -m mypy.stubtest --mypy-config-file pyproject.toml \
    lmtpfast.proto._cproto lmtpfast.proto._ccontent lmtpfast._cprotocol lmtpfast._csession
bash scripts/sanitize.sh  # core tests under ASan/UBSan in a temp copy (never in this tree)
exec python3 -m pytest -q "$@"
