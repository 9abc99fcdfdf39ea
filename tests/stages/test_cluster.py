"""Shards from the environment of a batch engine (Slurm job arrays, torchrun), and options from
environment variables."""

import pytest
import torch
from conftest import plain
from trakwomp.cli.main import app
from typer.testing import CliRunner

from trakwomp.errors import UserError
from trakwomp.runtime import Shard, resolve_device


@pytest.mark.parametrize("environ, expected", [
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4"}, (0, 4)),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"}, (2, 3)),  # --array=1-3
    ({"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_STEP": "2",
      "SLURM_ARRAY_TASK_COUNT": "5"}, (2, 5)),  # --array=10-18:2
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (5, 8)),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "RANK": "3", "WORLD_SIZE": "4"}, (7, 8)),
])
def test_shard_auto_reads_the_batch_engine(environ, expected):
    shard = Shard.parse("auto", environ)
    assert (shard.index, shard.count) == expected


@pytest.mark.parametrize("environ, fragment", [
    ({}, "neither a Slurm job array"),
    ({"SLURM_ARRAY_TASK_ID": "2"}, "SLURM_ARRAY_TASK_COUNT=None"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2",
      "SLURM_ARRAY_TASK_COUNT": "4"}, "not on the grid"),
    ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "4"}, "shard 9 of 4, out of range"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
])
def test_shard_auto_refuses_an_environment_it_cannot_read(environ, fragment):
    with pytest.raises(UserError, match=fragment):
        Shard.parse("auto", environ)


@pytest.mark.parametrize("gpus", [2, 1, 0])
def test_cuda_under_torchrun_is_the_local_rank_gpu(monkeypatch, gpus):
    """With the machine's GPUs stood in for: cuda is cuda:LOCAL_RANK, refused by that name when the
    machine has too few (or no CUDA), and cpu stays cpu."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert resolve_device("cpu", {"LOCAL_RANK": "1"}).type == "cpu"
    if gpus == 2:
        assert resolve_device("cuda", {"LOCAL_RANK": "1"}) == torch.device("cuda", 1)
        assert resolve_device("cuda", {}) == torch.device("cuda")
        return
    with pytest.raises(UserError, match="`device` cuda:1: " + ("this machine has 1 CUDA device" if gpus else "CUDA is not available")):
        resolve_device("cuda", {"LOCAL_RANK": "1"})


@pytest.mark.parametrize("variable, value, fragment", [
    ("TRAKWOMP_DEVICE", "tpu", "unknown --device 'tpu'"),
    ("TRAKWOMP_SHARD", "auto", "--shard auto: neither a Slurm job array"),
])
def test_options_default_to_environment_variables(tmp_path, monkeypatch, variable, value, fragment):
    for name in ("SLURM_ARRAY_TASK_ID", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(app, ["finalize", str(tmp_path / "store")], env={variable: value})
    assert result.exit_code == 2 and fragment in plain(result.stderr)
