#!/usr/bin/env python3
"""k-means of a whole encoder, ours against faiss: every Linear and Embedding weight of a BERT-family
`model.safetensors` (all-MiniLM-L6-v2: 38 matrices) cut into PQ sub-vectors with the paper's block
sizes (4 for attention projections, 8 for other linears and embeddings; a table with fewer blocks
than K is left out, as `qn compress` leaves it float), K centroids, ITERS iterations, every
sub-vector, both sides on all cores; layers alternate between the two sides. Prints per-layer
seconds and relative MSE and the totals.

    PY=.venv/bin/python scripts/ipq_model_vs_faiss.py MODEL.safetensors OURS_BIN [K] [ITERS]

OURS_BIN is `target/release/examples/kmeans_vs_faiss`
(`cargo build --release -p qn-kernels --example kmeans_vs_faiss`).
"""
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import faiss_kmeans  # noqa: E402  (the one faiss k-means of the project's comparisons)

ATTENTION = ("attention", "attn", "query", "key", "value")


def tensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
        for name, meta in header.items():
            if name == "__metadata__" or meta["dtype"] != "F32" or len(meta["shape"]) != 2:
                continue
            if not name.endswith(".weight"):
                continue
            start, end = meta["data_offsets"]
            f.seek(base + start)
            yield name, np.frombuffer(f.read(end - start), dtype="<f4").reshape(meta["shape"])


def ours_kmeans(binary, w, d, k, iters):
    with tempfile.NamedTemporaryFile(suffix=".f32", delete=False) as f:
        f.write(np.ascontiguousarray(w, dtype="<f4").tobytes())
        path = f.name
    try:
        out = subprocess.run(
            [binary, path, str(w.shape[0]), str(w.shape[1]), str(d), str(k), str(iters), "plain"],
            check=True, capture_output=True, text=True,
        ).stdout
    finally:
        os.unlink(path)
    r = json.loads(out.strip().splitlines()[-1])
    return r["seconds"], r["relative_mse"]


def main():
    model, binary = sys.argv[1], sys.argv[2]
    k = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    iters = int(sys.argv[4]) if len(sys.argv) > 4 else 20
    total = {"ours": 0.0, "faiss": 0.0}
    print(f"# layer d blocks ours_s faiss_s ours_mse faiss_mse (K = {k}, {iters} iterations)")
    for i, (name, w) in enumerate(tensors(model)):
        d = 4 if any(p in name for p in ATTENTION) else 8
        blocks = w.size // d
        if blocks < k:
            print(f"{name} skipped: {blocks} blocks < K")
            continue
        # Alternate which side goes first, so neither always meets a warm cache.
        runs = [("ours", lambda: ours_kmeans(binary, w, d, k, iters)),
                ("faiss", lambda: faiss_kmeans.kmeans(w, d, k, iters))]
        res = {}
        for side, f in (runs if i % 2 == 0 else runs[::-1]):
            res[side] = f()
            total[side] += res[side][0]
        print(f"{name} {d} {blocks} {res['ours'][0]:.3f} {res['faiss'][0]:.3f} "
              f"{res['ours'][1]:.5f} {res['faiss'][1]:.5f}")
    print(f"total ours {total['ours']:.2f} s, faiss {total['faiss']:.2f} s, "
          f"ratio ours/faiss {total['ours'] / total['faiss']:.2f}")


if __name__ == "__main__":
    main()
