"""Fault injection: a process killed at any write, or stopped by a full disk, leaves a store that
a rerun completes to exactly the store of an uninterrupted run; concurrent processes on one store
equal one process; a read-only store is read, and refused for writing, without a change.

Each stage (train, featurize, finalize, score, verify, and score keeping only the top k) is stopped by TRAKWOMP_FAULT=K (a kill just
before its K-th write) or K:torn (halfway through writing it: half of its bytes in a temporary
file), K drawn with a fixed seed from the writes the stage makes; the rerun is in-process, and
every array and done marker is compared, bitwise, with a store that no fault touched. In the
default run the kill is simulated in-process (the fault's SIGKILL becomes an exception raised at
the write, which leaves the store as the kill would: what was written stays, nothing after the
write happens); the `slow` run kills real `trakwomp` processes with SIGKILL. Full disks and
read-only file systems are injected (K:enospc, K:erofs) in-process, and, where this machine lets
the tests mount file systems, made real with a small tmpfs and a read-only bind mount.
"""

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import zarr
from conftest import REPO, TINY, plain, read_store, tree_digest, write_tiny_images
from trakwomp.cli.main import app
from trakwomp.store import durable
from trakwomp.store.durable import FAULT_VARIABLE, FaultPlan
from typer.testing import CliRunner

from trakwomp.analysis.verify import verify
from trakwomp.data.specs import load_dataset
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.stages.featurize import featurize
from trakwomp.stages.finalize import finalize
from trakwomp.stages.recipe import Recipe
from trakwomp.stages.score import score
from trakwomp.stages.train import train

RECIPE = Recipe(epochs=1, batch_size=16, lr=0.05)
PROJECTOR = ProjectorSpec("sjlt", 5, 2, 8)
STAGES = ("train", "featurize", "finalize", "score", "verify", "top-k")
KILLS_PER_STAGE = {"train": 5, "featurize": 7, "finalize": 5, "score": 7, "verify": 5, "top-k": 5}
COMMANDS = {"top-k": "score"}  # a stage run by a command of another name
FULL_DISKS_PER_STAGE = 2


class Setup:
    def __init__(self, root):
        self.root = root
        self.train_npz = write_tiny_images(root / "train.npz")
        self.target_npz = write_tiny_images(root / "targets.npz", n=9, seed=1)

    def command(self, stage, store, *extra):
        base = [sys.executable, "-m", "trakwomp.cli.main", COMMANDS.get(stage, stage), str(store)]
        args = {
            "train": ["--data", f"npz:{self.train_npz}", "--model", "resnet9", "--width", "0.0625", "--epochs", "1",
                      "--batch-size", "16", "--lr", "0.05", "--num-models", "2"],
            "featurize": ["--projector", "sjlt", "--projector-seed", "5", "--blocks", "2", "--block-dim", "8",
                          "--chunk-rows", "8", "--batch-size", "8"],
            "finalize": [],
            "score": ["--targets", f"npz:{self.target_npz}", "--chunk-rows", "4"],
            "verify": ["--target", "0", "--target", "3", "--k", "4", "--seeds", "1"],
            "top-k": ["--targets", f"npz:{self.target_npz}", "--chunk-rows", "4", "--top-k", "3", "--top-k-only",
                      "--top-k-out", str(self.root / "top-k.csv")],
        }[stage]
        return [*base, *args, "--quiet", *extra]

    def invoke(self, stage, store, *extra):
        """The stage's command run in this process; returns (exit code, stderr without colour)."""
        result = CliRunner().invoke(app, self.command(stage, store, *extra)[3:])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        return result.exit_code, plain(result.stderr).strip()

    def run(self, stage, store):
        """The stage in-process, with the same settings as `command`."""
        if stage == "train":
            train(store, load_dataset(f"npz:{self.train_npz}"), TINY, num_models=2, recipe=RECIPE)
        elif stage == "featurize":
            featurize(store, projector=PROJECTOR, chunk_rows=8, batch_size=8)
        elif stage == "finalize":
            finalize(store)
        elif stage == "score":
            score(store, load_dataset(f"npz:{self.target_npz}"), target_chunk_rows=4)
        elif stage == "top-k":
            score(store, load_dataset(f"npz:{self.target_npz}"), target_chunk_rows=4, top_k=3, top_k_only=True,
                  top_k_out=self.root / "top-k.csv")
        else:
            verify(store, target=(0, 3), k=4, seeds=1)


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


