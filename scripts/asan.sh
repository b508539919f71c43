#!/usr/bin/env bash
# Builds the C++ kernels with AddressSanitizer into build/asan and runs the tests that exercise
# them (the C++ paths of every op, their input checks, opcheck, the output cache) under it.
# Python itself is not instrumented, so libasan is preloaded (with libstdc++, which ASan must see
# at start to intercept C++ throws); leak checking is off because the
# interpreter's own allocations at exit are not ours to judge.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
FASTGPT_SANITIZE=address "$PY" setup.py -q build_ext --build-lib build/asan/lib \
    --build-temp build/asan/tmp 2>&1 | grep -E "error" || true
export FASTGPT_EXT_DIR=$PWD/build/asan/lib/fastgpt
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
# The hypothesis, compile and Triton tests add nothing for the C++ kernels and are slow here.
"$PY" -m pytest tests -q -p no:cacheprovider -k "cpu or check or opcheck or gradcheck or output_memory" \
    --ignore-glob='tests/test_triton_*' "$@"
