"""`trakwomp` subcommands. Each parses its options, makes one library call and shows progress."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import json
import sys
from enum import Enum
from textwrap import shorten
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trakwomp import __version__
from trakwomp.cli.progress import RichProgress, console
from trakwomp.data import SPEC_HELP, load_dataset, load_indices
from trakwomp.errors import UserError
from trakwomp.featurize import featurize as featurize_models
from trakwomp.finalize import finalize as finalize_view
from trakwomp.groups import GROUPS_HELP, group_scores, parse_group_names, predict_groups
from trakwomp.selection import parse_model_ids
from trakwomp.estimator import AUTO, DEFAULT_THRESHOLD, ViewSpec
from trakwomp.lds import lds as lds_report, pair_views
from trakwomp.show import default_show_file, show as show_target, show_groups
from trakwomp.status import status as store_status
from trakwomp.export import export_scores, top_k_rows, write_table
from trakwomp.predict import predict as predict_margins
from trakwomp.scoring import score as score_targets
from trakwomp.bindings import load_store_data
from trakwomp.models import GPT_DEFAULTS, ModelSpec
from trakwomp.tasks import make_task
from trakwomp.projectors import ProjectorSpec
from trakwomp.memory import parse_size
from trakwomp.runtime import NoProgress, Shard
from trakwomp.store import StoreError
from trakwomp.training import LANGUAGE_MODEL_RECIPE, Recipe, train as train_models

app = typer.Typer(
    name="trakwomp",
    help="Data attribution with TRAK and TRAK-WOMP: which training examples made a model behave as it does.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def reports_errors(command):
    """Print a user's mistake as one line on stderr and exit 2, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (UserError, StoreError) as e:
            console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("interrupted: finished units are kept; run the same command again to resume")
            raise typer.Exit(130) from None

    return wrapper


def print_json(report) -> None:
    """A library call's report (a dataclass) as JSON on stdout."""
    typer.echo(json.dumps(dataclasses.asdict(report), indent=1))


def progress_for(quiet: bool):
    return contextlib.nullcontext(NoProgress()) if quiet else RichProgress()


class Role(str, Enum):
    reference = "reference"
    lds = "lds"


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"trakwomp {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True, help="Print the version and exit."),
):
    """Data attribution with TRAK and TRAK-WOMP: which training examples made a model behave as it does."""


GroupsOpt = typer.Option(None, "--groups", help=f"The train examples' groups: {GROUPS_HELP} [default: the store's, else the sources of text data].")
StoreArg = typer.Argument(..., help="The store: a folder, or an fsspec URL such as s3://bucket/store (created if missing).")
DeviceOpt = typer.Option("cpu", "--device", envvar="TRAKWOMP_DEVICE",
                         help="cpu, cuda or cuda:N (under torchrun, cuda is cuda:LOCAL_RANK).")
ShardOpt = typer.Option("0/1", "--shard", envvar="TRAKWOMP_SHARD",
                        help="Run only shard K of N (K from 0), e.g. 0/2 and 1/2; auto: the Slurm array task or torchrun rank.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress display.")
JsonOpt = typer.Option(False, "--json", help="Print what was done as JSON on stdout (progress and messages go to stderr).")
IndicesOpt = typer.Option(None, "--indices", help="An .npy of ints selecting a subset of --data, in that order.")
TransformOpt = typer.Option(None, "--transform", help="package.module:callable applied to every input tensor.")
TokenizerOpt = typer.Option(None, "--tokenizer", help="Text: bytes (no files needed) or hf:DIR, a Hugging Face tokenizer saved in DIR [default: the store's, else bytes].")
MaxLengthOpt = typer.Option(None, "--max-length", help="Text: cut longer texts to their first N tokens (how many were cut is reported) [default: the store's, else no cut].")
LayersOpt = typer.Option(None, "--layers", help=f"Transformer blocks of the built-in gpt [default: {GPT_DEFAULTS['layers']}].")
HeadsOpt = typer.Option(None, "--heads", help=f"Attention heads of the built-in gpt [default: {GPT_DEFAULTS['heads']}].")
WidthOpt = typer.Option(None, "--width", help=f"resnet9: width multiplier [default: 1]; gpt: embedding width [default: {GPT_DEFAULTS['width']}].")


class TaskName(str, Enum):
    classification = "classification"
    causal_lm = "causal-lm"


def report_truncation(dataset, what: str) -> None:
    """Say how many texts --max-length cut."""
    if getattr(dataset, "truncated", 0):
        console.print(f"{what}: cut {dataset.truncated} of {len(dataset)} texts to --max-length {dataset.max_length} tokens")


