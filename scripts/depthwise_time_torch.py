"""PyTorch's depthwise convolution forward + backward on EfficientNet-Lite0's depthwise shapes
(batch 8, 224 px), the peer of `crates/qn-kernels/examples/depthwise_time.rs`.

    python scripts/depthwise_time_torch.py [reps] [threads]
"""
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(32, 112, 3, 1), (96, 112, 3, 2), (144, 56, 3, 1), (144, 56, 5, 2), (240, 28, 5, 1),
          (240, 28, 3, 2), (480, 14, 3, 1), (480, 14, 5, 1), (672, 14, 5, 1), (672, 14, 5, 2),
          (1152, 7, 5, 1), (1152, 7, 3, 1)]


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    total = 0.0
    print(f"pytorch {torch.__version__}, {torch.get_num_threads()} threads")
    for c, hw, k, s in SHAPES:
        x = torch.randn(8, c, hw, hw, requires_grad=True)
        w = (torch.randn(c, 1, k, k) * 0.1).requires_grad_()
        runs = []
        for _ in range(reps + 1):
            t = time.perf_counter()
            y = F.conv2d(x, w, stride=s, padding=k // 2, groups=c)
            y.sum().backward()
            runs.append(time.perf_counter() - t)
            x.grad = None
            w.grad = None
        runs = sorted(runs[1:])
        med = runs[len(runs) // 2]
        total += med
        print(f"{c:4}x{hw:3}x{hw:<3} k{k} s{s}   {med * 1e3:9.2f} ms")
    print(f"sum                  {total * 1e3:9.2f} ms")


if __name__ == "__main__":
    main()
