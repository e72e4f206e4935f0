#!/usr/bin/env bash
# Build, test and benchmark on a CUDA machine, in stages of under ten minutes each:
#
#   bash benchmarks/run_cuda.sh build      # CUDA extension against the machine's torch, info
#   bash benchmarks/run_cuda.sh test       # the test suite on CUDA tensors (CUDA + Triton)
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

tests() {
  stage_log test
  run_logged tests "$PY" -m pytest -q -p no:cacheprovider tests
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

case "${1:-all}" in
  build) build ;;
  test) tests ;;
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
    echo "usage: $0 build|test|ops|traj1|traj10|all" >&2
    exit 2
    ;;
esac
