"""LDS baselines (gradcos, repsim, bm25) against direct formulas computed here."""

import json
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch
import zarr
from scipy.stats import spearmanr

from conftest import TINY_GPT, fortunes, write_jsonl, write_scored_image_store, write_tiny_images
from trakwomp.analysis.baselines import BASELINES, BaselineInputs
from trakwomp.analysis.ground_truth import GroundTruth
from trakwomp.analysis.lds import lds
from trakwomp.analysis.show import show
from trakwomp.data.specs import load_dataset
from trakwomp.errors import UserError
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.stages.featurize import featurize
from trakwomp.stages.finalize import finalize
from trakwomp.stages.recipe import Recipe
from trakwomp.stages.score import score
from trakwomp.stages.train import load_reference_model, train
from trakwomp.store import Store
from trakwomp.tasks.causal_lm import CausalLM


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    """Two reference resnet9s on 48 images, 6 LDS models on 12 target images, scored."""
    return write_scored_image_store(tmp_path_factory.mktemp("baselines"))


@pytest.fixture(scope="module")
def text_store(tmp_path_factory):
    """A tiny gpt on 24 fortunes, 6 LDS models on 4 test fortunes, which are scored."""
    root = tmp_path_factory.mktemp("text-baselines")
    texts = load_dataset(f"jsonl:{write_jsonl(root / 'train.jsonl', fortunes('train', 24))}")
    targets = load_dataset(f"jsonl:{write_jsonl(root / 'targets.jsonl', fortunes('test', 4))}")
    store, recipe = root / "store", Recipe.for_task(CausalLM(), epochs=1)
    train(store, texts, TINY_GPT, task=CausalLM(), recipe=recipe)
    train(store, texts, TINY_GPT, targets=targets, task=CausalLM(), role="lds", num_models=6, recipe=recipe)
    featurize(store, projector=ProjectorSpec("sjlt", 0, 2, 8))
    finalize(store)
    score(store, targets)
    return store, texts, targets


def baseline_scores(store, name: str) -> np.ndarray:
    """The whole (targets, train) matrix of a baseline, as `lds` reads it."""
    report = lds(store, baselines=[name], resamples=10)
    assert [r.name for r in report.results][1:] == [f"{name} (baseline)"]
    handle = Store.open(store)
    truth = GroundTruth.from_store(handle)
    inputs = BaselineInputs(handle, [m.id for m in handle.manifest.models], truth.targets_sha,
                            truth.outputs.shape[1], truth.masks.shape[1], torch.device("cpu"))
    return np.concatenate([block for _, block in BASELINES.get(name).chunks(inputs)()])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T


def scipy_lds(store, scores: np.ndarray) -> float:
    group = zarr.open_group(str(store), mode="r")
    names = sorted(group["models/lds"].group_keys())
    masks = np.stack([group[f"models/lds/{n}/mask"][...] for n in names]).astype(np.float64)
    outputs = np.stack([group[f"models/lds/{n}/margins"][...] for n in names]).astype(np.float64)
    predicted = masks @ scores.T
    return float(np.mean([0.0 if np.ptp(predicted[:, t]) == 0 else spearmanr(outputs[:, t], predicted[:, t]).statistic
                          for t in range(scores.shape[0])]))


def test_gradcos_is_the_mean_cosine_of_the_stored_projected_gradients(image_store):
    store, _, _ = image_store
    group = zarr.open_group(str(store), mode="r")
    (targets_id,) = group["targets"].group_keys()
    expected = np.mean([cosines(group[f"targets/{targets_id}/features/{m:06d}/phi"][...],
                                group[f"features/{m:06d}/phi"][...]) for m in (0, 1)], axis=0)
    got = baseline_scores(store, "gradcos")
    np.testing.assert_allclose(got, expected, atol=1e-5)
    report = lds(store, baselines=["gradcos"], resamples=10)
    assert report.results[1].mean == pytest.approx(scipy_lds(store, expected), abs=1e-9)
    assert report.results[1].threshold == 0.0 and report.differences[0].baseline == report.results[0].name


def test_repsim_is_the_cosine_of_the_inputs_of_the_output_layer(image_store):
    store, data, targets = image_store
    expected = []
    for m in (0, 1):
        net = load_reference_model(store, m, 4).eval()
        with torch.no_grad():  # resnet9 ends Flatten, Linear, Scale: the Linear's input is net[:-2](x)
            hidden = [net[:-2](torch.stack([d[i][0] for i in range(len(d))])).numpy() for d in (targets, data)]
        expected.append(cosines(*hidden))
    np.testing.assert_allclose(baseline_scores(store, "repsim"), np.mean(expected, axis=0), atol=1e-5)


