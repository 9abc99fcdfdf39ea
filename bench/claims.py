"""The experiment behind TRAK-WOMP's three claims, driven through the `trakwomp` CLI.

Entry points: `bench/reproduce` (CPU scale, 5,000 CIFAR-10 images) and `bench/full_cifar10`
(the original setting on one CUDA GPU). A `Setting` fixes the data, models and views; `Run`
runs each stage as `trakwomp` commands, which skip finished units, so rerunning the same
command after an interruption (or in a later session) goes on where it stopped.

Each reference model is featurized once, SJLT projection to `stored_dims` dims kept as blocks
of `stored_block_dim`, and every view below is a prefix of those dims grouped into whole blocks.
The LDS models are split in two: views, ridges and "best" settings are chosen on the even half
(`lds --half 0`) and every reported number is measured on the odd half (`lds --half 1`), with
95% bootstrap intervals over targets and paired intervals for differences.

  claim 1  LDS against M: TRAK (B = 1) at its best d, TRAK-WOMP at its best (d, B), and traker
           (the reference library, default settings) where the setting asks for it.
  claim 2  at M = 1, LDS against d_block for each B, with B x d_block <= the stored dims.
  claim 3  at M = 1, LDS against B at fixed total d, with a ridge (chosen on the selection
           half) wherever a block is wider than the train set.

Writes WORK/results.json (every number), WORK/report.md (tables), WORK/claim{1,2,3}.png (with the
`plot` extra) and WORK/stages.log (the wall time of every stage run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
TRAKWOMP = str(Path(sys.executable).with_name("trakwomp"))


@dataclass(frozen=True)
class Setting:
    train_images: int = 5000
    test_images: int = 500
    width: float = 0.25
    epochs: int = 8
    reference_models: int = 8
    lds_models: int = 100
    stored_blocks: int = 256
    stored_block_dim: int = 64
    model_counts: tuple = (1, 2, 4, 8)
    traker_model_counts: tuple = (1, 2, 4)
    block_dims: tuple = (256, 512, 1024, 2048, 4096)
    block_counts: tuple = (1, 4, 16)
    fixed_dims: tuple = (4096, 16384)
    fixed_dims_blocks: tuple = (1, 2, 4, 8, 16, 32, 64)
    ridges: tuple = (1e-2, 1e-1)
    womp_candidates: tuple = ((4096, 4), (4096, 16), (4096, 64), (8192, 16), (8192, 64), (16384, 16), (16384, 64))
    feature_dtype: str = "float32"
    featurize_batch: int = 64

    @property
    def stored_dims(self) -> int:
        return self.stored_blocks * self.stored_block_dim

    @property
    def trak_candidates(self) -> list[tuple[int, int]]:
        return [(d, 1) for d in self.block_dims if d < self.train_images]


class Run:
    def __init__(self, work: Path, setting: Setting, jobs: int, device: str = "cpu", archive: Path = ARCHIVE):
        self.work, self.setting, self.jobs, self.device, self.archive = work, setting, jobs, device, archive
        self.store = str(work / "store")
        self.train_spec = f"imagefolder:{work / 'cifar' / 'train'}"
        self.target_spec = f"imagefolder:{work / 'cifar' / 'test'}"

    def stage(self, name: str, commands: list[list[str]], parallel: bool = False) -> None:
        """Run the commands (in parallel, one thread each, if asked) and log the stage's wall time."""
        start = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        if parallel:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            procs = [subprocess.Popen(c, env=env) for c in commands]
            if any(p.wait() != 0 for p in procs):
                sys.exit(f"stage {name} failed")
        else:
            for command in commands:
                if subprocess.run(command).returncode != 0:
                    sys.exit(f"stage {name} failed: {' '.join(command)}")
        with open(self.work / "stages.log", "a") as log:
            log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\t{name}\t{time.perf_counter() - start:.1f}\n")

    def lds(self, views: list[tuple[int, int, float]], models: int, half: int, files: list[Path] = ()) -> dict:
        command = [TRAKWOMP, "lds", self.store, "--models", f"0-{models - 1}", "--half", str(half), "--threshold", "0",
                   "--json"]  # the claims compare the estimators without the soft threshold
        for d, b, r in views:
            command += ["--dims", str(d), "--blocks", str(b), "--ridge", f"{r:g}"]
        for path in files:
            command += ["--scores", str(path)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"lds failed: {' '.join(command)}\n{result.stderr}")
        return json.loads(result.stdout)