def age_temporaries(store):
    """Make the temporary files a kill left look a few minutes old, as after a crash some time ago."""
    old = time.time() - 300
    for path in store.rglob("*.partial"):
        with contextlib.suppress(FileNotFoundError):  # a write that was in flight has just finished
            os.utime(path, (old, old))


def rerun_and_compare(setup, stage, victim, after):
    """Rerun the stage: it removes what the killed write left and completes the store to the
    uninterrupted one, which zarr then walks without meeting a stray object."""
    age_temporaries(victim)
    setup.run(stage, victim)
    assert_same_store(victim, after)
    assert list(victim.rglob("*.partial")) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(zarr.open_group(str(victim), mode="r").members(max_depth=None))


def victim_and_fault(stages, stage, fraction, torn, tmp_path):
    """(setup, a copy of the store before the stage, the store after it, the TRAKWOMP_FAULT value
    that stops the stage at the write `fraction` of the way through its writes)."""
    setup, built = stages
    before, after, writes = built[stage]
    victim = tmp_path / "victim"
    if before.exists():
        shutil.copytree(before, victim)
    return setup, victim, after, f"{1 + int(fraction * writes)}{':torn' if torn else ''}"


class SimulatedKill(Exception):
    """Raised in place of the fault's SIGKILL, to stop a stage in-process at a write."""


def first_points_per_stage():
    """Two of the seeded kill points per stage, one of them torn."""
    points = kill_points()
    return [p for stage in STAGES for p in [q for q in points if q[0] == stage and not q[2]][:1]
            + [q for q in points if q[0] == stage and q[2]][:1]]


def point_id(point):
    stage, fraction, torn = point
    return f"{stage}-{fraction:.3f}{'-torn' if torn else ''}"


@pytest.mark.parametrize("stage, fraction, torn", [
    pytest.param(*p, id=point_id(p), marks=() if p in first_points_per_stage() else pytest.mark.slow)
    for p in kill_points()])
def test_killed_at_a_write_then_rerun_equals_an_uninterrupted_run(stages, tmp_path, monkeypatch, stage, fraction, torn):
    setup, victim, after, fault = victim_and_fault(stages, stage, fraction, torn, tmp_path)

    def kill(pid, signal):
        raise SimulatedKill(pid, signal)

    monkeypatch.setattr(durable.os, "kill", kill)
    monkeypatch.setattr(FaultPlan, "writes", 0)
    monkeypatch.setenv(FAULT_VARIABLE, fault)
    with pytest.raises(SimulatedKill):
        setup.run(stage, victim)
    monkeypatch.delenv(FAULT_VARIABLE)
    time.sleep(0.3)  # zarr finishes the other writes of the stopped batch in its event loop
    rerun_and_compare(setup, stage, victim, after)


@pytest.mark.slow
@pytest.mark.parametrize("stage, fraction, torn", first_points_per_stage(), ids=map(point_id, first_points_per_stage()))
def test_sigkilled_process_at_a_write_then_rerun_equals_an_uninterrupted_run(stages, tmp_path, stage, fraction, torn):
    setup, victim, after, fault = victim_and_fault(stages, stage, fraction, torn, tmp_path)
    env = {**os.environ, FAULT_VARIABLE: fault}
    result = subprocess.run(setup.command(stage, victim), cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == -9, (fault, result.stderr[-2000:])
    rerun_and_compare(setup, stage, victim, after)


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("stage, units, done", [("featurize", 12, r"featurized (\d+) unit"), ("score", 3, r"\((\d+) chunk")])
def test_three_slurm_array_tasks_at_once_equal_one_process(stages, tmp_path, stage, units, done):
    """`--shard auto` in three processes launched as tasks 1-3 of a Slurm job array (--array=1-3):
    together they do each unit once, and leave the store of one process."""
    setup, built = stages
    before, after, _ = built[stage]
    store = tmp_path / "store"
    shutil.copytree(before, store)
    command = [a for a in setup.command(stage, store, "--shard", "auto") if a != "--quiet"]
    tasks = [{**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "1",
              "SLURM_ARRAY_TASK_COUNT": "3"} for task in (1, 2, 3)]
    processes = [subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True) for env in tasks]
    reports = [" ".join(p.communicate()[1].split()) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], reports
    assert sum(int(re.search(done, report).group(1)) for report in reports) == units, reports
    assert_same_store(store, after)


def full_disk_points():
    """(stage, fraction of its writes) at which the disk fills up, drawn with a fixed seed."""
    rng = np.random.default_rng(11)
    return [(stage, float(f)) for stage in STAGES for f in rng.random(FULL_DISKS_PER_STAGE)]


