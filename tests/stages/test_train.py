import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from conftest import REPO, TINY, read_store
from trakwomp.store import Store, StoreError, paths

from trakwomp.data.specs import load_dataset
from trakwomp.errors import UserError
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.models.spec import ModelSpec
from trakwomp.runtime import Shard
from trakwomp.stages.featurize import featurize
from trakwomp.stages.fit import model_outputs
from trakwomp.stages.recipe import Recipe, one_cycle_lr
from trakwomp.stages.train import train
from trakwomp.tasks.classification import Classification

RECIPE = Recipe(epochs=2, batch_size=16, lr=0.05)




def test_same_seed_same_masks_and_bitwise_weights(tmp_path, tiny_npz):
    data = load_dataset(f"npz:{tiny_npz}")
    for name in ("a", "b"):
        train(tmp_path / name, data, TINY, num_models=2, recipe=RECIPE)
    a, b = read_store(tmp_path / "a"), read_store(tmp_path / "b")
    assert any("weights" in k for k in a)
    assert a == b
    masks = [zarr.open_array(str(tmp_path / "a" / f"models/reference/00000{j}/mask"))[:] for j in (0, 1)]
    for mask in masks:
        assert mask.dtype == bool and mask.sum() == round(0.5 * len(data))
    assert not np.array_equal(masks[0], masks[1])


def test_alpha_and_roles_give_distinct_subsets(tmp_path, tiny_npz):
    data = load_dataset(f"npz:{tiny_npz}")
    recipe = Recipe(alpha=0.25, epochs=1, batch_size=16, lr=0.05)
    train(tmp_path / "s", data, TINY, num_models=1, recipe=recipe)
    report = train(tmp_path / "s", data, TINY, role="lds", num_models=1, targets=data, recipe=recipe)
    reference = zarr.open_array(str(tmp_path / "s/models/reference/000000/mask"))[:]
    lds = zarr.open_array(str(tmp_path / "s/models/lds/000000/mask"))[:]
    assert reference.sum() == lds.sum() == 12
    assert not np.array_equal(reference, lds)
    margins = zarr.open_array(str(tmp_path / "s/models/lds/000000/margins"))[:]
    assert margins.shape == (len(data),) and margins.dtype == np.float32 and np.isfinite(margins).all()
    # correct (argmax = label) implies margin >= -log(C - 1); margin > 0 implies correct
    assert np.mean(margins > 0) <= report.summaries["target_accuracy"][0] <= np.mean(margins >= -np.log(data.num_classes - 1))


def test_model_outputs_gives_margins_and_top1_accuracy(tiny_npz):
    data = load_dataset(f"npz:{tiny_npz}")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4)).eval()
    got_margins, summary = model_outputs(net, data, Classification(), torch.device("cpu"), batch_size=10)
    x = torch.stack([data[i][0] for i in range(len(data))]).flatten(1).double()
    logits = (x @ net[1].weight.double().T + net[1].bias.double()).detach().numpy()
    y = data.labels
    others = logits.copy()
    others[np.arange(len(y)), y] = -np.inf
    expected = logits[np.arange(len(y)), y] - np.log(np.exp(others).sum(1))
    np.testing.assert_allclose(got_margins, expected, rtol=1e-5, atol=1e-5)
    correct = logits.argmax(1) == y
    assert summary == {"target_accuracy": pytest.approx(correct.mean())}
    assert correct.mean() > 0 and correct.mean() != (got_margins > 0).mean()


def test_rerun_skips_finished_and_redoes_unfinished(tmp_path, tiny_npz):
    data = load_dataset(f"npz:{tiny_npz}")
    first = train(tmp_path / "s", data, TINY, num_models=2, recipe=RECIPE)
    assert first.trained == [0, 1]
    before = read_store(tmp_path / "s")
    assert train(tmp_path / "s", data, TINY, num_models=2, recipe=RECIPE).skipped == [0, 1]
    assert read_store(tmp_path / "s") == before
    # A unit whose marker never got written (a kill before publishing) is trained again, identically.
    (tmp_path / "s/done/train/reference/000001/zarr.json").unlink()
    weights = tmp_path / "s/models/reference/000001/weights"
    next(p for p in weights.rglob("c/*") if p.is_file()).write_bytes(b"garbage")
    again = train(tmp_path / "s", data, TINY, num_models=3, recipe=RECIPE)
    assert again.skipped == [0] and again.trained == [1, 2]
    after = read_store(tmp_path / "s")
    assert {k: v for k, v in after.items() if k in before} == before


