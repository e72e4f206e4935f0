#!/usr/bin/env bash
# Compile-check the CUDA sources on a machine without a GPU: build hpd_fast._C against the CUDA
# build of torch in a separate virtual environment, then import it and check that every
# operator has a CUDA kernel registered. Nothing CUDA runs here.
#
# Usage: .ci/cuda_compile_check.sh [VENV_DIR]   (default: .venv-cuda in the repository root)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv-cuda}
venv=$(cd "$root" && mkdir -p "$venv" && cd "$venv" && pwd)  # absolute: the build below runs elsewhere
py=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
"$venv/bin/pip" install -q torch==2.14.1 ninja setuptools wheel numpy

# The nvcc on PATH may be a wrapper script, from which torch would guess the toolkit root wrong.
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_path=$(readlink -f "$(command -v nvcc)")
  if grep -q "exec " "$nvcc_path" 2>/dev/null; then
    nvcc_path=$(grep -o 'exec [^ ]*nvcc' "$nvcc_path" | head -1 | cut -d' ' -f2)
  fi
  CUDA_HOME=$(dirname "$(dirname "$nvcc_path")")
fi
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
export HPD_FAST_FORCE_CUDA=1
echo "CUDA compile check: CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"

# Build from a copy of the sources so the CPU build in the work tree is left alone.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$root" && tar --exclude=.venv --exclude=.venv-cuda --exclude=build --exclude='*.so' \
  --exclude=.git -cf - .) | (cd "$work" && tar -xf -)
cd "$work"
"$venv/bin/python" setup.py build_ext --build-lib "$work/out" --build-temp "$work/tmp" >build.log 2>&1 \
  || { tail -50 build.log; exit 1; }
grep "hpd_fast build:" build.log

cd "$work/out"
"$venv/bin/python" - <<'PY'
import importlib.util
import sys

import torch

spec = importlib.util.find_spec("hpd_fast._C")
assert spec is not None, "hpd_fast._C was not built"
import hpd_fast._C  # noqa: F401

ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("hpd_fast::"))
missing = [n for n in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
print(f"hpd_fast._C built with CUDA kernels for {len(ops) - len(missing)}/{len(ops)} ops: {sorted(ops)}")
if missing or not ops:
    print("missing CUDA kernels:", missing)
    sys.exit(1)
PY
