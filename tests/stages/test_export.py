"""Exports out of the store: the .npy of `score --out` appears whole or not at all."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import soft_thresholded, write_tiny_images
from trakwomp.store import Store, layout

from trakwomp.data.specs import load_dataset
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
    tau = Store.open(store).read_array(layout.scores(key))
    np.testing.assert_allclose(np.load(out), soft_thresholded(tau), rtol=1e-5, atol=1e-7 * np.abs(tau).max())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.npy"]
