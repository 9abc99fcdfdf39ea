#!/usr/bin/env python3
"""A 124M-parameter GPT-2-small end to end on this machine's CPU: featurize, finalize and score
with the factored projection within 8 GiB, and what the `sjlt` path does on the same model.

    python bench/gpt2_small.py WORK [--train 300] [--targets 60] [--threads 2]
    python bench/gpt2_small.py WORK --smoke     (the code path: the same steps on a one-layer,
                                                width-32 GPT-2 of 257 tokens, 24 + 8 texts, 4 x 4 per layer)

The model is Hugging Face's GPT2Config() (12 layers, width 768, 12 heads, vocabulary 50,257,
context 1,024: 124,439,808 parameters) with seeded random weights, saved offline to WORK (the cost
of a gradient does not depend on the weights' values). Texts: consecutive fortunes-mini train
texts joined until they pass 200 bytes, read with the byte tokenizer and cut to 128 tokens
(--max-length 128), so every sequence has 128 tokens. Each command runs as the CLI in its own
process, with --max-memory 8G; reported: its wall time (start-up, loading and writing the
model's weights into the store included), the examples/s it prints, and its peak RSS.

Configurations: factored at 16 x 16 per layer (block dim 256: 50 layers, d = 12,800) through
featurize (--batch-size 8), finalize (one block per layer) and score; `sjlt` with its defaults
(16 x 1,024), which the memory check refuses before any work; and `sjlt` at 1 x 1,024 with
--batch-size 1 on the first 16 texts, the most it can do within 8 GiB. Writes WORK/gpt2_small.json
and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAKWOMP = [sys.executable, "-m", "trakwomp.cli.main"]


def make_model(work: Path, smoke: bool) -> tuple[Path, Path]:
    """GPT2Config() (for --smoke: one layer of width 32) with seeded weights, saved as a Hugging
    Face folder and as a checkpoint."""
    import torch
    import transformers

    from trakwomp.models.huggingface import HuggingFaceCausalLM

    folder, checkpoint = work / "gpt2-small", work / "gpt2-small.pt"
    if not checkpoint.exists():
        torch.manual_seed(0)
        config = (transformers.GPT2Config(vocab_size=257, n_layer=1, n_embd=32, n_head=2) if smoke
                  else transformers.GPT2Config())
        model = transformers.GPT2LMHeadModel(config)
        model.save_pretrained(folder)
        torch.save(HuggingFaceCausalLM(model).state_dict(), checkpoint)
    return folder, checkpoint


def make_texts(work: Path, train: int, targets: int) -> tuple[Path, Path]:
    """JSON-lines files of fortunes-mini train texts joined into texts of more than 200 bytes."""
    from trakwomp.data.text import read_fortunes_mini

    joined, current = [], ""
    for row in read_fortunes_mini("fortunes-mini:train", "train"):
        current = f"{current} {row['text']}".strip()
        if len(current.encode()) > 200:
            joined.append(current)
            current = ""
    if len(joined) < train + targets:
        sys.exit(f"fortunes-mini gives {len(joined)} joined texts, fewer than {train + targets}")
    paths = []
    for name, rows in (("train", joined[:train]), ("targets", joined[train:train + targets])):
        path = work / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": text}) + "\n" for text in rows))
        paths.append(path)
    return paths[0], paths[1]


def run(args: list[str], threads: int, cwd: Path = REPO) -> dict:
    """One CLI command (with --json) in its own process, run in `cwd`: exit code, wall seconds,
    peak RSS, the featurize loop's examples/s, and its last line of messages (the error, if refused)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as messages:
        process = subprocess.Popen([*TRAKWOMP, *args, "--json"], stdout=subprocess.PIPE, stderr=messages, env=env,
                                   text=True, cwd=cwd)
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        messages.seek(0)
        lines = [line for line in messages.read().splitlines() if line.strip()]
    report = json.loads(output) if output.strip() else {}
    rate = report["examples"] / report["seconds"] if report.get("seconds") and "examples" in report else None
    return {"command": "trakwomp " + " ".join(args), "exit_code": os.waitstatus_to_exitcode(status),
            "seconds": time.perf_counter() - start, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "examples_per_second": rate, "last_line": lines[-1] if lines else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--targets", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.train, args.targets = 24, 8
    block_dim = "16" if args.smoke else "256"
    args.work.mkdir(parents=True, exist_ok=True)
    folder, checkpoint = make_model(args.work, args.smoke)
    train, targets = make_texts(args.work, args.train, args.targets)
    first16 = args.work / "first16.jsonl"
    first16.write_text("".join(train.read_text().splitlines(keepends=True)[:16]))
    data = ["--model", f"hf:{folder}", "--tokenizer", "bytes", "--max-length", "128", "--task", "causal-lm",
            "--checkpoint", str(checkpoint), "--max-memory", "8G"]
    stores = {name: args.work / f"store-{name}" for name in ("factored", "sjlt", "sjlt-1x1024")}
    for store in stores.values():
        subprocess.run(["rm", "-rf", str(store)], check=True)
    steps = {
        f"featurize factored {'4 x 4' if args.smoke else '16 x 16'} per layer": ["featurize", str(stores["factored"]), "--data", f"jsonl:{train}", *data,
                                                 "--projector", "factored", "--block-dim", block_dim, "--batch-size", "8"],
        "finalize (one block per layer)": ["finalize", str(stores["factored"])],
        "score": ["score", str(stores["factored"]), "--targets", f"jsonl:{targets}", "--max-length", "128",
                  "--batch-size", "8", "--max-memory", "8G"],
        "featurize sjlt 16 x 1,024 (defaults)": ["featurize", str(stores["sjlt"]), "--data", f"jsonl:{train}", *data,
                                                 "--projector", "sjlt"],
        "featurize sjlt 1 x 1,024, batch 1, 16 texts": ["featurize", str(stores["sjlt-1x1024"]), "--data",
                                                        f"jsonl:{first16}", *data, "--projector", "sjlt", "--blocks",
                                                        "1", "--block-dim", "1024", "--batch-size", "1"],
    }
    import torch
    results = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "threads": args.threads,
               "train": args.train, "targets": args.targets, "steps": {}}
    for name, command in steps.items():
        results["steps"][name] = run(command, args.threads)
        print(f"{name}: {results['steps'][name]}", file=sys.stderr, flush=True)
    (args.work / "gpt2_small.json").write_text(json.dumps(results, indent=1))
    shape = "a one-layer, width-32 GPT-2 of 257 tokens (--smoke)" if args.smoke else "GPT-2 small shape (124,439,808 parameters)"
    lines = [f"{shape}, {args.train} train and {args.targets} target sequences of "
             f"128 tokens, {args.threads} threads, torch {results['torch']}, {results['date']}", "",
             "| step | exit | wall s | examples/s | peak RSS (GiB) | last line |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name, r in results["steps"].items():
        rate = "" if r["examples_per_second"] is None else f"{r['examples_per_second']:.2f}"
        lines.append(f"| {name} | {r['exit_code']} | {r['seconds']:.0f} | {rate} | {r['peak_rss_bytes'] / 2 ** 30:.2f} | "
                     f"{r['last_line'][:160]} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
