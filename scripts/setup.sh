#!/usr/bin/env bash
# Installs what fastgpt needs into the current Python, idempotently, then builds the C++ kernels
# incrementally (ninja, in build/). Used by `make bench` and `make test`.
#   - CPU torch 2.13 when no torch is present (any other spec could pull a multi-GB CUDA build)
#   - build tools, triton (the GPU path; its interpreter runs the Triton tests on CPU),
#     test and benchmark dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip() { "$PY" -m pip "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "== installing CPU torch 2.13.0"
    pip install -q torch==2.13.0
fi
"$PY" - <<'PYEOF'
import sys, torch
if not torch.__version__.startswith("2.13."):
    sys.exit(f"fastgpt is built and tested against torch 2.13; found {torch.__version__}")
PYEOF

need=()
for spec in setuptools wheel ninja pybind11 "triton==3.9.0" pytest pytest-benchmark hypothesis \
            expecttest ruff matplotlib transformers safetensors tqdm; do
    name=${spec%%=*}
    "$PY" -m pip show -q "$name" >/dev/null 2>&1 || need+=("$spec")
done
if ((${#need[@]})); then
    echo "== installing ${need[*]}"
    pip install -q "${need[@]}"
fi

# Register the package (editable) without building, then build the kernels in place: ninja
# keeps its objects in build/, so a rebuild compiles only what changed.
if ! "$PY" -m pip show -q fastgpt >/dev/null 2>&1; then
    echo "== registering fastgpt (editable)"
    FASTGPT_NO_EXT=1 pip install -q --no-build-isolation --no-deps -e .
fi
echo "== building the C++ kernels (default, AVX2, AVX-512)"
"$PY" setup.py -q build_ext --inplace 2>&1 | grep -vE "warning|Warning|^\s*$|^  " || true
"$PY" -c "import fastgpt; from fastgpt import _cpu; print('fastgpt ready, CPU kernels:', _cpu.supported_isas())"
