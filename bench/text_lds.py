#!/usr/bin/env python3
"""LDS of TRAK and TRAK-WOMP on a language model, for both causal-lm output functions.

    python bench/text_lds.py WORK             # about 30 minutes on 2 cores; rerun to resume
    python bench/text_lds.py WORK --smoke     # every stage on tiny settings, a few minutes

Setting: `fortunes-mini` (2,000 train texts, the 200 test texts as targets, byte tokenizer), the
built-in gpt (width 64, 2 layers, 4 heads) trained with the causal-lm recipe on random halves:
1 reference model and 50 LDS models (in two shard processes). Features at d = 16,384 (64 SJLT
blocks of 256), one store per output function: `sequence` (p = exp(-L)) trains the models;
`token` (p = exp(-L/T)) featurizes the same reference model (training does not depend on the
output function) and is scored against the same LDS models through score files. A target's
f under either output is a decreasing function of its loss L, so both rank the LDS models alike
and share their ground truth.

Views are chosen on the even LDS models (`--half 0`) and every number is reported on the odd
ones (`--half 1`); intervals are 95% bootstraps over targets, differences paired. Training runs
`trakwomp train` in processes (two shards for the LDS models); the later stages are the same
library calls, made in this process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

TRAKWOMP = [sys.executable, "-m", "trakwomp.cli.main"]
OUTPUTS = ("sequence", "token")
FULL = {"lds_models": 50, "blocks": 64, "block_dim": 256, "epochs": None, "train": None, "targets": None,
        "trak_dims": (256, 512, 1024, 1536), "womp": ((16384, 16), (16384, 32), (16384, 64), (8192, 32), (4096, 16))}
SMOKE = {"lds_models": 8, "blocks": 16, "block_dim": 16, "epochs": 1, "train": 200, "targets": 20,
         "trak_dims": (32, 64), "womp": ((256, 16), (256, 4))}
DEFAULT_VIEW = (16384, 16)  # the shape of the default projector: 16 blocks of 1,024


def run(*args: str) -> str:
    print("+ trakwomp", " ".join(args), flush=True)
    return subprocess.run([*TRAKWOMP, *args], check=True, stdout=subprocess.PIPE, text=True).stdout


def data_flags(work: Path, s: dict) -> tuple[list[str], list[str]]:
    """--data and --targets flags, with index files for the smoke setting."""
    if s["train"] is None:
        return ["--data", "fortunes-mini:train"], ["--targets", "fortunes-mini:test"]
    import numpy as np

    np.save(work / "train.npy", np.arange(s["train"]))
    np.save(work / "targets.npy", np.arange(s["targets"]))
    return (["--data", "fortunes-mini:train", "--indices", str(work / "train.npy")],
            ["--targets", "fortunes-mini:test", "--target-indices", str(work / "targets.npy")])


def prepare(work: Path, s: dict) -> None:
    data, targets = data_flags(work, s)
    recipe = ["--epochs", str(s["epochs"])] if s["epochs"] else []
    sequence, token = work / "sequence", work / "token"
    run("train", str(sequence), "--task", "causal-lm", "--lm-output", "sequence", *data, *recipe, "-q")
    shards = [subprocess.Popen([*TRAKWOMP, "train", str(sequence), "--task", "causal-lm", "--lm-output", "sequence",
                                *data, *recipe, "--role", "lds",
                                "--num-models", str(s["lds_models"]), *targets, "--shard", f"{k}/2", "-q"]) for k in range(2)]
    if any(p.wait() for p in shards):
        raise SystemExit("an LDS training shard failed")
    projector = ["--blocks", str(s["blocks"]), "--block-dim", str(s["block_dim"])]
    run("featurize", str(sequence), *projector, "-q")
    checkpoint = work / "reference0.pt"
    if not checkpoint.exists():
        export = ("import sys, torch; from trakwomp import load_reference_model\n"
                  "torch.save(load_reference_model(sys.argv[1], 0, 257).state_dict(), sys.argv[2])")
        subprocess.run([sys.executable, "-c", export, str(sequence), str(checkpoint)], check=True)
    run("featurize", str(token), *data, "--model", "gpt", "--task", "causal-lm", "--lm-output", "token",
        "--checkpoint", str(checkpoint), *projector, "-q")


def views(s: dict) -> list[tuple[int, int]]:
    return [(d, 1) for d in s["trak_dims"]] + list(s["womp"]) + ([DEFAULT_VIEW] if s["train"] is None else [])


def score_all(work: Path, s: dict) -> dict[str, dict[tuple[int, int], Path]]:
    """Every view finalized and scored in both stores, its scores exported to an .npy file."""
    from trakwomp import ViewSpec, finalize, load_dataset, score
    from trakwomp.stages.export import export_scores

    targets = load_dataset("fortunes-mini:test", indices=work / "targets.npy" if s["targets"] else None)
    files: dict[str, dict[tuple[int, int], Path]] = {name: {} for name in OUTPUTS}
    for name in OUTPUTS:
        for d, b in dict.fromkeys(views(s)):
            out = work / f"{name}-d{d}-b{b}.npy"
            print(f"finalize and score {name} d={d} B={b}", flush=True)
            finalize(work / name, ViewSpec(d, b, 0.0))  # no ridge and no threshold, as documented
            export_scores(work / name, score(work / name, targets, ViewSpec(d, b, 0.0)).key, out, threshold=0.0)
            files[name][(d, b)] = out
    return files


def lds(work: Path, half: int, files: list[Path]) -> dict:
    """LDS of score files against the LDS models (all in the sequence store) of one half."""
    from trakwomp import lds as lds_report

    return lds_report(work / "sequence", [], score_files=files, half=half).as_dict()


def evaluate(work: Path, s: dict) -> dict:
    files = score_all(work, s)
    table = {}
    for name in OUTPUTS:
        candidates = list(files[name])
        chosen = lds(work, 0, [files[name][v] for v in candidates])["results"]
        by_view = dict(zip(candidates, (r["lds"] for r in chosen), strict=True))
        best_trak = max((v for v in candidates if v[1] == 1), key=by_view.get)
        best_womp = max((v for v in candidates if v[1] > 1), key=by_view.get)
        reported = [best_trak, best_womp] + ([DEFAULT_VIEW] if DEFAULT_VIEW in candidates else [])
        report = lds(work, 1, [files[name][v] for v in reported])
        table[name] = {"views": [list(v) for v in reported], "half0": {f"d{d}-b{b}": x for (d, b), x in by_view.items()},
                       "half1": report}
    (work / "results.json").write_text(json.dumps(table, indent=1))
    return table


def markdown(table: dict) -> str:
    lines = ["| output | TRAK (best d) | LDS | TRAK-WOMP view | LDS | WOMP minus TRAK |", "|---|---|---|---|---|---|"]
    for name, entry in table.items():
        results, diffs = entry["half1"]["results"], entry["half1"]["paired_differences"]
        trak_view, *womp_views = entry["views"]
        kinds = ("best", "default")[:len(womp_views)]  # (the default view only where it was a candidate)
        for kind, view, result, diff in zip(kinds, womp_views, results[1:], diffs, strict=True):
            lines.append(f"| {name} | d={trak_view[0]} | {cell(results[0])} | {kind}: d={view[0]} B={view[1]} | "
                         f"{cell(result)} | {diff['difference']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}] |")
    return "\n".join(lines)


def cell(result: dict) -> str:
    return f"{result['lds']:.3f} [{result['ci95'][0]:.3f}, {result['ci95'][1]:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    setting = SMOKE if args.smoke else FULL
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work, setting)
    table = evaluate(args.work, setting)
    text = markdown(table)
    (args.work / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
