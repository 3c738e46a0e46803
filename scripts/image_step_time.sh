#!/bin/sh
# EfficientNet-Lite0 training step (64 px, batch 32, AdamW, 2 threads): ours without and with
# block-drop noise (interleaved), then PyTorch's on the same architecture, one after the other.
# Usage:
#   PY=<venv with torch, safetensors>/bin/python scripts/image_step_time.sh [rounds] [steps]
set -e
rounds=${1:-30}
steps=${2:-20}
export RAYON_NUM_THREADS=2
cargo run --release -q -p qn-models --example image_step_time -- lite0 64 32 "$rounds"
"${PY:-python3}" scripts/image_step_time_torch.py 64 32 "$steps" 2
