"""The commands that read a store's results: `predict`, `lds`, `show`, `explain` (which scores a model's
answer, then reads), `groups`, `status`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from trakwomp.cli.common import (
    BlocksOpt,
    DeviceOpt,
    DimsOpt,
    GroupsOpt,
    JsonOpt,
    ModelsOpt,
    QuietOpt,
    RidgeOpt,
    TargetSetOpt,
    ThresholdOpt,
    ScoresOptions,
    app,
    chooses_scores,
    print_json,
    progress_for,
    reports_errors,
    setting,
    wrote,
)
from trakwomp.cli.progress import console
from trakwomp.cli.tables import (
    calibration_note,
    cell,
    group_title,
    show_group_rows,
    show_predictions,
    show_tokens,
    show_top_k,
)

from trakwomp.analysis.baselines import baseline_help
from trakwomp.analysis.explain import Generation
from trakwomp.analysis.explain import explain as explain_answer
from trakwomp.stages.answers import DEFAULT_MAX_ANSWERS
from trakwomp.analysis.groups import group_scores, predict_groups
from trakwomp.analysis.lds import lds as lds_report
from trakwomp.analysis.lds import pair_views
from trakwomp.analysis.predict import predict as predict_outputs
from trakwomp.analysis.show import default_show_file, show_groups
from trakwomp.analysis.show import show as show_target
from trakwomp.analysis.status import status as store_status
from trakwomp.data.files import load_indices
from trakwomp.data.groups import parse_group_names
from trakwomp.errors import UserError
from trakwomp.estimator.scores import SCORE_MEANING
from trakwomp.estimator.threshold import DEFAULT_THRESHOLD
from trakwomp.estimator.view import ViewSpec
from trakwomp.outputs import check_output
from trakwomp.stages.export import TABLE_SUFFIXES, write_table
from trakwomp.stages.selection import parse_model_ids


BaselineOpt = typer.Option([], "--baseline", help=baseline_help())


@app.command(epilog=SCORE_MEANING)
@reports_errors
@chooses_scores
def predict(
    *,
    store: str = typer.Argument(..., help="A store with scores."),
    subset: Optional[Path] = typer.Option(None, "--subset", help="An .npy boolean mask over the train set, or train indices."),
    drop_group: list[str] = typer.Option([], "--drop-group", help="Instead of --subset: groups to remove from the train set (comma-separated or repeated)."),
    keep_groups: list[str] = typer.Option([], "--keep-groups", help="Instead of --subset: the only groups to keep (comma-separated or repeated)."),
    groups: Optional[Path] = GroupsOpt,
    scores_options: ScoresOptions,
    json_out: bool = JsonOpt,
):
    """Predicted output of each target for a train subset, or its change without some groups.

    --subset: the predicted output of a model trained on the subset (the sum of its scores, up
    to a constant). --drop-group or --keep-groups: the predicted change of each target's output
    if the groups were removed, or if only those were kept (minus the removed groups' scores)."""
    by_group = bool(drop_group or keep_groups)
    if by_group == (subset is not None):
        raise UserError("give --subset, or groups to drop (--drop-group) or keep (--keep-groups)")
    if groups is not None and not by_group:
        raise UserError("--groups goes with --drop-group or --keep-groups")
    chosen = scores_options.selection(store)
    if subset is not None:
        key, predictions = predict_outputs(store, load_indices(subset, what="--subset"), chosen)
        if json_out:
            typer.echo(json.dumps({"scores": key, "predicted_margin": predictions.tolist()}))
            return
        show_predictions(predictions, "predicted output (up to a constant)", f"datamodel predictions from scores/{key}")
        return
    prediction = predict_groups(store, parse_group_names(drop_group), parse_group_names(keep_groups), groups, chosen)
    if json_out:
        typer.echo(json.dumps(prediction.as_dict()))
        return
    calibration, calibrated = prediction.calibration, prediction.calibrated_mean_change
    note = f"calibrated: {calibrated:+.4f} ({calibration.describe()})" if calibration is not None and calibrated is not None else \
        calibration_note(calibration)[0]
    show_predictions(prediction.change, "predicted change of the output",
                     f"datamodel predictions from scores/{prediction.scores}, if the train set were changed so",
                     f"mean over the {len(prediction.change)} targets: {prediction.mean_change:+.4f}; {note}")


@app.command()
@reports_errors
def lds(
    store: str = typer.Argument(..., help="A store with LDS models and scores on their targets."),
    dims: list[int] = typer.Option([], "--dims", help="View dims; repeat with --blocks to compare views (paired by position)."),
    blocks: list[int] = typer.Option([], "--blocks", help="View blocks; repeat to compare views (e.g. --blocks 1 --blocks 16)."),
    ridge: list[str] = typer.Option([], "--ridge", help="View ridge (auto or relative, as in finalize); repeat to pair with --dims/--blocks."),
    models: Optional[str] = ModelsOpt,
    scores: list[Path] = typer.Option([], "--scores", help="An .npy (n_targets, n_train) score matrix to evaluate; repeatable."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help=f"Soft threshold, in units of each target's RMS score (default: {DEFAULT_THRESHOLD:g} for the store's scores, 0 for --scores files, which may be thresholded already)."),
    tune_threshold: bool = typer.Option(False, "--tune-threshold", help="Pick the threshold on half of the LDS models, report on the other half."),
    half: Optional[int] = typer.Option(None, "--half", help="Use only half of the LDS models: 0 = those at even positions (0, 2, ...), 1 = odd "
                                       "(choose views on one half, report on the other)."),
    resamples: int = typer.Option(2000, "--bootstrap", help="Bootstrap resamples of the targets for the 95% intervals."),
    by_group: bool = typer.Option(False, "--by-group", help="Against the group LDS models (train --role lds --group-alpha): the group-level LDS."),
    baseline: list[str] = BaselineOpt,
    device: str = DeviceOpt,
    json_out: bool = JsonOpt,
):
    """Linear datamodeling score of the scores against the store's LDS models, with 95% intervals."""
    views = pair_views(dims, blocks, ridge) if (dims or blocks or ridge or not scores) else []
    report = lds_report(store, views, parse_model_ids(models), scores, baselines=baseline, threshold=threshold,
                        tune_threshold=tune_threshold, half=half, resamples=resamples, by_group=by_group,
                        device=device)
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


@app.command(epilog=SCORE_MEANING)
@reports_errors
@chooses_scores
def show(
    *,
    store: str = typer.Argument(..., help="A store with scores."),
    target: Optional[int] = typer.Option(None, "--target", help="Which target (its position in the scored targets, from 0); with --by-group, default all."),
    k: Optional[int] = typer.Option(None, "--k", help="How many supporting and how many opposing train examples (default: 8); with --by-group, how many groups (default: 12)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Images: a PNG grid, the target and its supporting examples, then its opposing ones (default: show.png). Text: an HTML page (default: show.html). --by-group: a PNG bar chart (default: groups.png)."),
    table: Optional[Path] = typer.Option(None, "--table", help="Also write the rows to this .csv or .json file."),
    by_group: bool = typer.Option(False, "--by-group", help="Draw the strongest groups (sums of their members' scores) for --target or --target-set as a bar chart."),
    target_set: Optional[Path] = TargetSetOpt,
    groups: Optional[Path] = GroupsOpt,
    scores_options: ScoresOptions,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
):
    """The train examples (or groups) that most support and oppose a target.

    A PNG grid of images, or an HTML page of texts, with labels or sources and scores; with
    --by-group, the strongest groups for a target or a target set, as a PNG bar chart."""
    if not by_group and (target is None or target_set is not None or groups is not None):
        raise UserError("show needs --target; --target-set and --groups go with --by-group")
    out = out or Path("groups.png" if by_group else default_show_file(store))
    check_output("--out", out, (".png",) if by_group else (".png", ".html"), store)
    check_output("--table", table, TABLE_SUFFIXES, store)
    chosen = scores_options.selection(store)
    k = (12 if by_group else 8) if k is None else k
    if by_group or target is None:  # (without --by-group, --target was required above)
        scores = show_groups(store, k, out, None if target is None else [target], target_set, groups, chosen)
        rows = scores.strongest_rows(k)
    else:
        rows = show_target(store, target, k, out, chosen)
    if table is not None:
        write_table(rows, table)
    if json_out:
        typer.echo(json.dumps(rows, indent=1))
    if json_out or quiet:
        return
    wrote(out, table)
    if by_group:
        show_group_rows(rows, group_title(scores), calibration_note(scores.calibration))
        return
    if rows and "target_text" in rows[0]:
        Console().print(f"target {target} ({cell(rows[0]['target_source'] or 'no source')}):\n{cell(rows[0]['target_text'])}",
                        highlight=False)
    show_top_k(rows, f"Train examples that most support and oppose target {target}")


@app.command(epilog=SCORE_MEANING)
@reports_errors
def explain(
    store: str = typer.Argument(..., help="A store of a language model (train --task causal-lm), finalized."),
    prompt: str = typer.Option(..., "--prompt", help="The prompt the reference model answers."),
    completion: Optional[str] = typer.Option(None, "--completion", help="Attribute this answer instead of the model's own."),
    max_new_tokens: int = setting(Generation, "max_new_tokens", "--max-new-tokens"),
    temperature: float = setting(Generation, "temperature", "--temperature"),
    seed: int = setting(Generation, "seed", "--seed"),
    stop: Optional[str] = setting(Generation, "stop", "--stop"),
    model_id: int = typer.Option(0, "--model-id", help="Which registered model answers (`status` lists them; a store trained here: reference model j, or its checkpoints first with --save-checkpoints)."),
    k: int = typer.Option(5, "--k", help="How many supporting and how many opposing train examples."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write an HTML page (escaped, self-contained)."),
    per_token: bool = typer.Option(False, "--per-token", help="Also score each answer token on its own and show its strongest support (the page shades each token by how concentrated its support is)."),
    max_answers: int = typer.Option(DEFAULT_MAX_ANSWERS, "--max-answers", help="Answers the store keeps, so that a query asked again is read back; beyond them the oldest is removed."),
    dims: Optional[int] = DimsOpt,
    blocks: Optional[int] = BlocksOpt,
    ridge: str = RidgeOpt,
    threshold: float = ThresholdOpt,
    device: str = DeviceOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
):
    """Which train examples made the model answer a prompt as it did.

    The reference model completes --prompt (greedy unless --temperature), or takes --completion;
    the answer is scored as a prompt/completion target (f over the answer's tokens) and its
    most supporting and opposing train examples are shown."""
    check_output("--out", out, (".html",), store, "explain writes an HTML page")
    with progress_for(quiet or json_out) as progress:
        explained = explain_answer(store, prompt, completion, generation=Generation(max_new_tokens, temperature, seed, stop),
                                   model_id=model_id, k=k, view=ViewSpec(dims, blocks, ridge), threshold=threshold,
                                   out=out, per_token=per_token, max_answers=max_answers, device=device,
                                   progress=progress)
    if json_out:
        print_json(explained)
        return
    if quiet:
        return
    who = f"model {explained.model_id}, ended by {explained.ended}" if explained.generated else "given answer"
    Console().print(f"prompt: {cell(explained.prompt)}\nanswer ({who}): {cell(explained.answer)}", highlight=False)
    how = "read from the store" if explained.cached else f"{explained.seconds:.2f} s"
    show_top_k(explained.rows, f"Train examples that most support and oppose the answer ({how})")
    if per_token:
        show_tokens(explained.tokens, f"The answer token by token ({explained.token_seconds:.2f} s more)")
    if out is not None:
        wrote(out)


@app.command("groups", epilog=SCORE_MEANING)
@reports_errors
@chooses_scores
def groups_command(
    *,
    store: str = typer.Argument(..., help="A store with scores."),
    target: list[int] = typer.Option([], "--target", help="A target (its position in the scored targets); repeat for a set (default: all)."),
    target_set: Optional[Path] = TargetSetOpt,
    groups: Optional[Path] = GroupsOpt,
    top: int = typer.Option(20, "--top", help="Show the N groups of largest |score| (0: all); --table and --json hold all."),
    table: Optional[Path] = typer.Option(None, "--table", help="Write every group's row to this .csv or .json file."),
    scores_options: ScoresOptions,
    json_out: bool = JsonOpt,
):
    """Each group's score for a target or a target set, ranked: which source did the heavy lifting.

    A group's score is the sum of its members' scores (over a target set, its mean over the
    targets); the predicted change of the targets' mean output if it were removed is minus that."""
    if top < 0:
        raise UserError("--top must be >= 0")
    check_output("--table", table, TABLE_SUFFIXES, store)
    chosen = scores_options.selection(store)
    scores = group_scores(store, groups, chosen, target or None, target_set)
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
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
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
        table = Table("stage", "what", "done", "left", title=f"{cell(report.store)}: {report.size_bytes / 2**20:,.1f} MiB, "
                      f"{dataset.get('num_examples', '?')} train examples, model {cell(model.get('name', '?'))}"
                      + (f" (width {model['width']:g})" if model.get("width") else "")
                      + (f" with LoRA adapters of rank {model['lora']['r']}" if model.get("lora") else "")
                      + f", task {report.task}")
        for p in report.stages:
            table.add_row(p.stage, cell(p.what), f"{p.done}/{p.total}", "" if p.complete else f"[yellow]{p.total - p.done}[/]")
        Console().print(table)
        if report.runs:
            members = sum(len(ids) for ids in report.runs.values())
            console.print(f"{members} registered model(s) from {len(report.runs)} training run(s); each is a member of "
                          "TRAK's ensemble (M counts members)")
        if report.answers or report.unfinished_answers:
            console.print(f"{report.answers} explain answer(s) kept apart from the stages"
                          + (f"; {report.unfinished_answers} unfinished (a killed explain; the same query finishes it, "
                             "and it is removed in its turn like the others)" if report.unfinished_answers else ""))
        if report.temporary_files:
            console.print(f"{report.temporary_files} temporary file(s) (*.partial): writes in flight, or left by killed "
                          "writes; the next run of their stage removes those untouched for a minute")
        console.print("complete" if report.complete else "[yellow]incomplete[/]: run the stages with work left again")
    if not report.complete:
        raise typer.Exit(INCOMPLETE)
