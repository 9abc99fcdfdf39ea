
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from trakwomp.analysis.ground_truth import GroundTruth
from trakwomp.analysis.lds import (
    THRESHOLD_GRID,
    ScoreSource,
    bootstrap_interval,
    lds_of_source,
    lds_per_target,
    pair_views,
    paired_difference,
)
from trakwomp.data.specs import load_dataset
from trakwomp.errors import UserError
from trakwomp.estimator.view import ViewSpec
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.models.spec import ModelSpec
from trakwomp.stages.export import export_scores
from trakwomp.stages.featurize import featurize
from trakwomp.stages.finalize import finalize
from trakwomp.stages.score import score


def soft(x, t):
    return np.sign(x) * np.maximum(np.abs(x) - t, 0)


def scipy_lds(masks, margins, scores):
    out = []
    for t in range(margins.shape[1]):
        predicted = masks.astype(float) @ scores[t]
        if np.ptp(predicted) == 0:
            out.append(0.0)
            continue
        out.append(spearmanr(margins[:, t], predicted).statistic)
    return np.array(out)


def write_scores(tmp_path, scores):
    np.save(tmp_path / "s.npy", scores.astype(np.float32))
    return ScoreSource.from_file(tmp_path / "s.npy", chunk_rows=3)


@pytest.fixture
def hand_made():
    rng = np.random.default_rng(4)
    masks = rng.random((24, 30)) < 0.5
    scores = rng.normal(size=(7, 30))
    scores[2] = 0.0  # constant predictions
    margins = masks.astype(float) @ scores.T * 0.3 + rng.normal(size=(24, 7))
    margins[:, 4] = np.round(margins[:, 4])  # ties
    return masks, margins, scores


def test_lds_matches_scipy(hand_made, tmp_path):
    masks, margins, scores = hand_made
    truth = GroundTruth(masks, margins, "sha")
    got = lds_per_target(write_scores(tmp_path, scores).chunks(0.0), truth)
    np.testing.assert_allclose(got, scipy_lds(masks, margins, scores.astype(np.float32)), rtol=1e-10, atol=1e-12)
    assert got[2] == 0.0
    result = lds_of_source(write_scores(tmp_path, scores), truth, resamples=500)
    expected = scipy_lds(masks, margins, scores.astype(np.float32)).mean()
    assert result.mean == pytest.approx(expected, abs=1e-10) and result.low < result.mean < result.high
    assert (result.num_targets, result.num_models) == (7, 24)


def test_threshold_chosen_on_one_half_reported_on_the_other(hand_made, tmp_path):
    masks, margins, scores = hand_made
    scores = scores.astype(np.float32).astype(np.float64)
    rms = np.sqrt((scores ** 2).mean(axis=1, keepdims=True))
    selection = [scipy_lds(masks[0::2], margins[0::2], soft(scores, t * rms)).mean() for t in THRESHOLD_GRID]
    chosen = THRESHOLD_GRID[int(np.argmax(selection))]
    result = lds_of_source(write_scores(tmp_path, scores), GroundTruth(masks, margins, "sha"), tune_threshold=True,
                      resamples=200)
    assert result.threshold == chosen and result.num_models == 12 and result.selected_on_half
    expected = scipy_lds(masks[1::2], margins[1::2], soft(scores, chosen * rms)).mean()
    assert result.mean == pytest.approx(expected, abs=1e-6)


def test_views_pair_by_position_or_broadcast():
    V = ViewSpec
    assert pair_views([], []) == [V(None, None, "auto")]
    assert pair_views([], [1, 16]) == [V(None, 1, "auto"), V(None, 16, "auto")]
    assert pair_views([1024, 16384], [1, 16], ["0", "auto"]) == [V(1024, 1, 0.0), V(16384, 16, "auto")]
    assert pair_views([4096], [1, 4], [0.01]) == [V(4096, 1, 0.01), V(4096, 4, 0.01)]
    assert pair_views([16384], [1, 2, 64], [0.1, 0.01, 0.0]) == [V(16384, 1, 0.1), V(16384, 2, 0.01), V(16384, 64, 0.0)]
    with pytest.raises(UserError, match="one of each per view"):
        pair_views([1, 2, 3], [1, 2])
    with pytest.raises(UserError, match="2 `blocks` and 3 `ridge`"):
        pair_views([], [1, 2], [0.1, 0.2, 0.3])


