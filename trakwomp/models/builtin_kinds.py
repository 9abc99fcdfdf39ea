"""trakwomp's own model kinds: the built-in networks (resnet9, gpt), Hugging Face causal LMs in a
local folder (hf:DIR, with LoRA fine-tunes and peft adapter folders), and user factories
(package.module:factory)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from trakwomp.errors import UserError
from trakwomp.imports import import_object, is_object_spec
from trakwomp.models.huggingface import load_huggingface
from trakwomp.models.kinds import MODEL_KINDS, ModelKind
from trakwomp.models.lora import LoraSpec, base_fingerprint, check_base, read_adapter, with_adapter
from trakwomp.models.networks import GPT, GPT_DEFAULTS, resnet9
from trakwomp.models.spec import ModelSpec

GPT_LIMITS = {"width": 1 << 14, "layers": 1024}
RESNET9_MAX_WIDTH = 64.0
TRAINING_COPIES = 4  # weights, gradients and two optimizer moments


def within_memory(spec: ModelSpec, make: Callable[[], nn.Module]) -> nn.Module:
    """`make()`, once the same model built on the meta device (no memory) shows that
    TRAINING_COPIES float32 copies of its parameters fit in this machine's memory."""
    with torch.device("meta"):
        count = sum(p.numel() for p in make().parameters())
    need, memory = TRAINING_COPIES * 4 * count, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > memory:
        raise UserError(f"model {spec} has {count:,} parameters: {TRAINING_COPIES} float32 copies of them "
                        f"({need / 2**30:,.1f} GiB) do not fit in this machine's {memory / 2**30:,.1f} GiB")
    return make()


Parsed = TypeVar("Parsed")


def parsed(value: Parsed | None) -> Parsed:
    """A setting of a model spec that its kind's `parse` set (None only in a spec made otherwise)."""
    if value is None:
        raise ValueError("a model spec that its kind did not parse")
    return value


class ResNet9(ModelKind):
    name = usage = "resnet9"
    size_options = ("width",)

    def names(self, spec: str) -> bool:
        return spec == self.name

    def parse(self, spec, width, layers, heads, lora) -> ModelSpec:
        width = 1.0 if width is None else float(width)
        if not 0 < width <= RESNET9_MAX_WIDTH:
            raise UserError(f"resnet9 takes a `width` above 0 and up to {RESNET9_MAX_WIDTH}, got {width:g}")
        return ModelSpec(spec, width)

    def build(self, spec: ModelSpec, output_size: int) -> nn.Module:
        return within_memory(spec, lambda: resnet9(output_size, parsed(spec.width)))


class Gpt(ModelKind):
    name = usage = "gpt"
    size_options = ("width", "layers", "heads")

    def names(self, spec: str) -> bool:
        return spec == self.name

    def parse(self, spec, width, layers, heads, lora) -> ModelSpec:
        width = GPT_DEFAULTS["width"] if width is None else width
        layers = GPT_DEFAULTS["layers"] if layers is None else layers
        heads = GPT_DEFAULTS["heads"] if heads is None else heads
        if width != int(width) or width < 1 or layers < 1 or heads < 1 or int(width) % heads:
            raise UserError(f"gpt needs a whole `width` divisible by `heads` and at least 1 layer, got width {width:g}, "
                            f"{layers} layers, {heads} heads")
        if width > GPT_LIMITS["width"] or layers > GPT_LIMITS["layers"]:
            raise UserError(f"gpt takes `width` up to {GPT_LIMITS['width']} and `layers` up to {GPT_LIMITS['layers']}, "
                            f"got width {width:g}, {layers} layers")
        return ModelSpec("gpt", int(width), int(layers), int(heads))

    def record(self, spec: ModelSpec) -> dict:
        return {"name": spec.name, "width": spec.width, "layers": spec.layers, "heads": spec.heads}

    def describe(self, spec: ModelSpec) -> str:
        return f"gpt (width {spec.width}, {spec.layers} layers, {spec.heads} heads)"

    def build(self, spec: ModelSpec, output_size: int) -> nn.Module:
        return within_memory(spec, lambda: GPT(output_size, int(parsed(spec.width)), parsed(spec.layers),
                                               parsed(spec.heads)))


class HuggingFace(ModelKind):
    """`hf:DIR`: a model folder (with `lora`: a new LoRA fine-tune of it) or a peft adapter folder
    (its base and settings; its weights are then the checkpoint to featurize)."""

    name, usage = "hf", "hf:DIR"
    takes_lora = True

    def names(self, spec: str) -> bool:
        return spec.startswith("hf:") and len(spec) > 3

    def parse(self, spec, width, layers, heads, lora) -> ModelSpec:
        adapter = read_adapter(spec[3:])
        if adapter is not None and lora is not None:
            raise UserError(f"`lora` adds a new adapter to a base model; {spec[3:]!r} is an adapter already "
                            "(train with `model` hf:BASE, or featurize this adapter without `lora`)")
        if adapter is not None:
            folder, lora = adapter.base, adapter.lora
        elif lora is None:
            return ModelSpec(spec)
        else:
            folder = spec[3:]
        if not (Path(folder) / "config.json").is_file():
            raise UserError(f"`model` hf:{folder}: no Hugging Face model there (no config.json)")
        model_type = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type")
        return ModelSpec(f"hf:{folder}", lora=lora.resolved(model_type), base_sha256=base_fingerprint(folder),
                         adapter=adapter.folder if adapter else None)

    def record(self, spec: ModelSpec) -> dict:
        recorded = super().record(spec)
        if spec.lora is not None:
            recorded.update(lora=spec.lora.as_dict(), base_sha256=spec.base_sha256)
        return recorded

    def describe(self, spec: ModelSpec) -> str:
        lora: LoraSpec | None = spec.lora
        if lora is None:
            return super().describe(spec)
        return f"{spec.name} with LoRA (r {lora.r}, alpha {lora.alpha:g}, {', '.join(lora.targets or ())})"

    def build(self, spec: ModelSpec, output_size: int) -> nn.Module:
        net = load_huggingface(spec.name[3:]) if spec.lora is None else self._fine_tune(spec)
        return net

    @staticmethod
    def _fine_tune(spec: ModelSpec) -> nn.Module:
        check_base(spec.name[3:], spec.base_sha256)
        net = load_huggingface(spec.name[3:])
        with_adapter(net.model, parsed(spec.lora))
        return net


class Factory(ModelKind):
    """`package.module:factory`: a function of the number of outputs that returns an nn.Module."""

    name, usage = "factory", "package.module:factory"
    from_store = False
    fallback = True

    def names(self, spec: str) -> bool:
        return is_object_spec(spec)

    def parse(self, spec, width, layers, heads, lora) -> ModelSpec:
        return ModelSpec(spec)

    def build(self, spec: ModelSpec, output_size: int) -> nn.Module:
        model = import_object(spec.name, what="model")(output_size)
        if not isinstance(model, nn.Module):
            raise UserError(f"model factory {spec.name!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model


for _kind in (ResNet9, Gpt, HuggingFace, Factory):
    MODEL_KINDS.add(_kind.name, _kind)
