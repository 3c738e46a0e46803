"""PyTorch + transformers training-step time of all-MiniLM-L6-v2 on SST-2 (batch 32, <= 64 tokens,
dynamic padding, AdamW), the peer of `cargo run --release -p qn-models --example step_time`.
Same rows (the seeded 32*steps subset is not reproduced exactly: the first 32*steps rows of
train.tsv are used, whose lengths match SST-2's distribution), same thread count.

Run:  /tmp/ref/bin/python scripts/step_time_torch.py $QN_DATA_DIR [steps] [threads]
"""
import pathlib
import statistics
import sys
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

root = pathlib.Path(sys.argv[1])
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 10
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
model_dir = root / "models" / "all-MiniLM-L6-v2"
rows = [l.split("\t") for l in (root / "data" / "sst2" / "train.tsv").read_text().splitlines()[1:32 * steps + 1]]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
times = []
for s in range(steps):
    batch = rows[32 * s:32 * (s + 1)]
    enc = tok([r[0] for r in batch], truncation=True, max_length=64, padding=True, return_tensors="pt")
    y = torch.tensor([int(r[1]) for r in batch])
    t0 = time.perf_counter()
    loss = model(**enc, labels=y).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    times.append(time.perf_counter() - t0)
print(f"pytorch {torch.__version__}: median of {steps} steps {statistics.median(times[1:]):.3f} s/step "
      f"({torch.get_num_threads()} threads)")
