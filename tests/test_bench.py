"""bench/full_cifar10 --smoke: the full-scale experiment's code path on the CPU with tiny settings."""

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr
from scipy.stats import spearmanr

from conftest import REPO


def test_full_cifar10_smoke_runs_every_stage_and_reports_the_odd_half(tmp_path):
    work = tmp_path / "work"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "full_cifar10"), str(work), "--smoke"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    results = json.loads((work / "results.json").read_text())
    assert [e["M"] for e in results["claim1"]] == [1, 2]
    assert [e["block_dim"] for e in results["claim2"]] == [8, 16]
    assert all((work / f"claim{k}.png").stat().st_size > 0 for k in (1, 2, 3))
    assert "Claim 3" in (work / "report.md").read_text()

    # The chosen views are the best on the even half; the reported LDS is on the odd half.
    entry = results["claim1"][0]
    best = max(entry["selection"]["womp"], key=lambda row: row[-1])
    assert entry["womp_view"] == best[:3]
    d, b, ridge = entry["womp_view"]
    store = zarr.open_group(str(work / "store"), mode="r")
    key = next(k for k, v in store.attrs["trakwomp"]["scores"].items() if v["view"] == [d, b, ridge] and v["models"] == [0])
    tau = store[f"scores/{key}/tau"][...]
    odd = [f"{j:06d}" for j in range(1, 8, 2)]
    masks = np.stack([store[f"models/lds/{j}/mask"][...] for j in odd]).astype(float)
    margins = np.stack([store[f"models/lds/{j}/margins"][...] for j in odd])
    per_target = [spearmanr(margins[:, t], masks @ tau[t]).statistic for t in range(tau.shape[0])]
    expected = np.mean([0.0 if np.isnan(r) else r for r in per_target])
    reported = entry["report"]["results"][1]
    assert reported["models"] == 4 and reported["lds"] == pytest.approx(expected, abs=1e-6)
