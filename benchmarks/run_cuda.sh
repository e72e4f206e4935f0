#!/usr/bin/env bash
# Build, test and benchmark on a CUDA machine, in stages of under ten minutes each:
#
#   bash benchmarks/run_cuda.sh check      # what the machine must have (run first by every stage)
#   bash benchmarks/run_cuda.sh build      # CUDA extension against the machine's torch, info
#   bash benchmarks/run_cuda.sh test       # the kernel ops' tests on CUDA tensors (CUDA + Triton)
#   bash benchmarks/run_cuda.sh test_all   # the whole test suite (longer than one stage's cap)
#   bash benchmarks/run_cuda.sh ops        # feature distance + student block benchmarks
#   bash benchmarks/run_cuda.sh traj1      # trajectory matching, IPC 1, 10-80 steps
#   bash benchmarks/run_cuda.sh traj10     # trajectory matching, IPC 10, 10-80 steps
#   bash benchmarks/run_cuda.sh all        # everything above, in order (build, test, traj10,
#                                          # traj1, ops), each test/benchmark stage capped by
#                                          # STAGE_SECONDS (default 240) so that one call of
#                                          # under ten minutes brings back what finished
#
# Nothing is downloaded: the package is installed with --no-deps into the machine's own Python
# (torch >= 2.11 with CUDA, triton >= 3.6). Result JSON files go to benchmarks/results/ (named
# after the card) and, when $OUT is set, are copied there too, with a log of every stage.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-}
stage_log() { echo "== $1 ($(date +%H:%M:%S))"; }

# The tests of the GPU paths (the fused ops, the dispatcher): the `test` stage, inside its cap.
OP_TESTS="tests/test_class_mean_distance.py tests/test_instance_norm_relu_pool.py
  tests/test_trajectory_ops.py tests/test_backend_cases.py tests/test_build.py"

check() {  # fail fast, saying what is missing, before minutes of device time go to a build
  "$PY" - <<'PY' || { echo "run_cuda.sh: the machine lacks what is listed above" >&2; return 3; }
import importlib
import shutil
import sys

need = {
    "torch": "torch >= 2.11 built with CUDA", "triton": "triton >= 3.6", "setuptools": "setuptools",
    "ninja": "ninja", "numpy": "numpy", "safetensors": "safetensors", "tqdm": "tqdm",
    "pytest": "pytest", "pytest_benchmark": "pytest-benchmark", "matplotlib": "matplotlib",
    "sklearn": "scikit-learn", "PIL": "Pillow",
}
problems = []
for module, what in need.items():
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"missing {what} (import {module}: {exc})")
if not problems:
    import torch
    import triton

    version = lambda v: tuple(int(p) for p in v.split("+")[0].split(".")[:2])
    if version(torch.__version__) < (2, 11) or not torch.version.cuda:
        problems.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}): need >= 2.11 with CUDA")
    elif not torch.cuda.is_available():
        problems.append("torch sees no CUDA device")
    if version(triton.__version__) < (3, 6):
        problems.append(f"triton {triton.__version__}: need >= 3.6")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        problems.append("no CUDA toolkit (nvcc on PATH or CUDA_HOME) to build the CUDA kernels")
if not shutil.which("ninja") and not problems:
    problems.append("no ninja executable on PATH (the build uses it)")
for p in problems:
    print("run_cuda.sh check:", p, file=sys.stderr)
if not problems:
    import torch
    import triton

    print(f"run_cuda.sh check: torch {torch.__version__} CUDA {torch.version.cuda}, "
          f"triton {triton.__version__}, {torch.cuda.get_device_name()}")
sys.exit(1 if problems else 0)
PY
}

save() {
  if [ -n "$OUT_DIR" ]; then
    mkdir -p "$OUT_DIR/results"
    cp benchmarks/results/*.json "$OUT_DIR/results/" 2>/dev/null || true
  fi
}

run_logged() {  # name, command... (killed after $STAGE_SECONDS when that is set)
  local name=$1
  shift
  if [ -n "${STAGE_SECONDS:-}" ]; then
    set -- timeout --signal=INT --kill-after=20 "$STAGE_SECONDS" "$@"
  fi
  if [ -n "$OUT_DIR" ]; then
    mkdir -p "$OUT_DIR"
    "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    return "${PIPESTATUS[0]}"
  fi
  "$@"
}

build() {
  stage_log build
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c \
      'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
    export TORCH_CUDA_ARCH_LIST
  fi
  HPD_FAST_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} run_logged build \
    "$PY" -m pip install --no-build-isolation --no-deps -e . || return 1
  run_logged info "$PY" -m hpd_fast info
}

tests() {  # the GPU paths' tests, slowest reported (inside STAGE_SECONDS under `all`)
  stage_log test
  # shellcheck disable=SC2086
  run_logged tests "$PY" -m pytest -q -p no:cacheprovider --durations=10 $OP_TESTS
}

tests_all() {
  stage_log test_all
  run_logged tests_all "$PY" -m pytest -q -p no:cacheprovider --durations=20 tests
}

ops() {
  stage_log ops
  export HPD_BENCH_DEVICE=cuda
  run_logged bench_feature_distance "$PY" -m pytest -q -p no:cacheprovider \
    benchmarks/bench_feature_distance.py
  run_logged bench_student_block "$PY" -m pytest -q -p no:cacheprovider \
    benchmarks/bench_student_block.py
  save
}

traj() {  # IPC
  stage_log "trajectory IPC $1"
  HPD_BENCH_DEVICE=cuda HPD_BENCH_IPC=$1 HPD_BENCH_STEPS=10,20,40,80 run_logged "bench_trajectory_ipc$1" \
    "$PY" -m pytest -q -s -p no:cacheprovider benchmarks/bench_trajectory.py -k benchmark
  "$PY" benchmarks/bench_trajectory.py --table
  save
}

stage=${1:-all}
case "$stage" in
  check | build | test | test_all | ops | traj1 | traj10 | all) check || exit 3 ;;
esac
case "$stage" in
  check) ;;
  build) build ;;
  test) tests ;;
  test_all) tests_all ;;
  ops) ops ;;
  traj1) traj 1 ;;
  traj10) traj 10 ;;
  all)
    build || exit 1
    export STAGE_SECONDS=${STAGE_SECONDS:-240}
    tests
    traj 10
    traj 1
    ops
    ;;
  *)
    echo "usage: $0 check|build|test|test_all|ops|traj1|traj10|all" >&2
    exit 2
    ;;
esac
