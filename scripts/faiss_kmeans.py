#!/usr/bin/env python3
"""The peer side of `cargo xtask bench-kernels --vs-faiss`.

    faiss_kmeans.py make <out.f32> <rows> <cols> <seed>     write a N(0, 0.02) float32 matrix
    faiss_kmeans.py run  <in.f32> <rows> <cols> <d> <k> <iters>

`run` cuts the matrix into sub-vectors with the paper's layout (column j = b*rows + o is
W[o, b*d:(b+1)*d]), trains faiss k-means on every sub-vector (max_points_per_centroid raised so that
faiss does not sub-sample), assigns all points, and prints {"seconds", "relative_mse"} as JSON.
"""
import json
import sys
import time

import numpy as np


def make(path, rows, cols, seed):
    rng = np.random.default_rng(seed)
    rng.normal(0.0, 0.02, size=(rows, cols)).astype("<f4").tofile(path)


def kmeans(w, d, k, iters):
    """faiss k-means of `w`'s PQ sub-vectors (column j = b*rows + o is W[o, b*d:(b+1)*d]), every
    sub-vector, then the assignment of all; returns (seconds, relative MSE)."""
    import faiss

    rows, cols = w.shape
    sub = np.ascontiguousarray(w.reshape(rows, cols // d, d).transpose(1, 0, 2).reshape(-1, d))
    start = time.perf_counter()
    km = faiss.Kmeans(d, k, niter=iters, seed=1234, max_points_per_centroid=sub.shape[0], verbose=False)
    km.train(sub)
    dist, _ = km.index.search(sub, 1)
    seconds = time.perf_counter() - start
    return seconds, float(dist.sum(dtype=np.float64) / np.square(sub, dtype=np.float64).sum())


def run(path, rows, cols, d, k, iters):
    import faiss

    w = np.fromfile(path, dtype="<f4").reshape(rows, cols)
    seconds, rel = kmeans(w, d, k, iters)
    print(json.dumps({"seconds": seconds, "relative_mse": rel, "threads": faiss.omp_get_max_threads()}))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "make":
        make(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif cmd == "run":
        run(args[0], *map(int, args[1:]))
    else:
        sys.exit(f"unknown command {cmd!r}")
