"""Golden outputs for the EfficientNet parity tests (crates/qn-models/tests/efficientnet_parity.rs).

An independent PyTorch implementation of EfficientNet as EfficientNet-PyTorch defines it (static
TensorFlow "SAME" padding, batch norm eps 1e-3, swish + squeeze-excitation for B, ReLU6 and no SE
for Lite), run in eval mode on a deterministic synthetic image:

1. the shared pretrained EfficientNet-Lite0 (`--lite0 <model.safetensors>`), 224 x 224 input;
2. a small randomly initialised B0-style network with squeeze-excitation (width 0.25, depth 0.5,
   10 classes, random batch-norm statistics), 64 x 64 input, whose weights are written to
   `assets/golden/efficientnet-tiny-b0.safetensors` (a few hundred KB).

Writes `assets/golden/efficientnet.json`. Needs torch, numpy and safetensors; CI never runs it.

    python scripts/make_efficientnet_goldens.py --lite0 $QN_DATA_DIR/models/efficientnet-lite0/model.safetensors
"""
import argparse
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

B0_STAGES = [  # repeats, kernel, stride, expand, in, out
    (1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


def round_filters(f, width):
    f = f * width
    new = max(8, int(f + 4) // 8 * 8)
    if new < 0.9 * f:
        new += 8
    return new


def blocks(width, depth, lite):
    out = []
    for i, (r, k, s, e, cin, cout) in enumerate(B0_STAGES):
        reps = r if lite and i in (0, len(B0_STAGES) - 1) else int(math.ceil(depth * r))
        cin = 32 if (lite and i == 0) else round_filters(cin, width)
        cout = round_filters(cout, width)
        for j in range(reps):
            out.append(dict(k=k, s=s if j == 0 else 1, e=e, cin=cin if j == 0 else cout, cout=cout))
    return out


def same_conv(x, w, b, stride, groups):
    ih, iw = x.shape[-2:]
    k = w.shape[-1]
    oh, ow = math.ceil(ih / stride), math.ceil(iw / stride)
    ph = max((oh - 1) * stride + k - ih, 0)
    pw = max((ow - 1) * stride + k - iw, 0)
    x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    return F.conv2d(x, w, b, stride=stride, groups=groups)


def bn(x, sd, p):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                        sd[p + ".bias"], training=False, eps=1e-3)


def forward(sd, x, width, depth, lite):
    act = (lambda t: F.relu6(t)) if lite else (lambda t: t * torch.sigmoid(t))
    x = act(bn(same_conv(x, sd["_conv_stem.weight"], None, 2, 1), sd, "_bn0"))
    for i, a in enumerate(blocks(width, depth, lite)):
        p = f"_blocks.{i}."
        h = x
        if a["e"] != 1:
            h = act(bn(same_conv(h, sd[p + "_expand_conv.weight"], None, 1, 1), sd, p + "_bn0"))
        mid = h.shape[1]
        h = act(bn(same_conv(h, sd[p + "_depthwise_conv.weight"], None, a["s"], mid), sd, p + "_bn1"))
        if not lite:
            s = h.mean((2, 3), keepdim=True)
            s = F.conv2d(s, sd[p + "_se_reduce.weight"], sd[p + "_se_reduce.bias"])
            s = s * torch.sigmoid(s)
            s = F.conv2d(s, sd[p + "_se_expand.weight"], sd[p + "_se_expand.bias"])
            h = h * torch.sigmoid(s)
        h = bn(same_conv(h, sd[p + "_project_conv.weight"], None, 1, 1), sd, p + "_bn2")
        if a["s"] == 1 and a["cin"] == a["cout"]:
            h = h + x
        x = h
    x = act(bn(same_conv(x, sd["_conv_head.weight"], None, 1, 1), sd, "_bn1"))
    x = x.mean((2, 3))
    return F.linear(x, sd["_fc.weight"], sd["_fc.bias"])


def synthetic_image(size):
    """The same deterministic input as the Rust test: x[c, h, w] = sin(0.05 (c + 1) h + 0.03 w)."""
    c, h, w = np.meshgrid(np.arange(3), np.arange(size), np.arange(size), indexing="ij")
    return torch.tensor(np.sin(0.05 * (c + 1) * h + 0.03 * w), dtype=torch.float32)[None]


def tiny_b0(width, depth, classes):
    g = torch.Generator().manual_seed(0)
    sd = {}

    def conv(name, cout, cin, k, bias=False):
        bound = 1 / math.sqrt(cin * k * k)
        sd[name + ".weight"] = (torch.rand(cout, cin, k, k, generator=g) * 2 - 1) * bound
        if bias:
            sd[name + ".bias"] = (torch.rand(cout, generator=g) * 2 - 1) * bound

    def norm(name, c):
        sd[name + ".weight"] = 0.5 + torch.rand(c, generator=g)
        sd[name + ".bias"] = torch.randn(c, generator=g) * 0.1
        sd[name + ".running_mean"] = torch.randn(c, generator=g) * 0.1
        sd[name + ".running_var"] = 0.5 + torch.rand(c, generator=g)

    stem = round_filters(32, width)
    conv("_conv_stem", stem, 3, 3)
    norm("_bn0", stem)
    bl = blocks(width, depth, False)
    for i, a in enumerate(bl):
        p = f"_blocks.{i}."
        mid = a["cin"] * a["e"]
        if a["e"] != 1:
            conv(p + "_expand_conv", mid, a["cin"], 1)
            norm(p + "_bn0", mid)
        conv(p + "_depthwise_conv", mid, 1, a["k"])
        norm(p + "_bn1", mid)
        sq = max(1, int(a["cin"] * 0.25))
        conv(p + "_se_reduce", sq, mid, 1, bias=True)
        conv(p + "_se_expand", mid, sq, 1, bias=True)
        conv(p + "_project_conv", a["cout"], mid, 1)
        norm(p + "_bn2", a["cout"])
    head = round_filters(1280, width)
    conv("_conv_head", head, bl[-1]["cout"], 1)
    norm("_bn1", head)
    # A large classifier, so that logits are O(1) and a 1e-3 tolerance means something.
    sd["_fc.weight"] = torch.randn(classes, head, generator=g) * (8 / math.sqrt(head))
    sd["_fc.bias"] = torch.randn(classes, generator=g) * 0.1
    return sd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lite0", required=True)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "assets", "golden"))
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    out = {"torch": torch.__version__, "input": "sin(0.05 (c + 1) h + 0.03 w)"}

    lite = {k: v.float() for k, v in load_file(args.lite0).items() if "num_batches" not in k}
    y = forward(lite, synthetic_image(224), 1.0, 1.0, True)[0]
    out["lite0"] = {"size": 224, "logits": y.tolist(), "argmax": int(y.argmax())}

    width, depth, classes = 0.25, 0.5, 10
    sd = tiny_b0(width, depth, classes)
    save_file({k: v.contiguous() for k, v in sd.items()},
              os.path.join(args.out, "efficientnet-tiny-b0.safetensors"))
    y = forward(sd, synthetic_image(64), width, depth, False)[0]
    out["tiny_b0"] = {"size": 64, "width": width, "depth": depth, "classes": classes,
                      "logits": y.tolist()}
    with open(os.path.join(args.out, "efficientnet.json"), "w") as f:
        json.dump(out, f, indent=1)
    print("lite0 argmax", out["lite0"]["argmax"], "tiny b0 logits", [round(v, 4) for v in y.tolist()])


if __name__ == "__main__":
    main()
