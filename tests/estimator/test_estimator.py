"""The estimator against independent computations: dense numpy eq. 2 / eq. 3, the reference
TRAK library (`traker`), and the definitions of the soft threshold and ridge."""


import importlib
import shutil

import numpy as np
import pytest
import torch
import zarr
from conftest import soft_thresholded, write_tiny_images

from trakwomp.analysis.predict import predict
from trakwomp.analysis.show import show
from trakwomp.data.specs import load_dataset
from trakwomp.errors import UserError
from trakwomp.estimator import scores as scoring
from trakwomp.estimator.inverse import regularized_inverse
from trakwomp.estimator.threshold import relative_soft_threshold, soft_threshold
from trakwomp.estimator.view import AUTO_RIDGE_SCALE, View, ViewSpec
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.models.spec import ModelSpec
from trakwomp.stages.featurize import featurize
from trakwomp.stages.finalize import finalize
from trakwomp.stages.recipe import Recipe
from trakwomp.stages.score import score
from trakwomp.stages.selection import parse_model_ids
from trakwomp.stages.selection import Selection
from trakwomp.stages.train import train


def test_soft_threshold_matches_its_definition():
    v = torch.tensor([-3.0, -0.5, 0.0, 0.2, 1.0, 4.0])
    expected = [np.sign(x) * max(abs(x) - 0.7, 0) for x in v.tolist()]
    assert soft_threshold(v, 0.7).tolist() == pytest.approx(expected)
    rows = torch.tensor([[1.0, -2.0, 3.0], [10.0, 0.0, -10.0]])
    rms = rows.pow(2).mean(1, keepdim=True).sqrt()
    torch.testing.assert_close(relative_soft_threshold(rows, 0.5), soft_threshold(rows, 0.5 * rms))
    assert relative_soft_threshold(rows, 0.0) is rows


