#!/usr/bin/env python3
"""Attributing LoRA fine-tunes, with a known answer: who said it, in two stages.

    python bench/lora.py WORK             # about an hour on 2 cores; rerun to resume
    python bench/lora.py WORK --smoke     # every stage on tiny settings, a few minutes

Data: `scripts/fortune_authors.py` (prompt "<quote>\\n-- ", completion "<author>\\n"; 2 quotes of
each author held out as targets).

Stage 1, the base (`scripts/lora_base.py`): a Hugging Face GPT-2 (width 64, 2 layers, 4 heads,
a byte-level BPE of 512 tokens trained on the quotes) pretrained on the train quotes alone,
without their authors (8 epochs), saved as a Hugging Face folder: a base that knows the quotes'
language but not who said them.

Stage 2, the fine-tunes, on the author pairs (loss on the completion), 1 reference model and
LDS_MODELS LDS models on random halves, two shard processes each:
- `lora`: `--lora 8` on every attention and MLP projection (c_attn, c_proj, c_fc), peak lr 1e-2;
  the store keeps the adapters; attributed over the adapter weights (the default) and, from the
  same models, over every weight (`--params '*'`: the base's gradients too).
- `full`: full fine-tunes of the same base (the causal-lm recipe, peak lr 3e-3).

(a) LDS of each attribution at TRAK (B = 1) and TRAK-WOMP views at the defaults (ridge auto,
    threshold 0.25): the TRAK d and the WOMP view chosen on the even LDS models, reported on the
    odd ones; and the default view (d = 16,384 in 16 blocks) on the odd ones; beside the
    baselines gradcos (of each attribution's features), repsim and bm25, paired against TRAK's.
(b) Author precision at 10 of each attribution at the default view, against TF-IDF cosine and
    the hidden-state cosine of the LoRA reference model and of the base, and against chance.
Intervals are 95% bootstraps over targets (2,000 resamples); differences are paired.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from answers import MAKE_DATA, TRAKWOMP, interval, lds_table, precision_at_10, run, tfidf  # noqa: E402

MAKE_BASE = Path(__file__).resolve().parents[1] / "scripts" / "lora_base.py"

FULL = {"lds_models": 40, "authors": None, "pretrain_epochs": 8, "epochs": None,
        "trak_dims": (256, 1024, 4096, 8192), "womp": ((16384, 16), (16384, 32), (8192, 16)),
        "projector": ["--blocks", "64", "--block-dim", "256"], "default_view": (16384, 16)}
SMOKE = {"lds_models": 6, "authors": 12, "pretrain_epochs": 1, "epochs": 1, "trak_dims": (64, 128),
         "womp": ((256, 16), (256, 4)), "projector": ["--blocks", "16", "--block-dim", "16"], "default_view": (256, 16)}
SETTINGS = {"lora": ["--lora", "8", "--lora-targets", "c_attn,c_proj,c_fc", "--lr", "1e-2"], "full": []}
ATTRIBUTIONS = {"lora": ("lora", []), "lora, every weight": ("lora-all", ["--params", "*"]), "full": ("full", [])}


def fine_tunes(work: Path, base: Path, s: dict) -> None:
    """Stage 2: per setting, the reference model and the LDS models (two shards), then features."""
    data = ["--data", f"jsonl:{work / 'train.jsonl'}", "--tokenizer", f"hf:{base}", "--model", f"hf:{base}"]
    recipe = ["--epochs", str(s["epochs"])] if s["epochs"] else []
    for setting, options in SETTINGS.items():
        store = str(work / setting)
        run("train", store, "--task", "causal-lm", *data, *options, *recipe, "-q")
        shards = [subprocess.Popen([*TRAKWOMP, "train", store, "--task", "causal-lm", *data, *options, *recipe,
                                    "--role", "lds", "--num-models", str(s["lds_models"]),
                                    "--targets", f"jsonl:{work / 'targets.jsonl'}", "--shard", f"{k}/2", "-q"])
                  for k in range(2)]
        if any(p.wait() for p in shards):
            raise SystemExit(f"an LDS training shard of {setting} failed")
    if not (work / "lora-all").exists():  # the LoRA models again, attributed over every weight
        subprocess.run(["cp", "-r", str(work / "lora"), str(work / "lora-all")], check=True)
    for store, params in ATTRIBUTIONS.values():
        run("featurize", str(work / store), *s["projector"], *params, "-q")


def hidden_cosine(base: Path, texts: list[str], train_count: int, lora_store: Path | None = None) -> np.ndarray:
    """Target x train cosine of the last hidden state (mean over tokens) of the base, or of the
    LoRA reference model of `lora_store` (the base with its stored adapter)."""
    import torch
    import transformers
    from trakwomp import load_reference_model

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base))
    net = load_reference_model(lora_store, 0, len(tokenizer)).model if lora_store else \
        transformers.AutoModelForCausalLM.from_pretrained(str(base)).eval()
    with torch.no_grad():
        states = [net(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states[-1][0].mean(0)
                  for text in texts]
    vectors = torch.stack(states).double().numpy()
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors[train_count:] @ vectors[:train_count].T


def author_precision(work: Path, base: Path, targets, s: dict) -> dict:
    """(b) at the default view."""
    from trakwomp import ViewSpec, score
    from trakwomp.stages.export import export_scores

    view = ViewSpec(*s["default_view"])
    train_rows = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    target_rows = [json.loads(line) for line in (work / "targets.jsonl").read_text().splitlines()]
    train_authors, target_authors = (np.array([r["source"] for r in rows]) for rows in (train_rows, target_rows))
    similarities = {}
    for name, (store, _) in ATTRIBUTIONS.items():
        out = work / f"scores-{store}.npy"
        export_scores(work / store, score(work / store, targets, view).key, out)
        similarities[f"TRAK-WOMP, {name}"] = np.load(out)
    whole = [r["prompt"] + r["completion"] for r in train_rows + target_rows]
    vectors = tfidf(whole)
    similarities["TF-IDF cosine, quote and author"] = vectors[len(train_rows):] @ vectors[:len(train_rows)].T
    quotes = [r["prompt"] for r in train_rows + target_rows]
    similarities["hidden-state cosine, LoRA reference model"] = hidden_cosine(base, quotes, len(train_rows),
                                                                              work / "lora")
    similarities["hidden-state cosine, the base"] = hidden_cosine(base, quotes, len(train_rows))
    precision = {k: precision_at_10(v, train_authors, target_authors) for k, v in similarities.items()}
    first = precision["TRAK-WOMP, lora"]
    chance = float(np.mean([(train_authors == a).mean() for a in target_authors]))
    return {"chance": chance, **{k: {"precision_at_10": interval(v), "minus_lora": interval(v - first)}
                                 for k, v in precision.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny settings: every stage in a few minutes")
    args = parser.parse_args()
    s = SMOKE if args.smoke else FULL
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "targets.jsonl").exists():
        authors = ["--authors", str(s["authors"])] if s["authors"] else []
        subprocess.run([sys.executable, str(MAKE_DATA), str(args.work), *authors], check=True)
    base = args.work / "base"
    if not (base / "model.safetensors").exists():
        subprocess.run([sys.executable, str(MAKE_BASE), str(args.work), "--epochs", str(s["pretrain_epochs"])], check=True)
    fine_tunes(args.work, base, s)
    from trakwomp import load_dataset

    targets = load_dataset(f"jsonl:{args.work / 'targets.jsonl'}", tokenizer=f"hf:{base}")
    report = {"lds": {name: lds_table(args.work / store, targets, s) for name, (store, _) in ATTRIBUTIONS.items()},
              "author_precision": author_precision(args.work, base, targets, s)}
    (args.work / "lora.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
