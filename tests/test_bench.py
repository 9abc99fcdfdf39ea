"""bench/full_cifar10 --smoke: the full-scale experiment's code path on the CPU with tiny settings."""

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import zarr
from conftest import REPO
from PIL import Image
from scipy.stats import spearmanr

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_jpeg_archive(path, train_per_class=12, test_per_class=3):
    """A CIFAR-10-like archive (./train/<class>/*.jpg, ./test/<class>/*.jpg) of 32 x 32 images
    whose mean colour depends on the class, so models can learn something."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            for c, name in enumerate(CLASSES):
                for i in range(count):
                    pixels = rng.normal(25 * c, 40, (32, 32, 3)).clip(0, 255).astype(np.uint8)
                    buffer = io.BytesIO()
                    Image.fromarray(pixels).save(buffer, format="JPEG")
                    info = tarfile.TarInfo(f"./{split}/{name}/{i:04d}.jpg")
                    info.size = buffer.tell()
                    buffer.seek(0)
                    tar.addfile(info, buffer)


@pytest.mark.slow
def test_full_cifar10_smoke_runs_every_stage_and_reports_the_odd_half(tmp_path):
    work = tmp_path / "work"
    write_jpeg_archive(tmp_path / "cifar.tar.gz")
    result = subprocess.run([sys.executable, str(REPO / "bench" / "full_cifar10"), str(work), "--smoke",
                             "--archive", str(tmp_path / "cifar.tar.gz")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    results = json.loads((work / "results.json").read_text())
    assert [e["M"] for e in results["claim1"]] == [1, 2]
    assert [e["block_dim"] for e in results["claim2"]] == [8, 16]
    assert all((work / f"claim{k}.png").stat().st_size > 0 for k in (1, 2, 3))
    assert "Claim 3" in (work / "report.md").read_text()

    # The chosen views are the best on the even half; the reported LDS is on the odd half.
    entry = results["claim1"][0]
    best = max(entry["selection"]["womp"], key=lambda row: row[-1])
    assert entry["womp_view"] == best[:3]
    d, b, ridge = entry["womp_view"]
    store = zarr.open_group(str(work / "store"), mode="r")
    key = next(k for k, v in store.attrs["trakwomp"]["scores"].items() if v["view"] == [d, b, ridge] and v["models"] == [0])
    tau = store[f"scores/{key}/tau"][...]
    odd = [f"{j:06d}" for j in range(1, 8, 2)]
    masks = np.stack([store[f"models/lds/{j}/mask"][...] for j in odd]).astype(float)
    margins = np.stack([store[f"models/lds/{j}/margins"][...] for j in odd])
    per_target = [spearmanr(margins[:, t], masks @ tau[t]).statistic for t in range(tau.shape[0])]
    expected = np.mean([0.0 if np.isnan(r) else r for r in per_target])
    reported = entry["report"]["results"][1]
    assert reported["models"] == 4 and reported["lds"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_text_lds_smoke_chooses_on_the_even_half_and_reports_the_odd_half(tmp_path):
    work = tmp_path / "work"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "text_lds.py"), str(work), "--smoke"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    results = json.loads((work / "results.json").read_text())
    assert set(results) == {"sequence", "token"}
    store = zarr.open_group(str(work / "sequence"), mode="r")
    for name in ("sequence", "token"):  # each store features its own output function
        task = zarr.open_group(str(work / name), mode="r").attrs["trakwomp"]["task"]
        assert task.get("output", "token") == name, task
    odd = [f"{j:06d}" for j in range(1, 8, 2)]
    masks = np.stack([store[f"models/lds/{j}/mask"][...] for j in odd]).astype(float)
    outputs = np.stack([store[f"models/lds/{j}/margins"][...] for j in odd])
    for name, entry in results.items():
        half0 = entry["half0"]
        trak, womp = entry["views"][:2]
        assert half0[f"d{trak[0]}-b{trak[1]}"] == max(v for k, v in half0.items() if k.endswith("-b1"))
        assert half0[f"d{womp[0]}-b{womp[1]}"] == max(v for k, v in half0.items() if not k.endswith("-b1"))
        for (d, b), reported in zip(entry["views"], entry["half1"]["results"], strict=True):
            tau = np.load(work / f"{name}-d{d}-b{b}.npy")
            predicted = masks @ tau.T.astype(float)
            rho = [spearmanr(outputs[:, t], predicted[:, t])[0] for t in range(tau.shape[0])]
            assert reported["lds"] == pytest.approx(np.mean(np.nan_to_num(rho)), abs=1e-6)
    assert "| token |" in (work / "results.md").read_text()


@pytest.mark.slow
def test_gpt2_small_smoke_featurizes_finalizes_and_scores_with_the_factored_projection(tmp_path):
    work = tmp_path / "work"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpt2_small.py"), str(work), "--smoke"], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    steps = json.loads((work / "gpt2_small.json").read_text())["steps"]
    factored = [name for name in steps if name.startswith("featurize factored")]
    assert len(factored) == 1 and steps[factored[0]]["examples_per_second"] > 0
    for name in (*factored, "finalize (one block per layer)", "score"):
        assert steps[name]["exit_code"] == 0, steps[name]
        assert 0 < steps[name]["peak_rss_bytes"] < 8 << 30
    group = zarr.open_group(str(work / "store-factored"), mode="r")
    (key,) = dict(group["scores"].groups())
    assert group[f"scores/{key}/tau"].shape == (8, 24) and np.isfinite(group[f"scores/{key}/tau"][...]).all()


@pytest.mark.slow
def test_group_benchmarks_measure_the_change_without_a_group_and_the_partial_correlation_given_size(tmp_path):
    """bench/group_counterfactual.py: the actual change is the seed-by-seed difference of the
    stored outputs of models trained with and without the group (read here from Zarr), and the
    models without it never saw its examples; bench/group_lds.py: the partial Spearman
    correlation equals the textbook partial correlation of the Spearman correlations."""
    from conftest import TINY, soft_thresholded, write_tiny_images

    from trakwomp.data.specs import load_dataset
    from trakwomp.features.projectors import ProjectorSpec
    from trakwomp.stages.featurize import featurize
    from trakwomp.stages.finalize import finalize
    from trakwomp.stages.recipe import Recipe
    from trakwomp.stages.score import score
    from trakwomp.stages.train import train

    data = load_dataset(f"npz:{write_tiny_images(tmp_path / 'train.npz')}")
    targets = load_dataset(f"npz:{write_tiny_images(tmp_path / 'targets.npz', n=9, seed=1)}")
    labels = np.array([f"g{i % 5}" for i in range(48)])
    np.save(tmp_path / "groups.npy", labels)
    store, work = tmp_path / "store", tmp_path / "work"
    recipe = Recipe(epochs=1, batch_size=16, lr=0.05)
    train(store, data, TINY, recipe=recipe)
    featurize(store, projector=ProjectorSpec("sjlt", 0, 2, 8), chunk_rows=16)
    finalize(store)
    score(store, targets)
    train(store, data, TINY, role="lds", num_models=6, targets=targets, groups=tmp_path / "groups.npy",
          recipe=Recipe(epochs=1, batch_size=16, lr=0.05, group_alpha=0.5))

    result = subprocess.run([sys.executable, str(REPO / "bench" / "group_counterfactual.py"), str(store), str(work),
                             "--seeds", "2", "--top", "2", "--jobs", "1"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads((work / "counterfactual-all.json").read_text())
    everything = np.stack([zarr.open_array(str(work / f"all/models/lds/{j:06d}/margins"))[:] for j in (0, 1)])
    assert [len(r["actual_per_seed"]) for r in report["groups"]] == [2, 2]
    for row in report["groups"]:
        folder = work / f"without-{row['group']}"
        without = np.stack([zarr.open_array(str(folder / f"models/lds/{j:06d}/margins"))[:] for j in (0, 1)])
        np.testing.assert_allclose(row["actual_per_seed"], (without - everything).mean(axis=1), rtol=1e-5)
        mask = zarr.open_array(str(folder / "models/lds/000000/mask"))[:]
        assert mask.tolist() == (labels != row["group"]).tolist()

    result = subprocess.run([sys.executable, str(REPO / "bench" / "group_lds.py"), str(store), "--baseline", "gradcos"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    view, baseline = json.loads(result.stdout)["partial_spearman_given_size"].values()
    group = zarr.open_group(str(store), mode="r")
    masks = np.stack([group[f"models/lds-groups/{j:06d}/mask"][:] for j in range(6)])
    margins = np.stack([group[f"models/lds-groups/{j:06d}/margins"][:] for j in range(6)]).astype(np.float64)

    def textbook_partial(tau: np.ndarray) -> float:
        size, predicted = masks.sum(axis=1), masks @ tau.T
        expected = []
        for t in range(9):
            r_ap, r_as, r_ps = (spearmanr(a, b).statistic for a, b in
                                ((margins[:, t], predicted[:, t]), (margins[:, t], size), (predicted[:, t], size)))
            expected.append((r_ap - r_as * r_ps) / np.sqrt((1 - r_as ** 2) * (1 - r_ps ** 2)))
        return float(np.mean(expected))

    tau = soft_thresholded(next(group[f"scores/{key}/tau"][:] for key in group["scores"].group_keys()))  # the default threshold
    assert view["mean"] == pytest.approx(textbook_partial(tau), rel=1e-6)
    (targets_id,) = group["targets"].group_keys()
    phi, phi_z = (group[f"{prefix}features/000000/phi"][:].astype(np.float64) for prefix in ("", f"targets/{targets_id}/"))
    cosines = (phi_z / np.linalg.norm(phi_z, axis=1, keepdims=True)) @ (phi / np.linalg.norm(phi, axis=1, keepdims=True)).T
    assert baseline["mean"] == pytest.approx(textbook_partial(cosines), rel=1e-4)


@pytest.mark.slow
def test_ridge_study_lds_equals_finalize_score_and_lds_at_every_view_and_ridge(tmp_path):
    """bench/ridge_study.py computes every (view, ridge) LDS from one eigendecomposition per block;
    the pipeline computes each from a Cholesky inverse per block and its own scores. Per half of
    the LDS models and per target, the two agree, the auto ridge included."""
    from conftest import TINY, write_tiny_images

    from trakwomp.analysis.lds import lds
    from trakwomp.data.specs import load_dataset
    from trakwomp.estimator.view import ViewSpec
    from trakwomp.features.projectors import ProjectorSpec
    from trakwomp.stages.featurize import featurize
    from trakwomp.stages.finalize import finalize
    from trakwomp.stages.recipe import Recipe
    from trakwomp.stages.score import score
    from trakwomp.stages.train import train

    data = load_dataset(f"npz:{write_tiny_images(tmp_path / 'train.npz')}")
    targets = load_dataset(f"npz:{write_tiny_images(tmp_path / 'targets.npz', n=9, seed=1)}")
    store, recipe = tmp_path / "store", Recipe(epochs=1, batch_size=16, lr=0.05)
    train(store, data, TINY, num_models=2, recipe=recipe)
    train(store, data, TINY, role="lds", num_models=8, targets=targets, recipe=recipe)
    featurize(store, projector=ProjectorSpec("sjlt", 0, 2, 8), chunk_rows=16)
    views, ridges = [(16, 1), (16, 2), (8, 1)], [0.0, 0.1, "auto"]
    for dims, blocks in views:
        for ridge in ridges:
            finalize(store, ViewSpec(dims, blocks, ridge))
            score(store, targets, ViewSpec(dims, blocks, ridge))
    result = subprocess.run([sys.executable, str(REPO / "bench" / "ridge_study.py"), str(store), str(tmp_path / "out.npz"),
                             "--models", "0-1", "--ridges", "0,0.1", *[f"--view={d}x{b}" for d, b in views]],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    study = np.load(tmp_path / "out.npz")["lds"]
    for v, (dims, blocks) in enumerate(views):
        for r, ridge in enumerate(ridges):
            for half in (0, 1):
                expected = lds(store, [ViewSpec(dims, blocks, ridge)], half=half, threshold=0.0,
                           resamples=1).results[0].per_target
                np.testing.assert_allclose(study[v, r, half], expected, atol=1e-5)


def write_fortunes_archive(path, authors: dict[str, int]) -> None:
    """A fortunes-like archive: one file per author with `count` attributed quotes each, some
    attribution lines naming a work after a comma, plus unattributed fortunes and one too long."""
    with tarfile.open(path, "w:gz") as tar:
        for name, count in authors.items():
            entries = [f"Quote {i} of {name}.\n\t\t-- {name}" + (', "Collected Works"' if i % 2 else "")
                       for i in range(count)]
            entries += ["An unattributed fortune.", "x" * 300 + f"\n-- {name}"]
            data = "\n%\n".join(entries).encode()
            info = tarfile.TarInfo(f"fortunes/{name.split()[0].lower()}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_fortune_authors_keeps_authors_with_six_quotes_and_holds_out_two_quotes_each(tmp_path):
    write_fortunes_archive(tmp_path / "f.tar.gz", {"Mark Twain": 9, "Oscar Wilde": 6, "Rare Person": 5})
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "fortune_authors.py"), str(tmp_path / "out"),
                             "--archive", str(tmp_path / "f.tar.gz")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    train, targets = ([json.loads(line) for line in (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()]
                      for name in ("train", "targets"))
    assert sorted(r["source"] for r in targets) == ["Mark Twain"] * 2 + ["Oscar Wilde"] * 2
    assert sorted(r["source"] for r in train) == ["Mark Twain"] * 7 + ["Oscar Wilde"] * 4
    for row in train + targets:
        assert row["completion"] == row["source"] + "\n" and row["prompt"].endswith("\n-- ")
        assert row["prompt"].startswith("Quote ") and f"of {row['source']}." in row["prompt"]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in targets}


SHARED_FORTUNES = REPO.parent / "shared" / "data" / "fortunes.tar.gz"


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_FORTUNES.is_file(), reason="needs ../shared/data/fortunes.tar.gz")
def test_answers_smoke_chooses_on_the_even_half_and_counts_authors_among_the_top_ten(tmp_path):
    work = tmp_path / "work"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "answers.py"), str(work), "--smoke"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    results = json.loads((work / "results.json").read_text())
    half0, (trak, womp, *_) = results["lds"]["half0"], results["lds"]["views"]
    assert half0[f"d{trak[0]}-b{trak[1]}"] == max(v for k, v in half0.items() if k.endswith("-b1"))
    assert half0[f"d{womp[0]}-b{womp[1]}"] == max(v for k, v in half0.items() if not k.endswith("-b1"))
    train, targets = ([json.loads(line)["source"] for line in (work / f"{name}.jsonl").read_text().splitlines()]
                      for name in ("train", "targets"))
    tau = np.load(work / "scores.npy")
    top = [[train[i] for i in sorted(range(len(train)), key=lambda i: (-tau[t, i], i))[:10]] for t in range(len(targets))]
    expected = np.mean([sum(a == targets[t] for a in top[t]) / 10 for t in range(len(targets))])
    reported = results["author_precision_at_10"]
    assert reported["TRAK-WOMP, the answer (default view)"]["precision"][0] == pytest.approx(expected)
    assert reported["chance"][0] == pytest.approx(np.mean([train.count(a) / len(train) for a in targets]))


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_FORTUNES.is_file(), reason="needs ../shared/data/fortunes.tar.gz")
def test_lora_smoke_fine_tunes_one_base_and_reports_every_attribution(tmp_path):
    """Every stage of bench/lora.py on tiny settings: the base pretrained once, LoRA stores that
    keep adapters only, views chosen on the even half, and precision recomputed here from the
    exported scores."""
    work = tmp_path / "work"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "lora.py"), str(work), "--smoke"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((work / "lora.json").read_text())
    for table in report["lds"].values():
        half0, (trak, womp, *_) = table["half0"], table["views"]
        assert half0[f"d{trak[0]}-b{trak[1]}"] == max(v for k, v in half0.items() if k.endswith("-b1"))
        assert half0[f"d{womp[0]}-b{womp[1]}"] == max(v for k, v in half0.items() if not k.endswith("-b1"))
        rows = [row["name"] for row in table["half1"]["results"]]
        assert rows[len(table["views"]):] == ["gradcos (baseline)", "repsim (baseline)", "bm25 (baseline)"]
    from trakwomp.store import Store

    lora = Store.open(work / "lora")
    weights = lora.read_arrays(lora.manifest.models[0].weights)
    assert weights and all(".lora_" in name for name in weights)
    train, targets = ([json.loads(line)["source"] for line in (work / f"{name}.jsonl").read_text().splitlines()]
                      for name in ("train", "targets"))
    tau = np.load(work / "scores-full.npy")
    top = [[train[i] for i in sorted(range(len(train)), key=lambda i: (-tau[t, i], i))[:10]] for t in range(len(targets))]
    expected = np.mean([sum(a == targets[t] for a in top[t]) / 10 for t in range(len(targets))])
    assert report["author_precision"]["TRAK-WOMP, full"]["precision_at_10"][0] == pytest.approx(expected)


@pytest.mark.slow
def test_answer_cache_benchmark_keeps_the_manifest_and_reads_every_answer_back(tmp_path):
    """bench/answer_cache.py on 30 answers: the manifest's size does not change with them, the
    answers asked twice are read back (the script asserts it), and filling made 30 kept."""
    work = tmp_path / "work"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "answer_cache.py"), str(work), "--answers", "30"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    results = json.loads((work / "answer_cache.json").read_text())
    assert results["filled"]["answers_kept"] == 30 and results["after"]["answers_kept"] == 35
    assert results["filled"]["manifest_bytes"] == results["after"]["manifest_bytes"]


@pytest.mark.slow
def test_scale_benchmark_measures_every_stage_adds_the_features_bytes_and_resumes(tmp_path):
    """bench/scale.py at 300 and 600 rows (2 x 16 dims, float16): every stage ran, featurize added
    the features' bytes (rows x dims x 2; dense features compress to no less than half), the
    top-k file has every target, a rerun measures nothing again, and the growth it prints is the
    log-log slope of the stored numbers; score --top-k-only writes a table of every target too
    (tests/stages/test_top_k.py checks its rows against eq. 3 in float64)."""
    work = tmp_path / "work"
    command = [sys.executable, str(REPO / "bench" / "scale.py"), str(work), "--rows", "300", "--rows", "600",
               "--blocks", "2", "--block-dim", "16", "--targets", "5"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    measured = json.loads((work / "scale.json").read_text())
    for rows in (300, 600):
        stages = measured["rows"][str(rows)]
        assert list(stages) == ["train", "featurize", "finalize", "score --top-k 10", "score --top-k 10 --top-k-only"]
        assert all(stage["exit_code"] == 0 and stage["peak_rss_bytes"] > 0 for stage in stages.values())
        assert stages["featurize"]["added_bytes"] > 0.5 * rows * 32 * 2
        assert len((work / f"top-k-{rows}.csv").read_text().splitlines()) == 1 + 5 * 10 * 2
        assert len((work / f"top-k-only-{rows}.csv").read_text().splitlines()) == 1 + 5 * 10 * 2
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0 and "featurize:" not in rerun.stderr
    assert json.loads((work / "scale.json").read_text()) == measured
    seconds = [measured["rows"][n]["finalize"]["seconds"] for n in ("300", "600")]
    slope = np.log(seconds[1] / seconds[0]) / np.log(2)
    assert f"| finalize | {slope:.2f} |" in rerun.stdout


@pytest.mark.slow
def test_index_recall_folds_the_view_into_the_query_and_a_full_search_finds_every_top_example(trained_once, tmp_path):
    """bench/index_recall.py on a tiny store: w(z) . x_i equals the stored scores within the
    roundings of two float32 computations, and searches that see every row (C = n candidates,
    every IVF list) recall 1.0."""
    import shutil

    from conftest import write_tiny_images
    from trakwomp.data.specs import load_dataset
    from trakwomp.features.projectors import ProjectorSpec
    from trakwomp.stages.featurize import featurize
    from trakwomp.stages.finalize import finalize
    from trakwomp.stages.score import score

    store = shutil.copytree(trained_once / "store", tmp_path / "store")
    featurize(store, projector=ProjectorSpec("sjlt", 0, 4, 8), chunk_rows=16)
    finalize(store, models=[1])
    key = score(store, load_dataset(f"npz:{write_tiny_images(tmp_path / 't.npz', n=12, seed=1)}"), models=[1]).key
    command = [sys.executable, str(REPO / "bench" / "index_recall.py"), str(store), "--scores", key, "--targets", "12",
               "--jl-dims", "8", "--candidates", "5", "48", "--probes", "0.2", "1.0", "--json", str(tmp_path / "r.json")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads((tmp_path / "r.json").read_text())
    assert measured["rows"] == 48 and measured["dims"] == 32  # 2 x 32 + 7 roundings: bench and score each in float32
    assert measured["largest_difference_in_roundings"] <= 2 * 32 + 7
    everything = [r for r in measured["projection"] if r["candidates"] == 48] + measured["ivf"][-1:]
    assert measured["ivf"][-1]["nprobe"] == measured["ivf"][-1]["lists"]
    assert all(r["supports"] == 1.0 and r["opposes"] == 1.0 for r in everything)
    assert all(0 <= r["supports"] <= 1 for r in measured["projection"] + measured["ivf"])


def load_bench(name: str):
    """A bench/ script as a module (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ridge_loo_criteria_equal_brute_force_leave_one_out_and_gcv():
    """bench/ridge_loo.py's closed forms, against refitting the ridge regression n times without
    each example, and against GCV with the hat matrix written out."""
    ridge_loo = load_bench("ridge_loo")
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 6)) * np.array([3, 2, 1, 0.5, 0.1, 0.01]), rng.normal(size=30)
    s, V = np.linalg.eigh(X.T @ X)
    rhos = np.array([1e-4, 1e-2, 0.3, 3.0])
    loo, gcv = ridge_loo.criteria(s, X @ V, y, rhos)
    for rho, got_loo, got_gcv in zip(rhos, loo, gcv, strict=True):
        r = rho * np.trace(X.T @ X) / 6
        errors = []
        for i in range(30):
            keep = np.arange(30) != i
            beta = np.linalg.solve(X[keep].T @ X[keep] + r * np.eye(6), X[keep].T @ y[keep])
            errors.append(y[i] - X[i] @ beta)
        assert got_loo == pytest.approx(np.mean(np.square(errors)), rel=1e-9)
        hat = X @ np.linalg.solve(X.T @ X + r * np.eye(6), X.T)
        assert got_gcv == pytest.approx(30 * np.sum((y - hat @ y) ** 2) / (30 - np.trace(hat)) ** 2, rel=1e-9)


