#!/usr/bin/env python3
"""The peer side of `cargo xtask bench-format --vs-numpy`.

    numpy_gather.py make <dir> <rows> <cols> <d> <k> <seed>   write centroids.f32 and assign.u8
    numpy_gather.py run  <dir> <rows> <cols> <d> <repeats>

`run` times two numpy decodes of the same PQ weight, best of `repeats`, with preallocated outputs:
  gather: np.take(centroids, assign, axis=0, out=buf)  -- sub-vector order, the plain gather
  layout: the gather, then the transpose into (rows, cols) that a weight needs
and prints their throughput in GB/s of f32 written, as JSON.
"""
import json
import sys
import time

import numpy as np


def make(d, rows, cols, bs, k, seed):
    rng = np.random.default_rng(seed)
    rng.random((k, bs), dtype=np.float32).tofile(f"{d}/centroids.f32")
    rng.integers(0, k, size=rows * cols // bs, dtype=np.uint8).tofile(f"{d}/assign.u8")


def run(d, rows, cols, bs, repeats):
    c = np.fromfile(f"{d}/centroids.f32", dtype="<f4").reshape(-1, bs)
    a = np.fromfile(f"{d}/assign.u8", dtype=np.uint8).astype(np.intp)
    buf = np.empty((a.size, bs), dtype=np.float32)
    out = np.empty((rows, cols), dtype=np.float32)
    best_gather = best_layout = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.take(c, a, axis=0, out=buf)
        best_gather = min(best_gather, time.perf_counter() - t)
        t = time.perf_counter()
        np.take(c, a, axis=0, out=buf)
        out.reshape(rows, cols // bs, bs)[...] = buf.reshape(cols // bs, rows, bs).transpose(1, 0, 2)
        best_layout = min(best_layout, time.perf_counter() - t)
    nbytes = rows * cols * 4
    print(json.dumps({"gather_gbps": nbytes / best_gather / 1e9, "layout_gbps": nbytes / best_layout / 1e9}))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "make":
        make(args[0], *map(int, args[1:]))
    elif cmd == "run":
        run(args[0], *map(int, args[1:]))
    else:
        sys.exit(f"unknown command {cmd!r}")
