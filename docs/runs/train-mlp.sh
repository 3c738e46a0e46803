#!/usr/bin/env bash
# Reproduces the README's train-mlp figures; writes docs/runs/train-mlp.log.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${QN_DATA_DIR:?set QN_DATA_DIR to the shared data directory}"
cargo build --release --quiet -p qn-cli
out=$(mktemp -d)
{
  echo "\$ qn train-mlp --data \$QN_DATA_DIR/data/fashion-mnist -o <tmp> --plan docs/runs/mlp-ipq.toml --noise 0.1"
  ./target/release/qn train-mlp --data "$QN_DATA_DIR/data/fashion-mnist" -o "$out" \
    --plan docs/runs/mlp-ipq.toml --noise 0.1 2>/dev/null
  echo "\$ qn inspect <tmp>/model.qnz"
  ./target/release/qn inspect "$out/model.qnz"
} | tee docs/runs/train-mlp.log
rm -rf "$out"