@pytest.mark.slow
def test_ridge_loo_auto_row_equals_the_pipeline_and_verify_removals_summarizes_verify(tmp_path):
    """bench/ridge_loo.py's auto scores are the pipeline's stored scores, within float32's rounding
    of the pipeline's sums; bench/verify_removals.py's fractions and means are those of the verify
    reports it summarizes."""
    from conftest import write_scored_image_store

    from trakwomp.analysis.verify import verify
    from trakwomp.store import Store, paths

    store = write_scored_image_store(tmp_path)[0]
    handle = Store.open(store)
    key = next(iter(handle.manifest.scores))
    targets_id = handle.manifest.scores[key].targets
    scores, _ = load_bench("ridge_loo").view_scores(handle, [0, 1], targets_id, 32, 2)
    stored = handle.read_array(paths.scores(key)).astype(np.float64)
    # |tau| bound of the pipeline's float32 rounding: sum over models and blocks of |phi(z)| |K^-1| |phi_i|,
    # times q, each product of w = 16 terms rounded at most 2w times by float32
    q = sum(handle.read_array(f"{paths.features(m)}/q").astype(np.float64) for m in (0, 1)) / 4
    magnitude = np.zeros_like(stored)
    for m in (0, 1):
        train = np.abs(handle.read_array(f"{paths.features(m)}/phi").astype(np.float64))
        target = np.abs(handle.read_array(f"{paths.features(m, paths.targets_prefix(targets_id))}/phi").astype(np.float64))
        inverse = np.abs(handle.read_array(paths.inverse("d32-b2-ridgeauto", m)))
        for b in range(2):
            columns = slice(16 * b, 16 * (b + 1))
            magnitude += target[:, columns] @ inverse[b] @ train[:, columns].T
    bound = 2 * 16 * 2 * np.finfo(np.float32).eps * magnitude * q[None, :] + np.finfo(np.float32).tiny
    assert np.all(np.abs(scores["auto"] - stored) <= bound)
    result = subprocess.run([sys.executable, str(REPO / "bench" / "verify_removals.py"), str(store),
                             str(tmp_path / "verify"), "--targets", "3", "--k", "4", "--seeds", "2"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "verify.json").read_text())[0]
    reports = [verify(store, target=(t,), k=4, seeds=2) for t in range(3)]
    supporters = [r.conditions[0].mean_actual < r.conditions[2].mean_actual for r in reports]
    assert summary["supporters_lower_than_random"] == pytest.approx(np.mean(supporters))
    assert summary["supporters_change"] == pytest.approx(np.mean([r.conditions[0].mean_actual for r in reports]))
