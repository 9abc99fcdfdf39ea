"""Featurize throughput on CPU: trakwomp's projectors against traker, in one run.

    python bench/featurize_throughput.py IMAGEFOLDER CHECKPOINT [--examples 1024] [--threads 2]

CHECKPOINT is a state_dict of the width-0.25 ResNet-9 (143,248 parameters). Every configuration
featurizes the same first --examples images of IMAGEFOLDER with batches of 64; examples/s counts
the featurize loop only (data loading, per-example gradients, projection, storage), not start-up.
Also reports the store size per example at float32 and float16. Prints a Markdown table.
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("imagefolder")
    parser.add_argument("checkpoint")
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from trakwomp.data import load_dataset
    from trakwomp.featurize import featurize
    from trakwomp.gradients import PerExampleGradients, select_parameters
    from trakwomp.models import ModelSpec, load_checkpoint
    from trakwomp.projectors import ProjectorSpec
    from trakwomp.training import load_batch

    work = Path(tempfile.mkdtemp(prefix="trakwomp-bench-"))
    np.save(work / "indices.npy", np.arange(args.examples))
    data = load_dataset(f"imagefolder:{args.imagefolder}", indices=work / "indices.npy")
    spec = ModelSpec.parse("resnet9", 0.25)
    results = []

    model = spec.build(data.num_classes)
    model.load_state_dict(load_checkpoint(args.checkpoint))
    engine = PerExampleGradients(model, select_parameters(model, None), torch.device("cpu"))
    start = time.perf_counter()
    for i in range(0, len(data), 64):
        engine(*load_batch(data, range(i, min(i + 64, len(data)))))
    results.append(("per-example gradients only (no projection)", len(data) / (time.perf_counter() - start), None))

    configs = [("trakwomp gaussian, d = 2048 (B = 1)", ProjectorSpec("gaussian", 0, 1, 2048), "float32"),
               ("trakwomp gaussian, d = 16 x 1024", ProjectorSpec("gaussian", 0, 16, 1024), "float32"),
               ("trakwomp sjlt, d = 16 x 1024", ProjectorSpec("sjlt", 0, 16, 1024), "float32"),
               ("trakwomp sjlt, d = 16 x 1024, float16", ProjectorSpec("sjlt", 0, 16, 1024), "float16"),
               ("trakwomp sjlt, d = 256 x 64", ProjectorSpec("sjlt", 0, 256, 64), "float32")]
    for name, projector, dtype in configs:
        store = work / name.replace(" ", "_").replace(",", "")
        report = featurize(store, data, spec, [args.checkpoint], projector=projector, dtype=dtype, chunk_rows=512)
        size = folder_size(store / "features") / len(data)
        results.append((name, report.examples_per_second, size))
        shutil.rmtree(store)

    from trak import TRAKer

    model = spec.build(data.num_classes)
    traker = TRAKer(model=model, task="image_classification", train_set_size=len(data), proj_dim=2048,
                    device="cpu", save_dir=str(work / "traker"), use_half_precision=False)
    traker.load_checkpoint(load_checkpoint(args.checkpoint), model_id=0)
    start = time.perf_counter()
    for i in range(0, len(data), 64):
        x, y = load_batch(data, range(i, min(i + 64, len(data))))
        traker.featurize(batch=(x, y), num_samples=len(y))
    results.append(("traker 0.3.2, BasicProjector (gaussian), d = 2048", len(data) / (time.perf_counter() - start), None))
    shutil.rmtree(work)

    peer = results[-1][1]
    print(f"{args.examples} examples of {args.imagefolder}, width-0.25 ResNet-9, {args.threads} threads, "
          f"torch {torch.__version__}\n")
    print("| configuration | examples/s | vs traker | stored bytes per example |")
    print("| --- | ---: | ---: | ---: |")
    for name, rate, size in results:
        print(f"| {name} | {rate:.1f} | {rate / peer:.2f}x | {'' if size is None else f'{size:,.0f}'} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
