"""Shared fixtures and helpers: tiny datasets written by the tests, tiny models, one trained store
for the whole run, an in-process CLI runner, and independent computations that tests compare with."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from trakwomp.cli.main import app
from typer.testing import CliRunner

from trakwomp.data.specs import load_dataset
from trakwomp.data.text import read_fortunes_mini
from trakwomp.features.factored import side_projection
from trakwomp.models.spec import ModelSpec
from trakwomp.stages.recipe import Recipe
from trakwomp.stages.train import train

REPO = Path(__file__).resolve().parents[1]


def write_tiny_images(path: Path, n: int = 48, classes: int = 4, size: int = 16, seed: int = 0) -> Path:
    """An npz image dataset: x float32 (n, 3, size, size) in [0, 1], balanced labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.random((n, 3, size, size), dtype=np.float32) * 0.5
    x[np.arange(n), y % 3] += 0.5 * (y[:, None, None] / classes)
    np.savez(path, x=x, y=y)
    return path


TINY_RECIPE = Recipe(epochs=1, batch_size=16, lr=0.05)


@pytest.fixture(scope="session")
def trained_once(tmp_path_factory) -> Path:
    """One tiny trained store for the whole run, `store`: two reference models (TINY, one epoch)
    on the 48 images of `tiny.npz` beside it (those of `tiny_npz`). Copy it before writing to it."""
    root = tmp_path_factory.mktemp("trained")
    data = load_dataset(f"npz:{write_tiny_images(root / 'tiny.npz')}")
    train(root / "store", data, TINY, num_models=2, recipe=TINY_RECIPE)
    return root


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    return write_tiny_images(tmp_path / "tiny.npz")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a user module `package.module` (packages created as needed) under tmp_path, make it
    importable as a user's working directory is, and return nothing but the writer."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])

    def write(name: str, source: str) -> None:
        *packages, module = name.split(".")
        folder = tmp_path
        for package in packages:
            folder = folder / package
            folder.mkdir(exist_ok=True)
            (folder / "__init__.py").touch()
        (folder / f"{module}.py").write_text(source)

    return write


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


