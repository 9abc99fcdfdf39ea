"""LoRA fine-tunes of a Hugging Face causal LM (with `peft`): a frozen base in a local folder and,
in each adapted layer W, a trainable low-rank update,

    y = W x + (alpha / r) B A x,   A: r x in (random at first), B: out x r (zero at first),

so a fine-tune is its adapter weights (A, B of every adapted layer) on a base that never changes.
A store of LoRA models records the base folder, the adapter's settings and the base's
fingerprint (a hash of its config and weight files, refused if the folder changes) and keeps
each model's adapter weights only; features and scores take gradients of the adapter weights
(the trainable parameters) by default.

A peft adapter folder (`adapter_config.json` naming a local base folder, `adapter_model.*`)
is read offline, as `--model hf:ADAPTER`: its base and settings become the model spec and its
weights a checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import typing
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from trakwomp.errors import UserError
from trakwomp.store.records import LoraRecord

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
BASE_FILES = ("config.json", "*.safetensors", "*.bin")


def import_peft(what: str):
    try:
        import peft
    except ImportError:
        raise UserError(f"{what} needs the `peft` package: pip install 'trakwomp[lora]'") from None
    return peft


@dataclass(frozen=True)
class LoraSpec:
    """The adapter's settings: rank r, alpha (the update is scaled by alpha / r), the names of the
    adapted modules (None: peft's default for the base's model type), and the dropout on the
    adapter's input while training."""

    r: int
    alpha: float | None = None
    targets: tuple[str, ...] | None = None
    dropout: float = 0.0

    def __post_init__(self):
        if self.r < 1:
            raise UserError(f"`lora` must be a rank of at least 1, got {self.r}")
        if self.alpha is not None and not self.alpha > 0:
            raise UserError(f"`lora_alpha` must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"`lora_dropout` must lie in [0, 1), got {self.dropout}")
        object.__setattr__(self, "alpha", float(2 * self.r if self.alpha is None else self.alpha))
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(sorted(self.targets)))

    def as_dict(self) -> dict:
        recorded = asdict(self)
        recorded["targets"] = None if self.targets is None else list(self.targets)
        return recorded

    @classmethod
    def of_store(cls, recorded: LoraRecord) -> "LoraSpec":
        return cls(recorded.r, recorded.alpha, recorded.targets, recorded.dropout)

    def resolved(self, model_type: str | None) -> "LoraSpec":
        """These settings with the adapted modules named (peft's default for a base of
        `model_type` if none were given)."""
        if self.targets is not None:
            return self
        peft = import_peft("`lora`")
        default = peft.utils.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type or "")
        if not default:
            raise UserError(f"peft knows no default LoRA modules for a {model_type!r} model; name them with "
                            "`lora_targets`")
        return LoraSpec(self.r, self.alpha, tuple(default), self.dropout)


def with_adapter(model: nn.Module, lora: LoraSpec) -> nn.Module:
    """`model` (a transformers model, changed in place) with fresh LoRA layers in the modules
    `lora.targets`: A drawn from torch's global generator, B zero; only they are trainable."""
    peft = import_peft("`lora`")
    targets = lora.targets
    if targets is None:
        raise ValueError("LoRA settings whose modules are not named yet (LoraSpec.resolved names them)")
    # (peft's hints say an int alpha; the scale alpha / r takes any float)
    config = peft.LoraConfig(r=lora.r, lora_alpha=typing.cast(int, lora.alpha), target_modules=list(targets),
                             lora_dropout=lora.dropout, bias="none")
    try:
        with warnings.catch_warnings():  # peft sets fan_in_fan_out itself for GPT-2's Conv1D, and says so
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
            adapted = peft.inject_adapter_in_model(config, model)
    except ValueError as e:
        raise UserError(f"cannot add LoRA layers to the modules {', '.join(targets)}: "
                        f"{str(e).splitlines()[0]}") from None
    for name, parameter in adapted.named_parameters():
        parameter.requires_grad_(".lora_" in name)
    return adapted


@functools.lru_cache(maxsize=8)
def _files_hash(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in files:
        digest.update(Path(name).name.encode() + b"\0")
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def base_fingerprint(folder: str) -> str:
    """SHA-256 over the base folder's config and weight files (names and bytes), computed once
    per process for files of the same size and time."""
    path = Path(folder)
    files = sorted({f for pattern in BASE_FILES for f in path.glob(pattern) if f.is_file()})
    stats = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _files_hash(stats)


def check_base(folder: str, recorded: str | None) -> None:
    """Refuse a base folder whose files differ from those the store's models were made on."""
    if recorded is not None and base_fingerprint(folder) != recorded:
        raise UserError(f"the base model in {folder!r} has changed since the store's LoRA models were made on it "
                        "(its config or weight files differ); restore it, or use a new store")


@dataclass(frozen=True)
class Adapter:
    """A peft adapter folder: its base folder and its settings."""

    folder: str
    base: str
    lora: LoraSpec


def read_adapter(folder: str) -> Adapter | None:
    """The adapter in `folder` (None if it holds none), refused in one line if it cannot be read
    offline: a base that is not a local folder, an adapter kind other than LoRA, no weights."""
    config_path = Path(folder) / ADAPTER_CONFIG
    if not Path(folder).is_dir() or not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"`model` hf:{folder}: cannot read {ADAPTER_CONFIG}: {e}") from None
    where = f"`model` hf:{folder}"
    if config.get("peft_type") != "LORA":
        raise UserError(f"{where}: a {config.get('peft_type')} adapter; trakwomp reads LoRA adapters only")
    base = config.get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise UserError(f"{where}: its base model {base!r} is not a local folder with a config.json (nothing is "
                        "downloaded); set base_model_name_or_path in adapter_config.json to the base's folder")
    if not any((Path(folder) / name).is_file() for name in ADAPTER_WEIGHTS):
        raise UserError(f"{where}: the folder holds no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise UserError(f"{where}: target_modules is a pattern ({targets!r}); trakwomp needs the list of module names")
    for unsupported in ("use_dora", "use_rslora", "modules_to_save"):
        if config.get(unsupported):
            raise UserError(f"{where}: adapters with {unsupported} are not supported (plain LoRA only: their other "
                            "trained weights would be left out)")
    if config.get("bias", "none") != "none":
        raise UserError(f"{where}: an adapter that trains biases (bias {config['bias']!r}) is not supported (plain "
                        "LoRA only: the biases would be left out)")
    lora = LoraSpec(int(config["r"]), float(config["lora_alpha"]), tuple(targets) if targets else None,
                    float(config.get("lora_dropout") or 0.0))
    return Adapter(folder, str(base), lora)


def adapter_state(model: nn.Module, folder: str) -> dict[str, torch.Tensor]:
    """The adapter weights saved in `folder`, loaded into `model` (built with its settings) by
    peft's own reader; every adapter weight must be found."""
    peft = import_peft(f"`model` hf:{folder}")
    weights = peft.utils.load_peft_weights(folder, device="cpu")
    inner = model.model if hasattr(model, "model") else model
    result = peft.set_peft_model_state_dict(inner, weights)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        first = (missing or result.unexpected_keys)[0]
        raise UserError(f"the adapter in {folder!r} does not fit its base and settings ({first})")
    return trainable_state(model)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of `model` by name: a LoRA model's adapter weights."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
