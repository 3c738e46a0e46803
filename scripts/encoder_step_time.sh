#!/bin/sh
# Training-step time of all-MiniLM-L6-v2 (batch 32, <= 64 tokens, AdamW): ours without noise,
# PyTorch + transformers, ours with block drop p = 0.1 on every Linear and Embedding, interleaved
# in a rotating order for R rounds on the same machine with the same 2 threads; prints each
# round's ratios and their medians. Usage:
#   QN_DATA_DIR=... PY=<venv>/bin/python scripts/encoder_step_time.sh [steps] [rounds]
set -e
steps=${1:-12}
rounds=${2:-3}
export RAYON_NUM_THREADS=2
cargo build --release -q -p qn-models --example step_time
bin=target/release/examples/step_time
step() { sed -n 's/.*step \([0-9.]*\) s$/\1/p; s/.*steps \([0-9.]*\) s\/step.*/\1/p'; }
out=$(mktemp)
r=1
while [ "$r" -le "$rounds" ]; do
  # The order rotates every round: a fixed order lets the machine's drift pass for a cost
  # (measured: a fixed order showed +9.5 % for block drop, a mixed one none).
  case $((r % 3)) in
    1) order="ours torch noisy" ;;
    2) order="torch noisy ours" ;;
    *) order="noisy ours torch" ;;
  esac
  for m in $order; do
    case $m in
      ours) ours=$("$bin" "$QN_DATA_DIR" "$steps" 2>/dev/null | tail -1) ;;
      torch) torch=$("${PY:-python3}" scripts/step_time_torch.py "$QN_DATA_DIR" "$steps" 2 2>/dev/null | tail -1) ;;
      noisy) noisy=$("$bin" "$QN_DATA_DIR" "$steps" "block:p=0.1" 2>/dev/null | tail -1) ;;
    esac
  done
  echo "round $r: ours: $ours"
  echo "round $r: $torch"
  echo "round $r: ours, block drop p=0.1: $noisy"
  echo "$(echo "$ours" | step) $(echo "$torch" | step) $(echo "$noisy" | step)" >> "$out"
  r=$((r + 1))
done
awk '{ printf "round %d: ours %.3f s, PyTorch %.3f s, ratio %.2fx; noise overhead %+.1f %%\n", NR, $1, $2, $1 / $2, 100 * ($3 / $1 - 1) }' "$out"
awk '{ print $1 / $2, 100 * ($3 / $1 - 1) }' "$out" | sort -n -k1 | awk '{ r[NR] = $1 } END { printf "median ratio to PyTorch: %.2fx\n", r[int((NR + 1) / 2)] }'
awk '{ print 100 * ($3 / $1 - 1) }' "$out" | sort -n | awk '{ o[NR] = $1 } END { printf "median noise overhead: %+.1f %%\n", o[int((NR + 1) / 2)] }'
rm -f "$out"
