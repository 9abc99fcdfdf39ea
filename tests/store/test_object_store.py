"""A store on an object store: a real S3-compatible server (moto's server mode) on 127.0.0.1.

Two featurize processes write to s3://bucket/store at once; finalize, score and lds then read
from it; every array, done marker and LDS number equals those of the same work on a local store.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr
from conftest import REPO, write_tiny_images
from moto.server import ThreadedMotoServer
from test_store import STALE_LEASE
from trakwomp.store import Store, StoreError

from trakwomp.analysis.lds import lds
from trakwomp.data.specs import load_dataset
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.stages.featurize import featurize
from trakwomp.stages.finalize import finalize
from trakwomp.stages.recipe import Recipe
from trakwomp.stages.score import score
from trakwomp.stages.train import train

pytestmark = pytest.mark.slow
from conftest import TINY

FEATURIZE = ["--projector", "sjlt", "--projector-seed", "3", "--blocks", "2", "--block-dim", "8", "--chunk-rows", "8",
             "--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def s3_environment():
    """A moto S3 server on a free port of 127.0.0.1 with an empty bucket `bucket`; the AWS
    variables that point boto (here and in child processes) at it."""
    import s3fs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("bucket")
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key)
        else:
            os.environ[key] = value
    server.stop()


def contents(location: str) -> dict[str, bytes]:
    """Every array's bytes and every group's attributes (done markers included), read by zarr."""
    out = {}

    def walk(group, prefix):
        out[prefix + ".attrs"] = json.dumps(group.attrs.asdict(), sort_keys=True).encode()
        for name, array in group.arrays():
            out[prefix + name] = np.asarray(array[...]).tobytes()
        for name, sub in group.groups():
            walk(sub, f"{prefix}{name}/")

    walk(zarr.open_group(location, mode="r"), "")
    return out


def test_two_featurize_shards_on_s3_then_every_stage_equals_a_local_store(s3_environment, tmp_path):
    import s3fs

    train_set = load_dataset(f"npz:{write_tiny_images(tmp_path / 'train.npz')}")
    targets = load_dataset(f"npz:{write_tiny_images(tmp_path / 'targets.npz', n=9, seed=1)}")
    local, remote = tmp_path / "local", "s3://bucket/store"
    recipe = Recipe(epochs=1, batch_size=16, lr=0.05)
    train(local, train_set, TINY, num_models=2, recipe=recipe)
    train(local, train_set, TINY, role="lds", num_models=2, targets=targets, recipe=recipe)
    s3fs.S3FileSystem().put(str(local), "bucket/store", recursive=True)

    processes = [subprocess.Popen([sys.executable, "-m", "trakwomp.cli.main", "featurize", remote, *FEATURIZE,
                                   "--shard", f"{k}/2"], cwd=REPO, env={**os.environ, **s3_environment},
                                  stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    errors = [p.communicate()[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], errors
    featurize(local, projector=ProjectorSpec("sjlt", 3, 2, 8), chunk_rows=8, batch_size=8)

    results = {}
    for location in (str(local), remote):
        finalize(location)
        score(location, targets, target_chunk_rows=4)
        results[location] = lds(location, resamples=200).as_dict()
    assert results[remote] == results[str(local)]
    got, want = contents(remote), contents(str(local))
    lease = {k: v for k, v in got.items() if k.startswith("manifest_lease/")}
    got = {k: v for k, v in got.items() if k not in lease}
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []
    # one lease generation is left (older ones are removed by the next taker), and it is released
    (generation,) = [k for k in lease if k != "manifest_lease/.attrs"]
    assert json.loads(lease[generation])["released"] is True


def test_missing_object_store_is_refused_and_nothing_is_created(s3_environment):
    import s3fs

    with pytest.raises(StoreError, match="no trakwomp store at 's3://bucket/nothing'"):
        Store.open("s3://bucket/nothing")
    assert not s3fs.S3FileSystem().exists("bucket/nothing")


RACER = """
import sys
from trakwomp.store import Store, lease
lease.LEASE_SECONDS = 1.0
Store.open(sys.argv[1]).set_entry("entries", sys.argv[2], {"writer": sys.argv[2]})
"""


def test_two_processes_racing_to_break_a_stale_lease_on_s3_take_turns(s3_environment):
    """A lease object left by a process that died holding it; two processes that each add a
    manifest entry break it (S3's conditional PUT lets one of them create the next generation),
    then take turns: both entries are kept and the lease went through two more generations."""
    import s3fs

    Store.open("s3://bucket/race", create=True)
    s3fs.S3FileSystem().pipe("bucket/race/manifest_lease/000000000000/zarr.json", json.dumps(STALE_LEASE).encode())
    processes = [subprocess.Popen([sys.executable, "-c", RACER, "s3://bucket/race", f"w{k}"], cwd=REPO,
                                  env={**os.environ, **s3_environment}, stderr=subprocess.PIPE, text=True)
                 for k in (0, 1)]
    errors = [p.communicate()[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], errors
    assert sorted(Store.open("s3://bucket/race").manifest.json["entries"]) == ["w0", "w1"]
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[1] for p in fs.ls("bucket/race/manifest_lease") if not p.endswith(".json")] == ["000000000002"]
