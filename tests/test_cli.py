import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr

from conftest import REPO, plain


def assert_one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    text = plain(result.stderr).strip()
    assert "Traceback" not in result.output
    assert len(text.splitlines()) == 1, text
    assert text.startswith("error:") and fragment in text, text


@pytest.mark.parametrize("args, fragment", [
    (["--data", "mnist:train"], "unknown dataset spec 'mnist:train'"),
    (["--data", "imagefolder:/no/such/dir"], "no folder '/no/such/dir'"),
    (["--data", "npz:/no/such.npz"], "no file '/no/such.npz'"),
    (["--data", "cifar10-mini:train", "--model", "not a model"], "malformed model spec"),
    (["--data", "cifar10-mini:train", "--shard", "2/2"], "--shard '2/2' is out of range"),
    (["--data", "cifar10-mini:train", "--shard", "first"], "malformed --shard"),
    (["--data", "cifar10-mini:train", "--indices", "/no/such.npy"], "cannot read indices file"),
    (["--data", "cifar10-mini:train", "--role", "lds"], "--role lds needs --targets"),
])
def test_bad_input_is_one_line_and_exit_2(cli, tmp_path, args, fragment):
    result = cli("train", tmp_path / "store", *args, "--quiet")
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "store").exists()


def test_store_path_that_is_a_file(cli, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(cli("train", tmp_path / "file", "--data", "cifar10-mini:train", "--quiet"), "is a file")


def test_train_then_lds_through_the_cli(cli, tmp_path, tiny_npz):
    common = ["--data", f"npz:{tiny_npz}", "--width", "0.0625", "--epochs", "1", "--batch-size", "16", "--lr", "0.05"]
    result = cli("train", tmp_path / "s", *common, "--num-models", "2")
    assert result.exit_code == 0, result.output
    assert "2 reference model(s) trained" in plain(result.stderr)
    np.save(tmp_path / "t.npy", np.array([3, 1, 4]))
    result = cli("train", tmp_path / "s", *common, "--role", "lds", "--num-models", "2", "--targets",
                 f"npz:{tiny_npz}", "--target-indices", tmp_path / "t.npy", "--quiet")
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(tmp_path / "s"), mode="r")
    assert group["models/lds/000001/margins"].shape == (3,)
    assert group.attrs["trakwomp"]["lds_targets"]["num_examples"] == 3
    result = cli("train", tmp_path / "s", *common, "--num-models", "2")
    assert "2 already done" in plain(result.stderr)
    moved = tmp_path / "moved.npz"
    shutil.copy(tiny_npz, moved)
    result = cli("train", tmp_path / "s", *common, "--role", "lds", "--num-models", "3", "--targets",
                 f"npz:{moved}", "--target-indices", tmp_path / "t.npy", "--quiet")
    assert result.exit_code == 0, result.output  # the same targets at another path
    assert zarr.open_group(str(tmp_path / "s"), mode="r")["models/lds/000002/margins"].shape == (3,)
    np.save(tmp_path / "other.npy", np.array([3, 1, 5]))
    result = cli("train", tmp_path / "s", *common, "--role", "lds", "--num-models", "3", "--targets",
                 f"npz:{moved}", "--target-indices", tmp_path / "other.npy")
    assert result.exit_code == 2 and "lds_targets.sha256" in plain(result.stderr)


def test_console_script_reports_errors_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "trakwomp.cli.main", "train", str(tmp_path / "s"),
                             "--data", "nope:x"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "unknown dataset spec" in result.stderr