def test_repsim_of_a_language_model_averages_the_final_hidden_states_over_each_text(text_store):
    store, texts, targets = text_store
    net = load_reference_model(store, 0, 257).eval()

    def mean_hidden(data) -> np.ndarray:
        rows = []
        for i in range(len(data)):
            ids = data[i][0][None]
            with torch.no_grad():
                x = net.tokens(ids) + net.positions(torch.arange(ids.shape[1]))
                rows.append(net.norm(net.blocks(x))[0].mean(dim=0).numpy())
        return np.stack(rows)

    np.testing.assert_allclose(baseline_scores(store, "repsim"), cosines(mean_hidden(targets), mean_hidden(texts)),
                               atol=1e-5)


def lucene_bm25(query: str, documents: list[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """Lucene's BM25 written out: words of 2+ word characters, lowercased; idf = log(1 + (N - df +
    0.5) / (df + 0.5)); each query word (repeats counted) adds idf tf / (tf + k1 (1 - b + b |d| / avgdl))
    (Lucene leaves out Okapi's constant factor k1 + 1)."""
    def words(text):
        return re.findall(r"(?u)\b\w\w+\b", text.lower())

    docs = [Counter(words(d)) for d in documents]
    lengths = np.array([sum(d.values()) for d in docs], dtype=np.float64)
    average = lengths.mean()
    out = np.zeros(len(docs))
    for word in words(query):
        df = sum(word in d for d in docs)
        idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
        tf = np.array([d[word] for d in docs], dtype=np.float64)
        out += idf * tf / (tf + k1 * (1 - b + b * lengths / average))
    return out


def test_bm25_is_lucenes_formula_on_the_texts(text_store):
    pytest.importorskip("bm25s")
    store, texts, targets = text_store
    expected = np.stack([lucene_bm25(targets.text(t), [texts.text(i) for i in range(len(texts))])
                         for t in range(len(targets))])
    assert (expected > 0).any()
    np.testing.assert_allclose(baseline_scores(store, "bm25"), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BASELINES.names())
def test_every_baseline_scores_every_target_and_train_example_finitely(text_store, name):
    if name == "bm25":
        pytest.importorskip("bm25s")
    store, texts, targets = text_store
    scores = baseline_scores(store, name)
    assert scores.shape == (len(targets), len(texts)) and scores.dtype == np.float32 and np.isfinite(scores).all()
    assert np.ptp(scores) > 0  # not a constant: each target ranks the train examples


def test_baselines_that_cannot_run_are_refused_in_one_line(image_store, tmp_path):
    store, _, _ = image_store
    with pytest.raises(UserError, match=r"unknown `baseline` 'nothing': expected one of gradcos, repsim, bm25"):
        lds(store, baselines=["nothing"])
    with pytest.raises(UserError, match=r"^the bm25 baseline needs text data .*, not npz:"):
        lds(store, baselines=["bm25"])


def test_the_cli_reports_baseline_rows_and_their_paired_differences(image_store, cli):
    store, _, _ = image_store
    result = cli("lds", str(store), "--baseline", "gradcos", "--baseline", "repsim", "--bootstrap", "20", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    names = [r["name"] for r in report["results"]]
    assert names[1:] == ["gradcos (baseline)", "repsim (baseline)"] and names[0].startswith("TRAK")
    assert [(d["name"], d["baseline"]) for d in report["paired_differences"]] == [(n, names[0]) for n in names[1:]]
    assert report["results"][1]["lds"] == pytest.approx(lds(store, baselines=["gradcos"], resamples=20).results[1].mean)


def test_targets_changed_since_they_were_recorded_are_refused_by_show_and_repsim(image_store, tmp_path):
    store, _, _ = image_store
    spec_file = store.parent / "targets.npz"
    kept = spec_file.read_bytes()
    try:
        write_tiny_images(spec_file, n=12, seed=2)  # the same size, other images
        with pytest.raises(UserError, match=r"^the scored targets at 'npz:.*' are not those the store recorded "
                                            r"\(fingerprint differs\); pass `targets`"):
            show(store, 0, out=tmp_path / "show.png")
        with pytest.raises(UserError, match=r"^the targets at .* are not those the store recorded .*repsim"):
            lds(store, baselines=["repsim"])
    finally:
        spec_file.write_bytes(kept)