def views_at_m(s: Setting) -> dict[int, set[tuple[int, int, float]]]:
    """Every (dims, blocks, ridge) view to finalize and score, by the number of models M."""
    claim1 = {(d, b, 0.0) for d, b in s.trak_candidates + list(s.womp_candidates)}
    claim2 = {(b * w, b, 0.0) for w in s.block_dims for b in s.block_counts if b * w <= s.stored_dims}
    claim3 = {(d, b, r) for d in s.fixed_dims for b in s.fixed_dims_blocks
              for r in (s.ridges if d // b > s.train_images else (0.0,))}
    return {m: claim1 | (claim2 | claim3 if m == 1 else set()) for m in s.model_counts}


def prepare(run: Run) -> None:
    """Data subset, models, features, and every view's inverses and scores."""
    s, work, device = run.setting, run.work, ["--device", run.device]
    if not (work / "cifar").exists():
        run.stage("subset", [[sys.executable, str(REPO / "bench" / "make_cifar_subset.py"), str(run.archive),
                              str(work / "cifar-partial"),
                              "--train", str(s.train_images), "--test", str(s.test_images)]])
        (work / "cifar-partial").rename(work / "cifar")
    common = ["--data", run.train_spec, "--model", "resnet9", "--width", str(s.width), "--epochs", str(s.epochs),
              *device, "--quiet"]
    shards = [f"{k}/{run.jobs}" for k in range(run.jobs)]
    run.stage("train reference models", [[TRAKWOMP, "train", run.store, *common, "--num-models",
                                          str(s.reference_models), "--shard", k] for k in shards], parallel=run.jobs > 1)
    run.stage("train LDS models", [[TRAKWOMP, "train", run.store, *common, "--role", "lds", "--num-models",
                                    str(s.lds_models), "--targets", run.target_spec, "--shard", k] for k in shards],
              parallel=run.jobs > 1)
    run.stage("featurize", [[TRAKWOMP, "featurize", run.store, "--projector", "sjlt", "--blocks", str(s.stored_blocks),
                             "--block-dim", str(s.stored_block_dim), "--dtype", s.feature_dtype, "--batch-size",
                             str(s.featurize_batch), *device, "--quiet"]])
    views = views_at_m(s)
    for view in sorted(set().union(*views.values()), key=lambda v: (v[0] * v[0] // v[1], v)):  # cheapest first
        d, b, r = view
        flags = ["--dims", str(d), "--blocks", str(b), "--ridge", f"{r:g}", *device, "--quiet"]
        largest = max(m for m, wanted in views.items() if view in wanted)
        run.stage(f"finalize d={d} B={b} ridge={r:g}",
                  [[TRAKWOMP, "finalize", run.store, *flags, "--models", f"0-{largest - 1}"]])
        run.stage(f"score d={d} B={b} ridge={r:g}",
                  [[TRAKWOMP, "score", run.store, "--targets", run.target_spec, *flags, "--models", f"0-{m - 1}"]
                   for m in s.model_counts if view in views[m]])


def traker_files(run: Run) -> dict[int, Path]:
    return {m: run.work / "traker" / f"scores-m{m}.npy" for m in run.setting.traker_model_counts}


def run_traker(run: Run) -> None:
    """traker's scores with the first M reference models, for each M of the setting (on the CPU)."""
    files = traker_files(run)
    if all(path.exists() for path in files.values()):
        return
    checkpoints = run.work / "traker"
    checkpoints.mkdir(exist_ok=True)
    count = max(files)
    export = ("import sys, torch; from trakwomp import load_reference_model\n"
              "for m in range(int(sys.argv[2])):\n"
              "    torch.save(load_reference_model(sys.argv[1], m, 10).state_dict(), f'{sys.argv[3]}/model{m}.pt')")
    run.stage("traker", [[sys.executable, "-c", export, run.store, str(count), str(checkpoints)],
                         [sys.executable, str(REPO / "bench" / "traker_scores.py"), run.train_spec, run.target_spec,
                          str(checkpoints / "scores.npy"), *[str(checkpoints / f"model{m}.pt") for m in range(count)],
                          "--prefixes", ",".join(map(str, sorted(files))), "--width", str(run.setting.width)]])


def best(run: Run, candidates: list[tuple[int, int, float]], models: int) -> tuple[tuple[int, int, float], list]:
    """The candidate view with the highest LDS on the selection half, and every candidate's LDS there."""
    report = run.lds(candidates, models, half=0)
    lds = [r["lds"] for r in report["results"]]
    return candidates[max(range(len(lds)), key=lds.__getitem__)], [[*v, x] for v, x in zip(candidates, lds, strict=True)]


def evaluate(run: Run) -> dict:
    """Every claim's LDS numbers: selections on the even half, reports on the odd half."""
    s = run.setting
    results = {"setting": s.__dict__, "device": run.device, "claim1": [], "claim2": [], "claim3": []}
    traker = traker_files(run)
    for m in s.model_counts:
        trak, trak_selection = best(run, [(d, b, 0.0) for d, b in s.trak_candidates], m)
        womp, womp_selection = best(run, [(d, b, 0.0) for d, b in s.womp_candidates], m)
        files = [traker[m]] if m in traker else []
        report = run.lds([trak, womp], m, half=1, files=files)
        entry = {"M": m, "trak_view": trak, "womp_view": womp, "report": report,
                 "selection": {"trak": trak_selection, "womp": womp_selection}}
        if files:
            entry["traker_minus_womp"] = run.lds([womp], m, half=1, files=files)["paired_differences"][0]
        results["claim1"].append(entry)
    for w in s.block_dims:
        views = [(b * w, b, 0.0) for b in s.block_counts if b * w <= s.stored_dims]
        results["claim2"].append({"block_dim": w, "report": run.lds(views, 1, half=1)})
    for d in s.fixed_dims:
        views, ridge_selection = [], {}
        for b in s.fixed_dims_blocks:
            if d // b > s.train_images:
                chosen, ridge_selection[b] = best(run, [(d, b, r) for r in s.ridges], 1)
                views.append(chosen)
            else:
                views.append((d, b, 0.0))
        results["claim3"].append({"dims": d, "ridge_selection": ridge_selection, "report": run.lds(views, 1, half=1)})
    return results


def interval(result: dict, key: str = "lds") -> str:
    low, high = result["ci95"]
    return f"{result[key]:+.3f} [{low:+.3f}, {high:+.3f}]" if key == "difference" else \
        f"{result[key]:.3f} [{low:.3f}, {high:.3f}]"


def view_label(view) -> str:
    d, b, r = view
    return f"d={d} B={b}" + (f" ridge={r:g}" if r else "")


def stage_times(work: Path) -> dict[str, float]:
    """Wall seconds per kind of stage, summed over every run of it (sessions included)."""
    totals: dict[str, float] = {}
    if (work / "stages.log").exists():
        for line in (work / "stages.log").read_text().splitlines():
            _, name, seconds = line.split("\t")
            kind = name.split(" d=")[0]
            totals[kind] = totals.get(kind, 0.0) + float(seconds)
    return totals


def markdown(results: dict, work: Path) -> str:
    lines = ["### Claim 1: LDS against the number of reference models M", "",
             "| M | TRAK (best d) | LDS | TRAK-WOMP (best d, B) | LDS | WOMP minus TRAK | traker | WOMP minus traker |",
             "|---|---|---|---|---|---|---|---|"]
    for entry in results["claim1"]:
        trak, womp = entry["report"]["results"][:2]
        diff = entry["report"]["paired_differences"][0]
        traker = entry["report"]["results"][2] if len(entry["report"]["results"]) > 2 else None
        versus = entry.get("traker_minus_womp")
        womp_minus_traker = (f"{-versus['difference']:+.3f} [{-versus['ci95'][1]:+.3f}, {-versus['ci95'][0]:+.3f}]"
                             if versus else "")
        lines.append(f"| {entry['M']} | {view_label(entry['trak_view'])} | {interval(trak)} | "
                     f"{view_label(entry['womp_view'])} | {interval(womp)} | {interval(diff, 'difference')} | "
                     f"{interval(traker) if traker else ''} | {womp_minus_traker} |")
    counts = results["setting"]["block_counts"]
    lines += ["", "### Claim 2: same backward passes, M = 1: LDS against d_block", "",
              "| d_block | " + " | ".join(f"B = {b}" for b in counts) + " | "
              + " | ".join(f"B = {b} minus B = 1" for b in counts[1:]) + " |",
              "|---" * (2 * len(counts)) + "|"]
    for entry in results["claim2"]:
        cells = [interval(r) for r in entry["report"]["results"]]
        diffs = [interval(d, "difference") for d in entry["report"]["paired_differences"]]
        pad = len(counts) - len(cells)
        lines.append(f"| {entry['block_dim']} | " + " | ".join(cells + ["-"] * pad) + " | "
                     + " | ".join(diffs + ["-"] * pad) + " |")
    for entry in results["claim3"]:
        lines += ["", f"### Claim 3: same storage, M = 1: LDS against B at d = {entry['dims']}", "",
                  "| B | d_block | ridge | LDS | minus B = 1 |", "|---|---|---|---|---|"]
        views = [(r["name"]) for r in entry["report"]["results"]]
        diffs = [None] + entry["report"]["paired_differences"]
        for name, result, diff in zip(views, entry["report"]["results"], diffs, strict=True):
            fields = dict(part.split("=") for part in name.split() if "=" in part)
            b = int(fields["B"])
            lines.append(f"| {b} | {entry['dims'] // b} | {fields.get('ridge', '0')} | {interval(result)} | "
                         f"{interval(diff, 'difference') if diff else ''} |")
    lines += ["", "### Wall time of each stage (summed over runs)", "", "| stage | minutes |", "|---|---|"]
    lines += [f"| {kind} | {seconds / 60:.1f} |" for kind, seconds in stage_times(work).items()]
    return "\n".join(lines) + "\n"


def plot(results: dict, work: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is missing (pip install -e '.[plot]'): no plots")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def errorbar(ax, xs, rs, **kw):
        ys = [r["lds"] for r in rs]
        err = [[y - r["ci95"][0] for y, r in zip(ys, rs, strict=True)], [r["ci95"][1] - y for y, r in zip(ys, rs, strict=True)]]
        ax.errorbar(xs, ys, yerr=err, capsize=3, marker="o", **kw)

    def finish(ax, xlabel, title, name):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("LDS (odd half of the LDS models, 95% interval)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.figure.tight_layout()
        ax.figure.savefig(work / name, dpi=120)
        plt.close(ax.figure)

    claim1 = results["claim1"]
    ax = plt.figure(figsize=(6, 4.5)).gca()
    errorbar(ax, [e["M"] for e in claim1], [e["report"]["results"][0] for e in claim1], label="TRAK (B = 1, best d)")
    errorbar(ax, [e["M"] for e in claim1], [e["report"]["results"][1] for e in claim1], label="TRAK-WOMP (best d, B)")
    with_traker = [e for e in claim1 if len(e["report"]["results"]) > 2]
    if with_traker:
        errorbar(ax, [e["M"] for e in with_traker], [e["report"]["results"][2] for e in with_traker],
                 label="traker 0.3.2 (d = 2048)", linestyle="--")
    finish(ax, "reference models M", "Claim 1: LDS against M", "claim1.png")

    ax = plt.figure(figsize=(6, 4.5)).gca()
    for i, b in enumerate(results["setting"]["block_counts"]):
        points = [(e["block_dim"], e["report"]["results"][i]) for e in results["claim2"] if i < len(e["report"]["results"])]
        errorbar(ax, [x for x, _ in points], [r for _, r in points], label=f"B = {b}")
    finish(ax, "d_block (dims per block)", "Claim 2: M = 1, same backward passes", "claim2.png")

    ax = plt.figure(figsize=(6, 4.5)).gca()
    for entry in results["claim3"]:
        rs = entry["report"]["results"]
        errorbar(ax, results["setting"]["fixed_dims_blocks"][:len(rs)], rs, label=f"d = {entry['dims']}")
    finish(ax, "blocks B (same total d)", "Claim 3: M = 1, same storage", "claim3.png")


def main(settings: dict[str, Setting], doc: str, default_device: str = "cpu") -> None:
    """Command line of an entry point: `settings` maps "full" and "smoke" to their Setting."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="Working folder (data subset, store, results); reuse it to resume.")
    parser.add_argument("--smoke", action="store_true", help="Tiny setting on the CPU that runs every stage in minutes.")
    parser.add_argument("--device", help=f"cpu, cuda or cuda:N (default: {default_device}; cpu with --smoke).")
    parser.add_argument("--jobs", type=int, default=1, help="Training processes in parallel (one thread each on the CPU).")
    parser.add_argument("--skip-traker", action="store_true", help="Leave out the traker points.")
    parser.add_argument("--archive", type=Path, default=ARCHIVE, help="CIFAR-10 as JPEGs in a .tar.gz (ImageFolder layout).")
    args = parser.parse_args()
    device = args.device or ("cpu" if args.smoke else default_device)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if not (args.work / "cifar").exists() and not args.archive.is_file():
        parser.error(f"no CIFAR-10 archive at {args.archive}; pass --archive")
    args.work.mkdir(parents=True, exist_ok=True)
    run = Run(args.work.resolve(), settings["smoke" if args.smoke else "full"], args.jobs, device, args.archive)
    if args.skip_traker:
        run.setting = replace(run.setting, traker_model_counts=())
    prepare(run)
    run_traker(run)
    results = evaluate(run)
    (run.work / "results.json").write_text(json.dumps(results, indent=1))
    (run.work / "report.md").write_text(markdown(results, run.work))
    plot(results, run.work)
    print((run.work / "report.md").read_text())
