"""Groups of train examples: group scores are sums of the stored scores of their members (read
here straight from the Zarr array), predictions of dropping or keeping groups are minus the sum
over the removed members, group LDS models train on unions of half the groups and are scored
like scipy's Spearman, and excluded groups are never trained on."""

import csv
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import zarr
from conftest import TINY, fortunes, soft_thresholded, write_jsonl, write_tiny_images
from PIL import Image
from scipy.stats import spearmanr
from scipy.stats import t as student_t
from trakwomp.cli.main import app
from trakwomp.store import Store, StoreError, paths
from typer.testing import CliRunner

from trakwomp.analysis.groups import group_scores, predict_groups
from trakwomp.analysis.lds import SIZE_BASELINE, lds
from trakwomp.analysis.show import CHART_ROW, OPPOSES, SUPPORTS, show_groups
from trakwomp.analysis.status import status
from trakwomp.data.groups import Groups, read_groups_file, sources_of
from trakwomp.data.specs import load_dataset
from trakwomp.errors import UserError
from trakwomp.features import memory
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.stages.featurize import featurize
from trakwomp.stages.bindings import bind_groups, stored_groups
from trakwomp.stages.finalize import finalize
from trakwomp.stages.recipe import Recipe
from trakwomp.stages.score import score
from trakwomp.stages.train import train

RECIPE = Recipe(epochs=1, batch_size=16, lr=0.05)
NAMES = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
LABELS = np.random.default_rng(1).permutation(np.repeat(NAMES, [4, 6, 8, 8, 10, 12])).tolist()  # groups of unequal size


def write_groups_csv(path, labels, header=True, order=None):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(["index", "group"])
        for i in order if order is not None else range(len(labels)):
            writer.writerow([i, labels[i]])
    return path


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """A scored image store of 48 train examples in 6 groups (a CSV), with 6 example-level and
    8 group-level LDS models on its 9 targets."""
    root = tmp_path_factory.mktemp("groups")
    data = load_dataset(f"npz:{write_tiny_images(root / 'train.npz')}")
    targets = load_dataset(f"npz:{write_tiny_images(root / 'targets.npz', n=9, seed=1)}")
    groups_file = write_groups_csv(root / "groups.csv", LABELS, order=np.random.default_rng(0).permutation(48))
    store = root / "store"
    train(store, data, TINY, num_models=1, recipe=RECIPE)
    featurize(store, projector=ProjectorSpec("sjlt", 0, 2, 8), chunk_rows=16)
    finalize(store)
    key = score(store, targets).key
    train(store, data, TINY, role="lds", num_models=6, targets=targets, recipe=RECIPE)
    train(store, data, TINY, role="lds", num_models=8, targets=targets, groups=groups_file,
          recipe=Recipe(epochs=1, batch_size=16, lr=0.05, group_alpha=0.5))
    raw = zarr.open_group(str(store), mode="r")[f"scores/{key}/tau"][:]
    return {"root": root, "store": store, "data": data, "targets": targets, "groups": groups_file,
            "raw": raw.astype(np.float64), "tau": soft_thresholded(raw)}  # tau: at the default --threshold


def member_sum(tau: np.ndarray, names: list[str]) -> np.ndarray:
    """Per target, the sum of the scores of the train examples whose label is in `names`."""
    return np.array([sum(row[i] for i in range(48) if LABELS[i] in names) for row in tau])


def rounding_bound(tau: np.ndarray, names: list[str]) -> np.ndarray:
    """How far a sum of members' scores may lie from `member_sum` (float64 from the float64
    threshold) when each score was soft-thresholded in float32: a few float32 roundings of each
    member's |score| (the score, its target's RMS and the threshold), whatever the CPU."""
    return 8 * np.finfo(np.float32).eps * member_sum(np.abs(tau), names)


def assert_within(actual, expected, bound) -> None:
    assert np.all(np.abs(np.asarray(actual) - expected) <= bound), np.max(np.abs(np.asarray(actual) - expected) - bound)


def test_groups_files_of_every_form_give_the_same_groups(tmp_path):
    expected = {name: [i for i in range(48) if LABELS[i] == name] for name in NAMES}
    np.save(tmp_path / "text.npy", np.array(LABELS))
    write_groups_csv(tmp_path / "plain.csv", LABELS, header=False, order=range(47, -1, -1))
    for path in (tmp_path / "text.npy", tmp_path / "plain.csv"):
        groups = read_groups_file(path, 48)
        assert groups.names == tuple(sorted(NAMES))
        assert {name: np.flatnonzero(groups.codes == g).tolist() for g, name in enumerate(groups.names)} == expected
        assert groups.sha256 == Groups.from_labels(LABELS, "x").sha256
    np.save(tmp_path / "ints.npy", np.arange(48) % 3)
    assert read_groups_file(tmp_path / "ints.npy", 48).names == ("0", "1", "2")
    assert Groups.from_labels(["a", "b"], "x").sha256 != Groups.from_labels(["b", "a"], "x").sha256


