#!/bin/sh
# Depthwise convolution forward + backward, EfficientNet-Lite0 shapes, batch 8, 2 threads: ours
# (fused op and candle's grouped conv2d) and PyTorch's, one after the other. Usage:
#   PY=<venv with torch>/bin/python scripts/depthwise_vs_torch.sh [reps]
set -e
reps=${1:-5}
export RAYON_NUM_THREADS=2
cargo run --release -q -p qn-kernels --example depthwise_time -- "$reps"
"${PY:-python3}" scripts/depthwise_time_torch.py "$reps" 2
