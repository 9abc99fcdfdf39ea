"""Factored per-layer projections (LoGra-style): projected gradients without per-example gradients.

A layer is a weight W seen as a matrix of R rows and C columns (its shape[0] by the rest, as
stored: nn.Linear out x in, nn.Conv2d out x (in kh kw), nn.Embedding vocabulary x width, Hugging
Face GPT-2 Conv1D in x out). One example's gradient of it is a sum over the example's positions
t (tokens, pixels of a convolution's output, or the one position of a flat input):

    dW = sum_t u_t v_t^T,   Linear / Conv2d: u = g_t (gradient at the output), v = a_t (input or patch)
                            Conv1D:          u = a_t,                         v = g_t
                            Embedding:       u = e(token_t) (one-hot),          v = g_t

so its projection by P_R (R x k_R) and P_C (C x k_C) is

    P_R^T dW P_C = sum_t (P_R^T u_t)(P_C^T v_t)^T,

a k_R x k_C block computed from forward and backward hooks on one ordinary batched backward pass
of sum_i f(x_i) (example i's f depends only on example i's activations, so the gradient at its
activations is that of f(x_i)). Flattened row by row it equals (P_R kron P_C)^T vec(dW): the
Kronecker-product projection of the true per-example gradient, never built. A layer's bias rides
along as one more column of ones (one more row for Conv1D, whose bias sits on its C side); a
weight shared by two modules (GPT-2's tied embedding and output layer) gets the sum of both
modules' terms, as its gradient does. Parameters of other modules (layer and batch norms, grouped
convolutions) are left out; `featurize` says how many.

Each side with more than k = sqrt(block dim) coordinates is projected by Gaussian entries
N(0, 1/k) (so E <P^T x, P^T y> = <x, y>); a side with at most k coordinates is kept exactly.
Side s (0: rows, 1: columns) of layer `name` of model m is generated from SeedSequence([seed, m,
sha256(name), s]) alone: regenerable anywhere, and a layer's features do not depend on which
other layers are featurized. Each layer is one block of the store's features: eq. 3's block
inverses become per-layer inverses (blocks of k_R x k_C dims, k x k for layers wider than k on
both sides).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trakwomp.data.base import Batch
from trakwomp.errors import UserError
from trakwomp.features.base import BatchFeatures, GradientEngine
from trakwomp.features.layer_rules import LINEAR, LayerRule, rule_of
from trakwomp.features.projectors import side_dim
from trakwomp.runtime import torch_seed
from trakwomp.tasks.base import Task


@dataclass(frozen=True)
class FactoredLayer:
    """A weight (named as in `named_parameters`) and its bias, as an R x C matrix projected to
    rank_rows x rank_cols features."""

    name: str
    bias: str | None
    rows: int
    cols: int
    rank_rows: int
    rank_cols: int

    @property
    def width(self) -> int:
        return self.rank_rows * self.rank_cols

    def as_dict(self) -> dict:
        return asdict(self)


def weight_modules(model: nn.Module) -> list[tuple[nn.Module, LayerRule, str, str | None]]:
    """(module, its rule, weight name, bias name or None) of every module a factored rule applies
    to, parameters named as `named_parameters` names them (a tied weight by its first name)."""
    name_of: dict[int, str] = {}
    for name, p in model.named_parameters():
        name_of.setdefault(id(p), name)
    found = []
    for module in model.modules():
        rule = rule_of(module)
        weight, bias = rule.weight_and_bias(module) if rule else (None, None)
        if rule and id(weight) in name_of:
            found.append((module, rule, name_of[id(weight)], name_of.get(id(bias))))
    return found


def factored_layers(model: nn.Module, parameter_names: list[str], block_dim: int) -> list[FactoredLayer]:
    """The layers of `model` whose weights are among `parameter_names`, in parameter order, each
    with its bias if that is chosen too."""
    k = side_dim(block_dim)
    chosen = set(parameter_names)
    found: dict[str, FactoredLayer] = {}
    for module, rule, weight, bias in weight_modules(model):
        if weight not in chosen:
            continue
        bias = bias if bias in chosen else None
        rows, cols = rule.shape(module, bias is not None)
        layer = FactoredLayer(weight, bias, rows, cols, min(rows, k), min(cols, k))
        if found.setdefault(weight, layer) != layer:
            raise UserError(f"the weight {weight} is shared by modules with different biases, which factored "
                            "projections do not support; use `projector` sjlt")
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return sorted(found.values(), key=lambda layer: order[layer.name])


def covered_parameters(layers: list[FactoredLayer]) -> list[str]:
    return [name for layer in layers for name in (layer.name, layer.bias) if name]


def side_projection(seed: int, model_id: int, layer: str, side: int, size: int, rank: int) -> torch.Tensor:
    """P for one side of one layer (size x rank, float32 on CPU): the identity when rank == size,
    else Gaussian entries N(0, 1/rank) drawn from SeedSequence([seed, model_id, sha256(layer), side])."""
    if rank == size:
        return torch.eye(size)
    name_hash = int.from_bytes(hashlib.sha256(layer.encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(torch_seed(seed, model_id, name_hash, side))
    return torch.randn(size, rank, generator=generator).div_(math.sqrt(rank))


ORIGINAL_LINEAR = F.linear
VERIFY_EXAMPLES = 2  # examples of the first batch whose factored features are checked against autograd
VERIFY_TOLERANCE = 1e-3  # relative error, far above float32 rounding, far below a missing term


def sequence_first(x: torch.Tensor, batch_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Inside nn.MultiheadAttention, torch lays the in-projection's input out as (T, batch, E) and
    the out-projection's as (T * batch, E): a function that puts the example axis first."""
    if x.ndim == 3:
        return lambda t: t.transpose(0, 1)
    return lambda t: t.reshape(-1, batch_size, t.shape[-1]).transpose(0, 1)


