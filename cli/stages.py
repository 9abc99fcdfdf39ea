"""The pipeline's commands: `train`, `featurize`, `finalize`, `score`, and `verify`, which trains
again. Each builds its stage's settings object from its options (the same object a Python user
passes) and runs the stage."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Optional

import typer
from trakwomp.cli.common import (
    BlocksOpt,
    DeviceOpt,
    DimsOpt,
    GroupsOpt,
    HeadsOpt,
    IndicesOpt,
    JsonOpt,
    LayersOpt,
    MaxLengthOpt,
    MaxMemoryOpt,
    ModelOpt,
    ModelsOpt,
    QuietOpt,
    RidgeOpt,
    Role,
    ScoresOptions,
    ShardOpt,
    StoreArg,
    TokenizerOpt,
    TransformOpt,
    WidthOpt,
    app,
    chooses_scores,
    print_json,
    progress_for,
    recipe_default,
    report_batch_size,
    report_truncation,
    reports_errors,
    setting,
    wrote,
)
from trakwomp.cli.progress import console
from trakwomp.cli.tables import cell, show_top_k, show_verify

from trakwomp.analysis.verify import Verify, VerifySettings
from trakwomp.data.groups import parse_group_names
from trakwomp.data.specs import load_dataset, spec_help
from trakwomp.errors import UserError
from trakwomp.estimator.scores import SCORE_MEANING
from trakwomp.estimator.view import ViewSpec
from trakwomp.features.memory import parse_size
from trakwomp.features.projectors import DEFAULT_BLOCKS, ProjectorSpec, projector_help
from trakwomp.models.lora import LoraSpec
from trakwomp.models.spec import ModelSpec
from trakwomp.runtime import Shard
from trakwomp.stages.bindings import load_store_data
from trakwomp.stages.featurize import Featurize, FeaturizeSettings
from trakwomp.stages.finalize import Finalize, FinalizeSettings
from trakwomp.stages.recipe import Recipe
from trakwomp.stages.score import Score, ScoreSettings
from trakwomp.stages.selection import parse_model_ids
from trakwomp.stages.train import Train, TrainSettings
from trakwomp.tasks.base import TASKS
from trakwomp.tasks.registry import DEFAULT_TASK, make_task

TASK_HELP = "; ".join(f"{name}: {task.help}" for name, task in TASKS.items()) + "."
LoraOpt = typer.Option(None, "--lora", help="With --model hf:BASE: train LoRA fine-tunes of the base of this rank "
                       "(the store keeps each model's adapter weights; needs peft).")
LoraAlphaOpt = typer.Option(None, "--lora-alpha", help="LoRA's alpha: the update is scaled by alpha / rank (default: "
                            "2 x the rank).")
LoraTargetsOpt = typer.Option(None, "--lora-targets", help="Comma-separated names of the modules to adapt (default: "
                              "peft's for the base's model type).")
LoraDropoutOpt = typer.Option(0.0, "--lora-dropout", help="Dropout on the adapters' input while training.")
LmOutputOpt = typer.Option(None, "--lm-output", help="causal-lm output f = log(p/(1-p)): token (p = exp(-L/T), T the "
                           "predicted tokens) or sequence (p = exp(-L)) (default token).")


@app.command()
@reports_errors
def train(
    store: str = StoreArg,
    data: str = typer.Option(..., "--data", help=f"Train set: {spec_help()}."),
    task: str = typer.Option(DEFAULT_TASK, "--task", help=TASK_HELP),
    lm_output: Optional[str] = LmOutputOpt,
    model: Optional[str] = ModelOpt,
    width: Optional[float] = WidthOpt,
    layers: Optional[int] = LayersOpt,
    heads: Optional[int] = HeadsOpt,
    role: Role = setting(TrainSettings, "role", "--role", default=Role.reference),
    num_models: int = setting(TrainSettings, "num_models", "--num-models"),
    targets: Optional[str] = typer.Option(None, "--targets", help="With --role lds: the examples to record outputs f on."),
    alpha: float = setting(Recipe, "alpha", "--alpha"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help=f"Epochs of training {recipe_default('epochs')}."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=f"Examples per training batch {recipe_default('batch_size')}."),
    lr: Optional[float] = typer.Option(None, "--lr", help=f"Peak learning rate of the one-cycle schedule (SGD; causal-lm: AdamW) {recipe_default('lr')}."),
    seed: int = setting(Recipe, "seed", "--seed"),
    threads: int = setting(Recipe, "threads", "--threads"),
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
    group_alpha: Optional[float] = setting(Recipe, "group_alpha", "--group-alpha"),
    exclude_groups: list[str] = setting(Recipe, "exclude_groups", "--exclude-groups", default=[]),
    save_checkpoints: int = setting(Recipe, "save_checkpoints", "--save-checkpoints"),
    train_on_prompt: bool = setting(Recipe, "train_on_prompt", "--train-on-prompt"),
    lora: Optional[int] = LoraOpt,
    lora_alpha: Optional[float] = LoraAlphaOpt,
    lora_targets: Optional[str] = LoraTargetsOpt,
    lora_dropout: float = LoraDropoutOpt,
    json_out: bool = JsonOpt,
):
    """Train reference models (or LDS evaluation models) on random alpha-subsets of --data."""
    chosen_task = make_task(task, lm_output=lm_output)
    spec = ModelSpec.parse(model or chosen_task.default_model, width, layers, heads,
                           lora_spec(lora, lora_alpha, lora_targets, lora_dropout))
    recipe = Recipe.for_task(chosen_task, alpha=alpha, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                             threads=threads, group_alpha=group_alpha, save_checkpoints=save_checkpoints,
                             exclude_groups=tuple(parse_group_names(exclude_groups)), train_on_prompt=train_on_prompt)
    settings = TrainSettings(device=device, shard=Shard.parse(shard), task=chosen_task, role=role.value,
                             num_models=num_models, recipe=recipe, groups=groups)
    if target_indices is not None and targets is None:
        raise UserError("--target-indices needs --targets")
    train_set = load_dataset(data, indices, transform, download, tokenizer, max_length)
    target_set = load_dataset(targets, target_indices, transform, download, tokenizer, max_length) if targets else None
    with progress_for(quiet) as progress:
        report = Train(settings, train_set, spec, target_set).run(store, progress)
    report_truncation(train_set, "--data")  # after the run: a refusal stays one line
    report_truncation(target_set, "--targets")
    if json_out:
        print_json(report)
    if not quiet:
        kind = "group LDS" if group_alpha is not None else role.value
        console.print(f"{len(report.trained)} {kind} model(s) trained, {len(report.skipped)} already done, in {cell(store)}")


def lora_spec(rank: int | None, alpha: float | None, targets: str | None, dropout: float) -> LoraSpec | None:
    """The LoRA settings the options give (None without --lora)."""
    if rank is None:
        if alpha is not None or targets is not None or dropout:
            raise UserError("--lora-alpha, --lora-targets and --lora-dropout go with --lora RANK")
        return None
    names = None if targets is None else tuple(t.strip() for t in targets.split(",") if t.strip())
    if names == ():
        raise UserError("--lora-targets names no module")
    return LoraSpec(rank, alpha, names, dropout)


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


def projector_of(kind: str | None, seed: int | None, blocks: int | None, block_dim: int | None) -> ProjectorSpec | None:
    """The projector the options give (defaults for those not given), or None if none is given."""
    given = {"kind": kind, "seed": seed, "blocks": blocks, "block_dim": block_dim}
    if all(v is None for v in given.values()):
        return None
    return ProjectorSpec(**{k: v for k, v in given.items() if v is not None})


@app.command()
@reports_errors
def featurize(
    store: str = StoreArg,
    data: Optional[str] = typer.Option(None, "--data", help=f"Train set ({spec_help()}); default: the store's."),
    model: Optional[str] = ModelOpt,
    width: Optional[float] = WidthOpt,
    layers: Optional[int] = LayersOpt,
    heads: Optional[int] = HeadsOpt,
    task: Optional[str] = typer.Option(None, "--task", help=f"With --checkpoint in a new store: one of {', '.join(TASKS.names())} (default: the store's, else classification)."),
    lm_output: Optional[str] = LmOutputOpt,
    checkpoint: list[str] = typer.Option([], "--checkpoint", help="A state_dict file or a glob; repeatable. Default: the store's trained reference models and the checkpoints kept along their runs."),
    run: Optional[str] = setting(FeaturizeSettings, "run", "--run"),
    blocks: Optional[int] = typer.Option(None, "--blocks", help=f"Number of projection blocks B (default: the store's, else {DEFAULT_BLOCKS}; factored: one per layer)."),
    block_dim: Optional[int] = typer.Option(None, "--block-dim", help=f"Dimensions per block; d = B x block dim (default: the store's, else {ProjectorSpec.block_dim})."),
    projector: Optional[str] = typer.Option(None, "--projector", help=f"{projector_help()} (default: the store's, else sjlt up to 20M parameters and factored beyond)."),
    projector_seed: Optional[int] = typer.Option(None, "--projector-seed", help=f"(default: the store's, else {ProjectorSpec.seed})"),
    dtype: Optional[str] = setting(FeaturizeSettings, "dtype", "--dtype"),
    parameters: list[str] = setting(FeaturizeSettings, "parameters", "--params", default=[]),
    chunk_rows: Optional[int] = setting(FeaturizeSettings, "chunk_rows", "--chunk-rows"),
    batch_size: int = setting(FeaturizeSettings, "batch_size", "--batch-size"),
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
    settings = FeaturizeSettings(device=device, shard=Shard.parse(shard),
                                 projector=projector_of(projector, projector_seed, blocks, block_dim), dtype=dtype,
                                 parameters=parameters or None, chunk_rows=chunk_rows, batch_size=batch_size,
                                 memory_limit=parse_size(max_memory) if max_memory else None, run=run,
                                 task=make_task(task, lm_output=lm_output) if task else None)
    spec = ModelSpec.parse(model, width, layers, heads) if model else None
    if not data and (indices or transform or tokenizer or max_length):
        raise UserError("--indices, --transform, --tokenizer and --max-length go with --data")
    train_set = load_store_data(store, data, indices, transform, tokenizer, max_length) if data else None
    with progress_for(quiet) as progress:
        report = Featurize(settings, train_set, spec, expand_checkpoints(checkpoint)).run(store, progress)
    report_truncation(train_set, "--data")
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
    settings = FinalizeSettings(device=device, shard=Shard.parse(shard), view=ViewSpec(dims, blocks, ridge),
                                models=parse_model_ids(models))
    with progress_for(quiet) as progress:
        report = Finalize(settings).run(store, progress)
    if json_out:
        print_json(report)
    if not quiet:
        console.print(f"finalized view {report.view.key} for models {report.model_ids}: {report.units_done} block(s) "
                      f"inverted in {report.seconds:.1f}s, {report.units_skipped} already done")


@app.command(epilog=SCORE_MEANING)
@reports_errors
def score(
    store: str = typer.Argument(..., help="A finalized store."),
    targets: str = typer.Option(..., "--targets", help=f"The examples to attribute ({spec_help()})."),
    dims: Optional[int] = DimsOpt,
    blocks: Optional[int] = BlocksOpt,
    ridge: str = RidgeOpt,
    models: Optional[str] = ModelsOpt,
    out: Optional[Path] = setting(ScoreSettings, "out", "--out"),
    threshold: float = setting(ScoreSettings, "threshold", "--threshold"),
    top_k: int = setting(ScoreSettings, "top_k", "--top-k"),
    top_k_out: Path = setting(ScoreSettings, "top_k_out", "--top-k-out"),
    top_k_only: bool = setting(ScoreSettings, "top_k_only", "--top-k-only"),
    chunk_rows: int = setting(ScoreSettings, "target_chunk_rows", "--chunk-rows"),
    batch_size: int = setting(ScoreSettings, "batch_size", "--batch-size"),
    max_memory: Optional[str] = MaxMemoryOpt,
    device: str = DeviceOpt,
    shard: str = ShardOpt,
    quiet: bool = QuietOpt,
    target_indices: Optional[Path] = typer.Option(None, "--target-indices", help="An .npy of ints selecting a subset of --targets."),
    transform: Optional[str] = TransformOpt,
    tokenizer: Optional[str] = TokenizerOpt,
    max_length: Optional[int] = MaxLengthOpt,
    model: Optional[str] = ModelOpt,
    width: Optional[float] = WidthOpt,
    layers: Optional[int] = LayersOpt,
    heads: Optional[int] = HeadsOpt,
    per_token: bool = typer.Option(False, "--per-token", help="Prompt/completion targets: score each completion token on its own (f: the log-odds of that token given what precedes it); a target row per token."),
    json_out: bool = JsonOpt,
):
    """Attribution scores tau(z) of every train example for every target (TRAK-WOMP eq. 3)."""
    settings = ScoreSettings(device=device, shard=Shard.parse(shard), view=ViewSpec(dims, blocks, ridge),
                             models=parse_model_ids(models), model=ModelSpec.parse(model, width, layers, heads) if model
                             else None, target_chunk_rows=chunk_rows, batch_size=batch_size,
                             memory_limit=parse_size(max_memory) if max_memory else None, out=out, top_k=top_k,
                             top_k_out=top_k_out, top_k_only=top_k_only, threshold=threshold)
    target_set = load_store_data(store, targets, target_indices, transform, tokenizer, max_length)
    if per_token:
        target_set = target_set.per_token()
    with progress_for(quiet) as progress:
        report = Score(settings, target_set).run(store, progress)
    if json_out:
        print_json(report)
    if quiet:
        return
    report_truncation(target_set, "--targets")
    report_batch_size(batch_size, report.batch_size)
    console.print(f"scored {report.num_targets} targets x {report.num_train} train examples at view "
                  f"{report.view.key} with models {report.model_ids} ({report.chunks_done} chunk(s) in "
                  f"{report.seconds:.1f}s, {report.chunks_skipped} already done); stored as scores/{report.key}")
    if top_k and report.top_k_file is None:
        console.print(f"{top_k_out} not written yet: other shards' target chunks are left, and the run that scores "
                      "the last one writes it")
    elif out or top_k:
        wrote(out, top_k_out if top_k else None)
    if top_k and not json_out:  # the table would follow the JSON on stdout
        show_top_k([r for r in report.top_k_rows if r["target"] < 3],
                   "Train examples that most support and oppose the first 3 targets")


@app.command(epilog=SCORE_MEANING)
@reports_errors
@chooses_scores
def verify(
    *,
    store: str = typer.Argument(..., help="A scored store whose reference models `trakwomp train` trained."),
    target: list[int] = typer.Option([], "--target", help="A target (its position in the scored targets); repeat for "
                                     "a set."),
    target_set: Optional[Path] = typer.Option(None, "--target-set", help="An .npy of scored target positions, or a "
                                              "boolean mask over them: the target set."),
    group: Optional[str] = setting(VerifySettings, "group", "--group"),
    groups: Optional[Path] = GroupsOpt,
    k: int = setting(VerifySettings, "k", "--k"),
    seeds: int = setting(VerifySettings, "seeds", "--seeds"),
    method: str = setting(VerifySettings, "method", "--method"),
    out: Optional[Path] = setting(VerifySettings, "out", "--out"),
    model: Optional[str] = typer.Option(None, "--model", help="The store's model, where it was made with a "
                                        "package.module:factory (default: the store's)."),
    scores_options: ScoresOptions,
    device: str = DeviceOpt,
    shard: str = ShardOpt,
    quiet: bool = QuietOpt,
    json_out: bool = JsonOpt,
):
    """Retrain without the train examples the scores name, and compare f's actual change with the predicted one.

    Conditions, N seeds each (paired by seed): the K examples that most support the target(s)
    removed, the K that most oppose them, K random ones (the control), none; with --group, the
    group's members and as many random ones. The cost is printed before the runs; each run is a
    unit (resumable, --shard). Actual changes are in f's units; the predicted change is minus the
    removed examples' scores (score units), calibrated to f's by the store's LDS models where they
    were measured on these targets and their fit is significant."""
    settings = VerifySettings(device=device, shard=Shard.parse(shard), k=k, seeds=seeds, method=method, group=group,
                              groups=groups, target=tuple(target), target_set=target_set, selection=scores_options.selection(store),
                              out=out)
    with progress_for(quiet) as progress:
        report = Verify(settings, ModelSpec.parse(model, None, None, None) if model else None).run(store, progress)
    if json_out:
        typer.echo(json.dumps(report.as_dict(), indent=1))
    elif quiet:
        return
    elif not report.complete:
        console.print(f"verify: {report.runs_done} run(s) done here, {report.runs_skipped} done before, of "
                      f"{report.runs}; the findings come once every run (of every --shard) is done")
    else:
        show_verify(report)
        if out is not None:
            wrote(out)
