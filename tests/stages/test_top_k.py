"""`score --top-k K --top-k-only`: each target's top k kept without the (targets x train) scores,
checked against a stable sort of whole rows and against the dense scores' top k."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_RECIPE, soft_thresholded, write_tiny_images
from trakwomp.store import Store, paths

from trakwomp.data.specs import load_dataset
from trakwomp.errors import UserError
from trakwomp.estimator.scores import RunningTopK
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.models.spec import ModelSpec
from trakwomp.stages.featurize import featurize
from trakwomp.stages.finalize import finalize
from trakwomp.stages.score import score
from trakwomp.stages.train import train
from trakwomp.runtime import Shard


def test_the_running_top_k_keeps_what_a_stable_sort_of_the_whole_row_keeps():
    """Integer scores in [-3, 3] (ties everywhere), folded in chunks of uneven widths: the k kept
    are a stable sort's k first, the lower index first among equal scores, and the sum of
    squares is the row's."""
    rng = np.random.default_rng(0)
    scores = rng.integers(-3, 4, size=(5, 203)).astype(np.float32)
    for k in (1, 7, 203):
        top, start = RunningTopK.empty(5, torch.device("cpu")), 0
        for width in (1, 50, 13, 100, 39):
            top.add(torch.from_numpy(scores[:, start:start + width]), start, k)
            start += width
        largest, smallest = np.argsort(-scores, axis=1, kind="stable")[:, :k], np.argsort(scores, 1, kind="stable")[:, :k]
        np.testing.assert_array_equal(top.largest_index.numpy(), largest)
        np.testing.assert_array_equal(top.smallest_index.numpy(), smallest)
        np.testing.assert_array_equal(top.largest.numpy(), np.take_along_axis(scores, largest, 1))
        np.testing.assert_array_equal(top.sum_squares.numpy(), (scores.astype(np.float64) ** 2).sum(1))


def top_k_of(matrix: np.ndarray, k: int) -> list[tuple[int, str, int, int]]:
    """(target, direction, rank, train index) of each row's k largest positive and k smallest
    negative entries, by numpy's stable sort."""
    found = []
    for t, row in enumerate(matrix):
        supports = [i for i in np.argsort(-row, kind="stable")[:k] if row[i] > 0]
        opposes = [i for i in np.argsort(row, kind="stable")[:k] if row[i] < 0]
        found += [(t, "supports", r, int(i)) for r, i in enumerate(supports, 1)]
        found += [(t, "opposes", r, int(i)) for r, i in enumerate(opposes, 1)]
    return found


@pytest.fixture(scope="module")
def finalized(trained_once, tmp_path_factory):
    """Two models' features in 3 row chunks of the 48 train images, and 11 targets."""
    root = tmp_path_factory.mktemp("top-k")
    store = shutil.copytree(trained_once / "store", root / "store")
    featurize(store, projector=ProjectorSpec("sjlt", 0, 2, 8), chunk_rows=16)
    finalize(store)
    return store, load_dataset(f"npz:{write_tiny_images(root / 'targets.npz', n=11, seed=1)}")


@pytest.mark.parametrize("threshold", [0.0, 0.25])
def test_top_k_only_names_the_examples_and_scores_of_the_dense_scores_top_k(finalized, tmp_path, threshold):
    store, targets = finalized
    dense = score(store, targets, target_chunk_rows=4, threshold=threshold, out=tmp_path / "dense.npy")
    matrix = np.load(tmp_path / "dense.npy")
    assert np.allclose(matrix, soft_thresholded(Store.open(store).array(paths.scores(dense.key))[...], threshold))
    for k in (3, 48, 60):  # fewer than, all of, and more than the train examples
        kept = score(store, targets, target_chunk_rows=4, threshold=threshold, top_k=k, top_k_only=True,
                     top_k_out=tmp_path / f"top-{k}.json")
        assert kept.key != dense.key and Store.open(store).chunks_of(paths.scores(kept.key)) is None
        rows = kept.top_k_rows
        assert [(r["target"], r["direction"], r["rank"], r["train_index"]) for r in rows] == top_k_of(matrix, k)
        found = np.array([r["score"] for r in rows])
        expected = np.array([matrix[r["target"], r["train_index"]] for r in rows])
        np.testing.assert_allclose(found, expected, rtol=1e-6, atol=1e-6 * np.abs(matrix).max())


