"""Model kinds: what a `--model` spec names, and how a model of that kind is checked, recorded,
described and built. `ModelSpec` asks its kind; nothing else asks which kind a model is.

The built-in kinds (resnet9, gpt, hf:DIR, package.module:factory) are in
`trakwomp.models.builtin_kinds`; another package adds one through the entry point group
`trakwomp.model_kinds` (trakwomp.registry): a `ModelKind` subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from torch import nn

from trakwomp.errors import UserError
from trakwomp.registry import Registry

if TYPE_CHECKING:
    from trakwomp.models.lora import LoraSpec
    from trakwomp.models.spec import ModelSpec


class ModelKind(ABC):
    """A kind of model. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]  # its name in the registry
    usage: ClassVar[str]  # the spec as help shows it: "resnet9", "hf:DIR"
    size_options: ClassVar[tuple[str, ...]] = ()  # which of --width, --layers, --heads it takes
    takes_lora: ClassVar[bool] = False  # whether --lora fine-tunes it
    from_store: ClassVar[bool] = True  # rebuilt from a store's record; False: user code, imported only when named
    fallback: ClassVar[bool] = False  # asked last (a spec that no other kind names)

    @abstractmethod
    def names(self, spec: str) -> bool:
        """Whether `spec` names a model of this kind."""

    @abstractmethod
    def parse(self, spec: str, width: float | None, layers: int | None, heads: int | None,
              lora: LoraSpec | None) -> ModelSpec:
        """The model `spec` names, with its size options checked."""

    def record(self, spec: ModelSpec) -> dict:
        """What a store records of the model (its `name` and `width` at least)."""
        return {"name": spec.name, "width": spec.width}

    def describe(self, spec: ModelSpec) -> str:
        return spec.name if spec.width is None else f"{spec.name} (width {spec.width:g})"

    @abstractmethod
    def build(self, spec: ModelSpec, output_size: int) -> nn.Module:
        """A freshly initialised model with `output_size` outputs (parameters from torch's global generator)."""


MODEL_KINDS: Registry[ModelKind] = Registry("trakwomp.model_kinds", "model kind", lambda cls: cls(),
                                            builtins=("trakwomp.models.builtin_kinds",))


def kind_of(spec: str) -> ModelKind:
    """The kind a model spec names; none is refused naming the kinds' usages."""
    kinds = sorted((kind for _, kind in MODEL_KINDS.items()), key=lambda kind: kind.fallback)
    for kind in kinds:
        if kind.names(spec):
            return kind
    raise UserError(f"malformed model spec {spec!r}: expected one of {', '.join(k.usage for k in kinds)}")
