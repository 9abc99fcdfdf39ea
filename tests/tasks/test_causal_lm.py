"""The causal-lm task: f of a whole completion and of each of its tokens, and their gradients,
against closed forms by autograd in float64, where the model is certain of (or rules out) a
prompt token: such a token must change nothing of what is attributed."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trakwomp.data.base import load_batch
from trakwomp.data.text import text_dataset
from trakwomp.features.factored import FactoredFeatures, factored_layers
from trakwomp.features.gradients import PerExampleGradients
from trakwomp.tasks.causal_lm import CausalLM

PROMPT, COMPLETION = "ab", "cd"
IDS = [256, *b"abcd"]  # the completion's tokens are positions 3 and 4


class Bigram(nn.Module):
    """Logits of the next token from the current one alone: a vocabulary x vocabulary table."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(257, 257)

    def forward(self, ids, mask=None):
        return self.table(ids)


def bigram(prompt_logit: float) -> Bigram:
    """A bigram whose prediction of the prompt's second token 'a' (after the start token) has
    the logit `prompt_logit`: 1e4 makes its loss exactly 0 in float32 (f = inf there), -inf
    makes it inf."""
    net = Bigram()
    with torch.no_grad():
        net.table.weight[256, ord("a")] = prompt_logit
    return net.eval()


def closed_form(net: Bigram, position: int | None) -> tuple[float, torch.Tensor]:
    """f and its gradient (float64 autograd) of the completion's token at `position`, or of the
    whole completion (None, output "token": p = exp(-L / T))."""
    table = net.table.weight.detach().double().requires_grad_(True)
    losses = {t: -torch.log_softmax(table[IDS[t - 1]], -1)[IDS[t]] for t in (3, 4)}
    loss = losses[position] if position is not None else (losses[3] + losses[4]) / 2
    f = -loss - torch.log(-torch.expm1(-loss))
    f.backward()
    return float(f.detach()), table.grad.reshape(-1)


@pytest.fixture(scope="module")
def data():
    return text_dataset("pc", [{"prompt": PROMPT, "completion": COMPLETION}], "bytes", None)


@pytest.mark.parametrize("prompt_logit", [1e4, -math.inf], ids=["certain", "ruled-out"])
def test_a_prompt_token_the_model_is_certain_of_or_rules_out_leaves_f_and_gradients_finite(data, prompt_logit):
    net = bigram(prompt_logit)
    names = ["table.weight"]
    tokens = data.per_token()
    for batch, positions in ((load_batch(data, [0]), [None]), (load_batch(tokens, [0, 1]), [3, 4])):
        out = PerExampleGradients(net, names, torch.device("cpu"), CausalLM())(batch)
        for row, position in enumerate(positions):
            f, gradient = closed_form(net, position)
            assert math.isfinite(f) and out.outputs[row] == pytest.approx(f, rel=1e-4)
            scale = float(gradient.abs().max())
            assert float((out.rows[row].double() - gradient).abs().max()) <= 1e-4 * scale
        layers = factored_layers(net, names, 64)
        engine = FactoredFeatures(net, layers, 0, 0, torch.device("cpu"), CausalLM())
        factored = engine(batch).rows
        p_rows, p_cols = engine.projections[0]
        for row, position in enumerate(positions):
            gradient = closed_form(net, position)[1].reshape(257, 257)
            expected = (p_rows.double().T @ gradient @ p_cols.double()).flatten()
            assert torch.isfinite(factored[row]).all()
            assert float((factored[row].double() - expected).abs().max()) <= 1e-4 * float(expected.abs().max())


@pytest.mark.parametrize("output", ["token", "sequence"])
def test_the_answers_gradient_is_its_tokens_gradients_weighted_by_one_minus_p(data, output):
    """grad f = sum_t w_t grad f_t, w_t = (1 - p_t) / (T (1 - p)) for `token`, (1 - p_t) / (1 - p)
    for `sequence` (docs/method.md), with p_t and p from the engine's own outputs f_t and f."""
    net, task = bigram(0.5), CausalLM(output)
    engine = PerExampleGradients(net, ["table.weight"], torch.device("cpu"), task)
    whole, tokens = engine(load_batch(data, [0])), engine(load_batch(data.per_token(), [0, 1]))
    p_t, p = torch.sigmoid(tokens.outputs.double()), torch.sigmoid(whole.outputs.double())
    weights = (1 - p_t) / ((len(p_t) if output == "token" else 1) * (1 - p))
    combined = (weights[:, None] * tokens.rows.double()).sum(0)
    assert float((whole.rows[0].double() - combined).abs().max()) <= 1e-5 * float(combined.abs().max())
