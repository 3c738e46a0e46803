"""PyTorch's EfficientNet-Lite0 training step, the peer of
`crates/qn-models/examples/image_step_time.rs`: the same architecture (the independent definition
of `make_efficientnet_goldens.py`: TensorFlow "SAME" padding, batch norm eps 1e-3 in training mode,
ReLU6, no SE), 10 classes, random weights, one random batch, cross-entropy, AdamW; median step.

    python scripts/image_step_time_torch.py [image size] [batch] [steps] [threads]
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from make_efficientnet_goldens import blocks, same_conv  # noqa: E402


def lite0_params(classes):
    p = {}

    def conv(name, cout, cin, k):
        w = torch.empty(cout, cin, k, k)
        torch.nn.init.kaiming_normal_(w, mode="fan_out")
        p[name] = w

    def bn(name, c):
        p[name + ".weight"], p[name + ".bias"] = torch.ones(c), torch.zeros(c)

    conv("stem", 32, 3, 3)
    bn("bn0", 32)
    for i, a in enumerate(blocks(1.0, 1.0, True)):
        mid = a["cin"] * a["e"]
        if a["e"] != 1:
            conv(f"b{i}.expand", mid, a["cin"], 1)
            bn(f"b{i}.bn0", mid)
        conv(f"b{i}.dw", mid, 1, a["k"])
        bn(f"b{i}.bn1", mid)
        conv(f"b{i}.project", a["cout"], mid, 1)
        bn(f"b{i}.bn2", a["cout"])
    conv("head", 1280, 320, 1)
    bn("bn1", 1280)
    p["fc.weight"] = torch.randn(classes, 1280) * 0.01
    p["fc.bias"] = torch.zeros(classes)
    for v in p.values():
        v.requires_grad_()
    stats = {}
    return p, stats


def forward(p, stats, x):
    def bn(h, name):
        c = h.shape[1]
        rm, rv = stats.setdefault(name, (torch.zeros(c), torch.ones(c)))
        return F.batch_norm(h, rm, rv, p[name + ".weight"], p[name + ".bias"], training=True,
                            momentum=0.01, eps=1e-3)

    x = F.relu6(bn(same_conv(x, p["stem"], None, 2, 1), "bn0"))
    for i, a in enumerate(blocks(1.0, 1.0, True)):
        h = x
        if a["e"] != 1:
            h = F.relu6(bn(same_conv(h, p[f"b{i}.expand"], None, 1, 1), f"b{i}.bn0"))
        h = F.relu6(bn(same_conv(h, p[f"b{i}.dw"], None, a["s"], h.shape[1]), f"b{i}.bn1"))
        h = bn(same_conv(h, p[f"b{i}.project"], None, 1, 1), f"b{i}.bn2")
        if a["s"] == 1 and a["cin"] == a["cout"]:
            h = h + x
        x = h
    x = F.relu6(bn(same_conv(x, p["head"], None, 1, 1), "bn1"))
    x = F.dropout(x.mean((2, 3)), 0.2, training=True)
    return F.linear(x, p["fc.weight"], p["fc.bias"])


def main():
    arg = lambda i, d: int(sys.argv[i]) if len(sys.argv) > i else d  # noqa: E731
    size, batch, steps, threads = arg(1, 64), arg(2, 32), arg(3, 12), arg(4, 2)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    p, stats = lite0_params(10)
    opt = torch.optim.AdamW(p.values(), lr=1e-4)
    x = torch.randn(batch, 3, size, size)
    y = torch.arange(batch) % 10
    runs = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(p, stats, x), y).backward()
        opt.step()
        runs.append(time.perf_counter() - t)
    runs = sorted(runs[1:])
    print(f"pytorch {torch.__version__}, {threads} threads: EfficientNet-Lite0 at {size} px, "
          f"batch {batch}: median {runs[len(runs) // 2]:.3f} s/step (fastest {runs[0]:.3f})")


if __name__ == "__main__":
    main()
