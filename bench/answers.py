#!/usr/bin/env python3
"""Attributing answers, with a known answer: who said it.

    python bench/answers.py WORK             # about 30 minutes on 2 cores; rerun to resume
    python bench/answers.py WORK --smoke     # every stage on tiny settings, a few minutes

Data: `scripts/fortune_authors.py` (the shared fortunes that end in an attribution line, as
prompt/completion pairs: prompt "<quote>\\n-- ", completion "<author>\\n"; 2 quotes of each
author held out as targets; see the script).

Model: the built-in gpt (width 64, 2 layers, 4 heads, bytes), trained with the causal-lm recipe
on the completions only (the instruction-tuning convention): 1 reference model and 40 LDS models
on random halves (two shard processes). Features: sjlt at d = 16,384, stored as 64 blocks of 256
so that TRAK's small d are prefixes of them; the default view is the default projector's shape
(d = 16,384 in 16 blocks).

(a) LDS, f over the completion: TRAK (B = 1) at d in 256..16,384 and TRAK-WOMP views, at the
    defaults (ridge auto, threshold 0.25); the TRAK d and the WOMP view are chosen on the even
    LDS models (half 0) and reported on the odd ones (half 1), beside the baselines gradcos,
    repsim and bm25 (`lds --baseline`), paired against TRAK's best.
(b) Author precision at 10: the share of a target's 10 most supporting train examples (default
    view) that carry the target's own author, against cosine similarity of the reference
    model's last hidden states (mean over tokens) and of TF-IDF word vectors, each over the
    prompt (the quote) alone and over the whole text (quote and author), and against chance.
(c) The same for per-token attribution: each target's scores summed over the tokens of the
    author's name (`score --per-token`), each weighted by q_t = 1 - p_t (the answer's gradient is
    sum_t w_t grad f_t with w_t proportional to 1 - p_t within an answer; docs/method.md).
Intervals are 95% bootstraps over targets (2,000 resamples); differences are paired.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

TRAKWOMP = [sys.executable, "-m", "trakwomp.cli.main"]
MAKE_DATA = Path(__file__).resolve().parents[1] / "scripts" / "fortune_authors.py"
FULL = {"lds_models": 40, "authors": None, "epochs": None, "trak_dims": (256, 512, 1024, 2048, 4096, 8192, 16384),
        "womp": ((16384, 16), (16384, 32), (8192, 16)), "projector": ["--blocks", "64", "--block-dim", "256"],
        "default_view": (16384, 16)}
BASELINES = ("gradcos", "repsim", "bm25")  # the rows beside the reported views (`lds --baseline`)
SMOKE = {"lds_models": 6, "authors": 12, "epochs": 1, "trak_dims": (64, 128), "womp": ((256, 16), (256, 4)),
         "projector": ["--blocks", "16", "--block-dim", "16"], "default_view": (256, 16)}


def run(*args: str) -> None:
    print("+ trakwomp", " ".join(args), flush=True)
    subprocess.run([*TRAKWOMP, *args], check=True)


def prepare(work: Path, s: dict) -> None:
    if not (work / "targets.jsonl").exists():
        authors = ["--authors", str(s["authors"])] if s["authors"] else []
        subprocess.run([sys.executable, str(MAKE_DATA), str(work), *authors], check=True)
    store, data = str(work / "store"), ["--data", f"jsonl:{work / 'train.jsonl'}"]
    recipe = ["--epochs", str(s["epochs"])] if s["epochs"] else []
    run("train", store, "--task", "causal-lm", *data, *recipe, "-q")
    shards = [subprocess.Popen([*TRAKWOMP, "train", store, "--task", "causal-lm", *data, *recipe, "--role", "lds",
                                "--num-models", str(s["lds_models"]), "--targets", f"jsonl:{work / 'targets.jsonl'}",
                                "--shard", f"{k}/2", "-q"]) for k in range(2)]
    if any(p.wait() for p in shards):
        raise SystemExit("an LDS training shard failed")
    run("featurize", store, *s["projector"], "-q")


def lds_table(store: Path, targets, s: dict) -> dict:
    """(a): every view finalized and scored at the defaults; views chosen on half 0, reported on
    half 1 beside the baselines."""
    from trakwomp import ViewSpec, finalize, lds, score

    candidates = [ViewSpec(d, 1) for d in s["trak_dims"]] + [ViewSpec(d, b) for d, b in s["womp"]]
    for view in candidates:
        finalize(store, view)
        score(store, targets, view)
    half0 = {(v.dims, v.blocks): r["lds"] for v, r in zip(candidates, lds(store, candidates, half=0).as_dict()["results"], strict=True)}
    trak = max((v for v in candidates if v.blocks == 1), key=lambda v: half0[(v.dims, v.blocks)])
    womp = max((v for v in candidates if v.blocks > 1), key=lambda v: half0[(v.dims, v.blocks)])
    default = ViewSpec(*s["default_view"])
    reported = [trak, womp] + ([default] if default != womp else [])
    return {"half0": {f"d{d}-b{b}": x for (d, b), x in half0.items()}, "views": [[v.dims, v.blocks] for v in reported],
            "half1": lds(store, reported, half=1, baselines=BASELINES).as_dict()}


def precision_at_10(similarity: np.ndarray, train_authors: np.ndarray, target_authors: np.ndarray) -> np.ndarray:
    """Per target, the share of its 10 most similar (most supporting) train examples by its author."""
    top = np.argsort(-similarity, axis=1, kind="stable")[:, :10]
    return (train_authors[top] == target_authors[:, None]).mean(axis=1)


def interval(values: np.ndarray, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (2000, len(values)))].mean(axis=1)
    return [float(values.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def tfidf(texts: list[str]) -> np.ndarray:
    """Unit TF-IDF vectors over lower-cased words (smoothed idf, sublinear tf)."""
    words = [re.findall(r"[a-z0-9']+", t.lower()) for t in texts]
    vocabulary = {w: i for i, w in enumerate(sorted({w for ws in words for w in ws}))}
    counts = np.zeros((len(texts), len(vocabulary)))
    for row, ws in enumerate(words):
        for w in ws:
            counts[row, vocabulary[w]] += 1
    idf = np.log((1 + len(texts)) / (1 + (counts > 0).sum(axis=0))) + 1
    vectors = np.where(counts > 0, 1 + np.log(np.maximum(counts, 1)), 0) * idf
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def hidden_states(store: Path, texts: list[str]) -> np.ndarray:
    """Unit vectors: the reference model's final-layer-norm output, averaged over a text's tokens."""
    import torch
    from trakwomp import load_reference_model

    net = load_reference_model(store, 0, 257)
    states = []
    net.norm.register_forward_hook(lambda module, args, out: states.append(out[0].mean(0)))
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[256, *text.encode("utf-8")]])
            net(ids, torch.ones_like(ids, dtype=torch.bool))
    vectors = torch.stack(states).double().numpy()
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def author_precision(work: Path, s: dict) -> dict:
    """(b) and (c) at the default view."""
    from trakwomp import ViewSpec, load_dataset, score
    from trakwomp.stages.export import export_scores
    from trakwomp.store import Store, paths

    view = ViewSpec(*s["default_view"])
    store = work / "store"
    train_rows = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    target_rows = [json.loads(line) for line in (work / "targets.jsonl").read_text().splitlines()]
    train_authors, target_authors = (np.array([r["source"] for r in rows]) for rows in (train_rows, target_rows))
    targets = load_dataset(f"jsonl:{work / 'targets.jsonl'}")
    export_scores(store, score(store, targets, view).key, work / "scores.npy")
    tokens = targets.per_token()
    key = score(store, tokens, view, batch_size=32).key
    export_scores(store, key, work / "token-scores.npy")
    per_token = np.load(work / "token-scores.npy")
    handle = Store.open(store)  # q_t = 1 - p_t of each token: the answer's score is sum_t w_t tau_t, w_t ~ q_t
    q = handle.read_array(f"{paths.features(0, paths.targets_prefix(handle.manifest.scores[key].targets))}/q")
    name_rows = [[] for _ in range(len(targets))]  # per target, the rows of its name's tokens (bytes)
    for r, (t, _) in enumerate(tokens.rows):
        if tokens.describe(r)["token_position"] < len(target_authors[t].encode("utf-8")):
            name_rows[t].append(r)
    similarities = {"TRAK-WOMP, the answer (default view)": np.load(work / "scores.npy"),
                    "TRAK-WOMP, per token: the author's name, weighted by 1 - p_t":
                        np.stack([(q[r, None] * per_token[r]).sum(0) for r in name_rows])}
    for what, text in (("the quote", lambda r: r["prompt"]), ("quote and author", lambda r: r["prompt"] + r["completion"])):
        train_texts, target_texts = [text(r) for r in train_rows], [text(r) for r in target_rows]
        words = tfidf(train_texts + target_texts)
        similarities[f"TF-IDF cosine, {what}"] = words[len(train_texts):] @ words[:len(train_texts)].T
        states = hidden_states(store, train_texts + target_texts)
        similarities[f"hidden-state cosine, {what}"] = states[len(train_texts):] @ states[:len(train_texts)].T
    chance = np.array([(train_authors == a).mean() for a in target_authors])
    out = {"chance": interval(chance)}
    first = precision_at_10(similarities["TRAK-WOMP, the answer (default view)"], train_authors, target_authors)
    for name, similarity in similarities.items():
        values = precision_at_10(similarity, train_authors, target_authors)
        out[name] = {"precision": interval(values), "minus the answer's": interval(values - first)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    setting = SMOKE if args.smoke else FULL
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work, setting)
    from trakwomp import load_dataset

    targets = load_dataset(f"jsonl:{args.work / 'targets.jsonl'}")
    results = {"lds": once(args.work / "lds.json", lambda: lds_table(args.work / "store", targets, setting)),
               "author_precision_at_10": once(args.work / "precision.json", lambda: author_precision(args.work, setting))}
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


def once(path: Path, compute) -> dict:
    """What `compute` returned when it last finished (kept in `path`), else computed now."""
    if not path.exists():
        path.write_text(json.dumps(compute(), indent=1))
    return json.loads(path.read_text())


if __name__ == "__main__":
    main()