@pytest.mark.parametrize("name, content, fragment", [
    ("short.npy", np.array(LABELS[:40]), "has 40 labels for the 48 train examples"),
    ("empty-label.npy", np.array(LABELS[:47] + [""]), "no group for 1 of the 48 train examples (first: 47)"),
    ("floats.npy", np.ones(48), "integer or text labels"),
    ("missing.csv", [(i, LABELS[i]) for i in range(48) if i != 5], "no group for 1 of the 48 train examples (first: 5)"),
    ("twice.csv", [(i, LABELS[i]) for i in range(48)] + [(3, "alpha")], "train example 3 is given twice"),
    ("beyond.csv", [(i, LABELS[i]) for i in range(48)] + [(48, "alpha")], "index 48 is outside the train set"),
    ("three-columns.csv", [(0, "a", "b")], "expected index,group"),
    ("groups.txt", [(0, "a")], "(.npy or .csv)"),
])
def test_bad_groups_files_are_refused(tmp_path, name, content, fragment):
    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, content)
    else:
        path.write_text("".join(",".join(map(str, row)) + "\n" for row in content))
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        read_groups_file(path, 48)


def test_text_sources_are_groups(tmp_path):
    rows = fortunes("train", 30)
    data = load_dataset(f"jsonl:{write_jsonl(tmp_path / 'texts.jsonl', rows)}")
    groups = sources_of(data)
    assert groups.names == tuple(sorted({r["source"] for r in rows}))
    assert [groups.names[c] for c in groups.codes] == [r["source"] for r in rows]
    unsourced = load_dataset(f"jsonl:{write_jsonl(tmp_path / 'plain.jsonl', [{'text': 'a'}, {'text': 'b'}])}")
    with pytest.raises(UserError, match="2 of the 2 texts .* have no source"):
        sources_of(unsourced)


def test_group_scores_are_sums_of_their_members_scores(grouped):
    tau = grouped["tau"]
    every = group_scores(grouped["store"])
    expected = np.stack([member_sum(tau, [name]) for name in every.names], axis=1)
    bound = np.stack([rounding_bound(tau, [name]) for name in every.names], axis=1)
    assert_within(every.per_target, expected, bound)
    chosen = group_scores(grouped["store"], chosen_targets=[4, 1])
    assert_within(chosen.per_target, expected[[4, 1]], bound[[4, 1]])
    np.save(grouped["root"] / "mask.npy", np.arange(9) % 2 == 0)
    masked = group_scores(grouped["store"], target_set=grouped["root"] / "mask.npy")
    assert masked.targets == [0, 2, 4, 6, 8]
    rows = masked.rows()
    means = expected[[0, 2, 4, 6, 8]].mean(axis=0)
    assert [r["group"] for r in rows] == [every.names[g] for g in np.argsort(-means)]
    for r in rows:
        g = every.names.index(r["group"])
        assert r["examples"] == LABELS.count(r["group"])
        assert_within(r["score"], means[g], bound[[0, 2, 4, 6, 8], g].mean())
        assert_within(r["change_if_removed"], -means[g], bound[[0, 2, 4, 6, 8], g].mean())


