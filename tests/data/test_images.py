import io
import pickle
import tarfile
from importlib import resources

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from trakwomp.data.specs import load_dataset
from trakwomp.errors import UserError


def test_cifar10_mini_shapes_labels_and_pixels():
    with resources.files("trakwomp").joinpath("assets/cifar10_mini.npz").open("rb") as f:
        raw = dict(np.load(f))
    for split, n in (("train", 2000), ("test", 500)):
        ds = load_dataset(f"cifar10-mini:{split}")
        assert len(ds) == n and ds.num_classes == 10
        assert np.bincount(ds.labels, minlength=10).tolist() == [n // 10] * 10
        for i in (0, n // 2, n - 1):
            x, y = ds[i]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32
            expected = raw[f"x_{split}"][i].astype(np.float32).transpose(2, 0, 1) / 255
            np.testing.assert_array_equal(x.numpy(), expected)
            assert y == raw[f"y_{split}"][i]
            assert ds.path(i).startswith(f"{split}/{ds.classes[y]}/")
    assert load_dataset("cifar10-mini:train").classes[:3] == ("airplane", "automobile", "bird")


SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.mark.skipif(not SHARED_CIFAR10.is_file(), reason="needs ../shared/data/cifar10-jpeg.tar.gz")
def test_cifar10_mini_images_are_the_shared_cifar10_jpegs_they_name():
    """Images of cifar10-mini are the pixels of the JPEG files of the shared CIFAR-10 archive
    that they name, decoded by Pillow (scripts/build_cifar10_mini.py), with the class of their folder."""
    chosen = {}
    for split in ("train", "test"):
        ds = load_dataset(f"cifar10-mini:{split}")
        for i in (0, len(ds) // 3, len(ds) - 1):
            chosen[ds.path(i)] = (ds, i)
    with tarfile.open(SHARED_CIFAR10, "r:gz") as tar:
        for member in tar:
            name = member.name.lstrip("./")
            if name in chosen:
                ds, i = chosen.pop(name)
                pixels = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
                np.testing.assert_array_equal((ds[i][0].numpy() * 255).round().astype(np.uint8).transpose(1, 2, 0), pixels)
                assert ds.classes[ds[i][1]] == name.split("/")[1]
            if not chosen:
                break
    assert not chosen, f"not in the archive: {sorted(chosen)}"


def _write_imagefolder(root, rng):
    """Classes 'b_dog' and 'a_cat' (given out of order) with PNG images, lossless."""
    written = {}
    for cls, names in (("b_dog", ["2.png", "10.png"]), ("a_cat", ["z.png", "a.png", "m.png"])):
        (root / cls).mkdir(parents=True)
        for name in names:
            pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / name)
            written[f"{cls}/{name}"] = pixels
    return written


def test_imagefolder_order_labels_pixels_and_paths(tmp_path):
    written = _write_imagefolder(tmp_path / "tree", np.random.default_rng(0))
    ds = load_dataset(f"imagefolder:{tmp_path / 'tree'}")
    expected_order = ["a_cat/a.png", "a_cat/m.png", "a_cat/z.png", "b_dog/10.png", "b_dog/2.png"]
    assert ds.classes == ("a_cat", "b_dog")
    assert len(ds) == 5
    for i, rel in enumerate(expected_order):
        x, y = ds[i]
        assert ds.path(i).endswith(rel)
        assert y == (0 if rel.startswith("a_cat") else 1)
        np.testing.assert_array_equal(x.numpy(), written[rel].transpose(2, 0, 1).astype(np.float32) / 255)


def _fake_cifar10(root, rng):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 4).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        batches[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return batches


def test_cifar10_root_in_torchvision_format(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    batches = _fake_cifar10(tmp_path, np.random.default_rng(1))
    # The fake files cannot match torchvision's MD5 sums; everything else is torchvision's own reading.
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    train = load_dataset(f"cifar10:{tmp_path}:train")
    test = load_dataset(f"cifar10:{tmp_path}:test")
    assert len(train) == 20 and len(test) == 4
    assert train.classes[3] == "class3"
    data, labels = batches["data_batch_2"]
    x, y = train[4 + 1]
    np.testing.assert_array_equal(x.numpy(), data[1].reshape(3, 32, 32).astype(np.float32) / 255)
    assert y == labels[1]
    assert test.labels.tolist() == batches["test_batch"][1]


def test_cifar10_root_missing_says_download(tmp_path):
    with pytest.raises(UserError, match="`download`"):
        load_dataset(f"cifar10:{tmp_path / 'nowhere'}:train")


def test_npz_and_indices(tmp_path):
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 4])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    np.save(tmp_path / "idx.npy", np.array([9, 0, 4]))
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}", indices=tmp_path / "idx.npy")
    assert len(ds) == 3 and ds.num_classes == 5
    assert [ds[i][1] for i in range(3)] == [4, 0, 1]
    np.testing.assert_array_equal(ds[0][0].numpy(), x[9])
    np.save(tmp_path / "bad.npy", np.array([0, 10]))
    with pytest.raises(UserError, match=r"\[0, 10\)"):
        load_dataset(f"npz:{tmp_path / 'd.npz'}", indices=tmp_path / "bad.npy")


def test_fingerprint_tracks_pixels_labels_and_order(tmp_path):
    x = np.random.default_rng(0).random((6, 2), dtype=np.float32)
    y = np.array([0, 1, 0, 1, 0, 1])
    np.savez(tmp_path / "a.npz", x=x, y=y)
    x2 = x.copy()
    x2[3, 1] = np.nextafter(x2[3, 1], 2)
    np.savez(tmp_path / "b.npz", x=x2, y=y)
    y2 = y.copy()
    y2[5] = 0
    np.savez(tmp_path / "c.npz", x=x, y=y2)
    np.savez(tmp_path / "a_copy.npz", x=x, y=y)
    fp = {k: load_dataset(f"npz:{tmp_path / k}.npz").fingerprint() for k in ("a", "b", "c", "a_copy")}
    assert fp["a"] == fp["a_copy"]
    assert fp["a"].sha256 != fp["b"].sha256 and fp["a"].sha256 != fp["c"].sha256
    np.save(tmp_path / "rev.npy", np.arange(6)[::-1].copy())
    assert load_dataset(f"npz:{tmp_path / 'a.npz'}", indices=tmp_path / "rev.npy").fingerprint().sha256 != fp["a"].sha256


@pytest.mark.parametrize("spec, message", [
    ("mnist:train", "unknown dataset spec"),
    ("cifar10-mini:validation", "'train' or 'test'"),
    ("imagefolder:/no/such/folder", "no folder"),
    ("npz:/no/such/file.npz", "no file"),
])
def test_bad_dataset_specs(spec, message):
    with pytest.raises(UserError, match=message):
        load_dataset(spec)


def test_transform_applies_everywhere(tmp_path, monkeypatch):
    (tmp_path / "mytransforms.py").write_text("def double(x):\n    return x * 2\n")
    monkeypatch.chdir(tmp_path)
    plain = load_dataset("cifar10-mini:test")
    doubled = load_dataset("cifar10-mini:test", transform="mytransforms:double")
    torch.testing.assert_close(doubled[7][0], plain[7][0] * 2, rtol=0, atol=0)
