"""The whole command-line pipeline on tiny data, as a user runs it."""

import csv
import json

import numpy as np
import pytest
import zarr
from conftest import plain, soft_thresholded, write_tiny_images
from scipy.stats import spearmanr

COMMON = ["--width", "0.0625", "--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--quiet"]


def test_train_featurize_finalize_score_lds_predict(cli, tmp_path):
    train_npz = write_tiny_images(tmp_path / "train.npz")
    target_npz = write_tiny_images(tmp_path / "targets.npz", n=10, seed=9)
    store = tmp_path / "store"
    data, targets = f"npz:{train_npz}", f"npz:{target_npz}"

    def ok(*args):
        result = cli(*args)
        assert result.exit_code == 0, result.output
        return result

    def fails(fragment, *args):
        result = cli(*args)
        assert result.exit_code == 2 and fragment in plain(result.stderr), result.output

    ok("train", store, "--data", data, "--num-models", "1", *COMMON)
    fails("no LDS models", "lds", store)
    ok("train", store, "--data", data, "--role", "lds", "--num-models", "8", "--targets", targets, *COMMON)
    fails("run `trakwomp featurize` first", "finalize", store)
    ok("featurize", store, "--blocks", "4", "--block-dim", "8", "--chunk-rows", "16", "--quiet")
    fails("whole stored blocks", "finalize", store, "--blocks", "3")
    fails("not available", "finalize", store, "--dims", "64")
    fails("run `trakwomp finalize", "score", store, "--targets", targets, "--blocks", "1", "--quiet")
    for blocks in ("1", "4"):
        ok("finalize", store, "--blocks", blocks, "--quiet")
    fails("run `trakwomp score` first", "lds", store, "--blocks", "1")
    fails("need all shards", "score", store, "--targets", targets, "--shard", "0/2", "--out", tmp_path / "x.npy")
    for blocks in ("1", "4"):
        ok("score", store, "--targets", targets, "--blocks", blocks, "--quiet", "--chunk-rows", "4",
           "--out", tmp_path / f"scores{blocks}.npy", "--top-k", "2", "--top-k-out", tmp_path / f"top{blocks}.csv")
    scores = np.load(tmp_path / "scores4.npy")
    assert scores.shape == (10, 48) and np.isfinite(scores).all()
    # the store holds the raw scores; exports soft-threshold them at 0.25 x each target's RMS by default
    stored = zarr.open_group(str(store), mode="r")["scores"]
    raw = next(stored[f"{key}/tau"][...] for key in stored.group_keys() if "-b4-" in key)
    # float32 thresholding against float64: a few roundings of the largest |score|, whatever the CPU
    np.testing.assert_allclose(scores, soft_thresholded(raw), rtol=1e-5, atol=1e-6 * np.abs(raw).max())
    assert (scores == 0).mean() > 0.1
    ok("score", store, "--targets", targets, "--blocks", "4", "--quiet", "--chunk-rows", "4", "--threshold", "0",
       "--out", tmp_path / "scoresraw.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "scoresraw.npy"), raw)
    rows = list(csv.DictReader((tmp_path / "top4.csv").read_text().splitlines()))
    assert len(rows) == 10 * 2 * 2
    first = [r for r in rows if r["target"] == "0" and r["direction"] == "supports"]
    assert float(first[0]["score"]) == scores[0].max() and int(first[0]["train_index"]) == scores[0].argmax()

    report = json.loads(ok("lds", store, "--blocks", "1", "--blocks", "4", "--json").stdout)
    assert [r["name"] for r in report["results"]] == ["TRAK d=32 B=1 M=1", "TRAK-WOMP d=32 B=4 M=1"]
    lds_models = zarr.open_group(str(store), mode="r")["models/lds"]

    def scipy_lds(blocks, models):
        """Per-target Spearman correlations of the LDS models' margins with their predicted sums
        by the exported scores{blocks}.npy."""
        exported = np.load(tmp_path / f"scores{blocks}.npy")
        masks = np.stack([lds_models[f"{j:06d}/mask"][...] for j in models]).astype(float)
        margins = np.stack([lds_models[f"{j:06d}/margins"][...] for j in models])
        return np.array([spearmanr(margins[:, t], masks @ exported[t]).statistic for t in range(10)])

    for result, blocks in zip(report["results"], ("1", "4"), strict=True):
        assert (result["targets"], result["models"]) == (10, 8)
        assert result["lds"] == pytest.approx(scipy_lds(blocks, range(8)).mean(), abs=1e-6)
    per_target = scipy_lds("4", range(8)) - scipy_lds("1", range(8))
    assert report["paired_differences"][0]["difference"] == pytest.approx(per_target.mean(), abs=1e-6)
    # score files are evaluated as given (an export is thresholded already), unless --threshold says otherwise
    files = json.loads(ok("lds", store, "--scores", tmp_path / "scores4.npy", "--scores", tmp_path / "scoresraw.npy",
                          "--json").stdout)["results"]
    assert [r["threshold"] for r in files] == [0, 0]
    assert files[0]["lds"] == pytest.approx(report["results"][1]["lds"], abs=1e-6)
    assert files[1]["lds"] == pytest.approx(scipy_lds("raw", range(8)).mean(), abs=1e-6)
    again = json.loads(ok("lds", store, "--scores", tmp_path / "scoresraw.npy", "--threshold", "0.25", "--json").stdout)
    assert again["results"][0]["lds"] == pytest.approx(report["results"][1]["lds"], abs=1e-6)
    half = json.loads(ok("lds", store, "--blocks", "4", "--ridge", "auto", "--half", "1", "--json").stdout)["results"][0]
    assert half["models"] == 4 and half["lds"] == pytest.approx(scipy_lds("4", range(1, 8, 2)).mean(), abs=1e-6)
    fails("cannot go with --tune-threshold", "lds", store, "--half", "0", "--tune-threshold")

    subset = np.zeros(48, dtype=bool)
    subset[::3] = True
    np.save(tmp_path / "subset.npy", subset)
    predicted = json.loads(ok("predict", store, "--subset", tmp_path / "subset.npy", "--blocks", "4", "--json").stdout)
    np.testing.assert_allclose(predicted["predicted_margin"], scores[:, subset].sum(axis=1), rtol=1e-4, atol=1e-6)
    np.save(tmp_path / "bad.npy", np.zeros(5, dtype=bool))
    fails("expected (48,)", "predict", store, "--subset", tmp_path / "bad.npy", "--blocks", "4")
