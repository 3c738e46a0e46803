"""Checks that `qn decompress` writes directories Hugging Face loads as they are.

For the tiny RoBERTa of assets/ (and all-MiniLM-L6-v2 with --data), compresses with `qn compress
--method int8`, decompresses to a directory, loads it with
AutoModelForSequenceClassification.from_pretrained(..., output_loading_info=True) and AutoTokenizer,
and compares transformers' logits with `qn predict --json` on the same .qnz. Writes
assets/golden/hf-load-check.json, which tests/cli_encoder.rs reads (CI has no torch).

Run:  /tmp/ref/bin/python scripts/check_hf_load.py --qn target/release/qn [--data $QN_DATA_DIR]
"""
import argparse
import json
import pathlib
import subprocess
import tempfile

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEXTS = ["a charming and often affecting journey", "unflinchingly bleak and desperate",
         "the film is strictly routine", "it 's a cookie-cutter movie"]


def check(qn, model, work):
    qnz = work / "model.qnz"
    out = work / "hf"
    subprocess.run([qn, "compress", "--model", str(model), "--method", "int8", "-o", str(qnz)], check=True)
    subprocess.run([qn, "decompress", str(qnz), "-o", str(out)], check=True)
    hf, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    tok = AutoTokenizer.from_pretrained(out)
    hf.eval()
    with torch.no_grad():
        logits = hf(**tok(TEXTS, padding=True, return_tensors="pt")).logits
    args = [qn, "predict", "--model", str(qnz), "--json"]
    for t in TEXTS:
        args += ["--text", t]
    ours = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
    ours = torch.tensor([p["logits"] for p in ours["predictions"]])
    sd = hf.state_dict()
    return {
        "architecture": type(hf).__name__,
        "missing_keys": sorted(info["missing_keys"]),
        "unexpected_keys": sorted(info["unexpected_keys"]),
        "mismatched_keys": sorted(str(k) for k in info["mismatched_keys"]),
        "tensors": sorted(k for k in sd if not k.endswith("position_ids")),
        "max_abs_logit_diff": float((logits - ours).abs().max()),
        "labels": [hf.config.id2label[i] for i in range(hf.config.num_labels)],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qn", required=True)
    ap.add_argument("--data", default=None)
    a = ap.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as d:
        (pathlib.Path(d) / "tiny").mkdir()
        result["tiny-roberta"] = check(a.qn, ROOT / "assets" / "tiny-roberta", pathlib.Path(d) / "tiny")
        if a.data:
            (pathlib.Path(d) / "minilm").mkdir()
            result["all-MiniLM-L6-v2"] = check(a.qn, pathlib.Path(a.data) / "models" / "all-MiniLM-L6-v2",
                                               pathlib.Path(d) / "minilm")
    path = ROOT / "assets" / "golden" / "hf-load-check.json"
    path.write_text(json.dumps(result, indent=1))
    for k, v in result.items():
        print(k, v["architecture"], "missing", v["missing_keys"], "unexpected", v["unexpected_keys"],
              "max |Δlogit|", v["max_abs_logit_diff"])


if __name__ == "__main__":
    main()
