"""The regression task: f, q and the gradients against autograd; TRAK's scores against the
closed-form leave-one-out of least squares; every command on real-valued labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import plain
from trakwomp.store import Store, paths

from trakwomp.data.base import load_batch
from trakwomp.data.specs import load_dataset
from trakwomp.errors import UserError
from trakwomp.estimator.view import ViewSpec
from trakwomp.features.gradients import PerExampleGradients, select_parameters
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.models.spec import ModelSpec
from trakwomp.stages.featurize import featurize
from trakwomp.stages.finalize import finalize
from trakwomp.stages.score import score
from trakwomp.tasks.registry import make_task

REGRESSION = make_task("regression")
LINEAR = "linmods.linear:build"
LINEAR_SOURCE = ("import torch\n"
                 "def build(outputs):\n"
                 "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, outputs, bias=False))\n")


def write_values(path, n: int, dims=(6,), seed: int = 0):
    """An npz of n inputs and real-valued labels: a noisy linear function of the inputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *dims)).astype(np.float32)
    y = (x.reshape(n, -1) @ rng.standard_normal(int(np.prod(dims))) + 0.5 * rng.standard_normal(n)).astype(np.float32)
    np.savez(path, x=x, y=y)
    return path


def test_regression_outputs_weights_and_gradients_match_autograd(tmp_path):
    data = load_dataset(f"npz:{write_values(tmp_path / 'v.npz', 10, dims=(3, 4, 4))}")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    names = select_parameters(net, None)
    out = PerExampleGradients(net, names, torch.device("cpu"), REGRESSION)(load_batch(data, range(10)))
    for i in range(10):
        x, y = data[i]
        f = net(x.unsqueeze(0)).squeeze()
        grads = torch.autograd.grad(f, list(net.parameters()))
        torch.testing.assert_close(out.rows[i], torch.cat([g.reshape(-1) for g in grads]), rtol=1e-5, atol=1e-6)
        assert out.outputs[i].item() == pytest.approx(f.item(), rel=1e-5, abs=1e-6)
        assert out.q[i].item() == pytest.approx(y - f.item(), rel=1e-5, abs=1e-5)  # q = y - f, the residual


def test_scores_of_a_least_squares_fit_are_its_exact_leave_one_out_times_one_minus_leverage(tmp_path, user_module):
    """For f = theta . x fitted by least squares, removing train example i changes f(z) by
    x_z (X^T X)^-1 x_i r_i / (1 - h_i) exactly (r_i the residual, h_i the leverage); TRAK with
    q = r and no projection (identity, one block, no ridge) gives that times 1 - h_i."""
    user_module("linmods.linear", LINEAR_SOURCE)
    train_path, target_path = write_values(tmp_path / "train.npz", 40), write_values(tmp_path / "targets.npz", 7, seed=1)
    with np.load(train_path) as z:
        x, y = z["x"].astype(np.float64), z["y"].astype(np.float64)
    with np.load(target_path) as z:
        xz = z["x"].astype(np.float64)
    theta = np.linalg.lstsq(x, y, rcond=None)[0]
    checkpoint = tmp_path / "fitted.pt"
    torch.save({"1.weight": torch.tensor(theta, dtype=torch.float32).view(1, 6)}, checkpoint)
    store, spec = tmp_path / "store", ModelSpec.parse(LINEAR)
    featurize(store, load_dataset(f"npz:{train_path}"), spec, [str(checkpoint)], task=REGRESSION,
              projector=ProjectorSpec("identity", blocks=1, block_dim=6))
    finalize(store, ViewSpec(ridge=0))
    report = score(store, load_dataset(f"npz:{target_path}"), ViewSpec(ridge=0), model=spec)
    tau = Store.open(store).read_array(paths.scores(report.key))
    leverage = np.einsum("ij,jk,ik->i", x, np.linalg.inv(x.T @ x), x)
    expected = np.empty((len(xz), len(x)))
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        theta_without = np.linalg.lstsq(x[keep], y[keep], rcond=None)[0]
        expected[:, i] = (xz @ theta - xz @ theta_without) * (1 - leverage[i])
    np.testing.assert_allclose(tau, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_every_command_runs_on_real_valued_labels(tmp_path, cli):
    train_path = write_values(tmp_path / "train.npz", 48, dims=(3, 16, 16))
    targets = f"npz:{write_values(tmp_path / 'targets.npz', 12, dims=(3, 16, 16), seed=1)}"
    store = tmp_path / "store"
    recipe = ["--data", f"npz:{train_path}", "--task", "regression", "--width", "0.125", "--epochs", "2",
              "--batch-size", "16"]
    for args in (["train", store, *recipe], ["train", store, *recipe, "--role", "lds", "--num-models", "4",
                                             "--targets", targets],
                 ["featurize", store, "--blocks", "2", "--block-dim", "32"], ["finalize", store],
                 ["score", store, "--targets", targets, "--top-k", "2", "--top-k-out", tmp_path / "top.json"],
                 ["lds", store], ["predict", store, "--subset", write_mask(tmp_path)],
                 ["verify", store, "--target", "0", "--k", "4", "--seeds", "1"], ["status", store]):
        result = cli(*args, *(["--quiet"] if args[0] in ("train", "featurize", "finalize", "score") else []))
        assert result.exit_code == 0, (args[0], plain(result.output))
    handle = Store.open(store)
    assert handle.manifest.task.json == {"name": "regression"}
    outputs = handle.read_array(f"{paths.features(0)}/margins")
    net = ModelSpec.parse("resnet9", 0.125).build(1)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in
                         handle.read_arrays(paths.weights(paths.trained_model("reference", 0))).items()})
    with torch.no_grad(), np.load(train_path) as z:
        direct = net.eval()(torch.from_numpy(z["x"])).squeeze(1).numpy()
    np.testing.assert_allclose(outputs, direct, rtol=1e-4, atol=1e-5)


def write_mask(tmp_path):
    path = tmp_path / "half.npy"
    np.save(path, np.arange(48) % 2 == 0)
    return path


def test_regression_refuses_class_labels_and_classification_refuses_values(tmp_path, tiny_npz):
    values = load_dataset(f"npz:{write_values(tmp_path / 'v.npz', 8)}")
    with pytest.raises(UserError, match="regression needs real-valued labels"):
        REGRESSION.check_data(load_dataset(f"npz:{tiny_npz}"))
    with pytest.raises(UserError, match="real-valued labels for `task` regression"):
        make_task("classification").check_data(values)
    with pytest.raises(UserError, match="`lm_output` applies to `task` causal-lm only"):
        make_task("regression", lm_output="token")
