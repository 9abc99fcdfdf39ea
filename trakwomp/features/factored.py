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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trakwomp.data.base import Batch
from trakwomp.errors import UserError
from trakwomp.features.base import BatchFeatures, GradientEngine
from trakwomp.features.projectors import side_dim
from trakwomp.tasks.base import Task


def module_kind(module: nn.Module) -> str | None:
    """Which factored rule applies to `module`, or None if its parameters are left out."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        return "conv2d"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(module.weight, nn.Parameter):
        return "conv1d"  # transformers.pytorch_utils.Conv1D (GPT-2): y = x W + b, W in x out
    return None


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


def _shape(kind: str, module: nn.Module, with_bias: bool) -> tuple[int, int]:
    rows, cols = module.weight.shape[0], module.weight[0].numel()
    if with_bias and kind == "conv1d":
        return rows + 1, cols
    return rows, cols + int(with_bias)


def weight_modules(model: nn.Module) -> list[tuple[nn.Module, str, str, str | None]]:
    """(module, kind, weight name, bias name or None) of every module a factored rule applies to,
    parameters named as `named_parameters` names them (a tied weight by its first name)."""
    name_of: dict[int, str] = {}
    for name, p in model.named_parameters():
        name_of.setdefault(id(p), name)
    found = []
    for module in model.modules():
        kind = module_kind(module)
        if kind and id(module.weight) in name_of:
            found.append((module, kind, name_of[id(module.weight)], name_of.get(id(getattr(module, "bias", None)))))
    return found


def factored_layers(model: nn.Module, parameter_names: list[str], block_dim: int) -> list[FactoredLayer]:
    """The layers of `model` whose weights are among `parameter_names`, in parameter order, each
    with its bias if that is chosen too."""
    k = side_dim(block_dim)
    chosen = set(parameter_names)
    found: dict[str, FactoredLayer] = {}
    for module, kind, weight, bias in weight_modules(model):
        if weight not in chosen:
            continue
        bias = bias if bias in chosen else None
        rows, cols = _shape(kind, module, bias is not None)
        layer = FactoredLayer(weight, bias, rows, cols, min(rows, k), min(cols, k))
        if found.setdefault(weight, layer) != layer:
            raise UserError(f"the weight {weight} is shared by modules with different biases, which factored "
                            "projections do not support; use --projector sjlt")
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
    state = np.random.SeedSequence([seed, model_id, name_hash, side]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state >> np.uint64(1)))
    return torch.randn(size, rank, generator=generator).div_(math.sqrt(rank))


VERIFY_EXAMPLES = 2  # examples of the first batch whose factored features are checked against autograd
VERIFY_TOLERANCE = 1e-3  # relative error, far above float32 rounding, far below a missing term


class FactoredFeatures(GradientEngine):
    """Projected gradients phi(x) = (P_R kron P_C)^T vec(dW) per layer, for batches, from one
    batched forward and backward pass with hooks (no weight gradient is computed).

    Hooks see a layer's input and output only, so a weight used outside its module's forward
    (nn.MultiheadAttention's out_proj, a head tied by F.linear(h, embedding.weight)) or a gradient
    the module changes (Embedding(scale_grad_by_freq=True)) would go missing: on the first batch,
    each layer's features of the first examples are checked against P_R^T dW P_C of the example's
    own gradient (autograd on the example alone), and a layer that differs is refused by name.
    An output changed in place after its layer (ReLU(inplace=True)) is handled by handing the next
    module a copy from then on; an input changed in place after its layer is refused."""

    def __init__(self, model: nn.Module, layers: list[FactoredLayer], seed: int, model_id: int,
                 device: torch.device, task: Task):
        self.model, self.task, self.device, self.layers = model.to(device).eval(), task, device, layers
        self.dims = sum(layer.width for layer in layers)
        index = {layer.name: i for i, layer in enumerate(layers)}
        self.modules = {}  # module -> (kind, layer index)
        for module, kind, weight, _ in weight_modules(self.model):
            if weight in index:
                self.modules[module] = (kind, index[weight])
                module.weight.requires_grad_(True)  # the graph must reach every hooked output
        self.kinds = {i: kind for kind, i in self.modules.values()}
        self.projections = [
            tuple(side_projection(seed, model_id, layer.name, side, size, rank).to(device)
                  for side, (size, rank) in enumerate(((layer.rows, layer.rank_rows), (layer.cols, layer.rank_cols))))
            for layer in layers]
        self.offsets = np.cumsum([0] + [layer.width for layer in layers])
        self.copy_outputs, self.verified = False, False

    def __call__(self, batch: Batch) -> BatchFeatures:
        batch = batch.to(self.device)
        out = self._features(batch)
        if out is None:  # an output was changed in place after its layer: hand on copies from now on
            self.copy_outputs = True
            out = self._features(batch)
        if not self.verified:
            self._verify(batch, out.rows)
            self.verified = True
        return out

    def _features(self, batch: Batch) -> BatchFeatures | None:
        """The batch's features, or None if a layer's output was changed in place (and not copied)."""
        calls = self._forward_backward(batch)
        if calls is None:
            return None
        f, calls = calls
        features = torch.zeros(len(batch), self.dims, device=self.device)
        for module, inputs, g in calls:
            if g is None:
                continue
            if g.shape[0] != len(batch):
                raise UserError(f"a {type(module).__name__} layer runs on inputs shared by the whole batch, which a "
                                "factored projection cannot split by example; use --projector sjlt")
            kind, i = self.modules[module]
            u, v = self._factors(kind, module, inputs, g, *self.projections[i])
            features[:, self.offsets[i]:self.offsets[i + 1]] += torch.bmm(u.transpose(1, 2), v).flatten(1)
        f = f.detach().float()
        return BatchFeatures(features, f, self.task.weights(f, batch))

    def _forward_backward(self, batch: Batch):
        """(f, [(module, its input, the gradient at its output)]) from one pass with hooks, or None
        if an output was changed in place after its layer; an input changed so is refused."""
        calls = []

        def record(module, args, output):
            calls.append((module, args[0], output, output._version, args[0]._version))
            return output.clone() if self.copy_outputs else None

        def per_example_ids(module, args):
            """Ids shared by the whole batch (positions: (T,) or (1, T)), repeated for each example,
            so that the embedding's output, and the gradient there, is per example."""
            ids = args[0]
            if ids.ndim == 1 or (ids.shape[0] == 1 and len(batch) > 1):
                return (ids.expand(len(batch), ids.shape[-1]), *args[1:])
            return None

        hooks = [module.register_forward_hook(record) for module in self.modules]
        hooks += [module.register_forward_pre_hook(per_example_ids) for module, (kind, _) in self.modules.items()
                  if kind == "embedding"]
        try:
            with torch.enable_grad():
                f = self.task.outputs(self.model(*batch.inputs), batch)
                if any(output._version != version for _, _, output, version, _ in calls):
                    return None
                for module, inputs, _, _, version in calls:
                    if inputs._version != version:
                        raise UserError(f"the input of layer {self.layers[self.modules[module][1]].name} is changed "
                                        "in place after the layer, so hooks cannot read its gradient; use "
                                        "--projector sjlt for this model")
                grads = torch.autograd.grad(f.sum(), [output for _, _, output, _, _ in calls], allow_unused=True)
        finally:
            for hook in hooks:
                hook.remove()
        return f, [(module, inputs, g) for (module, inputs, _, _, _), g in zip(calls, grads)]

    def _verify(self, batch: Batch, features: torch.Tensor) -> None:
        """Each layer's features of the first VERIFY_EXAMPLES examples against P_R^T dW P_C of the
        example's own gradient, taken by autograd on the example alone; a layer that differs by
        more than VERIFY_TOLERANCE (relative) is refused by name."""
        parameters = dict(self.model.named_parameters())
        chosen = [name for layer in self.layers for name in (layer.name, layer.bias) if name]
        for row in range(min(VERIFY_EXAMPLES, len(batch))):
            one = Batch(tuple(t[row:row + 1] for t in batch.inputs), batch.labels[row:row + 1])
            with torch.enable_grad():
                f = self.task.outputs(self.model(*one.inputs), one).sum()
                grads = torch.autograd.grad(f, [parameters[n] for n in chosen], allow_unused=True)
            grads = {n: torch.zeros_like(parameters[n]) if g is None else g for n, g in zip(chosen, grads)}
            expected = torch.cat([self._projected(i, layer, grads) for i, layer in enumerate(self.layers)])
            floor = 1e-6 * float(expected.norm())
            for i, layer in enumerate(self.layers):
                got, want = features[row, self.offsets[i]:self.offsets[i + 1]], expected[self.offsets[i]:self.offsets[i + 1]]
                error = float((got - want).norm()) / max(float(want.norm()), floor, 1e-30)
                if error > VERIFY_TOLERANCE:
                    raise UserError(f"layer {layer.name}: its factored features differ from the projection of its "
                                    f"per-example gradient (relative error {error:.2g}): the weight is used outside "
                                    "the layer's forward (nn.MultiheadAttention's out_proj, a weight tied by "
                                    "F.linear), or the layer changes its gradient (Embedding(scale_grad_by_freq)); "
                                    "use --projector sjlt for this model")

    def _projected(self, i: int, layer: FactoredLayer, grads: dict) -> torch.Tensor:
        """P_R^T dW P_C of one example's gradient, flattened: dW as R x C with the bias as one more
        column (one more row for Conv1D, whose bias sits on its C side)."""
        dw = grads[layer.name].reshape(len(grads[layer.name]), -1)
        if layer.bias is not None:
            bias = grads[layer.bias].reshape(-1)
            dw = torch.cat([dw, bias[None, :]]) if self.kinds[i] == "conv1d" else torch.cat([dw, bias[:, None]], 1)
        p_rows, p_cols = self.projections[i]
        return (p_rows.T @ dw.float() @ p_cols).flatten()

    @staticmethod
    def _factors(kind: str, module: nn.Module, a: torch.Tensor, g: torch.Tensor, p_rows: torch.Tensor,
                 p_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_R^T u_t, P_C^T v_t) for every example and position: (batch, T, k_R), (batch, T, k_C)."""
        batch = len(g)
        has_bias = getattr(module, "bias", None) is not None
        if kind == "conv2d":
            width = a.shape[1] * module.weight[0, 0].numel()
            kernels = p_cols[:width].T.reshape(-1, *module.weight.shape[1:])
            v = F.conv2d(a.detach(), kernels, None, module.stride, module.padding, module.dilation).flatten(2)
            if len(p_cols) > width:
                v = v + p_cols[width].view(1, -1, 1)
            return g.flatten(2).transpose(1, 2) @ p_rows, v.transpose(1, 2)
        g = g.reshape(batch, -1, g.shape[-1])
        if kind == "embedding":
            ids = a.reshape(batch, -1)
            u = p_rows[ids]
            if module.padding_idx is not None:
                u = u * (ids != module.padding_idx).unsqueeze(-1)
            return u, g @ p_cols
        a = a.detach().reshape(batch, -1, a.shape[-1])
        if kind == "linear":
            v = a @ p_cols[:a.shape[-1]]
            return g @ p_rows, v + p_cols[-1] if has_bias and len(p_cols) > a.shape[-1] else v
        u = a @ p_rows[:a.shape[-1]]
        return (u + p_rows[-1] if has_bias and len(p_rows) > a.shape[-1] else u), g @ p_cols
