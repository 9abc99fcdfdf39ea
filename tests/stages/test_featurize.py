import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from conftest import REPO, TINY, plain, read_store
from trakwomp.store import StoreError

from trakwomp.data.specs import load_dataset
from trakwomp.errors import UserError
from trakwomp.features.projectors import ProjectorSpec, projection_block
from trakwomp.runtime import Shard
from trakwomp.stages.featurize import featurize
from trakwomp.stages.finalize import finalize
from trakwomp.stages.score import score
from trakwomp.tasks.classification import margins

PROJECTOR = ProjectorSpec("gaussian", seed=3, blocks=4, block_dim=16)


def copy_store(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def trained(trained_once, tmp_path):
    """A store with two trained tiny reference models (on the images of `tiny_npz`), a copy per test."""
    return copy_store(trained_once / "store", tmp_path / "trained")


def featurize_command(store, *extra):
    return [sys.executable, "-m", "trakwomp.cli.main", "featurize", str(store), "--projector", "gaussian", "--blocks", "4", "--block-dim", "16",
            "--projector-seed", "3", "--chunk-rows", "4", "--batch-size", "4", "--quiet", *extra]


def test_features_match_an_independent_computation(trained, tiny_npz):
    featurize(trained, projector=PROJECTOR, chunk_rows=10, batch_size=7)
    data = load_dataset(f"npz:{tiny_npz}")
    group = zarr.open_group(str(trained), mode="r")
    assert group["features/000001/phi"].chunks == (10, 16)
    for model_id in (0, 1):
        net = TINY.build(data.num_classes)
        net.load_state_dict({k: torch.from_numpy(np.asarray(a[...])) for k, a in
                             group[f"models/reference/{model_id:06d}/weights"].arrays()})
        net.eval()
        rows = []
        for i in (0, 13, 47):
            x, y = data[i]
            net.zero_grad()
            margins(net(x[None]), torch.tensor([y])).sum().backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
        grads = torch.stack(rows).double()
        p = grads.shape[1]
        P = torch.cat([projection_block(PROJECTOR, model_id, b, p) for b in range(4)], dim=1).double()
        phi = group[f"features/{model_id:06d}/phi"][[0, 13, 47]]
        np.testing.assert_allclose(phi, (grads @ P).numpy(), rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            logits = net(torch.stack([data[i][0] for i in (0, 13, 47)]))
        p_correct = torch.softmax(logits, 1)[torch.arange(3), torch.tensor([data[i][1] for i in (0, 13, 47)])]
        np.testing.assert_allclose(group[f"features/{model_id:06d}/q"][[0, 13, 47]], (1 - p_correct).numpy(), rtol=1e-5)


def test_prefix_property_through_the_store(trained):
    four = copy_store(trained, trained.parent / "four")
    featurize(four, projector=PROJECTOR, chunk_rows=16)
    featurize(trained, projector=ProjectorSpec("gaussian", seed=3, blocks=2, block_dim=16), chunk_rows=16)
    a = zarr.open_array(str(four / "features/000000/phi"))[...]
    b = zarr.open_array(str(trained / "features/000000/phi"))[...]
    np.testing.assert_array_equal(a[:, :32], b)


@pytest.mark.slow
def test_sigkill_then_rerun_is_bitwise_equal_to_an_uninterrupted_run(trained):
    reference = copy_store(trained, trained.parent / "reference")
    featurize(reference, projector=PROJECTOR, chunk_rows=4, batch_size=4)
    victim = subprocess.Popen(featurize_command(trained), cwd=REPO)
    markers = trained / "done" / "featurize"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(markers.glob("*/*/zarr.json"))) < 3:
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    finished = len(list(markers.glob("*/*/zarr.json")))
    assert 3 <= finished < 24, finished
    report = featurize(trained, projector=PROJECTOR, chunk_rows=4, batch_size=4)
    assert report.units_skipped == finished and report.units_done == 24 - finished
    assert read_store(trained) == read_store(reference)


@pytest.mark.slow
def test_two_concurrent_shard_processes_equal_one_process(trained):
    single = copy_store(trained, trained.parent / "single")
    featurize(single, projector=PROJECTOR, chunk_rows=4, batch_size=4)
    shards = [subprocess.Popen(featurize_command(trained, "--shard", f"{k}/2"), cwd=REPO) for k in (0, 1)]
    assert [p.wait() for p in shards] == [0, 0]
    assert read_store(trained) == read_store(single)


def test_store_refuses_other_projector_or_dataset(trained, tmp_path, tiny_npz):
    featurize(trained, projector=PROJECTOR, chunk_rows=16)
    for other in (ProjectorSpec("rademacher", 3, 4, 16), ProjectorSpec("gaussian", 4, 4, 16),
                  ProjectorSpec("gaussian", 3, 4, 32)):
        with pytest.raises(StoreError, match="featurize.projector"):
            featurize(trained, projector=other, chunk_rows=16)
    with pytest.raises(StoreError, match="featurize.dtype"):
        featurize(trained, projector=PROJECTOR, chunk_rows=16, dtype="float16")
    np.save(tmp_path / "half.npy", np.arange(24))
    with pytest.raises(StoreError, match="dataset.num_examples"):
        featurize(trained, load_dataset(f"npz:{tiny_npz}", indices=tmp_path / "half.npy"), projector=PROJECTOR)


def test_user_model_and_checkpoints_from_outside_the_package(cli, tmp_path, tiny_npz, user_module):
    user_module("mypkg.models", "import torch\n"
                "def build(num_classes):\n"
                "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),\n"
                "        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, num_classes))\n")
    from mypkg.models import build

    nets = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        nets.append(build(4).eval())
        torch.save(nets[-1].state_dict(), tmp_path / f"model{seed}.pt")
    result = cli("featurize", tmp_path / "store", "--data", f"npz:{tiny_npz}", "--model", "mypkg.models:build",
                 "--checkpoint", tmp_path / "model*.pt", "--blocks", "2", "--block-dim", "8", "--dtype", "float16",
                 "--quiet")
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(tmp_path / "store"), mode="r")
    registry = group.attrs["trakwomp"]["models"]
    assert [e["source"] for e in registry] == [str(tmp_path / "model1.pt"), str(tmp_path / "model2.pt")]
    assert [e["run"] for e in registry] == [e["source"] for e in registry]  # without --run, each file its own run
    data = load_dataset(f"npz:{tiny_npz}")
    x, y = data[5]
    for model_id, net in enumerate(nets):
        net.zero_grad()
        margins(net(x[None]), torch.tensor([y])).sum().backward()
        grad = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).double()
        P = torch.cat([projection_block(ProjectorSpec(blocks=2, block_dim=8), model_id, b, len(grad))  # the default kind
                       for b in range(2)], dim=1).double()
        phi = group[f"features/{model_id:06d}/phi"]
        assert phi.dtype == np.float16
        np.testing.assert_allclose(phi[5].astype(np.float64), (grad @ P).numpy(), rtol=2e-3, atol=2e-3)
    again = cli("featurize", tmp_path / "store", "--data", f"npz:{tiny_npz}", "--model", "mypkg.models:build",
                "--checkpoint", tmp_path / "model2.pt", "--blocks", "2", "--block-dim", "8", "--dtype", "float16")
    assert again.exit_code == 0 and "models [1]" in plain(again.stderr)
    for seed in (3, 4):  # two checkpoints of one run
        torch.manual_seed(seed)
        torch.save(build(4).state_dict(), tmp_path / f"late{seed}.pt")
    one_run = cli("featurize", tmp_path / "store", "--data", f"npz:{tiny_npz}", "--model", "mypkg.models:build",
                  "--checkpoint", tmp_path / "late*.pt", "--run", "mine", "--quiet")
    assert one_run.exit_code == 0, one_run.output
    registry = zarr.open_group(str(tmp_path / "store"), mode="r").attrs["trakwomp"]["models"]
    assert [(e["id"], e["run"]) for e in registry[2:]] == [(2, "mine"), (3, "mine")]


