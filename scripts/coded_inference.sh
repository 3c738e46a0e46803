#!/usr/bin/env bash
# Peak resident memory (/usr/bin/time -v) and wall time of `qn predict` and `qn embed` on a float
# model against a compressed `.qnz` of it, which runs from its codes: one sentence (load + one
# forward: what serving one request costs a fresh process) and a file of sentences (per-sentence
# latency in batches of 32). Each command runs REPEATS times, alternating; the medians are printed.
#   QN=target/release/qn scripts/coded_inference.sh FP32_DIR MODEL.qnz SENTENCES.txt [REPEATS] [THREADS]
# SENTENCES.txt: one sentence per line (e.g. `cut -f1` of SST-2's validation.tsv without its header).
set -euo pipefail
FP32=$1
QNZ=$2
INPUT=$3
REPEATS=${4:-3}
THREADS=${5:-$(nproc)}
QN=${QN:-target/release/qn}
N=$(wc -l < "$INPUT")
ONE="a gripping, funny and thoroughly satisfying film."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# measure NAME ARGS...: appends "rss_kb wall_s" of one run to $tmp/NAME.
measure() {
  local name=$1
  shift
  /usr/bin/time -v "$QN" "$@" --threads "$THREADS" > /dev/null 2> "$tmp/err"
  local rss wall
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$tmp/err")
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$tmp/err" | awk -F: '{ if (NF == 3) print $1*3600+$2*60+$3; else print $1*60+$2 }')
  echo "$rss $wall" >> "$tmp/$name"
}

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

for r in $(seq "$REPEATS"); do
  for model in fp32:"$FP32" qnz:"$QNZ"; do
    tag=${model%%:*}
    path=${model#*:}
    measure "$tag-predict-one" predict --model "$path" --text "$ONE"
    measure "$tag-embed-one" embed --model "$path" --text "$ONE"
    measure "$tag-predict-file" predict --model "$path" --input "$INPUT"
    measure "$tag-embed-file" embed --model "$path" --input "$INPUT"
  done
done

printf '%-20s %12s %12s %10s\n' command fp32_rss_MB qnz_rss_MB ratio
for cmd in predict-one embed-one predict-file embed-file; do
  f=$(cut -d' ' -f1 "$tmp/fp32-$cmd" | median)
  q=$(cut -d' ' -f1 "$tmp/qnz-$cmd" | median)
  awk -v c="$cmd" -v f="$f" -v q="$q" 'BEGIN { printf "%-20s %12.1f %12.1f %10.3f\n", c, f/1024, q/1024, q/f }'
done
printf '\n%-20s %12s %12s %10s\n' command fp32_s qnz_s ratio
for cmd in predict-one embed-one predict-file embed-file; do
  f=$(cut -d' ' -f2 "$tmp/fp32-$cmd" | median)
  q=$(cut -d' ' -f2 "$tmp/qnz-$cmd" | median)
  awk -v c="$cmd" -v f="$f" -v q="$q" 'BEGIN { printf "%-20s %12.2f %12.2f %10.3f\n", c, f, q, q/f }'
done
awk -v n="$N" 'BEGIN { printf "\n(%d sentences in the file; per-sentence ms = file seconds * 1000 / %d)\n", n, n }'