def test_dropping_or_keeping_groups_predicts_minus_the_removed_scores(grouped):
    tau = grouped["tau"]
    dropped = predict_groups(grouped["store"], drop=["beta", "zeta"]).change
    assert_within(dropped, -member_sum(tau, ["beta", "zeta"]), rounding_bound(tau, ["beta", "zeta"]))
    kept = predict_groups(grouped["store"], keep=["alpha"]).change
    others = [n for n in NAMES if n != "alpha"]
    assert_within(kept, -member_sum(tau, others), rounding_bound(tau, others))
    result = CliRunner().invoke(app, ["predict", str(grouped["store"]), "--keep-groups", "gamma,delta", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    removed = ["alpha", "beta", "eps", "zeta"]
    expected, bound = -member_sum(tau, removed), rounding_bound(tau, removed)
    assert_within(answer["predicted_change"], expected, bound)
    assert_within(answer["mean_predicted_change"], expected.mean(), bound.mean())
    with pytest.raises(UserError, match="unknown group 'omega'"):
        predict_groups(grouped["store"], drop=["omega"])
    with pytest.raises(UserError, match="not both"):
        predict_groups(grouped["store"], drop=["beta"], keep=["alpha"])


def test_group_lds_models_train_on_half_the_groups_and_are_scored_like_scipy(grouped):
    store = zarr.open_group(str(grouped["store"]), mode="r")
    masks = np.stack([store[f"models/lds-groups/{j:06d}/mask"][:] for j in range(8)])
    margins = np.stack([store[f"models/lds-groups/{j:06d}/margins"][:] for j in range(8)]).astype(np.float64)
    labels = np.array(LABELS)
    for mask in masks:
        chosen = set(labels[mask])
        assert len(chosen) == 3 and mask.tolist() == [label in chosen for label in labels]
    assert len({tuple(m) for m in masks}) > 4
    example_masks = np.stack([store[f"models/lds/{j:06d}/mask"][:] for j in range(6)])
    assert all(m.sum() == 24 and len(set(labels[m])) > 3 for m in example_masks)

    predicted = masks.astype(np.float64) @ grouped["raw"].T
    expected = np.mean([spearmanr(margins[:, t], predicted[:, t]).statistic if np.ptp(predicted[:, t]) else 0.0
                        for t in range(9)])
    report = lds(grouped["store"], by_group=True, threshold=0.0, resamples=200)
    assert report.results[0].num_models == 8
    assert report.results[0].mean == pytest.approx(expected, abs=1e-9)
    by_size = np.mean([spearmanr(margins[:, t], masks.sum(axis=1)).statistic for t in range(9)])
    assert report.results[-1].name == SIZE_BASELINE and report.results[-1].mean == pytest.approx(by_size, abs=1e-9)
    assert lds(grouped["store"], resamples=200).results[0].num_models == 6
    assert {p.what: p.done for p in status(grouped["store"]).stages if p.stage == "train"} == \
        {"reference models": 1, "lds models": 6, "lds-groups models": 8}


def test_excluded_groups_are_never_trained_on_and_the_recipe_records_them(grouped, tmp_path):
    store = tmp_path / "store"
    data, groups = grouped["data"], grouped["groups"]
    train(store, data, TINY, role="lds", num_models=2, targets=grouped["targets"], groups=groups,
          recipe=Recipe(alpha=1.0, epochs=1, batch_size=16, lr=0.05, exclude_groups=("gamma", "beta")))
    masks = [zarr.open_array(str(store / f"models/lds/00000{j}/mask"))[:] for j in (0, 1)]
    outside = [label not in ("beta", "gamma") for label in LABELS]
    assert all(mask.tolist() == outside for mask in masks)
    half = tmp_path / "half"
    train(half, data, TINY, groups=groups, recipe=Recipe(epochs=1, batch_size=16, lr=0.05, exclude_groups=("eps",)))
    mask = zarr.open_array(str(half / "models/reference/000000/mask"))[:]
    assert mask.sum() == round(0.5 * (48 - LABELS.count("eps"))) and not any(mask[i] for i in range(48) if LABELS[i] == "eps")
    with pytest.raises(StoreError, match=r'exclude_groups is \["beta", "gamma"\] in the store but \["gamma"\] here'):
        train(store, data, TINY, role="lds", num_models=2, targets=grouped["targets"],
              recipe=Recipe(alpha=1.0, epochs=1, batch_size=16, lr=0.05, exclude_groups=("gamma",)))


def test_a_store_keeps_its_groups(grouped, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(grouped["store"], store)
    assert group_scores(store).origin == str(grouped["groups"])
    other = write_groups_csv(tmp_path / "other.csv", LABELS[1:] + LABELS[:1])
    with pytest.raises(UserError, match="differ from those store"):
        group_scores(store, other)
    same = write_groups_csv(tmp_path / "same.csv", LABELS, header=False)
    np.testing.assert_array_equal(group_scores(store, same).per_target, group_scores(store).per_target)


def test_a_hundred_thousand_groups_stay_out_of_the_manifest_and_read_back_whole(tmp_path):
    """Group names live in arrays beside the manifest: its size does not grow with the groups, and
    names of any characters (NUL, commas, quotes, emoji) come back exactly; a store that kept the
    names in its manifest (before 2026-12-03) still reads."""
    labels = [f"g{i:06d}" for i in range(100_000)] + ["a\x00b", "x,\"y\"", "\u00e9t\u00e9 \U0001f600"]
    groups = Groups.from_labels(labels, "many")
    handle = Store.open(tmp_path / "store", create=True)
    bind_groups(handle, groups)
    assert len(json.dumps(handle.manifest.json)) < 1000
    back = Store.open(tmp_path / "store")
    assert stored_groups(back).names == tuple(sorted(labels)) and stored_groups(back).sha256 == groups.sha256
    older = Store.open(tmp_path / "older", create=True)
    older.write_array(paths.GROUP_CODES, groups.codes)
    older.set_section("groups", {**groups.record(), "names": list(groups.names)})
    assert stored_groups(Store.open(tmp_path / "older")).names == groups.names


def test_group_scores_too_big_for_memory_are_refused_before_they_are_made(grouped, monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda device: 500)  # 9 x 6 float64 twice: 864 bytes
    with pytest.raises(UserError, match=r"the group scores of 9 targets x 6 groups need .* of memory, and .* is "
                                        r"free; choose fewer targets"):
        group_scores(grouped["store"])
    assert group_scores(grouped["store"], chosen_targets=[3]).per_target.shape == (1, 6)


def test_the_group_chart_draws_the_strongest_groups_with_their_signs(grouped, tmp_path):
    out = tmp_path / "groups.png"
    result = CliRunner().invoke(app, ["show", str(grouped["store"]), "--by-group", "--target", "3", "--k", "4",
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    scores = {name: member_sum(grouped["tau"][3:4], [name])[0] for name in NAMES}
    strongest = sorted(sorted(NAMES, key=lambda n: -abs(scores[n]))[:4], key=lambda n: -scores[n])
    assert [r["group"] for r in rows] == strongest
    image = np.asarray(Image.open(out).convert("RGB"))
    for row, name in enumerate(strongest):
        colours = {tuple(pixel) for pixel in image[52 + row * CHART_ROW + CHART_ROW // 2].tolist()}
        assert (SUPPORTS if scores[name] > 0 else OPPOSES) in colours
        assert (OPPOSES if scores[name] > 0 else SUPPORTS) not in colours
    whole = show_groups(grouped["store"], k=2)  # default: the mean over every scored target
    means = {name: member_sum(grouped["tau"], [name]).mean() for name in NAMES}
    assert whole.targets == list(range(9))
    assert [whole.names[g] for g in whole.strongest(2)] == sorted(sorted(NAMES, key=lambda n: -abs(means[n]))[:2],
                                                                  key=lambda n: -means[n])


def test_the_groups_command_ranks_every_group(grouped, tmp_path):
    table = tmp_path / "groups.csv"
    result = CliRunner().invoke(app, ["groups", str(grouped["store"]), "--target", "2", "--target", "5",
                                      "--table", str(table), "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "the 3 strongest of 6 groups" in result.stdout
    rows = list(csv.DictReader(table.open()))
    means = {name: member_sum(grouped["tau"][[2, 5]], [name]).mean() for name in NAMES}
    assert [r["group"] for r in rows] == sorted(NAMES, key=lambda n: -means[n])
    for r in rows:
        assert float(r["score"]) == pytest.approx(means[r["group"]], rel=1e-5)


def test_predictions_are_calibrated_by_a_least_squares_fit_on_the_group_lds_models(grouped, tmp_path):
    store = zarr.open_group(str(grouped["store"]), mode="r")
    masks = np.stack([store[f"models/lds-groups/{j:06d}/mask"][:] for j in range(8)]).astype(np.float64)
    margins = np.stack([store[f"models/lds-groups/{j:06d}/margins"][:] for j in range(8)]).astype(np.float64)
    chosen = [1, 4, 7]
    predicted = (masks @ grouped["tau"][chosen].T).mean(axis=1)
    design = np.stack([predicted, np.ones(8)], axis=1)
    actual = margins[:, chosen].mean(axis=1)
    slope = np.linalg.lstsq(design, actual, rcond=None)[0][0]
    r = np.corrcoef(predicted, actual)[0, 1]
    p_value = 2 * student_t.sf(abs(r) * np.sqrt(6 / (1 - r ** 2)), 6)
    scores = group_scores(grouped["store"], chosen_targets=chosen)
    calibration = scores.calibration
    assert calibration.by_group and calibration.num_models == 8
    assert (calibration.slope, calibration.correlation, calibration.p_value) == \
        pytest.approx((slope, r, p_value), rel=1e-5)
    assert calibration.usable == (slope > 0 and p_value < 0.05)
    assert ("calibrated_change_if_removed" in scores.rows()[0]) == calibration.usable
    steep = replace(scores, calibration=replace(calibration, slope=2.5, p_value=0.01))
    for row in steep.rows():
        assert row["calibrated_change_if_removed"] == pytest.approx(2.5 * row["change_if_removed"], rel=1e-12)
    flat = replace(calibration, slope=1.0, p_value=0.2)
    assert not flat.usable and replace(flat, p_value=0.01).usable and not replace(flat, slope=-1.0, p_value=0.01).usable
    bare = tmp_path / "bare"
    shutil.copytree(grouped["store"], bare)
    shutil.rmtree(bare / "done" / "train" / "lds-groups")
    example_level = group_scores(bare, chosen_targets=chosen).calibration
    assert not example_level.by_group and example_level.num_models == 6
    shutil.rmtree(bare / "done" / "train" / "lds")
    assert group_scores(bare).calibration is None and "calibrated_change_if_removed" not in group_scores(bare).rows()[0]
