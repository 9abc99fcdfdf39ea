"""`trakwomp show`: the rows are the largest and smallest stored scores of the target (read here
straight from the Zarr array), and the PNG holds the target and those train images."""

import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from conftest import (
    TINY,
    fortunes,
    plain,
    soft_thresholded,
    write_jsonl,
    write_scored_text_store,
    write_tiny_images,
)
from PIL import Image
from trakwomp.cli.main import app
from trakwomp.store import Store
from typer.testing import CliRunner

from trakwomp.analysis.show import CAPTION, TILE
from trakwomp.data.specs import load_dataset
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.stages.featurize import featurize
from trakwomp.stages.finalize import finalize
from trakwomp.stages.recipe import Recipe
from trakwomp.stages.score import score
from trakwomp.stages.train import train


def test_show_draws_the_target_with_its_strongest_train_examples(tmp_path):
    data = load_dataset(f"npz:{write_tiny_images(tmp_path / 'train.npz')}")
    targets = load_dataset(f"npz:{write_tiny_images(tmp_path / 'targets.npz', n=9, seed=1)}")
    store = tmp_path / "store"
    train(store, data, TINY, num_models=1, recipe=Recipe(epochs=1, batch_size=16, lr=0.05))
    featurize(store, projector=ProjectorSpec("sjlt", 0, 2, 8), chunk_rows=16)
    finalize(store)
    key = score(store, targets).key
    k, target = 3, 4
    result = CliRunner().invoke(app, ["show", str(store), "--target", str(target), "--k", str(k),
                                      "--out", str(tmp_path / "grid.png"), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)

    tau = zarr.open_group(str(store), mode="r")[f"scores/{key}/tau"][target]
    order = sorted(range(len(tau)), key=lambda i: (-tau[i], i))
    assert [r["train_index"] for r in rows if r["direction"] == "supports"] == order[:k]
    assert [r["train_index"] for r in rows if r["direction"] == "opposes"] == sorted(range(len(tau)), key=lambda i: (tau[i], i))[:k]
    shown = soft_thresholded(tau[None])[0]  # the default --threshold 0.25 keeps the order
    assert [r["score"] for r in rows] == pytest.approx([shown[r["train_index"]] for r in rows], rel=1e-5)

    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    pad = 4
    assert grid.shape == (pad + 2 * (TILE + CAPTION + pad), pad + (k + 1) * (TILE + pad), 3)

    def image_at(row, column):
        top, left = pad + row * (TILE + CAPTION + pad), pad + column * (TILE + pad)
        return grid[top:top + TILE, left:left + TILE]

    def upscaled(x: torch.Tensor) -> np.ndarray:  # nearest-neighbour, as the tiles are drawn
        pixels = (x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        rows_, columns = (np.arange(TILE) * x.shape[1]) // TILE, (np.arange(TILE) * x.shape[2]) // TILE
        return pixels[rows_][:, columns]

    assert np.abs(image_at(0, 0).astype(int) - upscaled(targets[target][0])).max() <= 1
    assert np.abs(image_at(0, 1).astype(int) - upscaled(data[order[0]][0])).max() <= 1
    assert np.abs(image_at(1, 1).astype(int) - upscaled(data[rows[k]["train_index"]][0])).max() <= 1


@pytest.fixture(scope="module")
def text_store(tmp_path_factory):
    """A scored text store on 24 fortunes of a jsonl file that a test may then edit."""
    root = tmp_path_factory.mktemp("edited")
    write_scored_text_store(root, "store", "train.jsonl", "targets.jsonl")
    return root


@pytest.mark.parametrize("edit", ["reordered", "one text edited"])
def test_train_examples_are_never_shown_or_grouped_from_data_changed_since_the_store(text_store, tmp_path, edit):
    """The same number of texts, two swapped or one changed: show, score --top-k and groups refuse
    in one line instead of showing other texts under the stored scores (or recording their sources)."""
    root = shutil.copytree(text_store, tmp_path / "copy")
    rows = fortunes("train", 24)
    rows[3], rows[4] = (rows[4], rows[3]) if edit == "reordered" else (dict(rows[3], text=rows[3]["text"] + "!"), rows[4])
    write_jsonl(text_store / "train.jsonl", rows)  # where the store's recorded spec points
    try:
        for args in (["show", root / "store", "--target", "0", "--out", tmp_path / "page.html"],
                     ["score", root / "store", "--targets", f"jsonl:{text_store / 'targets.jsonl'}", "--top-k", "2",
                      "--top-k-out", tmp_path / "top.csv"],
                     ["groups", root / "store"]):
            result = CliRunner().invoke(app, [str(a) for a in args])
            assert result.exit_code == 2 and "changed since the store was made" in plain(result.stderr), result.output
        assert Store.open(root / "store").manifest.groups is None and not (tmp_path / "page.html").exists()
    finally:
        write_jsonl(text_store / "train.jsonl", fortunes("train", 24))
