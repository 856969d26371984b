#!/usr/bin/env bash
# Build a copy of the repo with AddressSanitizer + UndefinedBehaviorSanitizer
# (LMTPFAST_SANITIZE=1, see setup.py) in a temp dir and run the core tests
# against it: the engine (tests/test_engine*.py, both implementations), the
# content encoder (tests/test_content.py), the fuzz oracles over random input
# (tests/test_fuzz_smoke.py), the server engine (tests/test_server_engine.py:
# parity with the reference, the handler interface), the sink's sans-IO
# session and DATA decoder tests, and the compiled protocol's hot path
# and the compiled consumer (lmtpfast/_cprotocol.pyx, lmtpfast/_csession.pyx:
# tests/test_protocol.py, tests/test_send_many.py).
#
#   bash scripts/sanitize.sh [extra pytest args]
#
# Never builds in the working tree: an ASan-linked .so there would break
# `import lmtpfast` for everyone without LD_PRELOAD. Exits non-zero on a test
# failure or on any sanitizer report. Set LMTPFAST_SANITIZE_KEEP=1 to keep the
# temp dir (its path is printed).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

log() { printf 'sanitize: %s\n' "$*"; }

CC=${CC:-gcc}
LIBASAN=$("$CC" -print-file-name=libasan.so)
[[ -e $LIBASAN ]] || { log "no libasan for $CC (apt-get install gcc)"; exit 1; }

WORK=$(mktemp -d /tmp/lmtpfast-asan.XXXXXX)
cleanup() { [[ ${LMTPFAST_SANITIZE_KEEP:-0} == 1 ]] || rm -rf "$WORK"; }
trap cleanup EXIT
log "building in $WORK"

# The files of the checkout (tracked and new, not ignored), never build output.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -co --exclude-standard |
        while IFS= read -r f; do [[ -f $f ]] && printf '%s\n' "$f"; done |
        grep -Ev '\.(so|o)$|^build/|^lmtpfast/proto/_c(proto|content)\.c$|^lmtpfast/server/_cserver\.c$|^lmtpfast/_c(protocol|session)\.c$' |
        tar -cf - -T - | tar -xf - -C "$WORK"
else
    tar --exclude=./build --exclude=./.git --exclude='*.so' -cf - . | tar -xf - -C "$WORK"
fi

cd "$WORK"
LMTPFAST_SANITIZE=1 python3 setup.py -q build_ext --inplace >build.log 2>&1 || {
    cat build.log; log "build failed"; exit 1; }
for so in lmtpfast/proto/_cproto*.so lmtpfast/proto/_ccontent*.so lmtpfast/server/_cserver*.so \
          lmtpfast/_cprotocol*.so lmtpfast/_csession*.so; do
    ldd "$so" | grep libasan >/dev/null || { log "$so is not linked with ASan"; exit 1; }
done

export LD_PRELOAD=$LIBASAN
# Leaks: CPython keeps interned objects to exit, so LeakSanitizer would only
# report the interpreter; everything else stops at the first report.
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# Every Python object from malloc, so ASan sees overflows into them too.
export PYTHONMALLOC=malloc
export PYTHONPATH=$WORK
export CI=${CI:-true}  # a missing compiled core fails the engine tests instead of skipping

python3 - <<'EOF'
import lmtpfast.proto._cproto as p, lmtpfast.proto._ccontent as c, os
import lmtpfast.server._cserver as s
import lmtpfast._cprotocol as h
import lmtpfast._csession as k
for m in (p, c, s, h, k):
    assert m.__file__.startswith(os.environ["PYTHONPATH"]), m.__file__
print("sanitize: using", p.__file__)
EOF

set +e
python3 -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_engine.py tests/test_engine_bdat.py tests/test_engine_desync.py \
    tests/test_content.py tests/test_fuzz_smoke.py tests/test_sink.py \
    tests/test_server_engine.py tests/test_protocol.py tests/test_send_many.py \
    -k "not test_sink or decoder or session or parse" "$@" 2>&1 | tee pytest.log
status=${PIPESTATUS[0]}
set -e
if grep -qE 'ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer' pytest.log; then
    log "sanitizer report found (see above)"
    exit 1
fi
if [[ $status -ne 0 ]]; then
    log "tests failed under ASan/UBSan (pytest status $status)"
    exit "$status"
fi
log "clean: no ASan/UBSan report"
