#!/usr/bin/env python3
"""A small Hugging Face base model for LoRA fine-tunes, pretrained on the fortune-authors quotes.

    python scripts/lora_base.py WORK [--epochs 8]

Reads WORK/train.jsonl (`scripts/fortune_authors.py`), trains a byte-level BPE of 512 tokens on
its quotes (the prompts, without their authors) and a GPT-2 (width 64, 2 layers, 4 heads, context
256) on them with `trakwomp train --task causal-lm` (every quote, the causal-lm recipe), and saves
both to WORK/base (`save_pretrained`): a base that knows the quotes' language but not who said
them, for `trakwomp train --model hf:WORK/base --lora R`. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

def make_base(work: Path, epochs: int) -> Path:
    """The BPE tokenizer and GPT-2 initialised, pretrained on the train quotes, saved to WORK/base."""
    base = work / "base"
    import tokenizers
    import torch
    import transformers
    from trakwomp import load_reference_model

    quotes = [json.loads(line)["prompt"] for line in (work / "train.jsonl").read_text().splitlines()]
    (work / "quotes.jsonl").write_text("".join(json.dumps({"text": q}) + "\n" for q in quotes))
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(quotes, tokenizers.trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    transformers.logging.disable_progress_bar()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    init = work / "init"
    tokenizer.save_pretrained(init)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    transformers.GPT2LMHeadModel(config).save_pretrained(init)
    subprocess.run([sys.executable, "-m", "trakwomp.cli.main", "train", str(work / "pretrain"), "--task", "causal-lm",
                    "--data", f"jsonl:{work / 'quotes.jsonl'}", "--tokenizer", f"hf:{init}", "--model", f"hf:{init}",
                    "--alpha", "1", "--epochs", str(epochs), "-q"], check=True)
    net = load_reference_model(work / "pretrain", 0, len(tokenizer))
    net.model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    print(f"wrote {make_base(args.work, args.epochs)}")


if __name__ == "__main__":
    main()