def test_torn_marker_counts_as_unfinished(tmp_path, tiny_npz):
    data = load_dataset(f"npz:{tiny_npz}")
    train(tmp_path / "s", data, TINY, num_models=1, recipe=RECIPE)
    marker = tmp_path / "s/done/train/reference/000000/zarr.json"
    marker.write_bytes(marker.read_bytes()[:7])
    assert train(tmp_path / "s", data, TINY, num_models=1, recipe=RECIPE).trained == [0]


def test_store_refuses_other_recipe_data_or_model(tmp_path, tiny_npz):
    data = load_dataset(f"npz:{tiny_npz}")
    train(tmp_path / "s", data, TINY, num_models=1, recipe=RECIPE)
    with pytest.raises(StoreError, match="train_reference.epochs is 2 in the store but 3 here"):
        train(tmp_path / "s", data, TINY, num_models=1, recipe=Recipe(epochs=3, batch_size=16, lr=0.05))
    with pytest.raises(StoreError, match="model.width"):
        train(tmp_path / "s", data, ModelSpec.parse("resnet9", 0.125), num_models=1, recipe=RECIPE)
    other = load_dataset(f"npz:{tiny_npz}", indices=_indices(tmp_path, range(10)))
    with pytest.raises(StoreError, match="dataset.num_examples"):
        train(tmp_path / "s", other, TINY, num_models=1, recipe=RECIPE)


def _indices(tmp_path, values):
    np.save(tmp_path / "idx.npy", np.array(list(values)))
    return tmp_path / "idx.npy"


def test_shards_split_the_units(tmp_path, tiny_npz):
    data = load_dataset(f"npz:{tiny_npz}")
    assert train(tmp_path / "s", data, TINY, num_models=5, recipe=RECIPE, shard=Shard(1, 2)).trained == [1, 3]
    assert train(tmp_path / "s", data, TINY, num_models=5, recipe=RECIPE, shard=Shard(0, 2)).trained == [0, 2, 4]


@pytest.mark.slow
def test_two_shard_processes_equal_one_process(tmp_path, tiny_npz):
    def command(store, shard):
        return [sys.executable, "-m", "trakwomp.cli.main", "train", str(store), "--data", f"npz:{tiny_npz}",
                "--width", "0.0625", "--num-models", "3", "--epochs", "2", "--batch-size", "16", "--lr", "0.05",
                "--shard", shard, "--quiet"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    shards = [subprocess.Popen(command(tmp_path / "sharded", f"{k}/2"), env=env, cwd=REPO) for k in (0, 1)]
    single = subprocess.run(command(tmp_path / "single", "0/1"), env=env, cwd=REPO)
    assert single.returncode == 0 and [p.wait() for p in shards] == [0, 0]
    assert read_store(tmp_path / "sharded") == read_store(tmp_path / "single")


def test_bad_training_arguments(tmp_path, tiny_npz):
    data = load_dataset(f"npz:{tiny_npz}")
    with pytest.raises(UserError, match="`role` lds needs `targets`"):
        train(tmp_path / "s", data, TINY, role="lds", recipe=RECIPE)
    with pytest.raises(UserError, match="alpha"):
        Recipe(alpha=1.5)
    with pytest.raises(UserError, match="CUDA is not available|unknown `device`"):
        train(tmp_path / "s", data, TINY, recipe=RECIPE, device="cuda:7" if not _has_cuda() else "tpu")


def _has_cuda():
    import torch
    return torch.cuda.is_available()


@pytest.mark.parametrize("total_steps", [1, 2, 3, 5, 10, 37, 120])
def test_learning_rates_are_torchs_one_cycle_and_defined_where_it_divides_by_zero(total_steps):
    recipe = Recipe(lr=0.2)
    ours = [one_cycle_lr(s, total_steps, recipe) for s in range(total_steps)]
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=total_steps,
                                                   pct_start=recipe.warmup_fraction, anneal_strategy="linear",
                                                   cycle_momentum=False)
    expected = []
    for _ in range(total_steps):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert ours == expected


