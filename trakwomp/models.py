"""Models: the built-in CIFAR ResNet-9 and small GPT, Hugging Face causal LMs from a local
folder, user models by `package.module:factory`, and checkpoints."""

from __future__ import annotations

import hashlib
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trakwomp.data import load_batch
from trakwomp.errors import UserError
from trakwomp.imports import import_object, is_object_spec
from trakwomp.tasks import Task, logits_of
from trakwomp.text import import_transformers

BUILTIN_MODELS = ("resnet9", "gpt")
GPT_DEFAULTS = {"width": 64, "layers": 2, "heads": 4}
GPT_CONTEXT = 512
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """Per-channel (x - mean) / std, kept inside the model so that data stays in [0, 1]."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


class Residual(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return x + self.block(x)


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def _conv_bn(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def resnet9(num_classes: int = 10, width: float = 1.0) -> nn.Sequential:
    """The CIFAR ResNet-9 of the TRAK paper's CIFAR experiments (channels 64-128-256 at width 1),
    with CIFAR-10 normalization as its first layer. Width 0.25 has 143,248 parameters."""
    c1, c2, c3 = (max(1, round(c * width)) for c in (64, 128, 256))
    return nn.Sequential(
        Normalize(CIFAR10_MEAN, CIFAR10_STD),
        _conv_bn(3, c1),
        _conv_bn(c1, c2, kernel_size=5, stride=2, padding=2),
        Residual(nn.Sequential(_conv_bn(c2, c2), _conv_bn(c2, c2))),
        _conv_bn(c2, c3),
        nn.MaxPool2d(2),
        Residual(nn.Sequential(_conv_bn(c3, c3), _conv_bn(c3, c3))),
        _conv_bn(c3, c2, padding=0),
        nn.AdaptiveMaxPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(c2, num_classes, bias=False),
        Scale(0.2),
    )


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees positions 0..t only."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(c // self.heads)
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        attention = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        return self.out((attention @ v).transpose(1, 2).reshape(b, t, c))


class TransformerBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """A small pre-norm GPT: token and position embeddings, `layers` causal transformer blocks,
    a final layer norm and an untied output layer; (batch, T) token ids -> (batch, T, vocabulary)
    logits. The padding mask is accepted and not needed: padding sits right of the real tokens,
    which causal attention keeps from seeing it."""

    def __init__(self, vocab_size: int, width: int = 64, layers: int = 2, heads: int = 4, context: int = GPT_CONTEXT):
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[TransformerBlock(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids, mask=None):
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        return self.head(self.norm(self.blocks(x)))


class HuggingFaceCausalLM(nn.Module):
    """A Hugging Face causal LM called as trakwomp calls models: (ids, mask) -> logits. The mask
    is not passed on: padding sits right of the real tokens, where causal attention keeps it
    from changing them (and torch.func's vmap cannot map Hugging Face's mask code)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.context = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)

    def forward(self, ids, mask=None):
        return self.model(input_ids=ids).logits


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def load_huggingface(folder: str) -> HuggingFaceCausalLM:
    """The causal LM saved (`save_pretrained`) in `folder`, from local files only."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise UserError(f"--model hf:{folder}: no Hugging Face model there (no config.json); save one with "
                        "model.save_pretrained(FOLDER)")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"--model hf:{folder}: the folder holds no weights ({' or '.join(WEIGHT_FILES[:2])})")
    transformers = import_transformers(f"--model hf:{folder}")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                                  attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise UserError(f"--model hf:{folder}: cannot load the model: {str(e).splitlines()[0]}") from None
    return HuggingFaceCausalLM(model.float())


@dataclass(frozen=True)
class ModelSpec:
    """A built-in model with its size (resnet9: width multiplier; gpt: width, layers, heads), a
    Hugging Face causal LM in a local folder (`hf:DIR`), or a user factory `package.module:factory`."""

    name: str
    width: float | None = None
    layers: int | None = None
    heads: int | None = None

    @classmethod
    def parse(cls, spec: str, width: float | None = None, layers: int | None = None,
              heads: int | None = None) -> "ModelSpec":
        if (layers is not None or heads is not None) and spec != "gpt":
            raise UserError(f"--layers and --heads apply to the built-in gpt only, not to {spec!r}")
        if spec == "gpt":
            return cls._gpt(width, layers, heads)
        if spec == "resnet9":
            width = 1.0 if width is None else float(width)
            if not width > 0:
                raise UserError(f"--width must be positive, got {width}")
            return cls(spec, width)
        if not (is_object_spec(spec) or (spec.startswith("hf:") and len(spec) > 3)):
            raise UserError(f"malformed model spec {spec!r}: expected one of {', '.join(BUILTIN_MODELS)}, hf:DIR or "
                            "package.module:factory")
        if width is not None:
            raise UserError(f"--width applies to the built-in models only, not to {spec!r}")
        return cls(spec)

    @classmethod
    def _gpt(cls, width, layers, heads) -> "ModelSpec":
        width = GPT_DEFAULTS["width"] if width is None else width
        layers = GPT_DEFAULTS["layers"] if layers is None else layers
        heads = GPT_DEFAULTS["heads"] if heads is None else heads
        if width != int(width) or width < 1 or layers < 1 or heads < 1 or int(width) % heads:
            raise UserError(f"gpt needs a whole --width divisible by --heads and at least 1 layer, got width {width:g}, "
                            f"{layers} layers, {heads} heads")
        return cls("gpt", int(width), int(layers), int(heads))

    def as_dict(self) -> dict:
        recorded = {"name": self.name, "width": self.width}
        if self.name == "gpt":
            recorded.update(layers=self.layers, heads=self.heads)
        return recorded

    @classmethod
    def of_store(cls, recorded: dict, location: str) -> "ModelSpec":
        """The model a store records. A user factory is refused: trakwomp imports code only when
        the user names it (--model), never because a store names it (a Hugging Face folder is
        read as data: config and weights, no code)."""
        name = recorded["name"]
        if name not in BUILTIN_MODELS and not name.startswith("hf:"):
            raise UserError(f"store {location!r} was made with the model {name!r}; trakwomp imports "
                            f"code only when you name it: pass --model {name}")
        return cls(name, recorded.get("width"), recorded.get("layers"), recorded.get("heads"))

    def __str__(self) -> str:
        if self.name == "gpt":
            return f"gpt (width {self.width}, {self.layers} layers, {self.heads} heads)"
        return self.name if self.width is None else f"{self.name} (width {self.width:g})"

    def build(self, output_size: int) -> nn.Module:
        """A freshly initialised model (a Hugging Face model: its saved weights) with
        `output_size` outputs (classes, or the vocabulary of a language model); parameters are
        drawn from torch's global generator."""
        if self.name == "resnet9":
            return resnet9(output_size, self.width)
        if self.name == "gpt":
            return GPT(output_size, self.width, self.layers, self.heads)
        if self.name.startswith("hf:"):
            return load_huggingface(self.name[3:])
        factory = import_object(self.name, what="model")
        model = factory(output_size)
        if not isinstance(model, nn.Module):
            raise UserError(f"model factory {self.name!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict file, read with `weights_only=True` (no code from the file runs)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint file {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # what weights_only=True refuses: objects beyond tensors and containers
        raise UserError(f"checkpoint {str(path)!r} holds objects other than tensors, which trakwomp does not "
                        "unpickle; save model.state_dict() instead") from None
    except Exception as e:  # a damaged file fails anywhere in torch's reader
        first_sentence = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
        raise UserError(f"cannot read checkpoint {str(path)!r} (truncated or not a torch file): "
                        f"{type(e).__name__} {first_sentence}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {str(path)!r} is not a state_dict (a dict of parameter names to tensors)")
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, spec: ModelSpec) -> nn.Module:
    """`model` with the weights `state`, refused with a clear message if they belong to another architecture."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        problems = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                problems.append(f"{len(items)} {label} (e.g. {items[0]})")
        raise UserError(f"checkpoint {source} does not fit model {spec}: " + "; ".join(problems))
    model.load_state_dict(state)
    return model


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over parameter names, dtypes, shapes and values, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def check_model_fits_data(model: nn.Module, dataset, device: torch.device, spec: ModelSpec, task: Task,
                          output_size: int) -> None:
    """Refuse, with one clear message, data the task cannot use, and a model that cannot take
    the data (a text longer than its context included) or does not give the task's output shape
    with `output_size` outputs."""
    task.check_data(dataset)
    context = getattr(model, "context", None)
    lengths = getattr(dataset, "lengths", None)
    if context is not None and lengths is not None and lengths.max() > context:
        i = int(lengths.argmax())
        raise UserError(f"text {i} of {dataset.spec} has {lengths[i]} tokens, more than the context of model {spec} "
                        f"({context}); pass --max-length {context} to cut longer texts")
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
