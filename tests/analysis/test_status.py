"""`trakwomp status`: done and left per stage, counted by hand from the settings of each step,
and exit code 0 only when everything asked for is done."""

import json
import os

from conftest import TINY, write_tiny_images
from trakwomp.cli.main import app
from trakwomp.cli.reading import INCOMPLETE
from typer.testing import CliRunner

from trakwomp.analysis.status import status
from trakwomp.data.specs import load_dataset
from trakwomp.estimator.view import ViewSpec
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.runtime import Shard
from trakwomp.stages.featurize import featurize
from trakwomp.stages.finalize import finalize
from trakwomp.stages.recipe import Recipe
from trakwomp.stages.score import score
from trakwomp.stages.train import train


def progress(store) -> dict[tuple[str, str], tuple[int, int]]:
    return {(p.stage, p.what): (p.done, p.total) for p in status(store).stages}


def cli_status(store):
    result = CliRunner().invoke(app, ["status", str(store), "--json"])
    return result.exit_code, json.loads(result.stdout)


def test_status_counts_what_is_done_and_left_and_exits_0_only_when_complete(tmp_path):
    data = load_dataset(f"npz:{write_tiny_images(tmp_path / 'train.npz')}")  # 48 examples
    targets = load_dataset(f"npz:{write_tiny_images(tmp_path / 'targets.npz', n=9, seed=1)}")
    store = tmp_path / "store"
    recipe = Recipe(epochs=1, batch_size=16, lr=0.05)

    train(store, data, TINY, num_models=2, recipe=recipe, shard=Shard(0, 2))
    assert progress(store) == {("train", "reference models"): (1, 2)}
    code, report = cli_status(store)
    assert code == INCOMPLETE and report["complete"] is False
    train(store, data, TINY, num_models=2, recipe=recipe, shard=Shard(1, 2))
    assert cli_status(store)[0] == 0

    # 2 models x 3 row chunks of 16; shard 0/2 takes units 0, 2, 4: (0, 0), (0, 2), (1, 1)
    featurize(store, projector=ProjectorSpec("sjlt", 0, 2, 8), chunk_rows=16, shard=Shard(0, 2))
    assert progress(store)[("featurize", "model 0 (train:reference/000000) row chunks")] == (2, 3)
    assert progress(store)[("featurize", "model 1 (train:reference/000001) row chunks")] == (1, 3)
    featurize(store, shard=Shard(1, 2))

    finalize(store, models=[0], shard=Shard(0, 2))  # view d16-b2-ridgeauto: block 0 of 2 for model 0
    assert progress(store)[("finalize", "view d16-b2-ridgeauto model 0 blocks")] == (1, 2)
    finalize(store, models=[0])
    finalize(store, ViewSpec(blocks=1), models=[1])
    assert progress(store)[("finalize", "view d16-b1-ridgeauto model 1 blocks")] == (1, 1)

    score(store, targets, models=[0], target_chunk_rows=4, shard=Shard(0, 3))  # 3 chunks of 9 targets
    key = next(k for stage, k in progress(store) if stage == "score")
    assert progress(store)[("score", key)] == (1, 3)
    code, report = cli_status(store)
    assert code == INCOMPLETE
    quiet = CliRunner().invoke(app, ["status", str(store), "--quiet"])
    assert (quiet.exit_code, quiet.stdout, quiet.stderr) == (INCOMPLETE, "", "")
    score(store, targets, models=[0], target_chunk_rows=4)
    code, report = cli_status(store)
    assert code == 0 and all(p["complete"] for p in report["stages"])
    assert report["size_bytes"] == sum(os.path.getsize(os.path.join(folder, name))
                                       for folder, _, names in os.walk(store) for name in names)