def test_a_warm_up_that_ends_at_step_0_starts_at_the_peak():
    """4 steps with a quarter of warm-up: torch's OneCycleLR divides by zero; ours starts at the
    peak and falls linearly to lr / 250,000."""
    recipe = Recipe(lr=0.2)
    with pytest.raises(ZeroDivisionError):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
        torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, total_steps=4, pct_start=0.25,
                                            anneal_strategy="linear", cycle_momentum=False)
    assert [one_cycle_lr(s, 4, recipe) for s in range(4)] == pytest.approx(
        [0.2, 0.2 - (0.2 - 0.2 / 25 / 1e4) / 3, 0.2 - 2 * (0.2 - 0.2 / 25 / 1e4) / 3, 0.2 / 25 / 1e4])


def test_training_uses_the_recorded_threads_whatever_the_process_uses(tmp_path):
    """The recipe's thread count, not the caller's, sets how a CPU sums: the same recipe trained
    under 1 and under 2 process threads gives the same weights, and 1 and 2 recipe threads differ."""
    data = load_dataset("cifar10-mini:train").select(np.arange(256))  # (tiny random images sum alike)
    spec = ModelSpec.parse("resnet9", 0.25)
    weights = {}
    before = torch.get_num_threads()
    try:
        for process_threads, recipe_threads in ((1, 1), (2, 1), (2, 2)):
            torch.set_num_threads(process_threads)
            store = tmp_path / f"p{process_threads}-r{recipe_threads}"
            train(store, data, spec, num_models=1, recipe=Recipe(epochs=1, threads=recipe_threads))
            weights[process_threads, recipe_threads] = read_store(store)
    finally:
        torch.set_num_threads(before)
    assert weights[1, 1] == weights[2, 1]
    assert weights[2, 1] != weights[2, 2]


def test_a_model_with_dropout_trains_alike_whatever_the_process_drew_before(tmp_path, tiny_npz, user_module):
    """Dropout draws from torch's global generator: the same unit trained after different draws
    of the caller (another process, shard or order) gives bitwise the same weights, the caller's
    generator is left as it was, and the dropout is live (without it the weights differ)."""
    user_module("dropnets.nets", "import torch\n"
                "def build(num_classes, p=0.5):\n"
                "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(p), torch.nn.Linear(768, num_classes))\n"
                "def build_without(num_classes):\n"
                "    return build(num_classes, p=0.0)\n")
    data = load_dataset(f"npz:{tiny_npz}")
    weights = {}
    for name, factory, caller_seed in (("a", "build", 1), ("b", "build", 2), ("none", "build_without", 1)):
        torch.manual_seed(caller_seed)
        expected_next = torch.rand(3)
        torch.manual_seed(caller_seed)
        train(tmp_path / name, data, ModelSpec.parse(f"dropnets.nets:{factory}"), recipe=RECIPE)
        assert torch.equal(torch.rand(3), expected_next)
        stored = Store.open(tmp_path / name).read_arrays(paths.weights(paths.trained_model("reference", 0)))
        weights[name] = {k: v.tobytes() for k, v in stored.items()}
    assert weights["a"] == weights["b"]
    assert weights["a"] != weights["none"]


