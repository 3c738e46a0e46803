"""Golden outputs for loading EfficientNet checkpoints in torchvision's and timm's layouts
(crates/qn-models/tests/efficientnet_layouts.rs): the libraries' own models, small and randomly
initialised (width 0.1, depth 0.25, 10 classes, random batch-norm statistics, weights rounded
to float16 and stored so), run in eval mode on
the synthetic image of make_efficientnet_goldens.py at 64 x 64:

- torchvision `EfficientNet` with B0's stage list (symmetric padding, batch norm eps 1e-5);
- timm `efficientnet_b0` (the same conventions, timm's names);
- timm `tf_efficientnet_b0` (TensorFlow "SAME" padding, eps 1e-3, timm's names);
- timm `efficientnet_lite0` (ReLU6, no squeeze-excitation).

Writes each state dict to `assets/golden/efficientnet-<name>.safetensors` (float16, under 200 KB) and the
logits to `assets/golden/efficientnet-layouts.json`. Needs torch, torchvision, timm, safetensors;
CI never runs it.

    python scripts/make_efficientnet_layout_goldens.py
"""
import json
import math
import os

import timm
import torch
import torchvision
from safetensors.torch import save_file
from timm.models import efficientnet as timm_effnet
from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

WIDTH, DEPTH, CLASSES, SIZE = 0.1, 0.25, 10, 64
OUT = os.path.join(os.path.dirname(__file__), "..", "assets", "golden")


def synthetic_image(size):
    x = torch.empty(1, 3, size, size, dtype=torch.float64)
    for c in range(3):
        for h in range(size):
            for w in range(size):
                x[0, c, h, w] = math.sin(0.05 * (c + 1) * h + 0.03 * w)
    return x.float()


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        # The committed files are float16: the logits are those of the rounded weights.
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
    model.eval()
    return model


def models():
    setting, last = _efficientnet_conf("efficientnet_b0", width_mult=WIDTH, depth_mult=DEPTH)
    yield "torchvision-b0", "torchvision", False, EfficientNet(setting, dropout=0.2, last_channel=last, num_classes=CLASSES)
    kw = dict(channel_multiplier=WIDTH, depth_multiplier=DEPTH, pretrained=False, num_classes=CLASSES)
    yield "timm-b0", "timm", False, timm_effnet._gen_efficientnet("efficientnet_b0", **kw)
    yield "timm-tf-b0", "timm", False, timm_effnet._gen_efficientnet(
        "tf_efficientnet_b0", bn_eps=1e-3, pad_type="same", **kw)
    yield "timm-lite0", "timm", True, timm_effnet._gen_efficientnet_lite("efficientnet_lite0", **kw)


def main():
    x = synthetic_image(SIZE)
    golden = {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
              "width": WIDTH, "depth": DEPTH, "classes": CLASSES, "size": SIZE, "models": {}}
    for i, (name, library, lite, model) in enumerate(models()):
        randomise(model, i)
        with torch.no_grad():
            logits = model(x)[0].tolist()
        state = {k: v.half().contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        save_file(state, os.path.join(OUT, f"efficientnet-{name}.safetensors"))
        golden["models"][name] = {"library": library, "lite": lite, "logits": logits}
        print(name, sum(v.numel() for v in state.values()), "values")
    with open(os.path.join(OUT, "efficientnet-layouts.json"), "w") as f:
        json.dump(golden, f, indent=1)


if __name__ == "__main__":
    main()