def test_regularized_inverse_with_relative_ridge():
    g = torch.randn(30, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gram = g.T @ g
    expected = np.linalg.inv(gram.numpy() + 0.1 * np.mean(np.diag(gram.numpy())) * np.eye(6))
    np.testing.assert_allclose(regularized_inverse(gram, 0.1).numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(regularized_inverse(gram, 0.0).numpy(), np.linalg.inv(gram.numpy()), rtol=1e-9)
    dependent = g.clone()
    dependent[:, 5] = 0  # a feature that is always zero: the Gram matrix has a zero pivot
    singular = dependent.T @ dependent
    with pytest.raises(UserError, match="`ridge`"):
        regularized_inverse(singular, 0.0)
    # features that sum to zero (as a margin's logit gradients do): singular, though rounding
    # leaves a Cholesky pivot of 3e-16 of the largest diagonal entry, so the factorization succeeds
    dependent[:, 5] = -g[:, :5].sum(1)
    rounded = dependent.T @ dependent
    assert torch.linalg.cholesky_ex(rounded)[1].item() == 0
    with pytest.raises(UserError, match="not positive definite"):
        regularized_inverse(rounded, 0.0)
    assert np.isfinite(regularized_inverse(rounded, 1e-6).numpy()).all()


@pytest.mark.parametrize("dims, blocks, ridge, n, message", [
    (8192, None, 0, 5000, "not available"),
    (1000, None, 0, 5000, "multiple of the stored block dim"),
    (4096, 3, 0, 5000, "whole stored blocks"),
    (2048, 4, 0, 5000, "whole stored blocks"),
    (4096, 1, 0, 3000, "singular"),
    (4096, 1, -1, 5000, "`ridge` must be auto or a number >= 0"),
])
def test_view_refuses_what_the_features_cannot_give(dims, blocks, ridge, n, message):
    with pytest.raises(UserError, match=message):
        View.resolve(4096, 1024, dims, blocks, ridge, n)


def test_view_defaults_and_groupings():
    assert View.resolve(16384, 1024, None, None, 0, 50000) == View(16384, 16, 0.0)
    automatic = View.resolve(16384, 1024, None, 4, "auto", 5000)
    assert automatic.key == "d16384-b4-ridgeauto"
    assert automatic.block_ridge(0, 5000) == pytest.approx(AUTO_RIDGE_SCALE * np.sqrt(4096 * 5000) / 4 ** 0.75)
    assert View.resolve(16384, 1024, 4096, 1, 0, 50000).widths == (4096,)
    assert View.resolve(16384, 1024, None, 4, 0, 50000).columns(2) == slice(8192, 12288)
    assert View.resolve(4096, 1024, None, 1, 1e-3, 2000).ridge == 1e-3


@pytest.fixture(scope="module")
def model_store(tmp_path_factory):
    """Three tiny trained ResNet-9s, featurized at d = 4 x 8 on 48 train images, finalized at
    B = 1 and B = 4; models 0 and 1 scored at three views, models {0, 2} at B = 4."""
    root = tmp_path_factory.mktemp("est")
    train_npz = write_tiny_images(root / "train.npz")
    target_npz = write_tiny_images(root / "targets.npz", n=9, seed=5)
    data = load_dataset(f"npz:{train_npz}")
    store = root / "store"
    train(store, data, ModelSpec.parse("resnet9", 1 / 16), num_models=3, recipe=Recipe(epochs=1, batch_size=16, lr=0.05))
    featurize(store, projector=ProjectorSpec("gaussian", 1, 4, 8), chunk_rows=20)
    targets = load_dataset(f"npz:{target_npz}")
    keys = {}
    # Target chunks of 4 rows (3 chunks) scored one per pass over the train features, two per
    # pass, and all in one pass (the default budget).
    for (blocks, ridge), pass_bytes in zip(((1, 0.0), (4, 0.5), (4, 0.0)), (1, 4 * 48 * 4 * 2, None), strict=True):
        with pytest.MonkeyPatch.context() as patch:
            if blocks == 1:  # a block too big for one chunk is stored in row chunks (here 5 rows of 32)
                patch.setattr(importlib.import_module("trakwomp.stages.finalize"), "INVERSE_CHUNK_BYTES", 8 * 32 * 5)
            finalize(store, ViewSpec(blocks=blocks, ridge=ridge))
            if pass_bytes:
                patch.setattr(scoring, "SCORE_PASS_BYTES", pass_bytes)
            keys[blocks, ridge] = score(store, targets, ViewSpec(blocks=blocks, ridge=ridge), models=[0, 1],
                                        target_chunk_rows=4).key
    return store, keys, targets


def stored(store, path):
    return np.asarray(zarr.open_array(str(store / path), mode="r")[...], dtype=np.float64)


def model_features(store, target_key, models):
    """(train features, target features, q) of each model, read straight from the Zarr arrays."""
    return [(stored(store, f"features/00000{m}/phi"), stored(store, f"targets/{target_key}/features/00000{m}/phi"),
             stored(store, f"features/00000{m}/q")) for m in models]


def dense_scores(store, blocks, ridge, target_key, models=(0, 1)):
    """eq. 3 in numpy from the stored features: per model and block, phi_b(z) (Phi_b^T Phi_b + r I)^-1 Phi_b^T,
    summed, times (1/M^2) sum_m q_m; r = ridge x the mean diagonal, with ridge "auto" = the scale x
    sqrt(w n) / B^(3/4)."""
    total, q_sum = 0.0, 0.0
    for phi, target, q in model_features(store, target_key, models):
        w = phi.shape[1] // blocks
        for b in range(blocks):
            cols = slice(b * w, (b + 1) * w)
            gram = phi[:, cols].T @ phi[:, cols]
            relative = AUTO_RIDGE_SCALE * np.sqrt(w * len(phi)) / blocks ** 0.75 if ridge == "auto" else ridge
            gram += relative * np.trace(gram) / w * np.eye(w)
            total = total + target[:, cols] @ np.linalg.inv(gram) @ phi[:, cols].T
        q_sum = q_sum + q
    return q_sum / len(models) ** 2 * total


@pytest.mark.parametrize("blocks, ridge", [(1, 0.0), (4, 0.0), (4, 0.5)])
def test_scores_equal_dense_eq3(model_store, blocks, ridge):
    store, keys, _ = model_store
    key = keys[blocks, ridge]
    target_key = key.rsplit("_t", 1)[1]
    inverse = zarr.open_array(str(store / f"finalize/d32-b{blocks}-ridge{ridge:g}/000000/inverse"), mode="r")
    assert inverse.chunks == ((1, 5, 32) if blocks == 1 else (1, 8, 8))
    tau = stored(store, f"scores/{key}/tau")
    assert tau.shape == (9, 48)
    expected = dense_scores(store, blocks, ridge, target_key)
    np.testing.assert_allclose(tau, expected, rtol=2e-4, atol=1e-6 * np.abs(expected).max())


def test_a_model_set_with_a_gap_in_any_order_is_one_set_scored_as_eq3(model_store, tmp_path):
    """--models 0,2 and --models 2,0 name one set: one key, scores equal to dense eq. 3 over models
    0 and 2, found again by lds, predict and show in either order."""
    store, _, targets = model_store
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    finalize(copy, ViewSpec(blocks=4), models=parse_model_ids("2,0"))
    keys = {score(copy, targets, ViewSpec(blocks=4), models=parse_model_ids(given), target_chunk_rows=4).key
            for given in ("0,2", "2,0")}
    assert len(keys) == 1
    key = keys.pop()
    tau = stored(copy, f"scores/{key}/tau")
    expected = dense_scores(copy, 4, "auto", key.rsplit("_t", 1)[1], models=(0, 2))
    np.testing.assert_allclose(tau, expected, rtol=2e-4, atol=1e-6 * np.abs(expected).max())
    subset = np.arange(48) % 3 == 0
    for given in ([2, 0], [0, 2]):
        assert predict(copy, subset, Selection(ViewSpec(blocks=4), given))[0] == key
        assert show(copy, 0, k=2, selection=Selection(ViewSpec(blocks=4), given))[0]["score"] == pytest.approx(
            soft_thresholded(tau)[0].max(), rel=1e-5)


# Multinomial logistic regression with the last class as baseline (its logit fixed at 0): with a
# free logit per class the margin's gradient would be orthogonal to "shift every class alike",
# leaving the unprojected Gram matrix singular.
LINEAR_MODULE = """
import torch
class Baseline(torch.nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.linear = torch.nn.Linear(6, num_classes - 1)
    def forward(self, x):
        z = self.linear(x)
        return torch.cat([z, torch.zeros_like(z[:, :1])], dim=1)
def build(num_classes):
    return Baseline(num_classes)
"""


def test_agrees_with_traker_without_projection(tmp_path, user_module):
    import trak
    from trak.projectors import NoOpProjector

    user_module("linear_trak_model", LINEAR_MODULE)
    from linear_trak_model import build

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 6)).astype(np.float32), rng.integers(0, 3, 60)
    xt, yt = rng.normal(size=(10, 6)).astype(np.float32), rng.integers(0, 3, 10)
    y[:3], yt[:3] = [0, 1, 2], [0, 1, 2]
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "targets.npz", x=xt, y=yt)
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(build(3).eval())
        torch.save(nets[-1].state_dict(), tmp_path / f"m{seed}.pt")

    def traker_scores(model_ids):
        """traker's scores, (n_targets, n_train); it loads each checkpoint into the model it is given."""
        tr = trak.TRAKer(model=build(3).eval(), task="image_classification", train_set_size=60,
                         projector=NoOpProjector(device="cpu"), device="cpu",
                         save_dir=str(tmp_path / f"trak{''.join(map(str, model_ids))}"), use_half_precision=False)
        for m in model_ids:
            tr.load_checkpoint(nets[m].state_dict(), model_id=m)
            tr.featurize(batch=(torch.from_numpy(x), torch.from_numpy(y)), num_samples=60)
        tr.finalize_features()
        for m in model_ids:
            tr.start_scoring_checkpoint(exp_name="t", checkpoint=nets[m].state_dict(), model_id=m, num_targets=10)
            tr.score(batch=(torch.from_numpy(xt), torch.from_numpy(yt)), num_samples=10)
        return np.asarray(tr.finalize_scores(exp_name="t"), dtype=np.float64).T

    data = load_dataset(f"npz:{tmp_path / 'train.npz'}")
    targets = load_dataset(f"npz:{tmp_path / 'targets.npz'}")
    store = tmp_path / "store"
    spec = ModelSpec.parse("linear_trak_model:build")
    featurize(store, data, spec, [tmp_path / "m0.pt", tmp_path / "m1.pt"], projector=ProjectorSpec("identity", 0, 1, 14))
    finalize(store, ViewSpec(blocks=1, ridge=0.0))
    with pytest.raises(UserError, match="imports code only when you name it: pass `model` linear_trak_model:build"):
        score(store, targets, ViewSpec(blocks=1, ridge=0.0))  # the store names a user module: not imported unless the user names it
    ours = {}
    for models in ([0], [1], [0, 1]):
        ours[tuple(models)] = stored(store, f"scores/{score(store, targets, ViewSpec(blocks=1, ridge=0.0), models=models, model=spec).key}/tau")
    p = 14
    q = [stored(store, f"features/00000{m}/q") for m in (0, 1)]
    mean_abs_inverse = [np.abs(stored(store, f"finalize/d14-b1-ridge0/00000{m}/inverse")).mean() for m in (0, 1)]
    # traker divides gradients by sqrt(p) and each model's inverse by its own mean absolute value.
    for m in (0, 1):
        np.testing.assert_allclose(ours[m,], traker_scores([m]) * p * mean_abs_inverse[m], rtol=2e-3, atol=1e-6)
    x_m = [ours[m,] / q[m] for m in (0, 1)]  # phi(z) (Phi^T Phi)^-1 phi(x_i) per model
    expected_traker = (q[0] + q[1]) / 4 * (x_m[0] / (p * mean_abs_inverse[0]) + x_m[1] / (p * mean_abs_inverse[1]))
    np.testing.assert_allclose(traker_scores([0, 1]), expected_traker, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(ours[0, 1], (q[0] + q[1]) / 4 * (x_m[0] + x_m[1]), rtol=1e-5, atol=1e-9)


def test_score_passes_group_consecutive_chunks_within_the_byte_budget(monkeypatch):
    monkeypatch.setattr(scoring, "SCORE_PASS_BYTES", 4 * 48 * 4 * 2)  # two chunks of 4 targets x 48 train
    assert scoring.score_passes([0, 1, 2, 4, 5, 6, 7], 4 * 4 * 48) == [[0, 1], [2], [4, 5], [6, 7]]
    monkeypatch.setattr(scoring, "SCORE_PASS_BYTES", 1)
    assert scoring.score_passes([0, 1, 3], 4 * 4 * 48) == [[0], [1], [3]]