def plain(text: str) -> str:
    """Text without ANSI colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def soft_thresholded(tau: np.ndarray, threshold: float = 0.25) -> np.ndarray:
    """S(tau, T x each row's RMS) in numpy, T = 0.25 by default: the scores that lds, predict,
    groups, show and score's exports use unless told --threshold 0."""
    tau = np.asarray(tau, dtype=np.float64)
    rms = np.sqrt((tau ** 2).mean(axis=1, keepdims=True))
    return np.sign(tau) * np.maximum(np.abs(tau) - threshold * rms, 0)


def block_diagonal_scores(handle, widths: list[int], target_prefix: str, ridge: float,
                          magnitude: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """tau = [(1/M^2) sum_m q_m] * sum_m sum_b phi_m,b(z) (G_m,b + r I)^-1 Phi_m,b^T, dense in float64
    over every registered model, G_m,b = Phi_m,b^T Phi_m,b and r = ridge * mean(diag G_m,b): eq. 3
    from the stored features, independently of the streaming score stage. With `magnitude`, also
    the same sums of the products' absolute values (what bounds float32 rounding of tau)."""
    edges = np.cumsum([0] + widths)
    models = [entry.id for entry in handle.manifest.models]
    total, size, q_sum = 0, 0, 0
    for m in models:
        phi = handle.array(f"features/{m:06d}/phi")[...].astype(np.float64)
        target = handle.array(f"{target_prefix}features/{m:06d}/phi")[...].astype(np.float64)
        q_sum = q_sum + handle.array(f"features/{m:06d}/q")[...].astype(np.float64)
        for start, stop in zip(edges[:-1], edges[1:], strict=True):
            block = phi[:, start:stop]
            gram = block.T @ block
            gram += ridge * np.diag(gram).mean() * np.eye(len(gram))
            weighted = target[:, start:stop] @ np.linalg.inv(gram)
            total = total + weighted @ block.T
            size = size + np.abs(weighted) @ np.abs(block).T
    scale = q_sum / len(models) ** 2
    return (total * scale, size * scale) if magnitude else total * scale


def independent_lds(handle, key: str, threshold: float = 0.25) -> float:
    """The LDS of stored scores `key`, soft-thresholded, against the store's LDS models: Spearman
    correlations by scipy, 0 where a target's predictions are all equal, averaged over targets."""
    from scipy.stats import spearmanr

    tau = soft_thresholded(handle.read_array(f"scores/{key}/tau"), threshold)
    names = handle.done_units("train", "lds")
    masks = np.stack([handle.read_array(f"models/lds/{n}/mask") for n in names]).astype(np.float64)
    margins = np.stack([handle.read_array(f"models/lds/{n}/margins") for n in names]).astype(np.float64)
    predicted = masks @ tau.T
    rhos = [0.0 if np.ptp(predicted[:, t]) == 0 else spearmanr(margins[:, t], predicted[:, t]).statistic
            for t in range(tau.shape[0])]
    return float(np.mean(rhos))


TINY_GPT = ModelSpec.parse("gpt", 16, 1, 2)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def fortunes(split: str, count: int, start: int = 0) -> list[dict]:
    return [{"text": r["text"], "source": r["source"]} for r in read_fortunes_mini("x", split)[start:start + count]]


def write_hf_folder(folder: Path, texts: list[str]) -> Path:
    """A byte-level BPE tokenizer trained on `texts` and a tiny randomly initialised GPT-2 with its
    vocabulary, both saved in `folder` as Hugging Face saves them."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=None, eos_token_id=None)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


WORDS = ["<s>", "</s>", "[UNK]", "the", "cat", "sat", "on", "mat", "?", "yes", "no"]


def write_word_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer whose ids are the positions in WORDS (so expected ids can be written
    by hand), with BOS <s> and EOS </s>, and a post-processor that puts <s> before and </s> after
    every text it tokenizes with special tokens, as some Hugging Face tokenizers do."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    words.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A </s>",
                                                                    special_tokens=[("<s>", 0), ("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>",
                                                     unk_token="[UNK]")
    tokenizer.save_pretrained(folder)
    return folder


TINY = ModelSpec.parse("resnet9", 1 / 16)


def read_store(path: Path) -> dict[str, bytes]:
    """Every array of a store as bytes, keyed by its path, and every done marker's content."""
    out = {}
    group = zarr.open_group(str(path), mode="r")
    for name, array in group.arrays():
        out[name] = np.asarray(array[...]).tobytes()

    def walk(g, prefix):
        for name, array in g.arrays():
            out[prefix + name] = np.asarray(array[...]).tobytes()
        for name, sub in g.groups():
            walk(sub, f"{prefix}{name}/")

    walk(group, "")
    for marker in sorted((path / "done").rglob("zarr.json")):
        out[str(marker.relative_to(path))] = marker.read_bytes()
    return out


def tree_digest(path: Path, skip: set[str] = frozenset(), contents: bool = True) -> str:
    """SHA-256 over every path under `path` (folders included) and, with `contents`, every
    file's bytes, but the relative paths in `skip`."""
    digest = hashlib.sha256()
    for item in sorted(path.rglob("*")):
        if str(item.relative_to(path)) in skip:
            continue
        digest.update(str(item.relative_to(path)).encode() + b"\0")
        if contents and item.is_file():
            digest.update(item.read_bytes())
    return digest.hexdigest()


def write_scored_image_store(root: Path):
    """root/store: two reference TINY resnet9s on 48 images (root/train.npz), 6 LDS models on 12
    target images (root/targets.npz), featurized (sjlt, 2 x 16), finalized and scored on those
    targets; returns (store, train set, targets)."""
    from trakwomp.features.projectors import ProjectorSpec
    from trakwomp.stages.featurize import featurize
    from trakwomp.stages.finalize import finalize
    from trakwomp.stages.score import score

    data = load_dataset(f"npz:{write_tiny_images(root / 'train.npz')}")
    targets = load_dataset(f"npz:{write_tiny_images(root / 'targets.npz', n=12, seed=1)}")
    store = root / "store"
    train(store, data, TINY, num_models=2, recipe=TINY_RECIPE)
    train(store, data, TINY, targets=targets, role="lds", num_models=6, recipe=TINY_RECIPE)
    featurize(store, projector=ProjectorSpec("sjlt", 0, 2, 16))
    finalize(store)
    score(store, targets)
    return store, data, targets


def write_scored_text_store(root: Path, store: str, train_file: str, targets_file: str) -> Path:
    """root/store: the tiny gpt trained one epoch on 24 fortunes (written to root/train_file),
    featurized at 2 x 8 (sjlt), finalized and scored on 4 test fortunes (root/targets_file)."""
    from trakwomp.features.projectors import ProjectorSpec
    from trakwomp.stages.featurize import featurize
    from trakwomp.stages.finalize import finalize
    from trakwomp.stages.score import score
    from trakwomp.tasks.causal_lm import CausalLM

    texts = load_dataset(f"jsonl:{write_jsonl(root / train_file, fortunes('train', 24))}")
    targets = load_dataset(f"jsonl:{write_jsonl(root / targets_file, fortunes('test', 4))}")
    train(root / store, texts, TINY_GPT, task=CausalLM(), recipe=Recipe.for_task(CausalLM(), epochs=1))
    featurize(root / store, projector=ProjectorSpec("sjlt", 0, 2, 8))
    finalize(root / store)
    score(root / store, targets)
    return root / store


def causal_lm_autograd_loop(net, examples, task, names):
    """Each example (ids, label, predicted) alone, unpadded, through plain autograd, with f from
    its closed form: the cross-entropies of the tokens t where `predicted` (a first token
    position, a bool mask, or None: every token after the first) says, each predicted from the
    tokens before it, summed to L, or averaged for the "token" output; f = log(p / (1 - p)) with
    p = exp(-L)."""
    params = dict(net.named_parameters())
    rows, outputs = [], []
    for ids, _, predicted in examples:
        if predicted is None or isinstance(predicted, int):
            predicted = torch.arange(len(ids)) >= (predicted or 1)
        net.zero_grad()
        logits = net(ids[None], torch.ones(1, len(ids), dtype=torch.bool))
        logits = (logits.logits if hasattr(logits, "logits") else logits)[0].double()
        losses = [-torch.log_softmax(logits[t - 1], -1)[ids[t]] for t in torch.nonzero(predicted).flatten().tolist()]
        loss = sum(losses) / (len(losses) if task.output == "token" else 1)
        f = -loss - torch.log(-torch.expm1(-loss))
        f.backward()
        rows.append(torch.cat([params[n].grad.reshape(-1) for n in names]))
        outputs.append(float(f.detach()))
    return torch.stack(rows).float(), torch.tensor(outputs)


def kronecker_features(net, layers, gradients, seed=0, model_id=0):
    """(P_R kron P_C)^T vec(dW) per layer from one example's autograd gradients {name: tensor},
    the bias appended as a column (a row for GPT-2's Conv1D, whose bias sits on its C side)."""
    modules = {id(m.weight): m for m in net.modules() if hasattr(m, "weight")}
    params = dict(net.named_parameters())
    out = []
    for layer in layers:
        weight = gradients[layer.name].reshape(gradients[layer.name].shape[0], -1)
        if layer.bias:
            conv1d = type(modules.get(id(params[layer.name]))).__name__ == "Conv1D"
            bias = gradients[layer.bias]
            weight = torch.cat([weight, bias.view(1, -1)], 0) if conv1d else torch.cat([weight, bias.view(-1, 1)], 1)
        p_rows = side_projection(seed, model_id, layer.name, 0, layer.rows, layer.rank_rows)
        p_cols = side_projection(seed, model_id, layer.name, 1, layer.cols, layer.rank_cols)
        out.append(weight.reshape(-1).double() @ torch.kron(p_rows, p_cols).double())
    return torch.cat(out)


def split_gradient(net, names: list[str], row: torch.Tensor) -> dict[str, torch.Tensor]:
    """A flat gradient over the parameters `names` (in `named_parameters` order) as {name: tensor}."""
    params = dict(net.named_parameters())
    sizes = [params[n].numel() for n in names]
    return {n: part.view(params[n].shape) for n, part in zip(names, torch.split(row, sizes), strict=True)}
