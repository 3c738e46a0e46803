"""Golden outputs for the encoder parity tests (qn-models), from Hugging Face transformers.

Writes, under assets/:
  tiny-roberta/          a small randomly initialised RobertaForSequenceClassification (seeded)
                         with a byte-level BPE tokenizer trained on SST-2 sentences;
  golden/tiny-roberta.json  token ids, logits and last hidden states for single sentences and
                         sentence pairs (padded batch, fp32, CPU);
  golden/minilm.json     all-MiniLM-L6-v2 (from $QN_DATA_DIR/models or --minilm): mean-pooled,
                         L2-normalised embeddings, and hidden states / pooler output of a pair.

Run:  python -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers tokenizers numpy
      /tmp/ref/bin/python scripts/make_encoder_goldens.py --data $QN_DATA_DIR
CI never runs this; it reads the committed outputs.
"""
import argparse
import json
import os
import pathlib

import torch
from tokenizers import ByteLevelBPETokenizer, processors
from transformers import (AutoModel, AutoTokenizer, RobertaConfig,
                          RobertaForSequenceClassification, RobertaTokenizerFast)

ROOT = pathlib.Path(__file__).resolve().parent.parent
SENTENCES = ["This is a test sentence.", "a charming and often affecting journey",
             "unflinchingly bleak and desperate", "Hello"]
PAIRS = [("The cat sat on the mat.", "A cat is sitting."),
         ("Dana Reeve died of lung cancer.", "Christopher Reeve had an accident.")]


def tolist(t):
    return [round(float(v), 7) for v in t.flatten().tolist()]


def tiny_roberta(data_dir: pathlib.Path, out: pathlib.Path, golden: pathlib.Path):
    lines = (data_dir / "data" / "sst2" / "train.tsv").read_text().splitlines()[1:3001]
    corpus = [l.split("\t")[0] for l in lines]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=1000, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    inner = bpe._tokenizer
    inner.post_processor = processors.RobertaProcessing(("</s>", inner.token_to_id("</s>")),
                                                        ("<s>", inner.token_to_id("<s>")))
    tok = RobertaTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>",
                               sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                               pad_token="<pad>", mask_token="<mask>", model_max_length=64)
    assert tok.pad_token_id == 1 and len(tok) == inner.get_vocab_size(), (tok.pad_token_id, len(tok))
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=66, type_vocab_size=1,
                        num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"},
                        label2id={"neg": 0, "neu": 1, "pos": 2}, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2)
    model = RobertaForSequenceClassification(cfg).eval()
    # Random init leaves LayerNorm at 1/0 and biases at 0: perturb them so the test sees them.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "LayerNorm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    result = {}
    for name, batch in [("single", tok(SENTENCES, padding=True, return_tensors="pt")),
                        ("pair", tok([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True,
                                     return_tensors="pt"))]:
        with torch.no_grad():
            o = model(**batch, output_hidden_states=True)
        result[name] = {
            "input_ids": batch["input_ids"].tolist(),
            "attention_mask": batch["attention_mask"].tolist(),
            "logits": tolist(o.logits),
            "last_hidden_state": tolist(o.hidden_states[-1]),
            "shape": list(o.hidden_states[-1].shape),
        }
    result["sentences"], result["pairs"] = SENTENCES, PAIRS
    golden.write_text(json.dumps(result))


def minilm(model_dir: pathlib.Path, golden: pathlib.Path):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    pair = tok(*PAIRS[0], return_tensors="pt")
    with torch.no_grad():
        po = model(**pair)
    golden.write_text(json.dumps({
        "sentences": SENTENCES,
        "input_ids": batch["input_ids"].tolist(),
        "embeddings": [tolist(e) for e in emb],
        "pair": list(PAIRS[0]),
        "pair_input_ids": pair["input_ids"].tolist(),
        "pair_token_type_ids": pair["token_type_ids"].tolist(),
        "pair_last_hidden_state": tolist(po.last_hidden_state),
        "pair_pooler_output": tolist(po.pooler_output),
    }))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("QN_DATA_DIR"), required=False)
    ap.add_argument("--minilm", default=None)
    a = ap.parse_args()
    data = pathlib.Path(a.data)
    minilm_dir = pathlib.Path(a.minilm) if a.minilm else data / "models" / "all-MiniLM-L6-v2"
    (ROOT / "assets" / "golden").mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    tiny_roberta(data, ROOT / "assets" / "tiny-roberta", ROOT / "assets" / "golden" / "tiny-roberta.json")
    minilm(minilm_dir, ROOT / "assets" / "golden" / "minilm.json")


if __name__ == "__main__":
    main()
