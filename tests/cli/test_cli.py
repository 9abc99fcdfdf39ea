import json
import shutil
import subprocess
import sys

import numpy as np
import zarr
from conftest import REPO, plain
from trakwomp.cli.main import app
from trakwomp.cli.tables import show_top_k
from typer.testing import CliRunner


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
    result = cli("train", tmp_path / "s", *common, "--num-models", "2", "--json")
    assert "2 already done" in plain(result.stderr)
    assert json.loads(result.stdout) == {"trained": [], "skipped": [0, 1], "summaries": {}}
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


def test_score_with_top_k_and_json_prints_only_the_json(cli, tmp_path):
    """`score --top-k K --json`: stdout is the report alone (a pipeline parses it); the table of
    the first targets' examples goes to --top-k-out, as without --json."""
    from conftest import write_scored_image_store

    store = write_scored_image_store(tmp_path)[0]
    out = tmp_path / "top.csv"
    result = cli("score", store, "--targets", f"npz:{tmp_path / 'targets.npz'}", "--top-k", "2", "--top-k-out", out,
                 "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["top_k_file"] == str(out)
    assert len(out.read_text().splitlines()) == 1 + 12 * 2 * 2  # a header, then 2 + 2 rows per target


def test_console_script_reports_errors_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "trakwomp.cli.main", "train", str(tmp_path / "s"),
                             "--data", "nope:x"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "unknown dataset spec" in result.stderr


def test_shell_completion_completes_commands_and_options():
    def complete(words, index):
        env = {"_TRAKWOMP_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(index)}
        return CliRunner().invoke(app, [], env=env, prog_name="trakwomp").stdout.split()

    assert complete("trakwomp fea", 1) == ["featurize"]
    assert complete("trakwomp featurize store --proj", 3) == ["--projector", "--projector-seed"]


def test_tables_show_data_as_written_not_as_markup(capsys):
    """Labels, sources and texts from the data are escaped: "[/x]" or "[bold]" print as they are
    (rich would fail on a closing tag it never opened); a real-valued label prints as a number."""
    rows = [{"target": 0, "target_label": 0.25, "direction": direction, "rank": 1, "train_index": i,
             "train_path": f"[/x]/{i}.png", "train_label": "[bold]cat", "score": score}
            for i, (direction, score) in enumerate((("supports", 0.5), ("opposes", -0.5)))]
    show_top_k(rows, "t")
    texts = [{**rows[0], "target_source": "[/x]", "train_text": "a [/b] text", "train_source": "[red]src"}]
    show_top_k(texts, "t")
    shown = capsys.readouterr().out
    for written in ("[/x]/0.png", "[bold]cat", "0.25", "[/x]", "a [/b] text", "[red]src"):
        assert written in shown
