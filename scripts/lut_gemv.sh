#!/usr/bin/env bash
# Batch-1 forward from PQ codes (ours) against dense f32 GEMV (candle's matmul and numpy's BLAS) on
# the same shapes, in one run, rounds alternating; prints each line of both.
#   PY=<python with numpy> scripts/lut_gemv.sh [MB] [ROUNDS] [REPEATS]
# Threads: both sides use every core unless RAYON_NUM_THREADS / OMP_NUM_THREADS say otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
MB=${1:-340}
ROUNDS=${2:-5}
REPEATS=${3:-3}
PY=${PY:-python3}
cargo build --release --quiet -p qn-kernels --example lut_gemv
for r in $(seq "$REPEATS"); do
  echo "== repeat $r"
  "${CARGO_TARGET_DIR:-target}/release/examples/lut_gemv" "$MB" "$ROUNDS"
  "$PY" scripts/lut_gemv_numpy.py "$MB" "$ROUNDS"
done