def test_shards_keep_their_target_chunks_and_the_last_run_writes_the_table(finalized, tmp_path):
    store, targets = finalized
    store = shutil.copytree(store, tmp_path / "store")
    settings = dict(target_chunk_rows=4, top_k=5, top_k_only=True, top_k_out=tmp_path / "top.csv")
    first = score(store, targets, shard=Shard(0, 2), **settings)
    assert first.top_k_file is None and not (tmp_path / "top.csv").exists()
    second = score(store, targets, shard=Shard(1, 2), **settings)
    assert second.top_k_file == str(tmp_path / "top.csv") and first.chunks_done + second.chunks_done == 3
    whole = score(store, targets, **{**settings, "top_k_out": tmp_path / "whole.csv"})
    assert whole.chunks_done == 0 and whole.top_k_rows == second.top_k_rows
    assert (tmp_path / "top.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()


def test_a_score_whose_dense_chunk_exceeds_max_memory_succeeds_with_top_k_only(tmp_path, user_module, monkeypatch):
    """256 targets x 1,200 train examples take 1.2 MB as dense scores; featurizing the targets
    of a 772-weight linear model fits in 1 MB (with nothing held before)."""
    monkeypatch.setattr("trakwomp.features.memory.held_bytes", lambda device: 0)
    user_module("topknets.nets", "import torch\n"
                "def linear(num_classes):\n"
                "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, num_classes))\n")
    data = load_dataset(f"npz:{write_tiny_images(tmp_path / 'train.npz', n=1200, size=8)}")
    targets = load_dataset(f"npz:{write_tiny_images(tmp_path / 'targets.npz', n=256, size=8, seed=1)}")
    store, model = tmp_path / "store", ModelSpec.parse("topknets.nets:linear")
    train(store, data, model, num_models=1, recipe=TINY_RECIPE)
    featurize(store, projector=ProjectorSpec("sjlt", 0, 2, 16), chunk_rows=256, model=model)
    finalize(store)
    before = Store.open(store).manifest.json
    with pytest.raises(UserError, match=r"the scores of one target chunk \(256 x 1200 train examples\) need 1.2 MiB"):
        score(store, targets, memory_limit=1 << 20, top_k=5, model=model)
    assert Store.open(store).manifest.json == before
    report = score(store, targets, memory_limit=1 << 20, top_k=5, top_k_only=True, model=model, top_k_out=tmp_path / "top.csv")
    assert report.chunks_done == 1 and len(report.top_k_rows) > 0
    dense = score(store, targets, top_k=5, top_k_out=tmp_path / "dense.csv", model=model)
    assert report.top_k_rows == dense.top_k_rows


def test_show_reads_top_k_only_scores_that_kept_enough_examples(finalized, tmp_path):
    from trakwomp.analysis.predict import predict
    from trakwomp.analysis.show import show
    from trakwomp.stages.selection import Selection

    store, targets = finalized
    score(store, targets, target_chunk_rows=4, out=tmp_path / "dense.npy")
    expected = [row for row in top_k_of(np.load(tmp_path / "dense.npy"), 3) if row[0] == 6]
    kept = shutil.copytree(store, tmp_path / "kept")
    Store.open(kept).update(lambda manifest: manifest["scores"].clear())  # other tests' scores too
    score(kept, targets, target_chunk_rows=4, top_k=5, top_k_only=True, top_k_out=tmp_path / "top.csv")
    rows = show(kept, 6, k=3, selection=Selection(targets=targets))
    assert [(r["target"], r["direction"], r["rank"], r["train_index"]) for r in rows] == expected
    assert rows == show(store, 6, k=3, selection=Selection(targets=targets))
    with pytest.raises(UserError, match=r"keep only each target's top 5 \(`top_k_only`\), and this reads the top 6"):
        show(kept, 6, k=6, selection=Selection(targets=targets))
    with pytest.raises(UserError, match="keep only each target's top 5 .* reads every train example's score"):
        predict(kept, np.ones(48, dtype=bool), Selection(targets=targets))
