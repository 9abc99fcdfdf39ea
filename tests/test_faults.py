"""Fault injection: a process killed at any write leaves a store that a rerun completes to exactly
the store of an uninterrupted run; concurrent processes on one store equal one process.

Each stage (train, featurize, finalize, score) runs as a `trakwomp` process with TRAKWOMP_FAULT=K
(SIGKILL just before its K-th write) or K:torn (SIGKILL halfway through writing it), K drawn with
a fixed seed from the writes the stage makes; the rerun is in-process, and every array and done
marker is compared, bitwise, with a store that no fault touched.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from trakwomp.data import load_dataset
from trakwomp.featurize import featurize
from trakwomp.finalize import finalize
from trakwomp.projectors import ProjectorSpec
from trakwomp.scoring import score
from trakwomp.store.durable import FAULT_VARIABLE, FaultPlan
from trakwomp.training import Recipe, train

from conftest import REPO, write_tiny_images
from test_train import TINY, read_store

RECIPE = Recipe(epochs=1, batch_size=16, lr=0.05)
PROJECTOR = ProjectorSpec("sjlt", 5, 2, 8)
STAGES = ("train", "featurize", "finalize", "score")
KILLS_PER_STAGE = {"train": 5, "featurize": 7, "finalize": 5, "score": 7}


class Setup:
    def __init__(self, root):
        self.root = root
        self.train_npz = write_tiny_images(root / "train.npz")
        self.target_npz = write_tiny_images(root / "targets.npz", n=9, seed=1)

    def command(self, stage, store, *extra):
        base = [sys.executable, "-m", "trakwomp.cli.main", stage, str(store)]
        args = {
            "train": ["--data", f"npz:{self.train_npz}", "--model", "resnet9", "--width", "0.0625", "--epochs", "1",
                      "--batch-size", "16", "--lr", "0.05", "--num-models", "2"],
            "featurize": ["--projector", "sjlt", "--projector-seed", "5", "--blocks", "2", "--block-dim", "8",
                          "--chunk-rows", "8", "--batch-size", "8"],
            "finalize": [],
            "score": ["--targets", f"npz:{self.target_npz}", "--chunk-rows", "4"],
        }[stage]
        return [*base, *args, "--quiet", *extra]

    def run(self, stage, store):
        """The stage in-process, with the same settings as `command`."""
        if stage == "train":
            train(store, load_dataset(f"npz:{self.train_npz}"), TINY, num_models=2, recipe=RECIPE)
        elif stage == "featurize":
            featurize(store, projector=PROJECTOR, chunk_rows=8, batch_size=8)
        elif stage == "finalize":
            finalize(store)
        else:
            score(store, load_dataset(f"npz:{self.target_npz}"), target_chunk_rows=4)


def assert_same_store(store, expected):
    got, want = read_store(store), read_store(expected)
    differing = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    assert not differing, differing


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """(setup, {stage: (store before it, store after it, writes it made)}), built in-process."""
    root = tmp_path_factory.mktemp("faults")
    setup = Setup(root)
    before = root / "empty"
    out = {}
    for stage in STAGES:
        after = root / f"after-{stage}"
        if before.exists():
            shutil.copytree(before, after)
        FaultPlan.writes = 0
        setup.run(stage, after)
        out[stage] = (before, after, FaultPlan.writes)
        before = after
    return setup, out


def kill_points():
    """(stage, K, torn) for every kill point, drawn with a fixed seed (replay one by its id)."""
    rng = np.random.default_rng(7)
    points = []
    for stage in STAGES:
        for i, fraction in enumerate(rng.random(KILLS_PER_STAGE[stage])):
            points.append((stage, float(fraction), i % 2 == 1))
    return points


@pytest.mark.parametrize("stage, fraction, torn", kill_points(),
                         ids=[f"{s}-{f:.3f}{'-torn' if t else ''}" for s, f, t in kill_points()])
def test_killed_at_a_write_then_rerun_equals_an_uninterrupted_run(stages, tmp_path, stage, fraction, torn):
    setup, built = stages
    before, after, writes = built[stage]
    k = 1 + int(fraction * writes)
    victim = tmp_path / "victim"
    if before.exists():
        shutil.copytree(before, victim)
    env = {**os.environ, FAULT_VARIABLE: f"{k}{':torn' if torn else ''}"}
    result = subprocess.run(setup.command(stage, victim), cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == -9, (k, writes, result.stderr[-2000:])
    setup.run(stage, victim)
    assert_same_store(victim, after)


@pytest.mark.parametrize("stage", ["featurize", "score"])
def test_same_shard_twice_and_four_shards_at_once_equal_one_process(stages, tmp_path, stage):
    setup, built = stages
    before, after, _ = built[stage]
    for name, extras in (("twice", [[], []]), ("four", [["--shard", f"{k}/4"] for k in range(4)])):
        store = tmp_path / name
        shutil.copytree(before, store)
        processes = [subprocess.Popen(setup.command(stage, store, *extra), cwd=REPO) for extra in extras]
        assert [p.wait() for p in processes] == [0] * len(processes)
        assert_same_store(store, after)
