"""Per-example gradients of the TRAK output f (the correct-class margin) with torch.func.

For a model in eval mode and examples (x_i, y_i), returns the matrix whose row i is
grad_theta f(x_i) flattened over the selected parameters (in `named_parameters` order),
together with f(x_i) and q_i = 1 - p_i, where p_i = softmax(logits_i)[y_i] = sigmoid(f(x_i)).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from trakwomp.errors import UserError
from trakwomp.models import margins


def select_parameters(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """Names of the parameters matching any of the glob `patterns` (all parameters if None)."""
    names = [name for name, _ in model.named_parameters()]
    if not patterns:
        return names
    chosen = [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not chosen:
        raise UserError(f"no parameter matches {', '.join(patterns)}; parameters are named like {names[0]!r}")
    return chosen


def count_parameters(model: nn.Module, names: list[str]) -> int:
    """How many numbers the parameters `names` of `model` hold: the length p of a gradient."""
    chosen = set(names)
    return sum(p.numel() for n, p in model.named_parameters() if n in chosen)


@dataclass
class Gradients:
    grads: torch.Tensor  # (batch, p) float32, a transposed view of a contiguous (p, batch) tensor
    margins: torch.Tensor  # (batch,)
    q: torch.Tensor  # (batch,)


class PerExampleGradients:
    """Computes per-example gradients of the margin for batches, w.r.t. the chosen parameters only."""

    def __init__(self, model: nn.Module, parameter_names: list[str], device: torch.device):
        self.model = model.to(device).eval()
        chosen = set(parameter_names)
        self.parameter_names = [n for n, _ in model.named_parameters() if n in chosen]
        self.params = {n: p.detach() for n, p in model.named_parameters() if n in chosen}
        self.constants = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
        self.constants.update({n: b.detach() for n, b in model.named_buffers()})
        self.num_params = sum(p.numel() for p in self.params.values())
        self.device = device

        def margin(params, x, y):
            logits = functional_call(self.model, {**params, **self.constants}, (x.unsqueeze(0),))
            f = margins(logits, y.unsqueeze(0)).squeeze(0)
            return f, f

        self._grad = vmap(grad(margin, has_aux=True), in_dims=(None, 0, 0))

    def per_parameter(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({name: (batch, *shape) gradients}, margins) for a batch on the engine's device."""
        return self._grad(self.params, x.to(self.device), y.to(self.device))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Gradients:
        grads, f = self.per_parameter(x, y)
        # Stored parameter-major (p x batch): a sparse projection reads it as it is, a dense one
        # as a transposed operand, so no projection copies it again.
        columns = torch.cat([grads[n].reshape(len(x), -1).T for n in self.parameter_names], dim=0)
        return Gradients(columns.float().T, f.detach().float(), torch.sigmoid(-f.detach().float()))
