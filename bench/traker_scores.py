"""Score targets with traker (the reference TRAK library), for `trakwomp lds --scores`.

    python bench/traker_scores.py TRAIN_SPEC TARGET_SPEC CHECKPOINT OUT.npy [--proj-dim 2048] [--width 0.25]

Featurizes TRAIN_SPEC (a trakwomp dataset spec, so examples come in the same order as in a
trakwomp store) with traker 0.3.2 on the CPU at its defaults (BasicProjector, Gaussian
projection, proj_dim 2048; float32, since half precision is a GPU setting), scores TARGET_SPEC
with the same checkpoint (a built-in ResNet-9 of the given width), and saves the
(n_targets, n_train) score matrix.
"""

import argparse
import tempfile
import time

import numpy as np
import torch
from trak import TRAKer

from trakwomp.data import load_dataset
from trakwomp.models import ModelSpec, load_checkpoint
from trakwomp.training import load_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train")
    parser.add_argument("targets")
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    train, targets = load_dataset(args.train), load_dataset(args.targets)
    state = load_checkpoint(args.checkpoint)
    model = ModelSpec.parse("resnet9", args.width).build(train.num_classes).eval()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as save_dir:
        traker = TRAKer(model=model, task="image_classification", train_set_size=len(train), proj_dim=args.proj_dim,
                        device="cpu", save_dir=save_dir, use_half_precision=False)
        traker.load_checkpoint(state, model_id=0)
        for i in range(0, len(train), args.batch_size):
            x, y = load_batch(train, range(i, min(i + args.batch_size, len(train))))
            traker.featurize(batch=(x, y), num_samples=len(y))
        traker.finalize_features()
        traker.start_scoring_checkpoint(exp_name="targets", checkpoint=state, model_id=0, num_targets=len(targets))
        for i in range(0, len(targets), args.batch_size):
            x, y = load_batch(targets, range(i, min(i + args.batch_size, len(targets))))
            traker.score(batch=(x, y), num_samples=len(y))
        scores = np.asarray(traker.finalize_scores(exp_name="targets"), dtype=np.float32).T
    np.save(args.out, scores)
    print(f"traker: {scores.shape[0]} x {scores.shape[1]} scores in {time.perf_counter() - start:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
