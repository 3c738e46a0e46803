#!/bin/sh
# Training-step time of all-MiniLM-L6-v2 (batch 32, <= 64 tokens, AdamW): ours and PyTorch's, one
# after the other on the same machine with the same 2 threads. Usage:
#   QN_DATA_DIR=... PY=/tmp/ref/bin/python scripts/encoder_step_time.sh [steps]
set -e
steps=${1:-10}
export RAYON_NUM_THREADS=2
cargo run --release -q -p qn-models --example step_time -- "$QN_DATA_DIR" "$steps" 2>/dev/null
"${PY:-python3}" scripts/step_time_torch.py "$QN_DATA_DIR" "$steps" 2 2>/dev/null
cargo run --release -q -p qn-models --example step_time -- "$QN_DATA_DIR" "$steps" "block:p=0.1" 2>/dev/null
