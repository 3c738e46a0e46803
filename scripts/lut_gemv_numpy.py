"""numpy's dense f32 GEMV on the shapes of `cargo run -p qn-kernels --example lut_gemv`: batch 1,
cycling through enough layers that the weights (>= MB megabytes in all) leave the last-level cache,
and cache-hot (one layer again and again). Same output format: `shape mode numpy_us`.

    python scripts/lut_gemv_numpy.py [MB] [ROUNDS]
"""
import math
import sys
import time

import numpy as np

SHAPES = [(384, 1536), (1536, 384), (768, 3072), (1024, 4096)]


def timed(rounds, n, f):
    per = []
    for r in range(rounds + 1):
        t = time.perf_counter()
        for i in range(n):
            f(i)
        if r > 0:
            per.append((time.perf_counter() - t) * 1e6 / n)
    per.sort()
    return per[len(per) // 2]


def main():
    mb = float(sys.argv[1]) if len(sys.argv) > 1 else 340.0
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    rng = np.random.default_rng(0)
    print("# shape mode numpy_us")
    for rows, cols in SHAPES:
        layers = math.ceil(mb * 1e6 / (4 * rows * cols))
        ws = [rng.standard_normal((rows, cols), dtype=np.float32) for _ in range(layers)]
        x = rng.standard_normal((1, cols), dtype=np.float32)
        cold = timed(rounds, layers, lambda i: x @ ws[i].T)
        print(f"{rows}x{cols} cold({layers}) {cold:.1f}")
        hot = timed(rounds, 200, lambda i: x @ ws[0].T)
        print(f"{rows}x{cols} hot {hot:.1f}")


if __name__ == "__main__":
    main()
