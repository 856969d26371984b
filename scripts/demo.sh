#!/bin/sh
# The replay quick start, step by step: write the 20-message demo spool, start
# `lmtpfast sink` on a unix socket with faults (unknown users get 550, carol's
# full mailbox 452), replay the spool once, print the per-recipient report,
# stop the sink. `lmtpfast replay --demo` does the same from an installed package.
#
#   sh scripts/demo.sh            (after `pip install .`)
set -eu
LMTPFAST=${LMTPFAST:-lmtpfast}
command -v "$LMTPFAST" >/dev/null 2>&1 || LMTPFAST="python3 -m lmtpfast"
PY=$(echo "$LMTPFAST" | grep -q python && echo "${LMTPFAST% -m lmtpfast}" || echo python3)

work=$(mktemp -d "${TMPDIR:-/tmp}/lmtpfast-demo.XXXXXX")
$PY -m lmtpfast.cli._demo "$work/spool"

$LMTPFAST sink --listen "unix:$work/lmtp.sock" --maildir "$work/maildir" \
    --ready-file "$work/ready" --duration 300 --quiet \
    --fault 'rcpt:nobody@*=550 5.1.1 User unknown' \
    --fault 'rcpt:ghost@*=550 5.1.1 User unknown' \
    --fault 'dot:carol@*=452 4.2.2 Mailbox full, try again later' >/dev/null &
sink=$!
trap 'kill $sink 2>/dev/null || true' EXIT
i=0
while [ ! -e "$work/ready" ]; do
    i=$((i + 1)); [ $i -lt 300 ] || { echo "sink did not start" >&2; exit 70; }
    sleep 0.05
done

status=0
$LMTPFAST replay "$work/spool" --server "unix:$work/lmtp.sock" --once --verbose \
    --min-backoff 60 --report "$work/report.json" --bounce-dir "$work/bounces" || status=$?

echo
echo "delivered mail:  $work/maildir"
echo "failed/:         $work/spool/failed (reasons in *.txt)"
echo "still queued:    $work/spool/deferred"
echo "JSON report:     $work/report.json"
echo "replay exit status: $status (75: something is still queued, as expected here)"
[ "$status" -eq 0 ] || [ "$status" -eq 75 ] || [ "$status" -eq 65 ]
