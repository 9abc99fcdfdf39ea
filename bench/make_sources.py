"""Made-up data sources for an image dataset: each source a skewed mix of the classes.

Source s draws class weights w_s ~ Dirichlet(concentration x 1); each train example of class c
goes to source s with probability w_s,c / sum_s' w_s',c. Writes a CSV of index,group rows for
`--groups`.

    python bench/make_sources.py cifar10-mini:train sources.csv --sources 20
"""

from __future__ import annotations

import argparse
import csv

import numpy as np

from trakwomp.data.specs import load_dataset


def made_up_sources(labels: np.ndarray, num_classes: int, sources: int, concentration: float, seed: int) -> np.ndarray:
    """The source of each example (0..sources-1)."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(num_classes, concentration), size=sources)
    share = weights / weights.sum(axis=0, keepdims=True)
    return np.array([rng.choice(sources, p=share[:, label]) for label in labels])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="the train set spec, e.g. cifar10-mini:train")
    parser.add_argument("out", help="the CSV to write")
    parser.add_argument("--sources", type=int, default=20)
    parser.add_argument("--concentration", type=float, default=0.5, help="Dirichlet concentration: lower is more skewed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = load_dataset(args.data)
    source = made_up_sources(data.labels, data.num_classes, args.sources, args.concentration, args.seed)
    with open(args.out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "group"])
        writer.writerows((i, f"source-{s:02d}") for i, s in enumerate(source))
    sizes = np.bincount(source, minlength=args.sources)
    print(f"wrote {args.out}: {len(source)} examples in {args.sources} sources of {sizes.min()} to {sizes.max()} examples")


if __name__ == "__main__":
    main()
