"""PyTorch + transformers training-step time of an encoder built from a config.json alone (random
weights, random ids, batch x len tokens without padding, AdamW): the peer of
`cargo run --release -p qn-models --example config_step_time`.

Run:  <venv>/bin/python scripts/step_time_torch_config.py assets/configs/roberta-base.json [steps] [batch] [len] [threads]
"""
import json
import statistics
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

path = sys.argv[1]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 4
batch = int(sys.argv[3]) if len(sys.argv) > 3 else 32
length = int(sys.argv[4]) if len(sys.argv) > 4 else 64
torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 2)
raw = json.load(open(path))
config = AutoConfig.for_model(raw.pop("model_type"), **raw, num_labels=2)
torch.manual_seed(0)
model = AutoModelForSequenceClassification.from_config(config)
model.train()
params = sum(p.numel() for p in model.parameters())
opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
times = []
for s in range(steps + 1):
    ids = torch.randint(4, config.vocab_size, (batch, length))
    y = torch.arange(batch) % 2
    t0 = time.perf_counter()
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=y).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if s > 0:
        times.append(time.perf_counter() - t0)
print(f"pytorch {torch.__version__} {config.model_type} ({params} parameters): median of {steps} steps "
      f"{statistics.median(times):.3f} s/step, batch {batch} x {length} tokens, {torch.get_num_threads()} threads")
