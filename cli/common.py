"""What every command shares: the app, one-line errors (the settings a library message names, as
`name`, shown as the flags that set them), JSON output, progress, and each option declared once.
Options that the library's settings objects have take their help (and default) from the settings
field (`setting`), so the CLI cannot drift from the library.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import re
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from trakwomp.cli.progress import RichProgress, console
from trakwomp.cli.tables import cell, printable
from trakwomp.store import StoreError

from trakwomp.data.base import Dataset, TokenizedTexts
from trakwomp.data.groups import GROUPS_HELP
from trakwomp.errors import UserError
from trakwomp.estimator.view import ViewSpec
from trakwomp.models.networks import GPT_DEFAULTS
from trakwomp.runtime import NoProgress
from trakwomp.stages.bindings import load_store_data
from trakwomp.stages.recipe import Recipe
from trakwomp.stages.selection import parse_model_ids
from trakwomp.stages.skeleton import RunSettings
from trakwomp.stages.selection import Selection
from trakwomp.tasks.base import TASKS

app = typer.Typer(
    name="trakwomp",
    help="Data attribution with TRAK and TRAK-WOMP: which training examples made a model behave as it does.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

SAME = object()  # `setting`'s default: the settings field's own


def setting(settings: type, name: str, *flags: str, default=SAME, **kwargs):
    """The option of a settings field: its help, and its default unless the command line spells
    the value otherwise (a shard as text, a size as 8G)."""
    field = {f.name: f for f in dataclasses.fields(settings)}[name]
    return typer.Option(field.default if default is SAME else default, *flags, help=field.metadata["help"], **kwargs)


@functools.cache
def flags_of_settings() -> dict[str, str]:
    """Each setting by the name the library gives it (a command's parameter name: `block_dim`) ->
    the flag that sets it (--block-dim), read off every command of the app: the one place where
    settings meet flags."""
    flags: dict[str, str] = {}

    def visit(command) -> None:
        for subcommand in getattr(command, "commands", {}).values():
            visit(subcommand)
        for param in command.params:
            long = [option for option in param.opts if option.startswith("--")]
            if long and param.name:
                flags.setdefault(param.name, long[0])

    visit(typer.main.get_command(app))
    return flags


NAMED_SETTING = re.compile(r"`([a-z][a-z0-9_]*)`")


def as_flags(message: str) -> str:
    """A library message with each setting it names (`name`) shown as the flag that sets it."""
    flags = flags_of_settings()
    return NAMED_SETTING.sub(lambda match: flags.get(match.group(1), match.group(0)), message)


def reports_errors(command):
    """Print a user's mistake as one line on stderr and exit 2, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (UserError, StoreError) as e:
            console.print(f"[bold red]error:[/] {escape(printable(as_flags(str(e)), one_line=True))}",
                          highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("interrupted: finished units are kept; run the same command again to resume")
            raise typer.Exit(130) from None

    return wrapper


def print_json(report) -> None:
    """A library call's report (a dataclass) as JSON on stdout, less the fields marked json=False."""
    left_out = [f.name for f in dataclasses.fields(report) if not f.metadata.get("json", True)]
    typer.echo(json.dumps({k: v for k, v in dataclasses.asdict(report).items() if k not in left_out}, indent=1))


def progress_for(quiet: bool):
    return contextlib.nullcontext(NoProgress()) if quiet else RichProgress()


class Role(str, Enum):
    reference = "reference"
    lds = "lds"


def recipe_default(field: str) -> str:
    """A recipe field's default, and each task's own where it differs (for --help)."""
    own = "; ".join(f"{name}: {task.recipe_defaults[field]}" for name, task in TASKS.items()
                    if field in task.recipe_defaults)
    return f"(default {getattr(Recipe, field)}" + (f"; {own})" if own else ")")


def report_truncation(dataset: Dataset | None, what: str) -> None:
    """Say how many texts --max-length cut (once the command has run, so that an error stays one line)."""
    if isinstance(dataset, TokenizedTexts) and dataset.truncated:
        console.print(f"{what}: cut {dataset.truncated} of {len(dataset)} texts to --max-length {dataset.max_length} tokens")


def wrote(*paths) -> None:
    """Say which files a command wrote (paths escaped: `cell`)."""
    console.print("wrote " + " and ".join(cell(p) for p in paths if p is not None), highlight=False)


def report_batch_size(asked: int, used: int) -> None:
    if used and used < asked:
        console.print(f"lowered --batch-size from {asked} to {used} to fit in memory")


StoreArg = typer.Argument(..., help="The store: a folder, or an fsspec URL such as s3://bucket/store (created if missing).")
DeviceOpt = setting(RunSettings, "device", "--device", envvar="TRAKWOMP_DEVICE")
ShardOpt = setting(RunSettings, "shard", "--shard", default="0/1", envvar="TRAKWOMP_SHARD")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress display (status, show: print nothing).")
JsonOpt = typer.Option(False, "--json", help="Print the result as JSON on stdout (progress and messages go to stderr).")
ModelOpt = typer.Option(None, "--model", help="resnet9, gpt, hf:DIR (a Hugging Face causal LM saved in DIR) or "
                        "package.module:factory (factory(classes or vocabulary size) -> nn.Module) (default: the "
                        "store's; train: the task's, resnet9 or gpt); a store made with a factory needs it named again.")
GroupsOpt = typer.Option(None, "--groups", help=f"The train examples' groups: {GROUPS_HELP} (default: the store's, else the sources of text data).")
IndicesOpt = typer.Option(None, "--indices", help="An .npy of ints selecting a subset of --data, in that order.")
TransformOpt = typer.Option(None, "--transform", help="package.module:callable applied to every input tensor.")
TokenizerOpt = typer.Option(None, "--tokenizer", help="Text: bytes (no files needed) or hf:DIR, a Hugging Face tokenizer saved in DIR (default: the store's, else bytes).")
MaxLengthOpt = typer.Option(None, "--max-length", help="Text: cut longer texts to their first N tokens (how many were cut is reported) (default: the store's, else no cut).")
LayersOpt = typer.Option(None, "--layers", help=f"Transformer blocks of the built-in gpt (default: {GPT_DEFAULTS['layers']}).")
HeadsOpt = typer.Option(None, "--heads", help=f"Attention heads of the built-in gpt (default: {GPT_DEFAULTS['heads']}).")
WidthOpt = typer.Option(None, "--width", help=f"resnet9: width multiplier (default: 1); gpt: embedding width (default: {GPT_DEFAULTS['width']}).")
MaxMemoryOpt = typer.Option(None, "--max-memory", help="The most memory the process may hold while featurizing, e.g. 8G (on CUDA: of the GPU's) (default: what it holds now plus what is free); checked before any work.")
DimsOpt = setting(ViewSpec, "dims", "--dims")
BlocksOpt = setting(ViewSpec, "blocks", "--blocks")
RidgeOpt = setting(ViewSpec, "ridge", "--ridge")
ModelsOpt = setting(Selection, "models", "--models")
ThresholdOpt = setting(Selection, "threshold", "--threshold")
ScoredTargetsOpt = typer.Option(None, "--targets", help="Which scored targets (default: the only ones; needed if several are scored).")
TargetIndicesOpt = typer.Option(None, "--target-indices", help="The --target-indices they were scored with.")
TargetSetOpt = typer.Option(None, "--target-set", help="An .npy of scored target positions, or a boolean mask over them: the target set (default: all scored targets).")


@dataclasses.dataclass(frozen=True)
class ScoresOptions:
    """The options that choose which stored scores a reading command reads (`chooses_scores`)."""

    targets: str | None
    target_indices: Path | None
    dims: int | None
    blocks: int | None
    ridge: str
    models: str | None
    threshold: float

    def selection(self, store: str) -> Selection:
        """The library's Selection of them (the targets read, if named, for their fingerprint)."""
        scored = load_store_data(store, self.targets, self.target_indices) if self.targets else None
        return Selection(ViewSpec(self.dims, self.blocks, self.ridge), parse_model_ids(self.models), scored,
                         self.threshold)


SCORES_OPTIONS = [  # (name, type, option): declared once for every command that reads scores
    ("targets", Optional[str], ScoredTargetsOpt), ("target_indices", Optional[Path], TargetIndicesOpt),
    ("dims", Optional[int], DimsOpt), ("blocks", Optional[int], BlocksOpt), ("ridge", str, RidgeOpt),
    ("models", Optional[str], ModelsOpt), ("threshold", float, ThresholdOpt),
]


def chooses_scores(command):
    """`command`, whose parameter `scores_options: ScoresOptions` stands for the options of SCORES_OPTIONS:
    the command line shows them in its place, and the command receives them as one record."""
    signature = inspect.signature(command, eval_str=True)
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
             for name, kind, option in SCORES_OPTIONS]
    parameters = []
    for parameter in signature.parameters.values():
        parameters += added if parameter.name == "scores_options" else [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)]

    @functools.wraps(command)
    def wrapper(**given):
        chosen = ScoresOptions(**{name: given.pop(name) for name, _, _ in SCORES_OPTIONS})
        return command(**given, scores_options=chosen)

    wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    return wrapper
