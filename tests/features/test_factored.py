"""Factored per-layer projections: exact against the Kronecker projection of autograd's per-example
gradients, through the store with per-layer blocks, and memory refused or fitted before any work."""

import shutil

import numpy as np
import pytest
import torch
from conftest import (
    TINY,
    kronecker_features,
    block_diagonal_scores,
    fortunes,
    plain,
    write_hf_folder,
)
from torch import nn
from trakwomp.store import Store

from trakwomp.data.base import Batch, load_batch
from trakwomp.data.specs import load_dataset
from trakwomp.errors import UserError
from trakwomp.estimator.view import ViewSpec
from trakwomp.features.factored import (
    FactoredFeatures,
    factored_layers,
    side_projection,
)
from trakwomp.features.gradients import select_parameters
from trakwomp.features.memory import featurize_need, saved_activation_bytes
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.features.settings import FeatureSettings
from trakwomp.models.networks import GPT
from trakwomp.models.spec import ModelSpec
from trakwomp.stages.featurize import featurize
from trakwomp.stages.finalize import finalize
from trakwomp.stages.score import score
from trakwomp.tasks.causal_lm import CausalLM
from trakwomp.tasks.classification import Classification

CPU = torch.device("cpu")


def per_example_reference(net, layers, batches, task):
    """Each example alone (unpadded) through plain autograd, then the dense Kronecker projection."""
    params = dict(net.named_parameters())
    rows, outputs = [], []
    for one in batches:
        f = task.outputs(net(*one.inputs), one).sum()
        gradients = dict(zip(params, torch.autograd.grad(f, list(params.values())), strict=True))
        rows.append(kronecker_features(net, layers, gradients))
        outputs.append(float(f.detach()))
    return torch.stack(rows), torch.tensor(outputs)


def small_conv_net() -> nn.Module:
    """Convolutions with and without bias, strided and padded, BatchNorm (eval, non-trivial
    statistics), a linear layer with bias."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def test_factored_features_of_a_conv_net_with_batchnorm_equal_the_kronecker_projection():
    net = small_conv_net()
    layers = factored_layers(net, select_parameters(net, None), 16)
    # conv 6 x (3*9 + bias) and 8 x 54 projected 4 x 4; linear 5 x (8 + bias): 4 x 4 too
    assert [(l.rows, l.cols, l.width) for l in layers] == [(6, 28, 16), (8, 54, 16), (5, 9, 16)]
    x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    out = FactoredFeatures(net, layers, 0, 0, CPU, Classification())(Batch((x,), y))
    expected, f = per_example_reference(net, layers, [Batch((x[i:i + 1],), y[i:i + 1]) for i in range(5)],
                                        Classification())
    torch.testing.assert_close(out.rows.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.outputs, f.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("output", ["sequence", "token"])
def test_factored_features_of_the_gpt_with_padding_equal_the_kronecker_projection(output):
    data = load_dataset("fortunes-mini:train")
    torch.manual_seed(0)
    net = GPT(data.vocab_size, 16, 1, 2).eval()
    layers = factored_layers(net, select_parameters(net, None), 64)
    assert [l.name for l in layers][:2] == ["tokens.weight", "positions.weight"]  # layer norms are left out
    positions = [0, 5, 7, 11]  # texts of different lengths: all but the longest are padded
    assert len(set(data.lengths[positions])) == len(positions)
    task = CausalLM(output)
    out = FactoredFeatures(net, layers, 0, 0, CPU, task)(load_batch(data, positions))
    expected, f = per_example_reference(net, layers, [load_batch(data, [i]) for i in positions], task)
    torch.testing.assert_close(out.rows.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.outputs, f.float(), rtol=1e-5, atol=1e-5)


def test_factored_features_of_hugging_face_gpt2_with_tied_embeddings_equal_the_kronecker_projection(tmp_path):
    folder = write_hf_folder(tmp_path / "hf", [r["text"] for r in fortunes("train", 300)])
    data = load_dataset("fortunes-mini:test", tokenizer=f"hf:{folder}")
    net = ModelSpec.parse(f"hf:{folder}").build(data.vocab_size)
    layers = factored_layers(net, select_parameters(net, None), 64)
    names = [l.name for l in layers]
    assert "model.lm_head.weight" not in names and names[0] == "model.transformer.wte.weight"  # tied: one layer
    assert any(l.bias and l.rows == 17 for l in layers)  # a Conv1D's bias is a row: 16 inputs + 1
    positions = [0, 1, 2]
    out = FactoredFeatures(net, layers, 0, 0, CPU, CausalLM())(load_batch(data, positions))
    expected, f = per_example_reference(net, layers, [load_batch(data, [i]) for i in positions], CausalLM())
    torch.testing.assert_close(out.rows.double(), expected, rtol=1e-4, atol=1e-6)


def test_side_projections_preserve_inner_products_in_expectation_and_keep_narrow_sides_exactly():
    """E <P^T x, P^T y> = <x, y> for Gaussian entries N(0, 1/k): over S independent projections
    (other seeds, models and layer names) the mean lies within 5 standard errors, the variance of
    one draw being (|x|^2 |y|^2 + <x, y>^2) / k. A side of at most k coordinates is kept exactly."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, generator=generator, dtype=torch.float64), torch.randn(100, generator=generator, dtype=torch.float64)
    y = y + 0.5 * x
    draws = torch.tensor([float((side_projection(seed, model, name, 0, 100, 8).double().T @ x)
                                @ (side_projection(seed, model, name, 0, 100, 8).double().T @ y))
                          for seed in range(10) for model in range(5) for name in ("a.weight", "b.weight", "c.weight")])
    variance = (x.dot(x) * y.dot(y) + x.dot(y) ** 2) / 8
    assert abs(float(draws.mean() - x.dot(y))) < 5 * float((variance / len(draws)).sqrt())
    assert len({round(float(d), 6) for d in draws}) == len(draws)  # each (seed, model, layer) its own projection
    torch.testing.assert_close(side_projection(3, 1, "x", 1, 6, 6), torch.eye(6))




