#!/usr/bin/env python3
"""Example-level and group LDS at soft thresholds T = 0, 0.25 and 0.5 (x each target's RMS
score), each paired against T = 0, at TRAK d = 1,024 and TRAK-WOMP 16 x 1,024.

    python bench/threshold_check.py STORE [STORE ...]

Each STORE is a main job's store (scripts/demo.sh, scripts/demo-text.sh) with both views scored;
the group LDS rows need its group LDS models (train --role lds --group-alpha 0.5) and are left
out without them. docs/results.md, "The soft threshold".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trakwomp.analysis.lds import lds, paired_difference  # noqa: E402
from trakwomp.errors import UserError  # noqa: E402
from trakwomp.estimator.view import ViewSpec  # noqa: E402

VIEWS = (ViewSpec(1024, 1), ViewSpec(16384, 16))
THRESHOLDS = (0.25, 0.5)


def rows(store: str, by_group: bool):
    for view in VIEWS:
        base = lds(store, [view], threshold=0.0, by_group=by_group).results[0]
        cells = [f"{base.mean:.3f} [{base.low:.3f}, {base.high:.3f}]"]
        for t in THRESHOLDS:
            d = paired_difference(lds(store, [view], threshold=t, by_group=by_group).results[0], base)
            cells.append(f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]")
        yield f"| {store} | {'group' if by_group else 'example'} | d={view.dims} B={view.blocks} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stores", nargs="+")
    args = parser.parse_args()
    print("| store | LDS | view | T = 0 | " + " | ".join(f"T = {t:g} minus T = 0" for t in THRESHOLDS) + " |")
    for store in args.stores:
        for by_group in (False, True):
            try:
                for row in rows(store, by_group):
                    print(row, flush=True)
            except UserError as e:
                print(f"| {store} | {'group' if by_group else 'example'} | {e} |")


if __name__ == "__main__":
    main()
