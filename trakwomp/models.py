"""Models: the built-in CIFAR ResNet-9, user models by `package.module:factory`, checkpoints,
and the model output that TRAK attributes (the correct-class margin)."""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trakwomp.data import Dataset, load_batch
from trakwomp.errors import UserError
from trakwomp.imports import import_object, is_object_spec

BUILTIN_MODELS = ("resnet9",)
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


@dataclass(frozen=True)
class ModelSpec:
    """A built-in model name with its width, or a user factory `package.module:factory`."""

    name: str
    width: float | None = None

    @classmethod
    def parse(cls, spec: str, width: float | None = None) -> "ModelSpec":
        if spec in BUILTIN_MODELS:
            width = 1.0 if width is None else float(width)
            if not width > 0:
                raise UserError(f"--width must be positive, got {width}")
            return cls(spec, width)
        if not is_object_spec(spec):
            raise UserError(f"malformed model spec {spec!r}: expected one of {', '.join(BUILTIN_MODELS)} or package.module:factory")
        if width is not None:
            raise UserError(f"--width applies to the built-in models only, not to {spec!r}")
        return cls(spec)

    def as_dict(self) -> dict:
        return {"name": self.name, "width": self.width}

    @classmethod
    def of_store(cls, recorded: dict, location: str) -> "ModelSpec":
        """The built-in model a store records. A user factory is refused: trakwomp imports code
        only when the user names it (--model), never because a store names it."""
        if recorded["name"] not in BUILTIN_MODELS:
            raise UserError(f"store {location!r} was made with the model {recorded['name']!r}; trakwomp imports "
                            f"code only when you name it: pass --model {recorded['name']}")
        return cls(recorded["name"], recorded.get("width"))

    def __str__(self) -> str:
        return self.name if self.width is None else f"{self.name} (width {self.width:g})"

    def build(self, num_classes: int) -> nn.Module:
        """A freshly initialised model; parameters are drawn from torch's global generator."""
        if self.name == "resnet9":
            return resnet9(num_classes, self.width)
        factory = import_object(self.name, what="model")
        model = factory(num_classes)
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


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The TRAK output f = logit_y - logsumexp_{k != y} logit_k, one per row."""
    correct = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, labels.view(-1, 1), float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


@torch.no_grad()
def check_model_fits_data(model: nn.Module, dataset: Dataset, device: torch.device, spec: ModelSpec,
                          num_classes: int | None = None) -> None:
    """Refuse, with one clear message, a model that cannot take the data or does not give
    `num_classes` (default: the dataset's) logits."""
    num_classes = num_classes or dataset.num_classes
    x, _ = load_batch(dataset, range(min(2, len(dataset))))
    model.to(device).eval()
    try:
        out = model(x.to(device))
    except RuntimeError as e:
        raise UserError(f"model {spec} fails on inputs of shape {tuple(x.shape[1:])} from {dataset.spec}: "
                        f"{str(e).splitlines()[0]}") from None
    if out.shape != (len(x), num_classes):
        raise UserError(f"model {spec} returns outputs of shape {tuple(out.shape[1:])}, "
                        f"expected ({num_classes},) logits for the {num_classes} classes of {dataset.spec}")
