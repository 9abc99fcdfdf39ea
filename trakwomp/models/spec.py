"""Model specs: a built-in network with its size, a Hugging Face folder, or a user factory
`package.module:factory`; and the check that a model suits the data and the task.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from trakwomp.data.base import load_batch
from trakwomp.errors import UserError
from trakwomp.imports import import_object, is_object_spec
from trakwomp.models.huggingface import load_huggingface
from trakwomp.models.lora import LoraSpec, base_fingerprint, check_base, read_adapter, trainable_state, with_adapter
from trakwomp.models.networks import GPT, GPT_DEFAULTS, resnet9
from trakwomp.store.records import ModelRecord
from trakwomp.tasks.base import Task, logits_of

BUILTIN_MODELS = ("resnet9", "gpt")
GPT_LIMITS = {"width": 1 << 14, "layers": 1024}
RESNET9_MAX_WIDTH = 64.0
TRAINING_COPIES = 4  # weights, gradients and two optimizer moments


@dataclass(frozen=True)
class ModelSpec:
    """A built-in model with its size (resnet9: width multiplier; gpt: width, layers, heads), a
    Hugging Face causal LM in a local folder (`hf:DIR`), with `lora` a LoRA fine-tune of it (the
    base's fingerprint recorded; `adapter`: the peft adapter folder it was read from, whose
    weights are a checkpoint), or a user factory `package.module:factory`."""

    name: str
    width: float | None = None
    layers: int | None = None
    heads: int | None = None
    lora: LoraSpec | None = None
    base_sha256: str | None = None
    adapter: str | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, spec: str, width: float | None = None, layers: int | None = None,
              heads: int | None = None, lora: LoraSpec | None = None) -> "ModelSpec":
        if (layers is not None or heads is not None) and spec != "gpt":
            raise UserError(f"--layers and --heads apply to the built-in gpt only, not to {spec!r}")
        if lora is not None and not spec.startswith("hf:"):
            raise UserError(f"--lora fine-tunes a Hugging Face model (--model hf:DIR), not {spec!r}")
        if spec == "gpt":
            return cls._gpt(width, layers, heads)
        if spec == "resnet9":
            width = 1.0 if width is None else float(width)
            if not 0 < width <= RESNET9_MAX_WIDTH:
                raise UserError(f"resnet9 takes a --width above 0 and up to {RESNET9_MAX_WIDTH}, got {width:g}")
            return cls(spec, width)
        if not (is_object_spec(spec) or (spec.startswith("hf:") and len(spec) > 3)):
            raise UserError(f"malformed model spec {spec!r}: expected one of {', '.join(BUILTIN_MODELS)}, hf:DIR or "
                            "package.module:factory")
        if width is not None:
            raise UserError(f"--width applies to the built-in models only, not to {spec!r}")
        return cls._huggingface(spec, lora) if spec.startswith("hf:") else cls(spec)

    @classmethod
    def _huggingface(cls, spec: str, lora: LoraSpec | None) -> "ModelSpec":
        """`hf:DIR`: a model folder (with `lora`: a new LoRA fine-tune of it) or a peft adapter
        folder (its base and settings; its weights are then the checkpoint to featurize)."""
        adapter = read_adapter(spec[3:])
        if adapter is not None and lora is not None:
            raise UserError(f"--lora adds a new adapter to a base model; {spec[3:]!r} is an adapter already "
                            "(train with --model hf:BASE, or featurize this adapter without --lora)")
        if adapter is None and lora is None:
            return cls(spec)
        folder, lora = (adapter.base, adapter.lora) if adapter else (spec[3:], lora)
        if not (Path(folder) / "config.json").is_file():
            raise UserError(f"--model hf:{folder}: no Hugging Face model there (no config.json)")
        model_type = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type")
        return cls(f"hf:{folder}", lora=lora.resolved(model_type), base_sha256=base_fingerprint(folder),
                   adapter=adapter.folder if adapter else None)

    @classmethod
    def _gpt(cls, width, layers, heads) -> "ModelSpec":
        width = GPT_DEFAULTS["width"] if width is None else width
        layers = GPT_DEFAULTS["layers"] if layers is None else layers
        heads = GPT_DEFAULTS["heads"] if heads is None else heads
        if width != int(width) or width < 1 or layers < 1 or heads < 1 or int(width) % heads:
            raise UserError(f"gpt needs a whole --width divisible by --heads and at least 1 layer, got width {width:g}, "
                            f"{layers} layers, {heads} heads")
        if width > GPT_LIMITS["width"] or layers > GPT_LIMITS["layers"]:
            raise UserError(f"gpt takes --width up to {GPT_LIMITS['width']} and --layers up to {GPT_LIMITS['layers']}, "
                            f"got width {width:g}, {layers} layers")
        return cls("gpt", int(width), int(layers), int(heads))

    def as_dict(self) -> dict:
        recorded = {"name": self.name, "width": self.width}
        if self.name == "gpt":
            recorded.update(layers=self.layers, heads=self.heads)
        if self.lora is not None:
            recorded.update(lora=self.lora.as_dict(), base_sha256=self.base_sha256)
        return recorded

    @classmethod
    def of_store(cls, recorded: ModelRecord, location: str) -> "ModelSpec":
        """The model a store records. A user factory is refused: trakwomp imports code only when
        the user names it (--model), never because a store names it (a Hugging Face folder is
        read as data: config and weights, no code)."""
        name = recorded.name
        if name not in BUILTIN_MODELS and not name.startswith("hf:"):
            raise UserError(f"store {location!r} was made with the model {name!r}; trakwomp imports "
                            f"code only when you name it: pass --model {name}")
        lora = LoraSpec.of_store(recorded.lora) if recorded.lora else None
        return cls(name, recorded.width, recorded.layers, recorded.heads, lora, recorded.base_sha256)

    def __str__(self) -> str:
        if self.name == "gpt":
            return f"gpt (width {self.width}, {self.layers} layers, {self.heads} heads)"
        if self.lora is not None:
            return f"{self.name} with LoRA (r {self.lora.r}, alpha {self.lora.alpha:g}, {', '.join(self.lora.targets)})"
        return self.name if self.width is None else f"{self.name} (width {self.width:g})"

    def stored_state(self, net: nn.Module) -> dict[str, torch.Tensor]:
        """What a store keeps of a model: its state_dict; of a LoRA fine-tune, its adapter weights."""
        return trainable_state(net) if self.lora is not None else net.state_dict()

    def load_state(self, net: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
        """`net` with the weights `state` (as `stored_state` gives them), in eval mode; weights
        missing, left over or of another shape are refused in one line."""
        expected = set(self.stored_state(net))
        if set(state) != expected:
            names = sorted(expected ^ set(state))
            raise UserError(f"the weights do not fit the model {self}: {len(names)} tensor(s) missing or left over "
                            f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
        try:
            net.load_state_dict(state, strict=self.lora is None)
        except RuntimeError as e:
            raise UserError(f"the weights do not fit the model {self}: {str(e).splitlines()[-1].strip()}") from None
        return net.eval()

    def build(self, output_size: int) -> nn.Module:
        """A freshly initialised model (a Hugging Face model: its saved weights) with
        `output_size` outputs (classes, or the vocabulary of a language model); parameters are
        drawn from torch's global generator."""
        if self.name == "resnet9":
            return within_memory(self, lambda: resnet9(output_size, self.width))
        if self.name == "gpt":
            return within_memory(self, lambda: GPT(output_size, self.width, self.layers, self.heads))
        if self.name.startswith("hf:") and self.lora is not None:
            check_base(self.name[3:], self.base_sha256)
            net = load_huggingface(self.name[3:])
            with_adapter(net.model, self.lora)
            return net
        if self.name.startswith("hf:"):
            return load_huggingface(self.name[3:])
        factory = import_object(self.name, what="model")
        model = factory(output_size)
        if not isinstance(model, nn.Module):
            raise UserError(f"model factory {self.name!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model


def within_memory(spec: ModelSpec, make) -> nn.Module:
    """`make()`, once the same model built on the meta device (no memory) shows that
    TRAINING_COPIES float32 copies of its parameters fit in this machine's memory."""
    with torch.device("meta"):
        count = sum(p.numel() for p in make().parameters())
    need, memory = TRAINING_COPIES * 4 * count, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > memory:
        raise UserError(f"model {spec} has {count:,} parameters: {TRAINING_COPIES} float32 copies of them "
                        f"({need / 2**30:,.1f} GiB) do not fit in this machine's {memory / 2**30:,.1f} GiB")
    return make()


def refuse_beyond_context(lengths, bound: str, dataset, context: int, spec: ModelSpec) -> None:
    """Refuse the first text whose token count (or its lower bound) exceeds the model's context."""
    if lengths is not None and lengths.max() > context:
        i = int(lengths.argmax())
        raise UserError(f"text {i} of {dataset.spec} has {bound}{lengths[i]} tokens, more than the context of model "
                        f"{spec} ({context}); pass --max-length {context} to cut longer texts")


@torch.no_grad()
def check_model_fits_data(model: nn.Module, dataset, device: torch.device, spec: ModelSpec, task: Task,
                          output_size: int) -> None:
    """Refuse, with one clear message, data the task cannot use, and a model that cannot take
    the data (a text longer than its context included) or does not give the task's output shape
    with `output_size` outputs."""
    context = getattr(model, "context", None)
    if context is not None:
        refuse_beyond_context(dataset.fewest_tokens, "at least ", dataset, context, spec)  # needs no tokenizing
        refuse_beyond_context(dataset.lengths, "", dataset, context, spec)
    task.check_data(dataset)
    batch = load_batch(dataset, range(min(2, len(dataset))))
    model.to(device).eval()
    try:
        out = logits_of(model(*batch.to(device).inputs))
    except (RuntimeError, IndexError) as e:
        raise UserError(f"model {spec} fails on inputs of shape {tuple(batch.inputs[0].shape[1:])} from "
                        f"{dataset.spec}: {str(e).splitlines()[0]}") from None
    mismatch = task.output_mismatch(tuple(out.shape), batch, output_size)
    if mismatch:
        raise UserError(f"model {spec} returns outputs of shape {tuple(out.shape)} on {dataset.spec}: {mismatch} "
                        f"for the {task} task")
