"""Per-example gradients of the task's output f with torch.func.

For a model in eval mode and a batch of examples z_i, returns the matrix whose row i is
grad_theta f(z_i) flattened over the selected parameters (in `named_parameters` order),
together with f(z_i) and the task's weight q_i.
Each example is mapped on its own (vmap), so its padding is its own: a text's gradient is that
of its real tokens only.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from trakwomp.data.base import Batch, TokenBatch
from trakwomp.errors import UserError
from trakwomp.features.base import BatchFeatures
from trakwomp.tasks.base import Task


def select_parameters(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """Names of the parameters matching any of the glob `patterns`; if None, the trainable ones
    (all of an ordinary model's; a LoRA fine-tune's adapter weights)."""
    names = [name for name, _ in model.named_parameters()]
    if not patterns:
        return [name for name, p in model.named_parameters() if p.requires_grad]
    chosen = [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not chosen:
        raise UserError(f"no parameter matches {', '.join(patterns)}; parameters are named like {names[0]!r}")
    return chosen


def count_parameters(model: nn.Module, names: list[str]) -> int:
    """How many numbers the parameters `names` of `model` hold: the length p of a gradient."""
    chosen = set(names)
    return sum(p.numel() for n, p in model.named_parameters() if n in chosen)


class PerExampleGradients:
    """Computes per-example gradients of the task's output for batches, w.r.t. the chosen parameters only."""

    def __init__(self, model: nn.Module, parameter_names: list[str], device: torch.device, task: Task):
        self.model = model.to(device).eval()
        chosen = set(parameter_names)
        self.parameter_names = [n for n, _ in model.named_parameters() if n in chosen]
        self.params = {n: p.detach() for n, p in model.named_parameters() if n in chosen}
        self.constants = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
        self.constants.update({n: b.detach() for n, b in model.named_buffers()})
        self.num_params = sum(p.numel() for p in self.params.values())
        self.device, self.task = device, task

        def output(params, tensors, parts):
            one = Batch.of_tensors(tuple(t.unsqueeze(0) for t in tensors), parts)
            f = task.outputs(functional_call(self.model, {**params, **self.constants}, one.inputs), one).squeeze(0)
            return f, f

        def token_output(params, tensors, parts, positions):
            one = Batch.of_tensors(tuple(t.unsqueeze(0) for t in tensors), parts)
            f = task.token_outputs(functional_call(self.model, {**params, **self.constants}, one.inputs), one,
                                   torch.zeros_like(positions), positions)
            return f, f

        self._grad = vmap(grad(output, has_aux=True), in_dims=(None, 0, None))
        self._token_jacobian = jacrev(token_output, has_aux=True)  # one forward pass, a backward per token

    def per_parameter(self, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({name: (batch, *shape) gradients}, outputs f) for a batch on the engine's device."""
        batch = batch.to(self.device)
        if isinstance(batch, TokenBatch):
            return self.per_token(batch)
        return self._grad(self.params, batch.tensors, batch.parts)

    def per_token(self, batch: TokenBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The same for a token batch: text by text, the jacobian of its tokens' f (one forward
        pass of the text, a backward pass per token), placed at the tokens' rows."""
        grads = {n: torch.empty(len(batch), *p.shape, device=self.device) for n, p in self.params.items()}
        f = torch.empty(len(batch), device=self.device)
        for text, rows in enumerate(batch.text_rows()):
            one = Batch(tuple(t[text:text + 1] for t in batch.inputs), batch.labels[:1],
                        None if batch.predicted is None else batch.predicted[text:text + 1])
            jacobian, f[rows] = self._token_jacobian(self.params, tuple(t[0] for t in one.tensors), one.parts,
                                                     batch.tokens[rows, 1])
            for name, value in jacobian.items():
                grads[name][rows] = value
        return grads, f

    def __call__(self, batch: Batch) -> BatchFeatures:
        """Rows: (batch, p) float32 gradients, a transposed view of a contiguous (p, batch) tensor
        (parameter-major: a sparse projection reads it as it is, a dense one as a transposed
        operand, so no projection copies it again)."""
        batch = batch.to(self.device)
        grads, f = self.per_parameter(batch)
        columns = torch.cat([grads[n].reshape(len(batch), -1).T for n in self.parameter_names], dim=0)
        f = f.detach().float()
        return BatchFeatures(columns.float().T, f, self.task.q(f, batch))