def test_featurize_bad_inputs(cli, tmp_path, tiny_npz, trained):
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "linear.pt")
    cases = [
        (["featurize", tmp_path / "empty"], "no trakwomp store at"),
        (["featurize", tmp_path / "x", "--data", f"npz:{tiny_npz}", "--model", "resnet9", "--width", "0.0625",
          "--checkpoint", tmp_path / "linear.pt"], "does not fit model resnet9"),
        (["featurize", tmp_path / "x", "--data", f"npz:{tiny_npz}", "--model", "resnet9",
          "--checkpoint", tmp_path / "none*.pt"], "matches no file"),
        (["featurize", trained, "--projector", "fastjl"], "unknown --projector"),
        (["featurize", trained, "--dtype", "int8"], "unknown --dtype"),
        (["featurize", trained, "--params", "nothing.*"], "no parameter matches"),
    ]
    for args, fragment in cases:
        result = cli(*args, "--quiet")
        assert result.exit_code == 2, (args, result.output)
        assert fragment in plain(result.stderr) and "Traceback" not in result.output


def test_shard_selection_of_units(trained):
    report = featurize(trained, projector=PROJECTOR, chunk_rows=16, shard=Shard(1, 4))
    assert report.units_done == 2  # 2 models x 3 chunks = 6 units; positions 1 and 5
    done = sorted(p.parent.relative_to(trained / "done/featurize").as_posix()
                  for p in (trained / "done/featurize").glob("*/*/zarr.json"))
    assert done == ["000000/000001", "000001/000002"]


