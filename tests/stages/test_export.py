"""Exports out of the store: the .npy of `score --out` appears whole or not at all."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil

import numpy as np
import pytest
from conftest import soft_thresholded, write_tiny_images
from trakwomp.store import Store, paths

from trakwomp import outputs
from trakwomp.data.specs import load_dataset
from trakwomp.errors import UserError
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.stages import export
from trakwomp.stages.featurize import featurize
from trakwomp.stages.finalize import finalize
from trakwomp.stages.score import score


@pytest.fixture(scope="module")
def scored(trained_once, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    store = shutil.copytree(trained_once / "store", root / "store")
    featurize(store, projector=ProjectorSpec("sjlt", 0, 2, 8), chunk_rows=16)
    finalize(store)
    report = score(store, load_dataset(f"npz:{write_tiny_images(root / 'targets.npz', n=9, seed=1)}"),
                   target_chunk_rows=4)
    return store, report.key


def test_an_interrupted_export_leaves_the_old_file_and_no_temporary(scored, tmp_path, monkeypatch):
    store, key = scored
    out = tmp_path / "scores.npy"
    np.save(out, np.arange(3.0))
    chunks = export.iterate_scores

    def interrupted(handle, key, threshold):
        for i, chunk in enumerate(chunks(handle, key, threshold)):
            if i == 1:
                raise KeyboardInterrupt
            yield chunk

    monkeypatch.setattr(export, "iterate_scores", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.export_scores(store, key, out, threshold=0.25)
    np.testing.assert_array_equal(np.load(out), np.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.npy"]


def test_a_finished_export_is_the_thresholded_scores(scored, tmp_path):
    store, key = scored
    out = tmp_path / "scores.npy"
    assert export.export_scores(store, key, out, threshold=0.25) == (9, 48)
    tau = Store.open(store).read_array(paths.scores(key))
    np.testing.assert_allclose(np.load(out), soft_thresholded(tau), rtol=1e-5, atol=1e-7 * np.abs(tau).max())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.npy"]


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(scored, tmp_path, monkeypatch):
    store, key = scored
    out = tmp_path / "scores.npy"
    np.save(out, np.arange(3.0))

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outputs.os, "fsync", full)
    with pytest.raises(UserError, match="No space left on device; the file is as it was"):
        export.export_scores(store, key, out)
    np.testing.assert_array_equal(np.load(out), np.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.npy"]


def test_an_export_through_a_link_writes_where_it_points_and_keeps_the_link(scored, tmp_path):
    store, key = scored
    (tmp_path / "runs").mkdir()
    target = tmp_path / "runs" / "latest.npy"
    np.save(target, np.arange(3.0))
    link = tmp_path / "scores.npy"
    link.symlink_to(target)
    export.export_scores(store, key, link, threshold=0)
    assert link.is_symlink() and link.resolve() == target
    np.testing.assert_array_equal(np.load(target), Store.open(store).read_array(paths.scores(key)))


def test_csv_cells_that_would_run_as_formulas_are_neutralized_and_json_stays_exact(tmp_path):
    rows = [{"train_text": text, "score": -0.5} for text in ("=HYPERLINK(\"http://x\")", "+1", "-2", "@SUM(A1)",
                                                            "\tx", "plain")]
    export.write_table(rows, tmp_path / "t.csv")
    export.write_table(rows, tmp_path / "t.json")
    with open(tmp_path / "t.csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert [r["train_text"] for r in read] == ["'=HYPERLINK(\"http://x\")", "'+1", "'-2", "'@SUM(A1)", "'\tx", "plain"]
    assert [float(r["score"]) for r in read] == [-0.5] * 6  # numbers are not text: written as they are
    assert json.loads((tmp_path / "t.json").read_text()) == rows


def test_score_quiet_prints_nothing(scored, tmp_path, cli):
    store, _ = scored
    targets = write_tiny_images(tmp_path / "targets.npz", n=9, seed=1)
    result = cli("score", store, "--targets", f"npz:{targets}", "--chunk-rows", "4", "--out", tmp_path / "s.npy",
                 "--top-k", "2", "--top-k-out", tmp_path / "top.csv", "--quiet")
    assert result.exit_code == 0 and result.output == "" and (tmp_path / "s.npy").is_file()
