"""How often removing a target's top-K supporters lowers its f more than removing K random train
examples, and removing its top-K opposers raises it more, measured by `trakwomp verify`.

On a scored store made by `trakwomp train` (scripts/demo.sh, scripts/demo-text.sh): for each of
the first `--targets` scored targets on its own and each K, `verify` retrains `--seeds` models
per condition (supporters, opposers, random removed; nothing removed). Runs are units of the
store, so a killed benchmark resumes where it stopped, and the runs that remove nothing or random
examples are shared by every target. Prints (and writes to OUT.md and OUT.json) per K: the
fraction of targets whose supporters' removal lowered f more than random removal, the fraction
whose opposers' removal raised it more, the correlation of predicted and actual changes over
every (target, condition), the mean actual changes, and, where the store's LDS models calibrate
a target's scores (`Calibration`), the least-squares slope through zero of the actual changes on
the calibrated predictions (1 where the score's unit is f's), and that slope on the raw
predictions (score units).

    python bench/verify_removals.py STORE OUT [--targets 5] [--k 10 50 200] [--seeds 3] [--method trak]
        [--own-group TARGETS.jsonl]

With `--own-group`, each target's own group (its row's "source" in TARGETS.jsonl, the scored
targets' file: for the fortune-authors answers, the author) is also removed (`verify --group`),
against as many random examples: how often f falls more than under random removal, and by how much.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from trakwomp.analysis.verify import verify


def summary(reports: list, k: int) -> dict:
    """The fractions of targets whose order holds, the pooled correlation and the mean changes."""
    def mean_of(name: str) -> float:
        return float(np.mean([c.mean_actual for r in reports for c in r.conditions if c.condition == name]))

    actual = np.concatenate([c.actual for r in reports for c in r.conditions])
    predicted = np.concatenate([c.predicted for r in reports for c in r.conditions])
    pairs = np.array([(p, a) for r in reports for c in r.conditions if c.calibrated is not None
                      for p, a in zip(c.calibrated, c.actual, strict=True)]).reshape(-1, 2)
    calibrated = {"actual_per_predicted": float(predicted @ actual / (predicted @ predicted)),
                  "calibrated_targets": sum(r.conditions[0].calibrated is not None for r in reports),
                  "actual_per_calibrated": float(pairs[:, 0] @ pairs[:, 1] / (pairs[:, 0] @ pairs[:, 0]))
                  if len(pairs) else None}
    return {**calibrated, "k": k, "targets": len(reports),
            "supporters_lower_than_random": float(np.mean([r.holds["supporters_lower_than_random"][-1] for r in reports])),
            "opposers_higher_than_random": float(np.mean([r.holds["opposers_higher_than_random"][-1] for r in reports])),
            "correlation": float(np.corrcoef(predicted, actual)[0, 1]),
            "supporters_change": mean_of("supporters"), "opposers_change": mean_of("opposers"),
            "random_change": mean_of("random")}


def ratio(row: dict) -> str:
    value = row["actual_per_calibrated"]
    return f"{'n/a' if value is None else f'{value:.2f}'} ({row['calibrated_targets']})"


def own_group_row(args, selection, rows: list) -> str:
    """Each target's own group removed against as many random examples (appended to `rows`)."""
    sources = [json.loads(line)["source"] for line in args.own_group.read_text().splitlines()]
    reports = [verify(args.store, target=(t,), group=sources[t], seeds=args.seeds, selection=selection)
               for t in range(args.targets)]
    group = [r.conditions[0] for r in reports]
    random = [r.conditions[1] for r in reports]
    row = {"own_group": True, "targets": len(reports),
           "group_lower_than_random": float(np.mean([g.mean_actual < r.mean_actual for g, r in zip(group, random, strict=True)])),
           "moves_as_predicted": float(np.mean([r.holds["group_moves_as_predicted"][-1] for r in reports])),
           "group_change": float(np.mean([g.mean_actual for g in group])),
           "random_change": float(np.mean([r.mean_actual for r in random])),
           "predicted_group_change": float(np.mean([g.mean_predicted for g in group])),
           "mean_group_size": float(np.mean([g.removed for g in group]))}
    rows.append(row)
    print(json.dumps(row), flush=True)
    return (f"Each target's own group removed ({row['mean_group_size']:.1f} examples on average), against as many "
            f"random ones: f fell more than under random removal for {row['group_lower_than_random']:.2f} of the "
            f"targets, and moved against random removal as predicted for {row['moves_as_predicted']:.2f}; mean "
            f"change {row['group_change']:+.4f} (random {row['random_change']:+.4f}; predicted, in score units, "
            f"{row['predicted_group_change']:+.4f}).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("out", type=Path, help="OUT.md and OUT.json are written")
    parser.add_argument("--targets", type=int, default=5, help="the first T scored targets, each on its own")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--method", default="trak")
    parser.add_argument("--dims", type=int)
    parser.add_argument("--blocks", type=int)
    parser.add_argument("--own-group", type=Path, help="the scored targets' .jsonl: remove each target's source")
    args = parser.parse_args()
    from trakwomp.estimator.view import ViewSpec
    from trakwomp.stages.selection import Selection

    selection = Selection(view=ViewSpec(args.dims, args.blocks))
    rows, started = [], time.perf_counter()
    for k in args.k:
        reports = [verify(args.store, target=(t,), k=k, seeds=args.seeds, method=args.method, selection=selection)
                   for t in range(args.targets)]
        rows.append(summary(reports, k))
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"verify on {args.store}: the first {args.targets} targets one by one, {args.seeds} seeds, removals "
             f"ranked by {args.method}, scores {reports[0].scores} ({time.perf_counter() - started:.0f} s)", "",
             "| K | supporters' removal lowers f more than random | opposers' raises it more | "
             "correlation predicted vs actual | mean change: supporters / opposers / random | "
             "actual per calibrated (targets calibrated) |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['k']} | {r['supporters_lower_than_random']:.2f} | {r['opposers_higher_than_random']:.2f} | "
              f"{r['correlation']:+.2f} | {r['supporters_change']:+.4f} / {r['opposers_change']:+.4f} / "
              f"{r['random_change']:+.4f} | {ratio(r)} |" for r in rows]
    if args.own_group is not None:
        lines += ["", own_group_row(args, selection, rows)]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
