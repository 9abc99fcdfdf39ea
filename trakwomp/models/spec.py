"""Model specs: a built-in network with its size, a Hugging Face folder, or a user factory
`package.module:factory`; and the check that a model suits the data and the task.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from trakwomp.data.base import Dataset, TokenizedTexts, load_batch
from trakwomp.errors import UserError
from trakwomp.models.kinds import ModelKind, kind_of
from trakwomp.models.lora import LoraSpec, trainable_state
from trakwomp.store.records import ModelRecord
from trakwomp.tasks.base import Task, logits_of

@dataclass(frozen=True)
class ModelSpec:
    """A model as its spec names it: its kind's name, its size (resnet9: width multiplier; gpt:
    width, layers, heads), for a LoRA fine-tune of a Hugging Face model its `lora` settings and
    the base's fingerprint (`adapter`: the peft adapter folder it was read from, whose weights are
    a checkpoint). What a spec means, how it is recorded, described and built is its kind's
    (`trakwomp.models.kinds`)."""

    name: str
    width: float | None = None
    layers: int | None = None
    heads: int | None = None
    lora: LoraSpec | None = None
    base_sha256: str | None = None
    adapter: str | None = field(default=None, compare=False)

    @property
    def kind(self) -> ModelKind:
        return kind_of(self.name)

    @classmethod
    def parse(cls, spec: str, width: float | None = None, layers: int | None = None,
              heads: int | None = None, lora: LoraSpec | None = None) -> "ModelSpec":
        """The model `spec` names, with the size options and LoRA settings its kind takes."""
        kind = kind_of(spec)
        if (layers is not None and "layers" not in kind.size_options) or \
                (heads is not None and "heads" not in kind.size_options):
            raise UserError(f"`layers` and `heads` apply to the built-in gpt only, not to {spec!r}")
        if lora is not None and not kind.takes_lora:
            raise UserError(f"`lora` fine-tunes a Hugging Face model (`model` hf:DIR), not {spec!r}")
        if width is not None and "width" not in kind.size_options:
            raise UserError(f"`width` applies to the built-in models only, not to {spec!r}")
        return kind.parse(spec, width, layers, heads, lora)

    def as_dict(self) -> dict:
        """What a store records of the model (its kind's record)."""
        return self.kind.record(self)

    @classmethod
    def of_store(cls, recorded: ModelRecord, location: str) -> "ModelSpec":
        """The model a store records. A user factory is refused: trakwomp imports code only when
        the user names it (--model), never because a store names it (a Hugging Face folder is
        read as data: config and weights, no code)."""
        if not kind_of(recorded.name).from_store:
            raise UserError(f"store {location!r} was made with the model {recorded.name!r}; trakwomp imports "
                            f"code only when you name it: pass `model` {recorded.name}")
        lora = LoraSpec.of_store(recorded.lora) if recorded.lora else None
        return cls(recorded.name, recorded.width, recorded.layers, recorded.heads, lora, recorded.base_sha256)

    def __str__(self) -> str:
        return self.kind.describe(self)

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
        return self.kind.build(self, output_size)


def refuse_beyond_context(lengths: np.ndarray | None, bound: str, dataset: Dataset, context: int,
                          spec: ModelSpec) -> None:
    """Refuse the first text whose token count (or its lower bound) exceeds the model's context."""
    if lengths is not None and lengths.max() > context:
        i = int(lengths.argmax())
        raise UserError(f"text {i} of {dataset.spec} has {bound}{lengths[i]} tokens, more than the context of model "
                        f"{spec} ({context}); pass `max_length` {context} to cut longer texts")


@torch.no_grad()
def check_model_fits_data(model: nn.Module, dataset: Dataset, device: torch.device, spec: ModelSpec, task: Task,
                          output_size: int) -> None:
    """Refuse, with one clear message, data the task cannot use, and a model that cannot take
    the data (a text longer than its context included) or does not give the task's output shape
    with `output_size` outputs."""
    context = getattr(model, "context", None)
    if context is not None and isinstance(dataset, TokenizedTexts):  # (a model that reads tokens, on texts)
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