def assert_refused_in_one_line(code, message, reason):
    assert code == 2 and len(message.splitlines()) == 1, (code, message)
    assert message.startswith("error: cannot write to store") and reason in message, message


@pytest.mark.parametrize("stage, fraction", [
    pytest.param(s, f, id=f"{s}-{f:.3f}", marks=() if i % FULL_DISKS_PER_STAGE == 0 else pytest.mark.slow)
    for i, (s, f) in enumerate(full_disk_points())])
def test_full_disk_mid_stage_publishes_only_finished_units(stages, tmp_path, monkeypatch, stage, fraction):
    """ENOSPC at a write and every write after it: one line, exit 2; then a rerun (disk freed)
    equals an uninterrupted run, so every unit published before the disk filled was whole."""
    setup, built = stages
    before, after, writes = built[stage]
    victim = tmp_path / "victim"
    if before.exists():
        shutil.copytree(before, victim)
    monkeypatch.setenv(FAULT_VARIABLE, f"{1 + int(fraction * writes)}:enospc")
    monkeypatch.setattr(FaultPlan, "writes", 0)
    code, message = setup.invoke(stage, victim)
    assert_refused_in_one_line(code, message, "No space left on device")
    monkeypatch.delenv(FAULT_VARIABLE)
    setup.run(stage, victim)
    assert_same_store(victim, after)


@contextlib.contextmanager
def mounted(*mount_args, at):
    """`mount *mount_args at`, unmounted afterwards; skips the test where mounting is not allowed."""
    at.mkdir(exist_ok=True)
    result = subprocess.run(["mount", *mount_args, str(at)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here: {result.stderr.strip()}")
    try:
        yield at
    finally:
        subprocess.run(["umount", "--lazy", str(at)], check=True)  # lazy: writes zarr still has in flight end first


@contextlib.contextmanager
def read_only(store, how, monkeypatch):
    """`store` made read-only: a read-only bind mount over itself, or EROFS on every write."""
    if how == "injected":
        monkeypatch.setenv(FAULT_VARIABLE, "1:erofs")
        monkeypatch.setattr(FaultPlan, "writes", 0)
        yield
        monkeypatch.delenv(FAULT_VARIABLE)
        return
    with mounted("--bind", str(store), at=store):
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(store)]).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield


NEXT_WORK = {"train": ["featurize"], "featurize": ["finalize"], "finalize": ["score"], "score": ["finalize", "--blocks", "1"],
             "verify": ["verify", "--k", "5"], "top-k": ["score", "--top-k", "4", "--top-k-only"]}


@pytest.mark.parametrize("how", ["injected", "mount"])
@pytest.mark.parametrize("stage", STAGES)
def test_read_only_store_is_read_and_refused_for_writing_unchanged(stages, tmp_path, monkeypatch, stage, how):
    """On a read-only store, a finished stage reruns (it only reads) and new work is refused in
    one line; neither changes a byte."""
    setup, built = stages
    store = tmp_path / "store"
    shutil.copytree(built[stage][1], store)
    digest = tree_digest(store)
    with read_only(store, how, monkeypatch):
        code, message = setup.invoke(stage, store)
        assert code == 0, message
        next_stage, *extra = NEXT_WORK[stage]
        code, message = setup.invoke(next_stage, store, *extra)
        assert_refused_in_one_line(code, message, "Read-only file system")
    assert tree_digest(store) == digest


def used_bytes(folder):
    stats = os.statvfs(folder)
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


@pytest.mark.parametrize("stage", ["featurize", "score"])
def test_a_real_full_disk_then_rerun_equals_an_uninterrupted_run(stages, tmp_path, stage):
    """The stage on a tmpfs resized to hold its store before the stage and half of what the
    stage adds (both measured on the tmpfs)."""
    setup, built = stages
    before, after, _ = built[stage]
    with mounted("-t", "tmpfs", "-o", "size=64m", "tmpfs", at=tmp_path / "disk") as disk:
        shutil.copytree(after, disk / "store")
        used_after = used_bytes(disk)
        shutil.rmtree(disk / "store")
        shutil.copytree(before, disk / "store")
        used_before = used_bytes(disk)
        size = used_before + (used_after - used_before) // 2
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)
        code, message = setup.invoke(stage, disk / "store")
        assert_refused_in_one_line(code, message, "No space left on device")
        # (zarr may still be removing the temporary files of writes that were in flight)
        shutil.copytree(disk / "store", tmp_path / "store", ignore=shutil.ignore_patterns("*.partial"))
    setup.run(stage, tmp_path / "store")
    assert_same_store(tmp_path / "store", after)