@pytest.mark.parametrize("kind", ["gaussian", "sjlt"])
def test_non_finite_gradients_are_refused_and_their_chunk_is_not_published(tmp_path, tiny_npz, kind):
    with np.load(tiny_npz) as z:
        x, y = z["x"].copy(), z["y"]
    x[6, 0, 3, 3] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=y)
    torch.manual_seed(0)
    torch.save(TINY.build(4).state_dict(), tmp_path / "init.pt")
    store = tmp_path / "store"
    with pytest.raises(UserError, match=r"example\(s\) 6;"):
        featurize(store, load_dataset(f"npz:{tmp_path / 'nan.npz'}"), TINY, [str(tmp_path / "init.pt")],
                  projector=ProjectorSpec(kind, 0, 2, 8), chunk_rows=4, batch_size=2)
    done = sorted(p.parent.name for p in (store / "done/featurize/000000").glob("*/zarr.json"))
    assert done == ["000000"]


def test_without_settings_featurize_uses_the_stores_so_the_same_command_resumes(cli, trained, tmp_path, tiny_npz):
    featurize(trained, projector=PROJECTOR, chunk_rows=16, dtype="float16")
    result = cli("featurize", trained, "--quiet")
    assert result.exit_code == 0, result.output
    torch.save(TINY.build(4).state_dict(), tmp_path / "extra.pt")
    result = cli("featurize", trained, "--data", f"npz:{tiny_npz}", "--model", "resnet9", "--width", "0.0625",
                 "--checkpoint", tmp_path / "extra.pt", "--quiet")
    assert result.exit_code == 0, result.output
    phi = zarr.open_group(str(trained), mode="r")["features/000002/phi"]
    assert (phi.shape, phi.chunks, phi.dtype) == ((48, 64), (16, 16), np.float16)
    result = cli("featurize", trained, "--blocks", "4", "--block-dim", "16", "--quiet")  # the rest: defaults, not the store's
    assert result.exit_code == 2 and "featurize.projector.kind is \"gaussian\" in the store but \"sjlt\" here" in plain(result.stderr)


def test_targets_are_projected_with_every_recorded_projector_setting(trained, tiny_npz):
    """A store featurized with tiles of 64 parameters (not today's default): the targets are
    projected with its tiles too, so the train set scored as its own targets has target features
    equal to its train features; asking for other tiles is refused."""
    spec = ProjectorSpec("sjlt", seed=2, blocks=2, block_dim=8, tile_rows=64)
    featurize(trained, projector=spec, chunk_rows=16)
    finalize(trained)
    data = load_dataset(f"npz:{tiny_npz}")
    key = score(trained, data, target_chunk_rows=16).key
    group = zarr.open_group(str(trained), mode="r")
    for model_id in ("000000", "000001"):
        np.testing.assert_array_equal(group[f"targets/{key.rsplit('_t', 1)[1]}/features/{model_id}/phi"][...],
                                      group[f"features/{model_id}/phi"][...])
    with pytest.raises(StoreError, match="featurize.projector.tile_rows is 64 in the store but 4096 here"):
        featurize(trained, projector=ProjectorSpec("sjlt", seed=2, blocks=2, block_dim=8))
