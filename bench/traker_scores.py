"""Score targets with traker (the reference TRAK library), for `trakwomp lds --scores`.

    python bench/traker_scores.py TRAIN_SPEC TARGET_SPEC OUT.npy CHECKPOINT [CHECKPOINT ...]
        [--prefixes 1,2,4] [--proj-dim 2048] [--width 0.25]

Featurizes TRAIN_SPEC (a trakwomp dataset spec, so examples come in the same order as in a
trakwomp store) with traker 0.3.2 on the CPU at its defaults (BasicProjector, Gaussian
projection, proj_dim 2048; float32, since half precision is a GPU setting) for each checkpoint
(a built-in ResNet-9 of the given width), scores TARGET_SPEC with the same checkpoints, and
saves the (n_targets, n_train) score matrix of all of them to OUT.npy; with --prefixes, the
scores of the first M checkpoints for each M to OUT-m{M}.npy instead.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from trak import TRAKer

from trakwomp.data.base import load_batch
from trakwomp.data.specs import load_dataset
from trakwomp.models.checkpoints import load_checkpoint
from trakwomp.models.spec import ModelSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train")
    parser.add_argument("targets")
    parser.add_argument("out", type=Path)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--prefixes", help="Comma-separated model counts M: score the first M checkpoints for each.")
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    prefixes = [int(m) for m in args.prefixes.split(",")] if args.prefixes else [len(args.checkpoints)]
    if max(prefixes) > len(args.checkpoints):
        parser.error(f"--prefixes {args.prefixes} needs {max(prefixes)} checkpoints")
    train, targets = load_dataset(args.train), load_dataset(args.targets)
    checkpoints = [load_checkpoint(path) for path in args.checkpoints[:max(prefixes)]]
    model = ModelSpec.parse("resnet9", args.width).build(train.num_classes).eval()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as save_dir:
        traker = TRAKer(model=model, task="image_classification", train_set_size=len(train), proj_dim=args.proj_dim,
                        device="cpu", save_dir=save_dir, use_half_precision=False)
        for model_id, state in enumerate(checkpoints):
            traker.load_checkpoint(state, model_id=model_id)
            for i in range(0, len(train), args.batch_size):
                batch = load_batch(train, range(i, min(i + args.batch_size, len(train))))
                x, y = batch.inputs[0], batch.labels
                traker.featurize(batch=(x, y), num_samples=len(y))
        traker.finalize_features()
        for model_id, state in enumerate(checkpoints):
            traker.start_scoring_checkpoint(exp_name="targets", checkpoint=state, model_id=model_id,
                                            num_targets=len(targets))
            for i in range(0, len(targets), args.batch_size):
                batch = load_batch(targets, range(i, min(i + args.batch_size, len(targets))))
                x, y = batch.inputs[0], batch.labels
                traker.score(batch=(x, y), num_samples=len(y))
        for m in prefixes:
            scores = np.asarray(traker.finalize_scores(exp_name="targets", model_ids=range(m)), dtype=np.float32).T
            out = args.out if not args.prefixes else args.out.with_name(f"{args.out.stem}-m{m}{args.out.suffix}")
            np.save(out, scores)
            print(f"traker: {scores.shape[0]} x {scores.shape[1]} scores of {m} model(s) -> {out} "
                  f"({time.perf_counter() - start:.0f}s so far)")


if __name__ == "__main__":
    main()
