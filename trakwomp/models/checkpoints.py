"""Checkpoint files and weights: reading a state_dict safely, fitting it to a model, hashing it.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch
from torch import nn

from trakwomp.errors import UserError
from trakwomp.models.spec import ModelSpec


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
    expected = spec.stored_state(model)
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
    return spec.load_state(model, state)


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over parameter names, dtypes, shapes and values, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