@dataclass
class LayerCall:
    """One use of a layer's weight in the forward pass: its input, its output (whose gradient is
    taken), the versions both had then, and, for a use inside nn.MultiheadAttention, the rows of
    the weight it used and the function that puts the example axis first."""

    module: nn.Module
    rule: LayerRule
    index: int
    inputs: torch.Tensor
    output: torch.Tensor
    rows: tuple[int, int] | None = None
    with_bias: bool = True
    arrange: Callable[[torch.Tensor], torch.Tensor] = lambda t: t

    def __post_init__(self):
        self.versions = (self.output._version, self.inputs._version)


class FactoredFeatures(GradientEngine):
    """Projected gradients phi(x) = (P_R kron P_C)^T vec(dW) per layer, for batches, from one
    batched forward and backward pass with hooks (no weight gradient is computed).

    Hooks see a layer's input and output only. nn.MultiheadAttention uses its in-projection and
    its out_proj's weight through F.linear inside its own forward: while it runs, F.linear is
    replaced by one that records each use of a covered weight (a row slice of the packed
    in-projection for q, k and v), with the sequence-first layout torch uses there. A weight used
    elsewhere outside its module's forward (a head tied by F.linear(h, embedding.weight)) or a
    gradient the module changes (Embedding(scale_grad_by_freq=True)) would go missing: on the first
    batch, each layer's features of the first examples are checked against P_R^T dW P_C of the
    example's own gradient (autograd on the example alone), and a layer that differs is refused by
    name. An output changed in place after its layer (ReLU(inplace=True)) is handled by handing
    the next module a copy from then on; an input changed in place after its layer is refused."""

    def __init__(self, model: nn.Module, layers: list[FactoredLayer], seed: int, model_id: int,
                 device: torch.device, task: Task):
        self.model, self.task, self.device, self.layers = model.to(device).eval(), task, device, layers
        self.dims = sum(layer.width for layer in layers)
        index = {layer.name: i for i, layer in enumerate(layers)}
        self.modules: dict[nn.Module, tuple[LayerRule, int]] = {}  # module -> (its rule, layer index)
        self.weights = {}  # id of a covered weight -> (its module, layer index)
        for module, rule, weight, _bias in weight_modules(self.model):
            if weight in index:
                self.modules[module] = (rule, index[weight])
                tensor = rule.weight_and_bias(module)[0]
                tensor.requires_grad_(True)  # the graph must reach every hooked output
                self.weights[id(tensor)] = (module, index[weight])
        self.rules = {i: rule for rule, i in self.modules.values()}
        self.projections = [
            tuple(side_projection(seed, model_id, layer.name, side, size, rank).to(device)
                  for side, (size, rank) in enumerate(((layer.rows, layer.rank_rows), (layer.cols, layer.rank_cols))))
            for layer in layers]
        self.offsets = np.cumsum([0] + [layer.width for layer in layers])
        self.copy_outputs, self.verified = False, False

    def __call__(self, batch: Batch) -> BatchFeatures:
        """The batch's features; an engine not checked yet (`check`) checks the first
        VERIFY_EXAMPLES rows of its first batch."""
        batch = batch.to(self.device)
        out = self._copying_if_needed(batch)
        if not self.verified:
            self._verify(batch, out.rows, range(min(VERIFY_EXAMPLES, len(batch))))
        return out

    def check(self, batch: Batch) -> None:
        """Every row of `batch` (a probe of the data: its longest and shortest texts, the one that
        repeats a token most) against the projection of its own autograd gradient."""
        batch = batch.to(self.device)
        self._verify(batch, self._copying_if_needed(batch).rows, range(len(batch)))

    def _copying_if_needed(self, batch: Batch) -> BatchFeatures:
        out = self._features(batch)
        if out is None:  # an output was changed in place after its layer: hand on copies from now on
            self.copy_outputs = True
            out = self._features(batch)
        if out is None:
            raise RuntimeError("a layer's output changed in place although copies were handed on")
        return out

    def _features(self, batch: Batch) -> BatchFeatures | None:
        """The batch's features, or None if a layer's output was changed in place (and not copied)."""
        passes = self._forward_backward(batch)
        if passes is None:
            return None
        f, calls, backward = passes
        features = torch.zeros(len(batch), self.dims, device=self.device)
        for rows, examples, grads in backward:
            for call, g in zip(calls, grads, strict=True):
                if g is not None:
                    block = slice(self.offsets[call.index], self.offsets[call.index + 1])
                    features[rows, block] += self._call_features(call, g, examples, len(batch.inputs[0]))
        f = f.detach().float()
        return BatchFeatures(features, f, self.task.q(f, batch))

    def _call_features(self, call: LayerCall, g: torch.Tensor, examples: torch.Tensor | slice,
                       batch_size: int) -> torch.Tensor:
        """The features (its layer's block) that one use of a layer gives the rows computed from
        `examples` (their inputs' positions in the batch)."""
        g, inputs = call.arrange(g), call.arrange(call.inputs)
        if g.shape[0] != batch_size:
            raise UserError(f"a {type(call.module).__name__} layer runs on inputs shared by the whole batch, "
                            "which a factored projection cannot split by example; use `projector` sjlt")
        p_rows, p_cols = self.projections[call.index]
        if call.rows is not None:
            p_rows = p_rows[call.rows[0]:call.rows[1]]
        u, v = call.rule.factors(call.module, inputs[examples], g[examples], p_rows, p_cols, call.with_bias)
        return torch.bmm(u.transpose(1, 2), v).flatten(1)

    def _forward_backward(self, batch: Batch):
        """(f, the calls, [(rows, their inputs, the gradient at each call's output)]) from one forward
        pass with hooks and a backward pass per group of rows (`Batch.backward_groups`), or None if
        an output was changed in place after its layer; an input changed so is refused."""
        calls: list[LayerCall] = []

        def record(module, args, output):
            rule, i = self.modules[module]
            calls.append(LayerCall(module, rule, i, args[0], output, with_bias=getattr(module, "bias", None) is not None))
            return output.clone() if self.copy_outputs else None

        hooks = [module.register_forward_hook(record) for module, (rule, _) in self.modules.items()
                 if not rule.uses_linear_inside]
        hooks += [module.register_forward_pre_hook(self._per_example_ids(len(batch.inputs[0])))
                  for module, (rule, _) in self.modules.items() if rule.per_example_ids]
        hooks += self._attention_hooks(calls, len(batch.inputs[0]))
        try:
            with torch.enable_grad():
                f = self.task.outputs(self.model(*batch.inputs), batch)
                if any(call.output._version != call.versions[0] for call in calls):
                    return None
                for call in calls:
                    if call.inputs._version != call.versions[1]:
                        raise UserError(f"the input of layer {self.layers[call.index].name} is changed in place "
                                        "after the layer, so hooks cannot read its gradient; use `projector` sjlt "
                                        "for this model")
                groups = batch.backward_groups()
                backward = [(rows, examples, torch.autograd.grad(f[rows].sum(), [call.output for call in calls],
                                                                 allow_unused=True, retain_graph=k < len(groups) - 1))
                            for k, (rows, examples) in enumerate(groups)]
        finally:
            for hook in hooks:
                hook.remove()
            F.linear = ORIGINAL_LINEAR
        return f, calls, backward

    @staticmethod
    def _per_example_ids(batch_size: int):
        def per_example_ids(module, args):
            """Ids shared by the whole batch (positions: (T,) or (1, T)), repeated for each example,
            so that the embedding's output, and the gradient there, is per example."""
            ids = args[0]
            if ids.ndim == 1 or (ids.shape[0] == 1 and batch_size > 1):
                return (ids.expand(batch_size, ids.shape[-1]), *args[1:])
            return None

        return per_example_ids

    def _attention_hooks(self, calls: list[LayerCall], batch_size: int) -> list:
        """Hooks that, while a covered nn.MultiheadAttention runs, record its weights' F.linear uses."""
        def recording_linear(x, weight, bias=None):
            out = ORIGINAL_LINEAR(x, weight, bias)
            base = weight if weight._base is None else weight._base
            if id(base) not in self.weights:
                return out
            module, i = self.weights[id(base)]
            start = (weight.data_ptr() - base.data_ptr()) // (base.stride(0) * base.element_size())
            with_bias = bias is not None and self.layers[i].bias is not None
            calls.append(LayerCall(module, LINEAR, i, x, out, (start, start + weight.shape[0]), with_bias,
                                   sequence_first(x, batch_size)))
            return out.clone() if self.copy_outputs else out

        def enter(module, args):
            F.linear = recording_linear

        def leave(module, args, output):
            F.linear = ORIGINAL_LINEAR

        attention = [module for module, (rule, _) in self.modules.items() if rule.uses_linear_inside]
        return [hook for module in attention for hook in (module.register_forward_pre_hook(enter),
                                                          module.register_forward_hook(leave))]

    def _verify(self, batch: Batch, features: torch.Tensor, rows: range) -> None:
        """Each layer's features of the examples `rows` against P_R^T dW P_C of the example's own
        gradient, taken by autograd on the example alone; a layer that differs by more than
        VERIFY_TOLERANCE (relative), or whose features or gradient are not finite, is refused by
        name."""
        parameters = dict(self.model.named_parameters())
        chosen = [name for layer in self.layers for name in (layer.name, layer.bias) if name]
        for row in rows:
            one = batch.rows(row, row + 1)
            with torch.enable_grad():
                f = self.task.outputs(self.model(*one.inputs), one).sum()
                grads = torch.autograd.grad(f, [parameters[n] for n in chosen], allow_unused=True)
            grads = {n: torch.zeros_like(parameters[n]) if g is None else g for n, g in zip(chosen, grads, strict=True)}
            expected = torch.cat([self._projected(i, layer, grads) for i, layer in enumerate(self.layers)])
            floor = 1e-6 * float(expected.norm())
            for i, layer in enumerate(self.layers):
                got, want = features[row, self.offsets[i]:self.offsets[i + 1]], expected[self.offsets[i]:self.offsets[i + 1]]
                if not (torch.isfinite(got).all() and torch.isfinite(want).all()):
                    raise UserError(f"layer {layer.name}: its gradient or its factored features are not finite for "
                                    "an example it checks (NaN or inf in the model's output)")
                error = float((got - want).norm()) / max(float(want.norm()), floor, 1e-30)
                if not error <= VERIFY_TOLERANCE:
                    raise UserError(f"layer {layer.name}: its factored features differ from the projection of its "
                                    f"per-example gradient (relative error {error:.2g}): the weight is used outside "
                                    "the layer's forward (a weight tied by F.linear; an nn.MultiheadAttention with "
                                    "kdim, vdim, bias_k or add_zero_attn), or the layer changes its gradient "
                                    "(Embedding(scale_grad_by_freq)); use `projector` sjlt for this model")
        self.verified = True

    def _projected(self, i: int, layer: FactoredLayer, grads: dict) -> torch.Tensor:
        """P_R^T dW P_C of one example's gradient, flattened: dW as R x C with the bias as one more
        column (one more row for Conv1D, whose bias sits on its C side)."""
        dw = grads[layer.name].reshape(len(grads[layer.name]), -1)
        if layer.bias is not None:
            bias = grads[layer.bias].reshape(-1)
            dw = torch.cat([dw, bias[None, :]]) if self.rules[i].bias_on_rows else torch.cat([dw, bias[:, None]], 1)
        p_rows, p_cols = self.projections[i]
        return (p_rows.T @ dw.float() @ p_cols).flatten()
