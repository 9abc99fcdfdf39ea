"""verify against retraining by hand: the removed sets, the runs' outputs, the changes, the
intervals and the calibration, each computed here from the stored arrays and the recipe."""

import json
import shutil

import numpy as np
import pytest
import scipy.stats
import torch
import zarr
from PIL import Image

from conftest import (TINY, TINY_GPT, TINY_RECIPE, plain, soft_thresholded, write_scored_image_store,
                      write_scored_text_store)
from trakwomp.analysis.status import status
from trakwomp.analysis.verify import verify
from trakwomp.data.specs import load_dataset
from trakwomp.runtime import NoProgress, Shard
from trakwomp.stages.recipe import Recipe
from trakwomp.stages.fit import fit, model_outputs
from trakwomp.tasks.causal_lm import CausalLM
from trakwomp.tasks.classification import Classification

K, SEEDS, ROWS = 5, 2, (0, 2)


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    """Two reference resnet9s on 48 images, 6 LDS models on 12 target images, scored."""
    return write_scored_image_store(tmp_path_factory.mktemp("verify"))


def documented_seed(recipe_seed: int, seed: int) -> int:
    """Run `seed`'s torch seed as docs/method.md states it: SeedSequence([recipe seed, 3, seed])."""
    return int(np.random.SeedSequence([recipe_seed, 3, seed]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def by_hand(data, targets, keep: np.ndarray, seed: int, model=TINY, recipe=TINY_RECIPE, task=Classification()):
    """f on the targets of the model trained by hand on `keep` with the recipe and run `seed`."""
    torch_seed = documented_seed(recipe.seed, seed)
    torch.manual_seed(torch_seed)
    net = model.build(task.output_size(data))
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        fit(net, data, keep, recipe, task, torch.Generator().manual_seed(torch_seed), torch.device("cpu"), NoProgress())
        return model_outputs(net, targets, task, torch.device("cpu"))[0]
    finally:
        torch.set_num_threads(threads)


def test_verify_equals_retraining_by_hand(image_store):
    store, data, targets = image_store
    report = verify(store, target=ROWS, k=K, seeds=SEEDS)
    group = zarr.open_group(str(store), mode="r")
    tau = soft_thresholded(group[f"scores/{report.scores}/tau"][:])[list(ROWS)].astype(np.float64)
    order = np.argsort(-tau.mean(axis=0), kind="stable")
    n, rows = len(data), list(ROWS)

    def removed(condition: str, seed: int) -> np.ndarray:
        if condition == "random":  # as docs/method.md states the draw
            return np.sort(np.random.default_rng(np.random.SeedSequence([TINY_RECIPE.seed, 3, seed, K])).permutation(n)[:K])
        return np.sort(order[:K] if condition == "supporters" else order[-K:])

    base = np.stack([by_hand(data, targets, np.arange(n), s)[rows] for s in range(SEEDS)])
    assert [c.condition for c in report.conditions] == ["supporters", "opposers", "random"]
    for result in report.conditions:
        sets = [removed(result.condition, s) for s in range(SEEDS)]
        outputs = np.stack([by_hand(data, targets, np.setdiff1d(np.arange(n), r), s)[rows] for s, r in enumerate(sets)])
        differences = outputs - base
        np.testing.assert_allclose(result.actual, differences.mean(axis=0), rtol=1e-4, atol=1e-5)
        low, high = scipy.stats.t.interval(0.95, SEEDS - 1, differences.mean(axis=0), scipy.stats.sem(differences, axis=0))
        np.testing.assert_allclose(result.low, low, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(result.high, high, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(result.predicted, np.mean([-tau[:, r].sum(axis=1) for r in sets], axis=0),
                                   rtol=1e-5, atol=1e-6)
        assert result.mean_actual == pytest.approx(differences.mean(), rel=1e-4, abs=1e-5)
    supporters, random = report.conditions[0], report.conditions[2]
    assert report.holds["supporters_lower_than_random"] == [
        s < r for s, r in zip(supporters.actual + [supporters.mean_actual], random.actual + [random.mean_actual], strict=True)]


def test_the_calibration_is_the_lds_models_fit_on_the_target_set(image_store):
    store, _, _ = image_store
    report = verify(store, target=ROWS, k=K, seeds=SEEDS)
    group = zarr.open_group(str(store), mode="r")
    tau = soft_thresholded(group[f"scores/{report.scores}/tau"][:])[list(ROWS)].astype(np.float64)
    names = sorted(group["models/lds"].group_keys())
    masks = np.stack([group[f"models/lds/{m}/mask"][:] for m in names]).astype(np.float64)
    outputs = np.stack([group[f"models/lds/{m}/margins"][:] for m in names])[:, list(ROWS)].mean(axis=1)
    fit = scipy.stats.linregress(masks @ tau.mean(axis=0), outputs)
    assert report.calibration is not None
    # the scores are thresholded in float32 (each target's RMS, then the cut): a relative 1e-4
    assert report.calibration.slope == pytest.approx(fit.slope, rel=1e-4)
    assert report.calibration.p_value == pytest.approx(fit.pvalue, rel=1e-4)


def test_runs_are_shared_resumed_and_sharded(image_store, tmp_path):
    store = shutil.copytree(image_store[0], tmp_path / "store")
    whole = verify(image_store[0], target=ROWS, k=K, seeds=SEEDS)
    assert (whole.runs, whole.runs_done, whole.runs_skipped) == (8, 0, 8)  # the first test made them
    shutil.rmtree(store / "verify")
    shutil.rmtree(store / "done" / "verify")
    first = verify(store, target=ROWS, k=K, seeds=SEEDS, shard=Shard(0, 2))
    assert not first.complete and first.runs_done == 4
    assert status(store).stages[-1].done == 4 and status(store).stages[-1].total == 8
    second = verify(store, target=ROWS, k=K, seeds=SEEDS, shard=Shard(1, 2))
    assert second.complete and second.runs_done == 4
    assert json.dumps(second.as_dict()["conditions"]) == json.dumps(whole.as_dict()["conditions"])
    ranked_by_gradcos = verify(store, target=ROWS, k=K, seeds=SEEDS, method="gradcos")
    assert ranked_by_gradcos.runs_skipped >= 4  # nothing removed and random removal: the same runs


def test_a_group_of_a_language_model_equals_retraining_by_hand(tmp_path, cli):
    store = write_scored_text_store(tmp_path, "store", "train.jsonl", "targets.jsonl")
    texts, targets = (load_dataset(f"jsonl:{tmp_path / name}") for name in ("train.jsonl", "targets.jsonl"))
    sources = np.array([json.loads(line)["source"] for line in (tmp_path / "train.jsonl").read_text().splitlines()])
    result = cli("verify", str(store), "--group", str(sources[0]), "--seeds", "1", "--json", "--quiet")
    assert result.exit_code == 0, plain(result.output)
    report = json.loads(result.stdout)
    members = np.flatnonzero(sources == sources[0])
    tau = soft_thresholded(zarr.open_group(str(store), mode="r")[f"scores/{report['scores']}/tau"][:]).astype(np.float64)
    removed = report["conditions"][0]
    assert (removed["condition"], removed["removed"]) == ("group", len(members))
    np.testing.assert_allclose(removed["predicted"], -tau[:, members].sum(axis=1), rtol=1e-5, atol=1e-6)
    hand = {"model": TINY_GPT, "recipe": Recipe.for_task(CausalLM(), epochs=1), "task": CausalLM()}
    change = by_hand(texts, targets, np.setdiff1d(np.arange(len(texts)), members), 0, **hand) - \
        by_hand(texts, targets, np.arange(len(texts)), 0, **hand)
    np.testing.assert_allclose(removed["actual"], change, rtol=1e-4, atol=1e-4)
    assert removed["low"] == [None] * len(targets)  # one seed: no interval


def test_the_cli_prints_the_table_and_draws_the_png(image_store, tmp_path, cli):
    store = image_store[0]
    png = tmp_path / "verify.png"
    result = cli("verify", str(store), "--target", "0", "--target", "2", "--k", str(K), "--seeds", str(SEEDS),
                 "--out", str(png))
    assert result.exit_code == 0, plain(result.output)
    text = plain(result.stdout)
    for fragment in ("supporters", "opposers", "random", "95% interval", "supporters lower than random"):
        assert fragment in text
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 400