def normal_interval(values):
    """mean +- 1.96 standard errors: what a percentile bootstrap of the mean approaches."""
    se = values.std(ddof=1) / np.sqrt(len(values))
    return values.mean() - 1.96 * se, values.mean() + 1.96 * se, se


def test_bootstrap_interval_approaches_the_normal_interval():
    values = np.random.default_rng(0).normal(0.3, 0.1, 400)
    low, high = bootstrap_interval(values, resamples=2000)
    expected_low, expected_high, se = normal_interval(values)
    assert low == pytest.approx(expected_low, abs=0.4 * se) and high == pytest.approx(expected_high, abs=0.4 * se)
    assert bootstrap_interval(np.full(50, 0.2)) == pytest.approx((0.2, 0.2))


def test_paired_difference_is_taken_target_by_target(tmp_path):
    """Two score sets on 200 targets: the paired difference and its interval against scipy's
    per-target Spearman correlations."""
    rng = np.random.default_rng(5)
    masks = rng.random((30, 40)) < 0.5
    signal = rng.normal(size=(200, 40))
    margins = masks.astype(float) @ signal.T + rng.normal(size=(30, 200)) * 4
    good, worse = signal + rng.normal(size=signal.shape), signal + rng.normal(size=signal.shape) * 1.5
    truth = GroundTruth(masks, margins, "sha")
    results = [lds_of_source(write_scores(tmp_path, s), truth, resamples=200) for s in (good, worse)]
    diff = paired_difference(*results, resamples=4000)
    per_target = scipy_lds(masks, margins, good.astype(np.float32)) - scipy_lds(masks, margins, worse.astype(np.float32))
    expected_low, expected_high, se = normal_interval(per_target)
    assert diff.mean == pytest.approx(per_target.mean(), abs=1e-10)
    assert diff.low == pytest.approx(expected_low, abs=0.4 * se) and diff.high == pytest.approx(expected_high, abs=0.4 * se)


LOGISTIC_MODULE = """
import torch
class Logistic(torch.nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.linear = torch.nn.Linear(5, 1)
    def forward(self, x):
        z = self.linear(x)
        return torch.cat([z, torch.zeros_like(z)], dim=1)
def build(num_classes):
    return Logistic(num_classes)
"""


def fit_logistic(build, x, y, l2=1e-2):
    """Regularised logistic regression trained to convergence by L-BFGS (independent of trakwomp)."""
    torch.manual_seed(0)
    model = build(2)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xt), yt) + l2 * model.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval()


def test_unprojected_trak_is_accurate_for_logistic_regression(tmp_path, user_module):
    user_module("logistic_lds_model", LOGISTIC_MODULE)
    from logistic_lds_model import build

    rng = np.random.default_rng(1)
    w = rng.normal(size=5)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    y = (x @ w + 0.8 * rng.normal(size=120) < 0).astype(np.int64)
    xt = rng.normal(size=(20, 5)).astype(np.float32)
    yt = (xt @ w < 0).astype(np.int64)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "targets.npz", x=xt, y=yt)
    torch.save(fit_logistic(build, x, y).state_dict(), tmp_path / "full.pt")

    masks = np.stack([rng.permutation(120) < 60 for _ in range(60)])
    margins = []
    for mask in masks:
        net = fit_logistic(build, x[mask], y[mask])
        with torch.no_grad():
            logits = net(torch.from_numpy(xt))
        margins.append((logits[np.arange(20), yt] - logits[np.arange(20), 1 - yt]).numpy())
    truth = GroundTruth(masks, np.stack(margins).astype(np.float64), "sha")

    data, targets = load_dataset(f"npz:{tmp_path / 'train.npz'}"), load_dataset(f"npz:{tmp_path / 'targets.npz'}")
    store = tmp_path / "store"
    spec = ModelSpec.parse("logistic_lds_model:build")
    featurize(store, data, spec, [tmp_path / "full.pt"], projector=ProjectorSpec("identity", 0, 1, 6))
    finalize(store, ViewSpec(blocks=1))
    key = score(store, targets, ViewSpec(blocks=1), model=spec).key
    export_scores(store, key, tmp_path / "scores.npy")
    result = lds_of_source(ScoreSource.from_file(tmp_path / "scores.npy"), truth, resamples=200)
    # Measured 0.94 here (60 LDS models, 20 targets); a broken estimator (wrong sign, wrong q, a
    # mis-indexed inverse) falls far below. 0.8 leaves room for platform noise.
    assert result.mean > 0.8, result.mean
