"""`score --top-k K --top-k-only`: each target's top k kept without the (targets x train) scores,
checked against a stable sort of whole rows, and against eq. 3 computed densely in float64 from the
stored features, within the rounding that float32 scores can have."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_RECIPE, block_diagonal_scores, soft_thresholded, write_tiny_images
from trakwomp.store import Store, paths

from trakwomp.data.specs import load_dataset
from trakwomp.errors import UserError
from trakwomp.estimator.scores import RunningTopK
from trakwomp.estimator.view import ViewSpec
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


UNIT = 2.0 ** -24  # float32's unit roundoff
EXACT = ViewSpec(ridge=0.0)  # no ridge, so that the float64 reference inverts the Gram matrices as they are


def reference_and_bound(handle, key: str, widths: list[int], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The soft-thresholded scores of eq. 3 in float64 (`block_diagonal_scores`), and a bound on how
    far float32 scores of them may be: (D + M + 4) u sum |w_j x_j| for the dot products of D dims
    summed over M models and the roundings of the weighted targets, q and the product, plus u of
    the score, plus the threshold's share of the largest such error in the row's RMS."""
    prefix = paths.targets_prefix(handle.manifest.scores[key].targets)
    raw, size = block_diagonal_scores(handle, widths, prefix, 0.0, magnitude=True)
    error = (sum(widths) + len(handle.manifest.models) + 4) * UNIT * size + UNIT * np.abs(raw)
    rms = np.sqrt((raw ** 2).mean(axis=1, keepdims=True))
    return soft_thresholded(raw, threshold), error + threshold * (error.max(axis=1, keepdims=True) + 2 * UNIT * rms)


def check_top_k(rows: list[dict], reference: np.ndarray, error: np.ndarray, k: int, targets: range) -> None:
    """Each target's listed supporting and opposing examples are a top k of `reference` up to
    `error`: scores within their bounds, ranks in order, none left out that beats a listed one
    beyond both bounds, and a list shorter than k only where the rest are zero within theirs."""
    for t in targets:
        for direction, sign in (("supports", 1), ("opposes", -1)):
            listed = [r for r in rows if r["target"] == t and r["direction"] == direction]
            assert [r["rank"] for r in listed] == list(range(1, len(listed) + 1))
            chosen = np.array([r["train_index"] for r in listed], dtype=int)
            ref, err = sign * reference[t], error[t]
            assert np.all(np.abs(sign * np.array([r["score"] for r in listed]) - ref[chosen]) <= err[chosen])
            assert np.all(ref[chosen] + err[chosen] > 0) and len(chosen) <= k
            assert np.all(ref[chosen][1:] - err[chosen][1:] <= ref[chosen][:-1] + err[chosen][:-1])
            others = np.setdiff1d(np.arange(len(ref)), chosen)
            weakest = (ref[chosen] + err[chosen]).min() if len(chosen) == k else 0.0
            assert np.all(ref[others] - err[others] <= weakest)


@pytest.fixture(scope="module")
def finalized(trained_once, tmp_path_factory):
    """Two models' features in 3 row chunks of the 48 train images (2 blocks of 8 dims), finalized
    without a ridge, and 11 targets."""
    root = tmp_path_factory.mktemp("top-k")
    store = shutil.copytree(trained_once / "store", root / "store")
    featurize(store, projector=ProjectorSpec("sjlt", 0, 2, 8), chunk_rows=16)
    finalize(store, EXACT)
    return store, load_dataset(f"npz:{write_tiny_images(root / 'targets.npz', n=11, seed=1)}")


@pytest.mark.parametrize("threshold", [0.0, 0.25])
def test_top_k_only_lists_a_top_k_of_eq_3_in_float64(finalized, tmp_path, threshold):
    store, targets = finalized
    for k in (3, 48, 60):  # fewer than, all of, and more than the train examples
        kept = score(store, targets, EXACT, target_chunk_rows=4, threshold=threshold, top_k=k, top_k_only=True,
                     top_k_out=tmp_path / f"top-{k}.json")
        handle = Store.open(store)
        assert handle.chunks_of(paths.scores(kept.key)) is None  # no dense scores
        reference, error = reference_and_bound(handle, kept.key, [8, 8], threshold)
        check_top_k(kept.top_k_rows, reference, error, k, range(11))


def test_shards_keep_their_target_chunks_and_the_last_run_writes_the_table(finalized, tmp_path):
    store, targets = finalized
    store = shutil.copytree(store, tmp_path / "store")
    settings = dict(target_chunk_rows=4, top_k=5, top_k_only=True, top_k_out=tmp_path / "top.csv")
    first = score(store, targets, EXACT, shard=Shard(0, 2), **settings)
    assert first.top_k_file is None and not (tmp_path / "top.csv").exists()
    second = score(store, targets, EXACT, shard=Shard(1, 2), **settings)
    assert second.top_k_file == str(tmp_path / "top.csv") and first.chunks_done + second.chunks_done == 3
    whole = score(store, targets, EXACT, **{**settings, "top_k_out": tmp_path / "whole.csv"})
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
    finalize(store, EXACT)
    before = Store.open(store).manifest.json
    with pytest.raises(UserError, match=r"the scores of one target chunk \(256 x 1200 train examples\) need 1.2 MiB"):
        score(store, targets, EXACT, memory_limit=1 << 20, top_k=5, model=model)
    assert Store.open(store).manifest.json == before
    report = score(store, targets, EXACT, memory_limit=1 << 20, top_k=5, top_k_only=True, model=model,
                   top_k_out=tmp_path / "top.csv")
    assert report.chunks_done == 1 and len(report.top_k_rows) > 0
    reference, error = reference_and_bound(Store.open(store), report.key, [16, 16], 0.25)
    check_top_k(report.top_k_rows, reference, error, 5, range(256))


def test_show_reads_top_k_only_scores_that_kept_enough_examples(finalized, tmp_path):
    from trakwomp.analysis.predict import predict
    from trakwomp.analysis.show import show
    from trakwomp.stages.selection import Selection

    store, targets = finalized
    kept = shutil.copytree(store, tmp_path / "kept")
    Store.open(kept).update(lambda manifest: manifest["scores"].clear())  # other tests' scores too
    key = score(kept, targets, EXACT, target_chunk_rows=4, top_k=5, top_k_only=True, top_k_out=tmp_path / "top.csv").key
    selection = Selection(view=EXACT, targets=targets)
    rows = show(kept, 6, k=3, selection=selection)
    reference, error = reference_and_bound(Store.open(kept), key, [8, 8], 0.25)
    assert {r["target"] for r in rows} == {6} and len(rows) > 0
    check_top_k(rows, reference, error, 3, range(6, 7))
    with pytest.raises(UserError, match=r"keep only each target's top 5 \(`top_k_only`\), and this reads the top 6"):
        show(kept, 6, k=6, selection=selection)
    with pytest.raises(UserError, match="keep only each target's top 5 .* reads every train example's score"):
        predict(kept, np.ones(48, dtype=bool), selection)