def test_per_layer_blocks_of_different_widths_through_finalize_and_score(trained_once, tmp_path):
    store = shutil.copytree(trained_once / "store", tmp_path / "store")
    report = featurize(store, projector=ProjectorSpec("factored", seed=1, block_dim=36), chunk_rows=10, batch_size=7)
    assert report.left_out and all("." in name for name in report.left_out)  # the batch norms
    handle = Store.open(store)
    widths = [l.rank_rows * l.rank_cols for l in handle.manifest.featurize.layers]
    assert len(set(widths)) > 1 and handle.manifest.featurize.projector.blocks == len(widths)
    targets = load_dataset(f"npz:{trained_once / 'tiny.npz'}").select(np.arange(6))
    # the last layer's gradients span 3 of its 4 output directions (a margin's logit gradient sums to 0)
    with pytest.raises(UserError, match=r"block 8 \(layer 10.weight\).*not positive definite.*sums to zero"):
        finalize(store, ViewSpec(ridge=0.0))
    finalize(store, ViewSpec(ridge=1e-3))
    layers = score(store, targets, ViewSpec(ridge=1e-3))
    assert layers.view.key == f"d{sum(widths)}-layers{len(widths)}-ridge0.001"
    handle = Store.open(store)
    prefix = f"targets/{handle.manifest.scores[layers.key].targets}/"
    np.testing.assert_allclose(handle.array(f"scores/{layers.key}/tau")[...],
                               block_diagonal_scores(handle, widths, prefix, 1e-3), rtol=1e-3, atol=1e-6)
    # the same features regrouped into equal blocks: 2 blocks of half the dims
    finalize(store, ViewSpec(blocks=2, ridge=1e-3))
    equal = score(store, targets, ViewSpec(blocks=2, ridge=1e-3))
    np.testing.assert_allclose(handle.array(f"scores/{equal.key}/tau")[...],
                               block_diagonal_scores(handle, [sum(widths) // 2] * 2, prefix, 1e-3), rtol=1e-3, atol=1e-6)
    with pytest.raises(UserError, match="must end on a layer"):
        finalize(store, ViewSpec(dims=widths[0] + 1))


@pytest.fixture
def nothing_held(monkeypatch):
    """The estimate without what the test process happens to hold already (pytest, other tests'
    data), so that a limit set in the test is the estimate's alone."""
    monkeypatch.setattr("trakwomp.features.memory.held_bytes", lambda device: 0)
    monkeypatch.setattr("trakwomp.features.memory.held_bytes", lambda device: 0)


def test_a_model_too_large_for_the_memory_limit_is_refused_before_any_write(trained_once, tmp_path, cli, nothing_held):
    store = shutil.copytree(trained_once / "store", tmp_path / "store")
    before = Store.open(store).manifest.json
    result = cli("featurize", store, "--projector", "sjlt", "--blocks", "64", "--block-dim", "64", "--max-memory", "5M")
    assert result.exit_code == 2
    lines = plain(result.stderr).strip().splitlines()
    assert len(lines) == 1 and "sjlt tables (64 blocks)" in lines[0] and "--projector factored" in lines[0]
    assert Store.open(store).manifest.json == before


def test_the_batch_size_is_lowered_to_what_fits_and_features_do_not_change(trained_once, tmp_path, nothing_held):
    small, big = (shutil.copytree(trained_once / "store", tmp_path / name) for name in ("small", "big"))
    spec = ProjectorSpec("factored", seed=2, block_dim=16)
    reference = featurize(big, projector=spec, chunk_rows=48, batch_size=48)
    assert reference.batch_size == 48
    net = TINY.build(4)
    data = load_dataset(f"npz:{trained_once / 'tiny.npz'}")
    settings = FeatureSettings.for_model(spec, "float32", net, select_parameters(net, None))
    need = featurize_need(net, settings.method, settings.layout, settings.num_params, 48,
                          saved_activation_bytes(net, data, Classification(), CPU), CPU)
    limit = need.total(5) + 1  # room for 5 examples per batch, not 6
    report = featurize(small, projector=spec, chunk_rows=48, batch_size=48, memory_limit=limit)
    assert report.batch_size == 5
    expected = Store.open(big).array("features/000000/phi")[...]  # float32 sums in another blocking: a few eps of the scale
    np.testing.assert_allclose(Store.open(small).array("features/000000/phi")[...], expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())


def test_without_projector_options_a_model_beyond_20m_parameters_gets_the_factored_projection(tmp_path, user_module,
                                                                                              trained_once, cli):
    user_module("bignets.wide", "import torch\n"
                "def wide(classes):\n"
                "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(768, 26100), torch.nn.ReLU(),\n"
                "                               torch.nn.Linear(26100, classes))\n")
    torch.manual_seed(0)
    big = torch.nn.Sequential(nn.Flatten(), nn.Linear(768, 26100), nn.ReLU(), nn.Linear(26100, 4))
    assert sum(p.numel() for p in big.parameters()) > 20_000_000
    torch.save(big.state_dict(), tmp_path / "big.pt")
    data = ["--data", f"npz:{trained_once / 'tiny.npz'}", "--checkpoint", str(tmp_path / "big.pt"), "--quiet"]
    assert cli("featurize", tmp_path / "big", "--model", "bignets.wide:wide", *data).exit_code == 0
    assert Store.open(tmp_path / "big").manifest.featurize.projector.kind == "factored"
    report = featurize(shutil.copytree(trained_once / "store", tmp_path / "small"))
    assert Store.open(tmp_path / "small").manifest.featurize.projector.kind == "sjlt" and report.units_done


class TiedHead(nn.Module):
    """Token embedding, a linear layer, and an output layer tied to the embedding by F.linear: the
    tied term reaches the embedding's weight outside any module's forward."""

    def __init__(self, vocab=11, width=6):
        super().__init__()
        self.embedding, self.mix = nn.Embedding(vocab, width), nn.Linear(width, width)

    def forward(self, ids, mask=None):
        return nn.functional.linear(torch.tanh(self.mix(self.embedding(ids))), self.embedding.weight)


class Attention(nn.Module):
    """nn.MultiheadAttention, whose functional forward reads its in-projection (whole, split in two
    or in three by how query, key and value are shared) and its out_proj weight directly, then a
    linear head; sequence-first or batch-first, with masks and attention weights or without."""

    def __init__(self, sharing="self", batch_first=True, need_weights=False, masks=False, classes=4):
        super().__init__()
        self.attention = nn.MultiheadAttention(6, 2, batch_first=batch_first)
        self.head = nn.Linear(6, classes)
        self.sharing, self.batch_first, self.need_weights, self.masks = sharing, batch_first, need_weights, masks

    def forward(self, x):
        h = x.view(len(x), 4, 6)
        key = {"self": h, "cross": h * 0.5 + 1, "separate": h + 1}[self.sharing]
        value = h * 2 if self.sharing == "separate" else key
        padding = torch.zeros(len(x), 4, dtype=torch.bool)
        padding[:, 3] = x[:, 0] > 0.45  # per example (here the first): some may not attend to their last position
        causal = torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)
        if not self.batch_first:
            h, key, value = (t.transpose(0, 1) for t in (h, key, value))
        out = self.attention(h, key, value, need_weights=self.need_weights,
                             key_padding_mask=padding if self.masks else None,
                             attn_mask=causal if self.masks else None)[0]
        return self.head((out if self.batch_first else out.transpose(0, 1)).mean(1))


class Encoder(nn.Module):
    """nn.TransformerEncoderLayer (self-attention, feed-forward, layer norms) and a linear head."""

    def __init__(self, classes=4):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(6, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        return self.head(self.layer(x.view(len(x), 4, 6)).mean(1))


class ChangesItsInput(nn.Module):
    """A linear layer whose input is scaled in place after the layer has read it."""

    def __init__(self, classes=4):
        super().__init__()
        self.first, self.second = nn.Linear(24, 8), nn.Linear(24, classes)

    def forward(self, x):
        x = x.view(len(x), 24).clone()
        h = self.first(x)
        x.mul_(2)
        return self.second(x) + h.sum(1, keepdim=True)


def features_of(net, batch, task, block_dim=16):
    torch.manual_seed(1)
    layers = factored_layers(net, select_parameters(net, None), block_dim)
    return FactoredFeatures(net, layers, 0, 0, CPU, task)(batch), layers


def text_batch(vocab=11):
    ids = torch.randint(0, vocab, (3, 5), generator=torch.Generator().manual_seed(0))
    return Batch((ids, torch.ones_like(ids, dtype=torch.bool)), torch.zeros(3))


@pytest.mark.parametrize("case, fragment", [
    ("tied head", "layer embedding.weight: its factored features differ"),
    ("scale_grad_by_freq", "layer embedding.weight: its factored features differ"),
    ("input changed in place", "the input of layer first.weight is changed in place after the layer"),
])
def test_a_gradient_that_hooks_cannot_see_is_refused_naming_the_layer(case, fragment):
    """On today's main each of these gave wrong features silently (the tied term, the frequency
    scaling and the out_proj gradient missing, the input read after it changed)."""
    torch.manual_seed(0)
    images = Batch((torch.rand(3, 24),), torch.tensor([0, 1, 2]))
    if case == "tied head":
        net, batch, task = TiedHead(), text_batch(), CausalLM()
    elif case == "scale_grad_by_freq":  # tokens repeated within an example: their rows are scaled down
        net, task = TiedHead(), CausalLM()
        net.embedding.scale_grad_by_freq = True
        head = torch.randn(6, 11, generator=torch.Generator().manual_seed(2))  # a constant, not a parameter
        net.forward = lambda ids, mask=None: net.mix(net.embedding(ids)) @ head
        ids = torch.tensor([[1, 1, 2, 1, 3], [4, 4, 4, 5, 6], [7, 8, 7, 9, 7]])
        batch = Batch((ids, torch.ones_like(ids, dtype=torch.bool)), torch.zeros(3))
    else:
        net, batch, task = ChangesItsInput(), images, Classification()
    with pytest.raises(UserError, match=fragment):
        features_of(net.eval(), batch, task)


@pytest.mark.parametrize("net", [
    Attention(), Attention("cross", batch_first=False), Attention("separate", need_weights=True),
    Attention(masks=True), Attention("cross", batch_first=False, need_weights=True, masks=True), Encoder()],
    ids=["self", "cross-sequence-first", "separate-weights", "masks", "cross-all", "encoder-layer"])
def test_factored_features_of_multi_head_attention_equal_the_kronecker_projection(net):
    """Its packed in-projection (3E x E, bias as a column) and out_proj, which its forward uses
    through F.linear, against each example's autograd gradient (on today's main out_proj's
    features were all zero and the in-projection was left out)."""
    torch.manual_seed(0)
    net.eval()
    batch = Batch((torch.rand(3, 24),), torch.tensor([0, 1, 2]))
    out, layers = features_of(net, batch, Classification())
    assert {"attention.in_proj_weight", "layer.self_attn.in_proj_weight"} & {layer.name for layer in layers}
    assert {(l.rows, l.cols) for l in layers if "in_proj" in l.name} == {(18, 7)}
    expected, f = per_example_reference(net, layers, [Batch((batch.inputs[0][i:i + 1],), batch.labels[i:i + 1])
                                                      for i in range(3)], Classification())
    torch.testing.assert_close(out.rows.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.outputs.double(), f.double(), rtol=1e-5, atol=1e-6)


def test_an_output_changed_in_place_after_its_layer_is_handed_on_as_a_copy():
    """ReLU(inplace=True) right after hooked layers (as in nearly every torchvision model): the
    features are still the Kronecker projection of each example's autograd gradient."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).eval()
    batch = Batch((torch.rand(4, 3, 4, 4),), torch.tensor([0, 1, 2, 0]))
    out, layers = features_of(net, batch, Classification())
    expected, f = per_example_reference(net, layers, [Batch((batch.inputs[0][i:i + 1],), batch.labels[i:i + 1])
                                                      for i in range(4)], Classification())
    torch.testing.assert_close(out.rows.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.outputs.double(), f.double(), rtol=1e-5, atol=1e-6)


REPEATS_SOURCE = ("import torch\n"
                  "class Net(torch.nn.Module):\n"
                  "    def __init__(self, vocab):\n"
                  "        super().__init__()\n"
                  "        self.embedding = torch.nn.Embedding(vocab, 8, scale_grad_by_freq=True)\n"
                  "        self.head = torch.nn.Linear(8, vocab)\n"
                  "    def forward(self, ids, mask=None):\n"
                  "        return self.head(torch.tanh(self.embedding(ids)))\n"
                  "def build(vocab):\n"
                  "    return Net(vocab)\n")


def test_featurize_checks_the_text_that_repeats_a_token_not_only_the_first_rows(tmp_path, user_module):
    """Embedding(scale_grad_by_freq) scales a repeated token's gradient, which hooks cannot see.
    The first rows of the first batch (the shortest texts) repeat no token, nor does the
    longest; the check refuses all the same, from the text that repeats one (before, nothing was
    refused and that text's features were wrong)."""
    from conftest import write_jsonl

    user_module("mods.repeats", REPEATS_SOURCE)
    texts = ["ab", "cd", "ef", "gh", "ijkl", "mnop", "xyxyxy", "qrstuvwxyz"]  # only "xyxyxy" repeats a token
    data = load_dataset(f"jsonl:{write_jsonl(tmp_path / 't.jsonl', [{'text': t} for t in texts])}")
    spec = ModelSpec.parse("mods.repeats:build")
    torch.manual_seed(0)
    torch.save(spec.build(data.vocab_size).state_dict(), tmp_path / "net.pt")
    with pytest.raises(UserError, match="layer embedding.weight: its factored features differ"):
        featurize(tmp_path / "store", data, spec, [str(tmp_path / "net.pt")], task=CausalLM(),
                  projector=ProjectorSpec("factored", block_dim=16), batch_size=2)
    assert not (tmp_path / "store").exists()