@app.command()
@reports_errors
def train(
    store: str = StoreArg,
    data: str = typer.Option(..., "--data", help=f"Train set: {SPEC_HELP}."),
    task: TaskName = typer.Option(TaskName.classification, "--task", help="classification (margin of the label) or causal-lm (next-token prediction on text)."),
    lm_output: Optional[str] = typer.Option(None, "--lm-output", help="causal-lm output f = log(p/(1-p)): token (p = exp(-L/T), T the predicted tokens) or sequence (p = exp(-L)) [default: token]."),
    model: Optional[str] = typer.Option(None, "--model", help="resnet9, gpt, hf:DIR (a Hugging Face causal LM saved in DIR) or package.module:factory (factory(classes or vocabulary size) -> nn.Module) [default: resnet9; causal-lm: gpt]."),
    width: Optional[float] = WidthOpt,
    layers: Optional[int] = LayersOpt,
    heads: Optional[int] = HeadsOpt,
    role: Role = typer.Option(Role.reference, "--role", help="reference: models to attribute; lds: evaluation models."),
    num_models: int = typer.Option(1, "--num-models", help="Number of models of this role (ids 0..M-1)."),
    targets: Optional[str] = typer.Option(None, "--targets", help="With --role lds: the examples to record outputs f on."),
    alpha: float = typer.Option(Recipe.alpha, "--alpha", help="Fraction of --data in each model's random subset."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help=f"[default: {Recipe.epochs}; causal-lm: {LANGUAGE_MODEL_RECIPE['epochs']}]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=f"[default: {Recipe.batch_size}; causal-lm: {LANGUAGE_MODEL_RECIPE['batch_size']}]"),
    lr: Optional[float] = typer.Option(None, "--lr", help=f"Peak learning rate of the one-cycle schedule [default: {Recipe.lr} (SGD); causal-lm: {LANGUAGE_MODEL_RECIPE['lr']} (AdamW)]."),
    seed: int = typer.Option(Recipe.seed, "--seed"),
    threads: int = typer.Option(Recipe.threads, "--threads", help="CPU threads for training; recorded, since results depend on it."),
    device: str = DeviceOpt,
    shard: str = ShardOpt,
    quiet: bool = QuietOpt,
    indices: Optional[Path] = IndicesOpt,
    target_indices: Optional[Path] = typer.Option(None, "--target-indices", help="An .npy of ints selecting a subset of --targets."),
    transform: Optional[str] = TransformOpt,
    tokenizer: Optional[str] = TokenizerOpt,
    max_length: Optional[int] = MaxLengthOpt,
    download: bool = typer.Option(False, "--download", help="Let cifar10:ROOT specs download CIFAR-10 into ROOT."),
    groups: Optional[Path] = GroupsOpt,
    group_alpha: Optional[float] = typer.Option(None, "--group-alpha", help="With --role lds: train each model on the examples of a random group_alpha-fraction of the groups (group LDS models, kept apart from the others; --alpha does not apply)."),
    exclude_groups: list[str] = typer.Option([], "--exclude-groups", help="Groups (comma-separated or repeated) whose examples no model sees; subsets are drawn from the rest."),
    save_checkpoints: int = typer.Option(1, "--save-checkpoints", help="K: keep K checkpoints along each reference model's run (after epochs floor(kE/K), the last being the model); featurize makes each a member of TRAK's ensemble."),
    json_out: bool = JsonOpt,
):
    """Train reference models (or LDS evaluation models) on random alpha-subsets of --data."""
    shard_spec = Shard.parse(shard)
    chosen_task = make_task(task.value, lm_output)
    spec = ModelSpec.parse(model or chosen_task.default_model, width, layers, heads)
    recipe = Recipe.for_task(chosen_task, alpha=alpha, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                             threads=threads, group_alpha=group_alpha, save_checkpoints=save_checkpoints,
                             exclude_groups=tuple(parse_group_names(exclude_groups)))
    if target_indices is not None and targets is None:
        raise UserError("--target-indices needs --targets")
    train_set = load_dataset(data, indices, transform, download, tokenizer, max_length)
    target_set = load_dataset(targets, target_indices, transform, download, tokenizer, max_length) if targets else None
    report_truncation(train_set, "--data")
    report_truncation(target_set, "--targets")
    with progress_for(quiet) as progress:
        report = train_models(store, train_set, spec, task=chosen_task, role=role.value, num_models=num_models,
                              targets=target_set, recipe=recipe, device=device, shard=shard_spec, progress=progress,
                              groups=groups)
    if json_out:
        print_json(report)
    if not quiet:
        kind = "group LDS" if group_alpha is not None else role.value
        console.print(f"{len(report.trained)} {kind} model(s) trained, {len(report.skipped)} already done, in {store}")


def expand_checkpoints(patterns: list[str]) -> list[str]:
    """Each --checkpoint value as given, or the sorted files matching it if it is a glob."""
    paths = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise UserError(f"--checkpoint {pattern!r} matches no file")
            paths.extend(matches)
        else:
            paths.append(pattern)
    return paths


MaxMemoryOpt = typer.Option(None, "--max-memory", help="The most memory the process may hold while featurizing, e.g. 8G (on CUDA: of the GPU's) [default: what it holds now plus what is free]; checked before any work.")


def report_batch_size(asked: int, used: int) -> None:
    if used and used < asked:
        console.print(f"lowered --batch-size from {asked} to {used} to fit in memory")


@app.command()
@reports_errors
def featurize(
    store: str = StoreArg,
    data: Optional[str] = typer.Option(None, "--data", help=f"Train set ({SPEC_HELP}); default: the store's."),
    model: Optional[str] = typer.Option(None, "--model", help="resnet9, gpt, hf:DIR or package.module:factory; default: the store's."),
    width: Optional[float] = WidthOpt,
    layers: Optional[int] = LayersOpt,
    heads: Optional[int] = HeadsOpt,
    task: Optional[TaskName] = typer.Option(None, "--task", help="With --checkpoint in a new store: classification or causal-lm [default: the store's, else classification]."),
    lm_output: Optional[str] = typer.Option(None, "--lm-output", help="With --task causal-lm: sequence or token."),
    checkpoint: list[str] = typer.Option([], "--checkpoint", help="A state_dict file or a glob; repeatable. Default: the store's trained reference models and the checkpoints kept along their runs."),
    run: Optional[str] = typer.Option(None, "--run", help="Name of the one training run the --checkpoint files come from: they become members of one model's ensemble [default: each file its own run]."),
    blocks: Optional[int] = typer.Option(None, "--blocks", help=f"Number of projection blocks B [default: the store's, else {ProjectorSpec.blocks}]."),
    block_dim: Optional[int] = typer.Option(None, "--block-dim", help=f"Dimensions per block; d = B x block dim [default: the store's, else {ProjectorSpec.block_dim}]."),
    projector: Optional[str] = typer.Option(None, "--projector", help="sjlt (sparse, O(p) per block), gaussian, rademacher, identity (no projection) or factored (one k x k block per layer from hooks, no per-example gradients; block dim k x k) [default: the store's, else sjlt up to 20M parameters and factored beyond]."),
    projector_seed: Optional[int] = typer.Option(None, "--projector-seed", help=f"[default: the store's, else {ProjectorSpec.seed}]"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Storage dtype of the features: float32 or float16 [default: the store's, else float32]."),
    parameters: list[str] = typer.Option([], "--params", help="Glob of parameter names to take gradients for; repeatable. Default: the store's, else all."),
    chunk_rows: Optional[int] = typer.Option(None, "--chunk-rows", help="Train examples per stored chunk and per unit of work [default: the store's, else 1024]."),
    batch_size: int = typer.Option(64, "--batch-size", help="Examples per gradient batch (lowered, and said, if it would not fit in memory)."),
    max_memory: Optional[str] = MaxMemoryOpt,
    device: str = DeviceOpt,
    shard: str = ShardOpt,
    quiet: bool = QuietOpt,
    indices: Optional[Path] = IndicesOpt,
    transform: Optional[str] = TransformOpt,
    tokenizer: Optional[str] = TokenizerOpt,
    max_length: Optional[int] = MaxLengthOpt,
    json_out: bool = JsonOpt,
):
    """Project per-example gradients of each model to d = B x block-dim dims and store them.

    Projector options given replace all of the store's (defaults for those not given); none
    given means the store's, so the same command resumes or adds checkpoints."""
    shard_spec = Shard.parse(shard)
    spec = ModelSpec.parse(model, width, layers, heads) if model else None
    chosen_task = make_task(task.value, lm_output) if task else None
    given = {"kind": projector, "seed": projector_seed, "blocks": blocks, "block_dim": block_dim}
    if projector == "factored" and blocks is not None:
        raise UserError("--blocks does not go with --projector factored, which makes one block per layer")
    projector_spec = None
    if any(v is not None for v in given.values()):
        projector_spec = ProjectorSpec(**{k: v for k, v in given.items() if v is not None})
    if not data and (indices or transform or tokenizer or max_length):
        raise UserError("--indices, --transform, --tokenizer and --max-length go with --data")
    train_set = load_store_data(store, data, indices, transform, tokenizer, max_length) if data else None
    report_truncation(train_set, "--data")
    with progress_for(quiet) as progress:
        report = featurize_models(store, train_set, spec, expand_checkpoints(checkpoint), run=run, task=chosen_task,
                                  projector=projector_spec,
                                  dtype=dtype, parameters=parameters or None, chunk_rows=chunk_rows,
                                  batch_size=batch_size, memory_limit=parse_size(max_memory) if max_memory else None,
                                  device=device, shard=shard_spec, progress=progress)
    report_batch_size(batch_size, report.batch_size)
    if json_out:
        print_json(report)
    if not quiet:
        console.print(f"featurized {report.units_done} unit(s) of models {report.model_ids} "
                      f"({report.examples_per_second:,.1f} examples/s), {report.units_skipped} already done")
        if report.left_out:
            shown = ", ".join(report.left_out[:4]) + (", ..." if len(report.left_out) > 4 else "")
            console.print(f"the factored projection leaves out {len(report.left_out)} chosen parameter tensor(s) of "
                          f"no supported layer: {shown}")


DimsOpt = typer.Option(None, "--dims", help="Use the first D featurized dims (default: all).")
BlocksOpt = typer.Option(None, "--blocks", help="Split the D dims into B equal blocks (default: the stored blocks, one per layer for factored features; 1 is plain TRAK).")
RidgeOpt = typer.Option(AUTO, "--ridge", help="Ridge added to each block Gram matrix, relative to the mean of its diagonal, or auto: 7.5e-4 sqrt(w n) / B^(3/4) for B blocks of w dims and n train examples (needs no LDS models; docs/method.md); 0 for none.")
ScoredTargetsOpt = typer.Option(None, "--targets", help="Which scored targets (needed if several are scored).")
TargetIndicesOpt = typer.Option(None, "--target-indices", help="The --target-indices they were scored with.")
ThresholdOpt = typer.Option(DEFAULT_THRESHOLD, "--threshold", help="Soft threshold of the scores, in units of each target's RMS score (0 for the raw scores; docs/method.md).")
ModelsOpt = typer.Option(None, "--models", help="Model ids to use, e.g. 0,2,5-7 (default: all featurized).")


@app.command()
@reports_errors
def finalize(
    store: str = typer.Argument(..., help="A store with features."),
    dims: Optional[int] = DimsOpt,
    blocks: Optional[int] = BlocksOpt,
    ridge: str = RidgeOpt,
    models: Optional[str] = ModelsOpt,
    device: str = DeviceOpt,
    shard: str = ShardOpt,
    quiet: bool = QuietOpt,
    json_out: bool = JsonOpt,
):
    """Invert each block's Gram matrix Phi_b^T Phi_b (+ ridge) for a view (D dims, B blocks)."""
    shard_spec = Shard.parse(shard)
    with progress_for(quiet) as progress:
        report = finalize_view(store, ViewSpec(dims, blocks, ridge), parse_model_ids(models), device=device,
                               shard=shard_spec, progress=progress)
    if json_out:
        print_json(report)
    if not quiet:
        console.print(f"finalized view {report.view.key} for models {report.model_ids}: {report.units_done} block(s) "
                      f"inverted in {report.seconds:.1f}s, {report.units_skipped} already done")


@app.command()
@reports_errors
def score(
    store: str = typer.Argument(..., help="A finalized store."),
    targets: str = typer.Option(..., "--targets", help=f"The examples to attribute ({SPEC_HELP})."),
    dims: Optional[int] = DimsOpt,
    blocks: Optional[int] = BlocksOpt,
    ridge: str = RidgeOpt,
    models: Optional[str] = ModelsOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Write the (n_targets, n_train) scores to this .npy file."),
    threshold: float = typer.Option(DEFAULT_THRESHOLD, "--threshold", help="Soft threshold for --out and --top-k, in units of each target's RMS score (0 for the raw scores, as the store holds them)."),
    top_k: int = typer.Option(0, "--top-k", help="Write the K most supporting and opposing train examples per target."),
    top_k_out: Path = typer.Option(Path("top-k.csv"), "--top-k-out", help="Where --top-k goes (.csv or .json)."),
    chunk_rows: int = typer.Option(256, "--chunk-rows", help="Targets per unit of work."),
    batch_size: int = typer.Option(64, "--batch-size", help="Targets per gradient batch (lowered, and said, if it would not fit in memory)."),
    max_memory: Optional[str] = MaxMemoryOpt,
    device: str = DeviceOpt,
    shard: str = ShardOpt,
    quiet: bool = QuietOpt,
    target_indices: Optional[Path] = typer.Option(None, "--target-indices", help="An .npy of ints selecting a subset of --targets."),
    transform: Optional[str] = TransformOpt,
    tokenizer: Optional[str] = TokenizerOpt,
    max_length: Optional[int] = MaxLengthOpt,
    model: Optional[str] = typer.Option(None, "--model", help="The store's model; needed (and checked) if it is a package.module:factory."),
    width: Optional[float] = WidthOpt,
    layers: Optional[int] = LayersOpt,
    heads: Optional[int] = HeadsOpt,
    json_out: bool = JsonOpt,
):
    """Attribution scores tau(z) of every train example for every target (TRAK-WOMP eq. 3)."""
    shard_spec = Shard.parse(shard)
    if (out or top_k) and shard_spec.count > 1:
        raise UserError("--out and --top-k need all shards' scores: run them without --shard once every shard is done")
    if top_k < 0 or threshold < 0:
        raise UserError("--top-k and --threshold must be >= 0")
    for flag, path in (("--out", out), ("--top-k-out", top_k_out if top_k else None)):
        if path is not None and not path.parent.is_dir():
            raise UserError(f"{flag} {str(path)!r}: there is no folder {str(path.parent)!r}")
    spec = ModelSpec.parse(model, width, layers, heads) if model else None
    target_set = load_store_data(store, targets, target_indices, transform, tokenizer, max_length)
    report_truncation(target_set, "--targets")
    with progress_for(quiet) as progress:
        report = score_targets(store, target_set, ViewSpec(dims, blocks, ridge), parse_model_ids(models), model=spec,
                               target_chunk_rows=chunk_rows, batch_size=batch_size,
                               memory_limit=parse_size(max_memory) if max_memory else None, device=device, shard=shard_spec,
                               progress=progress)
    report_batch_size(batch_size, report.batch_size)
    if json_out:
        print_json(report)
    if not quiet:
        console.print(f"scored {report.num_targets} targets x {report.num_train} train examples at view "
                      f"{report.view.key} with models {report.model_ids} ({report.chunks_done} chunk(s) in "
                      f"{report.seconds:.1f}s, {report.chunks_skipped} already done); stored as scores/{report.key}")
    if out:
        shape = export_scores(store, report.key, out, threshold)
        console.print(f"wrote {shape[0]} x {shape[1]} scores to {out}")
    if top_k:
        rows = top_k_rows(store, report.key, target_set, top_k, threshold)
        write_table(rows, top_k_out)
        console.print(f"wrote the top {top_k} supporting and opposing train examples per target to {top_k_out}")
        if not quiet:
            show_top_k([r for r in rows if r["target"] < 3],
                       "Train examples that most support and oppose the first 3 targets")


def show_top_k(rows: list[dict], title: str) -> None:
    """A table of supporting and opposing train examples, target by target."""
    text = "train_text" in (rows[0] if rows else {})
    table = Table("target", "source" if text else "label", "", "train example", "source" if text else "label", "score",
                  title=title)
    for row in rows:
        first = row["rank"] == 1
        head = first and row["direction"] == "supports"
        if text:
            example = f"#{row['train_index']} {shorten(' '.join(row['train_text'].split()), 100, placeholder=' ...')}"
            cells = (row["target_source"] if head else "", example, row["train_source"])
        else:
            cells = (row["target_label"] if head else "", row["train_path"] or str(row["train_index"]), row["train_label"])
        table.add_row(str(row["target"]) if head else "", cells[0], row["direction"] if first else "", escape(cells[1]),
                      cells[2], f"{row['score']:+.4g}")
    Console().print(table)


@app.command()
@reports_errors
def predict(
    store: str = typer.Argument(..., help="A store with scores."),
    subset: Optional[Path] = typer.Option(None, "--subset", help="An .npy boolean mask over the train set, or train indices."),
    drop_group: list[str] = typer.Option([], "--drop-group", help="Instead of --subset: groups to remove from the train set (comma-separated or repeated)."),
    keep_groups: list[str] = typer.Option([], "--keep-groups", help="Instead of --subset: the only groups to keep (comma-separated or repeated)."),
    groups: Optional[Path] = GroupsOpt,
    targets: Optional[str] = ScoredTargetsOpt,
    target_indices: Optional[Path] = TargetIndicesOpt,
    dims: Optional[int] = DimsOpt,
    blocks: Optional[int] = BlocksOpt,
    ridge: str = RidgeOpt,
    models: Optional[str] = ModelsOpt,
    threshold: float = ThresholdOpt,
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
):
    """Predicted output of each target for a train subset, or its change without some groups.

    --subset: the predicted margin of a model trained on the subset (the sum of its scores, up
    to a constant). --drop-group or --keep-groups: the predicted change of each target's output
    if the groups were removed, or if only those were kept (minus the removed groups' scores)."""
    by_group = bool(drop_group or keep_groups)
    if by_group == (subset is not None):
        raise UserError("give --subset, or groups to drop (--drop-group) or keep (--keep-groups)")
    if groups is not None and not by_group:
        raise UserError("--groups goes with --drop-group or --keep-groups")
    target_set = load_store_data(store, targets, target_indices) if targets else None
    view = ViewSpec(dims, blocks, ridge)
    if by_group:
        prediction = predict_groups(store, parse_group_names(drop_group), parse_group_names(keep_groups), groups,
                                    target_set, view, parse_model_ids(models), threshold)
        if json_out:
            typer.echo(json.dumps(prediction.as_dict()))
            return
        calibrated = prediction.calibrated_mean_change
        note = f"calibrated: {calibrated:+.4f} ({prediction.calibration.describe()})" if calibrated is not None else \
            calibration_note(prediction.calibration)[0]
        show_predictions(prediction.change, "predicted change of the output",
                         f"datamodel predictions from scores/{prediction.scores}, if the train set were changed so",
                         f"mean over the {len(prediction.change)} targets: {prediction.mean_change:+.4f}; {note}")
        return
    key, predictions = predict_margins(store, load_indices(subset, what="--subset"), target_set, view,
                                       parse_model_ids(models), threshold)
    if json_out:
        typer.echo(json.dumps({"scores": key, "predicted_margin": predictions.tolist()}))
        return
    show_predictions(predictions, "predicted margin (up to a constant)", f"datamodel predictions from scores/{key}")


def show_predictions(values, what: str, title: str, caption: str | None = None) -> None:
    table = Table("target", what, title=title, caption=caption)
    for t, value in enumerate(values):
        table.add_row(str(t), f"{value:+.4f}")
    Console().print(table)


@app.command()
@reports_errors
def lds(
    store: str = typer.Argument(..., help="A store with LDS models and scores on their targets."),
    dims: list[int] = typer.Option([], "--dims", help="View dims; repeat with --blocks to compare views (paired by position)."),
    blocks: list[int] = typer.Option([], "--blocks", help="View blocks; repeat to compare views (e.g. --blocks 1 --blocks 16)."),
    ridge: list[str] = typer.Option([], "--ridge", help="View ridge (auto or relative, as in finalize); repeat to pair with --dims/--blocks."),
    models: Optional[str] = ModelsOpt,
    scores: list[Path] = typer.Option([], "--scores", help="An .npy (n_targets, n_train) score matrix to evaluate; repeatable."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help=f"Soft threshold, in units of each target's RMS score [default: {DEFAULT_THRESHOLD:g} for the store's scores, 0 for --scores files, which may be thresholded already]."),
    tune_threshold: bool = typer.Option(False, "--tune-threshold", help="Pick the threshold on half of the LDS models, report on the other half."),
    half: Optional[int] = typer.Option(None, "--half", help="Use only half of the LDS models: 0 = those at even positions (0, 2, ...), 1 = odd "
                                       "(choose views on one half, report on the other)."),
    resamples: int = typer.Option(2000, "--bootstrap", help="Bootstrap resamples of the targets for the 95% intervals."),
    by_group: bool = typer.Option(False, "--by-group", help="Against the group LDS models (train --role lds --group-alpha): the group-level LDS."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
):
    """Linear datamodeling score of the scores against the store's LDS models, with 95% intervals."""
    views = pair_views(dims, blocks, ridge) if (dims or blocks or ridge or not scores) else []
    report = lds_report(store, views, parse_model_ids(models), scores, threshold=threshold,
                        tune_threshold=tune_threshold, half=half, resamples=resamples, by_group=by_group)
    if json_out:
        typer.echo(json.dumps(report.as_dict(), indent=1))
        return
    tuned = any(r.selected_on_half for r in report.results)
    table = Table("scores", "LDS", "95% interval", "targets", "LDS models", "threshold",
                  title=f"{'Group-level l' if by_group else 'L'}inear datamodeling score (mean Spearman correlation over targets)",
                  caption="tuned: threshold chosen on the other half of the LDS models" if tuned else None)
    for r in report.results:
        chosen = " tuned" if r.selected_on_half else ""
        table.add_row(r.name, f"{r.mean:.4f}", f"[{r.low:.4f}, {r.high:.4f}]", str(r.num_targets), str(r.num_models),
                      f"{r.threshold:g}{chosen}")
    for d in report.differences:
        table.add_row(f"{d.name} minus {d.baseline}", f"{d.mean:+.4f}", f"[{d.low:+.4f}, {d.high:+.4f}]", "paired", "", "")
    Console().print(table)


TargetSetOpt = typer.Option(None, "--target-set", help="An .npy of scored target positions, or a boolean mask over them: the target set [default: all scored targets].")


@app.command()
@reports_errors
def show(
    store: str = typer.Argument(..., help="A store with scores."),
    target: Optional[int] = typer.Option(None, "--target", help="Which target (its position in the scored targets, from 0); with --by-group, default all."),
    k: Optional[int] = typer.Option(None, "--k", help="How many supporting and how many opposing train examples [default: 8]; with --by-group, how many groups [default: 12]."),
    out: Optional[Path] = typer.Option(None, "--out", help="Images: a PNG grid, the target and its supporting examples, then its opposing ones [default: show.png]. Text: an HTML page [default: show.html]. --by-group: a PNG bar chart [default: groups.png]."),
    table: Optional[Path] = typer.Option(None, "--table", help="Also write the rows to this .csv or .json file."),
    by_group: bool = typer.Option(False, "--by-group", help="Draw the strongest groups (sums of their members' scores) for --target or --target-set as a bar chart."),
    target_set: Optional[Path] = TargetSetOpt,
    groups: Optional[Path] = GroupsOpt,
    targets: Optional[str] = typer.Option(None, "--targets", help="Which scored targets (default: the only ones, from their stored spec)."),
    target_indices: Optional[Path] = TargetIndicesOpt,
    dims: Optional[int] = DimsOpt,
    blocks: Optional[int] = BlocksOpt,
    ridge: str = RidgeOpt,
    models: Optional[str] = ModelsOpt,
    threshold: float = ThresholdOpt,
    json_out: bool = typer.Option(False, "--json", help="Print the rows as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing; only write the files."),
):
    """The train examples (or groups) that most support and oppose a target.

    A PNG grid of images, or an HTML page of texts, with labels or sources and scores; with
    --by-group, the strongest groups for a target or a target set, as a PNG bar chart."""
    if not by_group and (target is None or target_set is not None or groups is not None):
        raise UserError("show needs --target; --target-set and --groups go with --by-group")
    out = out or Path("groups.png" if by_group else default_show_file(store))
    for flag, path in (("--out", out), ("--table", table)):
        if path is not None and not path.parent.is_dir():
            raise UserError(f"{flag} {str(path)!r}: there is no folder {str(path.parent)!r}")
    target_set_data = load_store_data(store, targets, target_indices) if targets else None
    view = ViewSpec(dims, blocks, ridge)
    k = (12 if by_group else 8) if k is None else k
    if by_group:
        scores = show_groups(store, k, out, None if target is None else [target], target_set, groups,
                             target_set_data, view, parse_model_ids(models), threshold)
        rows = scores.strongest_rows(k)
    else:
        rows = show_target(store, target, k, out, target_set_data, view, parse_model_ids(models), threshold)
    if table is not None:
        write_table(rows, table)
    if json_out:
        typer.echo(json.dumps(rows, indent=1))
    if json_out or quiet:
        return
    console.print(f"wrote {out}" + (f" and {table}" if table else ""))
    if by_group:
        show_group_rows(rows, group_title(scores), calibration_note(scores.calibration))
        return
    if rows and "target_text" in rows[0]:
        Console().print(f"target {target} ({escape(rows[0]['target_source'] or 'no source')}):\n{escape(rows[0]['target_text'])}")
    show_top_k(rows, f"Train examples that most support and oppose target {target}")


def group_title(scores) -> str:
    which = f"target {scores.targets[0]}" if len(scores.targets) == 1 else f"the mean over {len(scores.targets)} targets"
    return f"Group scores for {which} (groups: {scores.origin}; scores/{scores.scores})"


def show_group_rows(rows: list[dict], title: str, notes: list[str]) -> None:
    """A table of groups: size, score, score per example, predicted change if removed (and that
    change calibrated, where the rows have it)."""
    calibrated = bool(rows) and "calibrated_change_if_removed" in rows[0]
    table = Table("rank", "group", "examples", "score", "per example", "change if removed",
                  *(["calibrated change"] if calibrated else []), title=escape(title), caption="\n".join(notes) or None)
    for row in rows:
        table.add_row(str(row["rank"]), escape(row["group"]), str(row["examples"]), f"{row['score']:+.4g}",
                      f"{row['score_per_example']:+.3g}", f"{row['change_if_removed']:+.4g}",
                      *([f"{row['calibrated_change_if_removed']:+.4g}"] if calibrated else []))
    Console().print(table)


def calibration_note(calibration) -> list[str]:
    if calibration is None:
        return ["change if removed: in score units (no LDS models on these targets to calibrate it)"]
    if not calibration.usable:
        return [f"change if removed: in score units; not calibrated: the {calibration.describe()} is not "
                "positive at p < 0.05 on these targets"]
    return [f"calibrated change: the change x {calibration.describe()} on these targets"]


@app.command("groups")
@reports_errors
def groups_command(
    store: str = typer.Argument(..., help="A store with scores."),
    target: list[int] = typer.Option([], "--target", help="A target (its position in the scored targets); repeat for a set [default: all]."),
    target_set: Optional[Path] = TargetSetOpt,
    groups: Optional[Path] = GroupsOpt,
    top: int = typer.Option(20, "--top", help="Show the N groups of largest |score| (0: all); --table and --json hold all."),
    table: Optional[Path] = typer.Option(None, "--table", help="Write every group's row to this .csv or .json file."),
    targets: Optional[str] = ScoredTargetsOpt,
    target_indices: Optional[Path] = TargetIndicesOpt,
    dims: Optional[int] = DimsOpt,
    blocks: Optional[int] = BlocksOpt,
    ridge: str = RidgeOpt,
    models: Optional[str] = ModelsOpt,
    threshold: float = ThresholdOpt,
    json_out: bool = typer.Option(False, "--json", help="Print every group's row, and its score per target, as JSON on stdout."),
):
    """Each group's score for a target or a target set, ranked: which source did the heavy lifting.

    A group's score is the sum of its members' scores (over a target set, its mean over the
    targets); the predicted change of the targets' mean output if it were removed is minus that."""
    if top < 0:
        raise UserError("--top must be >= 0")
    if table is not None and not table.parent.is_dir():
        raise UserError(f"--table {str(table)!r}: there is no folder {str(table.parent)!r}")
    target_set_data = load_store_data(store, targets, target_indices) if targets else None
    scores = group_scores(store, groups, target_set_data, ViewSpec(dims, blocks, ridge), parse_model_ids(models),
                          target or None, target_set, threshold)
    if table is not None:
        write_table(scores.rows(), table)
    if json_out:
        typer.echo(json.dumps(scores.as_dict(), indent=1))
        return
    rows = scores.strongest_rows(top or len(scores.names))
    shown_note = [f"the {len(rows)} strongest of {len(scores.names)} groups; --top 0 for all"] \
        if len(rows) < len(scores.names) else []
    show_group_rows(rows, group_title(scores), shown_note + calibration_note(scores.calibration))


INCOMPLETE = 3


@app.command()
@reports_errors
def status(
    store: str = typer.Argument(..., help="A store."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing; only the exit code tells."),
):
    """What each stage has done and has left, per model, view and scores, and the store's size.

    Exit code 0 when everything asked for is done, 3 when some of it is not (2: an error), so a
    script can wait with `until trakwomp status STORE --quiet; do sleep 60; done`."""
    report = store_status(store)
    if json_out:
        typer.echo(json.dumps(report.as_dict(), indent=1))
    elif not quiet:
        dataset = report.dataset or {}
        model = report.model or {}
        table = Table("stage", "what", "done", "left", title=f"{report.store}: {report.size_bytes / 2**20:,.1f} MiB, "
                      f"{dataset.get('num_examples', '?')} train examples, model {model.get('name', '?')}"
                      + (f" (width {model['width']:g})" if model.get("width") else "") + f", task {report.task}")
        for p in report.stages:
            table.add_row(p.stage, p.what, f"{p.done}/{p.total}", "" if p.complete else f"[yellow]{p.total - p.done}[/]")
        Console().print(table)
        if report.runs:
            members = sum(len(ids) for ids in report.runs.values())
            console.print(f"{members} registered model(s) from {len(report.runs)} training run(s); each is a member of "
                          "TRAK's ensemble (M counts members)")
        if report.temporary_files:
            console.print(f"{report.temporary_files} temporary file(s) (*.partial): writes in flight, or left by killed "
                          "writes; the next run of their stage removes those untouched for a minute")
        console.print("complete" if report.complete else "[yellow]incomplete[/]: run the stages with work left again")
    if not report.complete:
        raise typer.Exit(INCOMPLETE)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
