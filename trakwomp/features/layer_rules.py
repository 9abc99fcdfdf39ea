"""Factored layer rules: one class per module type, saying which weight of the module a factored
projection covers, its shape as a matrix, and the factors u_t, v_t of one example's gradient
dW = sum_t u_t v_t^T (trakwomp.features.factored). A rule is asked, never switched on.

trakwomp's own rules: Linear, Conv2d (groups 1, zero padding), Embedding, Hugging Face GPT-2's
Conv1D and nn.MultiheadAttention's packed in-projection. Another package adds a rule for its own
module type through the entry point group `trakwomp.layer_rules` (trakwomp.registry): a
`LayerRule` subclass.
"""

from __future__ import annotations

import sys
import typing
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from trakwomp.registry import Registry


class LayerRule(ABC):
    """How a factored projection covers one module type. `a` is what the module's forward hook
    sees as its input, `g` the gradient at its output; (u, v) come back projected:
    (P_R^T u_t, P_C^T v_t) for every example and position, (batch, T, k_R) and (batch, T, k_C)."""

    name: ClassVar[str]
    module_name: ClassVar[str]  # the module type, as messages name it
    bias_on_rows: ClassVar[bool] = False  # the bias is one more row of W (not one more column)
    per_example_ids: ClassVar[bool] = False  # token ids shared by the batch are repeated per example first
    uses_linear_inside: ClassVar[bool] = False  # its weight is used through F.linear inside its forward

    @abstractmethod
    def applies(self, module: nn.Module) -> bool:
        """Whether the rule covers `module`."""

    def weight_and_bias(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight the rule covers, and its bias."""
        return typing.cast(torch.Tensor, module.weight), getattr(module, "bias", None)

    def shape(self, module: nn.Module, with_bias: bool) -> tuple[int, int]:
        """(R, C): the weight as a matrix (shape[0] by the rest), with the bias as one more column
        (or row)."""
        weight, _ = self.weight_and_bias(module)
        rows, cols = weight.shape[0], weight[0].numel()
        return (rows + int(with_bias), cols) if self.bias_on_rows else (rows, cols + int(with_bias))

    @abstractmethod
    def factors(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor, p_rows: torch.Tensor,
                p_cols: torch.Tensor, with_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_R^T u_t, P_C^T v_t); `with_bias`: the use added the bias (featurized if P has its row)."""


LAYER_RULES: Registry[LayerRule] = Registry("trakwomp.layer_rules", "layer rule", lambda cls: cls(),
                                            builtins=("trakwomp.features.layer_rules",))


def rule_of(module: nn.Module) -> LayerRule | None:
    """The rule that covers `module`, or None if its parameters are left out."""
    return next((rule for _, rule in LAYER_RULES.items() if rule.applies(module)), None)


def _by_position(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output gradient as (batch, positions, features)."""
    batch = len(g)
    return a.detach().reshape(batch, -1, a.shape[-1]), g.reshape(batch, -1, g.shape[-1])


class Linear(LayerRule):
    """y = x W^T + b: u = g_t, v = a_t (and 1 for the bias)."""

    name, module_name = "linear", "Linear"

    def applies(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def factors(self, module, a, g, p_rows, p_cols, with_bias):
        a, g = _by_position(a, g)
        v = a @ p_cols[:a.shape[-1]]
        return g @ p_rows, v + p_cols[-1] if with_bias and len(p_cols) > a.shape[-1] else v


class Conv1D(LayerRule):
    """Hugging Face GPT-2's Conv1D, y = x W + b with W in x out: u = a_t (and 1), v = g_t."""

    name, module_name = "conv1d", "GPT-2 Conv1D"
    bias_on_rows = True

    def applies(self, module: nn.Module) -> bool:
        utils = sys.modules.get("transformers.pytorch_utils")  # a model with a Conv1D has imported it
        return utils is not None and isinstance(module, utils.Conv1D)

    def factors(self, module, a, g, p_rows, p_cols, with_bias):
        a, g = _by_position(a, g)
        u = a @ p_rows[:a.shape[-1]]
        return (u + p_rows[-1] if with_bias and len(p_rows) > a.shape[-1] else u), g @ p_cols


class Embedding(LayerRule):
    """A lookup of W's rows: u = e(token_t) (one-hot, so P_R^T u is a row of P_R), v = g_t."""

    name, module_name = "embedding", "Embedding"
    per_example_ids = True

    def applies(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def factors(self, module: nn.Embedding, a, g, p_rows, p_cols, with_bias):
        batch = len(g)
        ids = a.reshape(batch, -1)
        u = p_rows[ids]
        if module.padding_idx is not None:
            u = u * (ids != module.padding_idx).unsqueeze(-1)
        return u, g.reshape(batch, -1, g.shape[-1]) @ p_cols


class Conv2d(LayerRule):
    """A convolution as a matrix of out x (in kh kw): u = g_t at output pixel t, v = its input
    patch (and 1), projected by convolving the input with P_C's columns as kernels."""

    name, module_name = "conv2d", "Conv2d"

    def applies(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"

    def factors(self, module: nn.Conv2d, a, g, p_rows, p_cols, with_bias):
        width = a.shape[1] * module.weight[0, 0].numel()
        kernels = p_cols[:width].T.reshape(-1, *module.weight.shape[1:])
        v = F.conv2d(a.detach(), kernels, None, module.stride, module.padding, module.dilation).flatten(2)
        if len(p_cols) > width:
            v = v + p_cols[width].view(1, -1, 1)
        return g.flatten(2).transpose(1, 2) @ p_rows, v.transpose(1, 2)


class Attention(LayerRule):
    """nn.MultiheadAttention's packed in-projection (its out_proj is a Linear of its own): used
    through F.linear inside the module's forward, so each use is recorded there and factored as
    a Linear use of the rows it took."""

    name, module_name = "attention", "MultiheadAttention"
    uses_linear_inside = True

    def applies(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim and module.bias_k is None \
            and not module.add_zero_attn

    def weight_and_bias(self, module):
        return module.in_proj_weight, module.in_proj_bias

    def factors(self, module, a, g, p_rows, p_cols, with_bias):
        return LINEAR.factors(module, a, g, p_rows, p_cols, with_bias)


LINEAR = Linear()
for _rule in (Attention, Linear, Embedding, Conv2d, Conv1D):
    LAYER_RULES.add(_rule.name, _rule)