def test_checkpoints_along_a_run_are_members_of_its_ensemble(tmp_path, tiny_npz):
    """--save-checkpoints 3 over 3 epochs keeps the weights after epochs 1 and 2 and the model;
    keeping them does not change training (the model equals one trained without checkpoints, bit
    for bit), and featurize registers each as a member of its run, in epoch order, the others
    differing from the model."""
    from trakwomp.store import Store

    from trakwomp.features.projectors import ProjectorSpec
    from trakwomp.stages.featurize import featurize
    from trakwomp.stages.train import load_reference_model

    data = load_dataset(f"npz:{tiny_npz}")
    recipe = Recipe(epochs=3, batch_size=16, lr=0.05)
    assert Recipe(epochs=8, save_checkpoints=3).checkpoint_epochs == [2, 5, 8]
    train(tmp_path / "plain", data, TINY, num_models=2, recipe=recipe)
    train(tmp_path / "kept", data, TINY, num_models=2, recipe=Recipe(epochs=3, batch_size=16, lr=0.05,
                                                                        save_checkpoints=3))
    featurize(tmp_path / "kept", projector=ProjectorSpec("gaussian", 0, 2, 4))
    registry = Store.open(tmp_path / "kept").manifest.json["models"]
    assert [(e["id"], e["run"], e.get("epoch")) for e in registry] == [
        (3 * j + k, f"train:reference/00000{j}", k + 1) for j in (0, 1) for k in range(3)]
    for j in (0, 1):
        final = load_reference_model(tmp_path / "kept", j, 4).state_dict()
        plain = load_reference_model(tmp_path / "plain", j, 4).state_dict()
        assert all(torch.equal(final[k], plain[k]) for k in final)
        stored = [zarr.open_group(str(tmp_path / "kept" / e["weights"]), mode="r") for e in registry[3 * j:3 * j + 3]]
        assert all(np.array_equal(stored[2][k][...], final[k].numpy()) for k in final)
        assert not np.array_equal(stored[0]["1.0.weight"][...], stored[1]["1.0.weight"][...])
    with pytest.raises(StoreError, match="save_checkpoints is not set in the store but 3 here"):
        train(tmp_path / "plain", data, TINY, num_models=2, recipe=Recipe(epochs=3, batch_size=16, lr=0.05,
                                                                           save_checkpoints=3))


@pytest.mark.parametrize("mixed", ["the model", "a checkpoint"])
def test_weights_that_two_runs_of_a_unit_wrote_are_refused(tmp_path, tiny_npz, mixed):
    """Two runs of one unit (the same shard twice, on CUDA where kernels differ run to run) can
    leave some of its arrays from each run; featurize checks the weights against the hash the
    publishing run recorded and refuses a mix, naming the unit."""
    data = load_dataset(f"npz:{tiny_npz}")
    store = tmp_path / "store"
    train(store, data, TINY, recipe=Recipe(epochs=2, batch_size=16, lr=0.05, save_checkpoints=2))
    handle = Store.open(store)
    folder = paths.trained_model("reference", 0)
    if mixed == "a checkpoint":
        folder = paths.checkpoint("reference", 0, 1)
    weights = handle.read_arrays(paths.weights(folder))
    name = sorted(weights)[0]
    handle.write_array(f"{paths.weights(folder)}/{name}", weights[name] + 1e-3)  # another run's values
    with pytest.raises(UserError, match=f"the weights in {folder} are not those its training run published"):
        featurize(store, projector=ProjectorSpec("sjlt", 0, 2, 8))
    assert Store.open(store).manifest.featurize is None


def test_images_too_small_for_the_augmentation_are_refused_in_one_line_before_a_store_is_made(tmp_path, user_module,
                                                                                            cli):
    """4 x 4 images cannot be reflect-padded by 4 pixels (torch raised mid-training before)."""
    from conftest import plain, write_tiny_images

    user_module("fourpixels.nets", "import torch\n"
                "def linear(num_classes):\n"
                "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, num_classes))\n")
    data = write_tiny_images(tmp_path / "four.npz", size=4)
    result = cli("train", tmp_path / "store", "--data", f"npz:{data}", "--model", "fourpixels.nets:linear", "--epochs", "1")
    lines = plain(result.stderr).strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1
    assert "images of 4 x 4 pixels are too small for the recipe's augmentation" in lines[0]
    assert not (tmp_path / "store").exists()
    five = write_tiny_images(tmp_path / "five.npz", size=5)
    user_module("fivepixels.nets", "import torch\n"
                "def linear(num_classes):\n"
                "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(75, num_classes))\n")
    assert cli("train", tmp_path / "store", "--data", f"npz:{five}", "--model", "fivepixels.nets:linear", "--epochs", "1",
               "--quiet").exit_code == 0
