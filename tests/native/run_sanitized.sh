#!/usr/bin/env bash
# Build the native ESP engine with AddressSanitizer + UndefinedBehaviorSanitizer and run its tests under it.
#
#   bash tests/native/run_sanitized.sh                        tests/native and tests/datapath (about a minute)
#   bash tests/native/run_sanitized.sh tests/native/test_native_rejections.py -k icv    (any pytest args)
#   bash tests/native/run_sanitized.sh --fuzz 50 [SEED]       the fuzz harness for 50 s: atheris (if
#                                                             installed) builds a corpus, which then runs
#                                                             under the sanitizers, then random inputs;
#                                                             then the forwarder's (fuzz_datagram.py)
#                                                             and the NFQUEUE codec's (fuzz_nfq.py)
#
# How it works:
# - the sources are copied to a temporary directory (never the worktree: its build/ cache and in-place
#   extension stay as they are) and built there by the project's own setup.py (pip wheel), with
#   CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -O1 -g";
#   the sanitized extension is unpacked into that copy and the tests run from it;
# - the Python interpreter is not built with ASan, so the ASan runtime must be the first library loaded:
#   LD_PRELOAD="$(gcc -print-file-name=libasan.so)" (Debian 12, gcc 12: /usr/lib/gcc/x86_64-linux-gnu/12/
#   libasan.so); libubsan comes in as the extension's own dependency;
# - PYTHONMALLOC=malloc makes every interpreter allocation (the bytes objects the engine fills among
#   them) a malloc that ASan guards; detect_leaks=0 because CPython keeps objects alive until exit;
#   -fno-sanitize-recover=all and halt_on_error=1 make any finding abort the run with a report.
# Exit status: that of pytest (or of the fuzz run); 3 when the sanitized build itself failed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -O1 -g"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ipsecstack-asan.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

mkdir "$WORK/src" "$WORK/dist"
tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.so' --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.hypothesis -cf - . | tar -C "$WORK/src" -xf -

echo "== building the sanitized extension in $WORK/src"
(cd "$WORK/src" && CFLAGS="$SAN" "$PY" -m pip wheel -q --no-deps -w "$WORK/dist" . 2> >(grep -v "^WARNING: Location" >&2))
"$PY" - "$WORK/dist" "$WORK/src" <<'EOF'
import pathlib, sys, zipfile
dist, dest = (pathlib.Path(p) for p in sys.argv[1:])
sos = [n for w in dist.glob("*.whl") for n in zipfile.ZipFile(w).namelist() if n.endswith(".so")]
if not sos:
    print("run_sanitized: the sanitized build of ipsecstack.native._engine failed (compiler output above)", file=sys.stderr)
    sys.exit(3)
for w in dist.glob("*.whl"):
    zipfile.ZipFile(w).extractall(dest, [n for n in zipfile.ZipFile(w).namelist() if n.endswith(".so")])
EOF
SO=$(ls "$WORK"/src/ipsecstack/native/_engine*.so 2>/dev/null) || exit 3
if [[ "$(ldd "$SO")" != *libasan* ]]; then
    echo "run_sanitized: $SO is not linked to libasan" >&2
    exit 3
fi

export LD_PRELOAD
LD_PRELOAD=$(gcc -print-file-name=libasan.so)
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=0:strict_string_checks=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONMALLOC=malloc
export PYTHONPATH="$WORK/src"
export IPSECSTACK_REQUIRE_NATIVE=1  # it was just built
cd "$WORK/src"
"$PY" -c 'import ipsecstack.native._engine as e, sys; assert e.__file__.startswith(sys.argv[1]), e.__file__' "$WORK/src"

if [ "${1:-}" = "--fuzz" ]; then
    # atheris's coverage feedback cannot work with gcc's ASan runtime loaded (both define the coverage
    # hooks), so the coverage-guided search runs first without sanitizers (against the worktree's own
    # build), and its corpus, then fresh random inputs, run under ASan + UBSan.
    secs=${2:-50}
    mkdir "$WORK/corpus"
    if (cd "$ROOT" && env -u LD_PRELOAD -u PYTHONMALLOC PYTHONPATH="$ROOT" "$PY" -c 'import atheris' 2>/dev/null); then
        echo "== atheris for $((secs / 2))s (no sanitizer), building a corpus"
        if ! (cd "$ROOT" && env -u LD_PRELOAD -u PYTHONMALLOC PYTHONPATH="$ROOT" "$PY" tests/native/fuzz_unprotect.py \
            -max_total_time=$((secs / 2)) "$WORK/corpus" >"$WORK/atheris.log" 2>&1); then
            tail -n 40 "$WORK/atheris.log"
            echo "run_sanitized: atheris found a disagreement or a crash (above; the input is in $ROOT/crash-*)" >&2
            exit 1
        fi
        grep -E "^(INFO: Seed|Done)" "$WORK/atheris.log"
        echo "== the corpus under ASan + UBSan"
        "$PY" tests/native/fuzz_unprotect.py --corpus "$WORK/corpus"
        secs=$((secs - secs / 2))
    fi
    echo "== seeded random inputs for ${secs}s under ASan + UBSan"
    "$PY" tests/native/fuzz_unprotect.py --random "$secs" "${3:-$RANDOM}"
    # the forwarder's threads: arbitrary datagrams into its sockets and its inner fd (fuzz_datagram.py)
    echo "== the forwarder: seeded random datagrams for ${secs}s under ASan + UBSan"
    "$PY" tests/native/fuzz_datagram.py --random "$secs" "${3:-$RANDOM}"
    # the NFQUEUE netlink codec against its Python reference (fuzz_nfq.py)
    echo "== the NFQUEUE codec: seeded random messages for $((secs / 2 + 1))s under ASan + UBSan"
    "$PY" tests/native/fuzz_nfq.py --random "$((secs / 2 + 1))" "${3:-$RANDOM}"
    exit 0  # (not exec: the EXIT trap removes the temporary directory; set -e reports a failure)
fi
echo "== pytest under ASan + UBSan (LD_PRELOAD=$LD_PRELOAD)"
# --capture=sys: a sanitizer report is written to fd 2 by C code and must reach the terminal
# by default the engine's own tests and every datapath test (tests/datapath runs each once on the native engine)
if [ $# -eq 0 ]; then set -- tests/native tests/datapath; fi
"$PY" -m pytest -q -p no:cacheprovider --capture=sys "$@"
