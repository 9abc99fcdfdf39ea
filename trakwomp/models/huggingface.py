"""Hugging Face causal LMs from a local folder (nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from trakwomp.huggingface import import_transformers, refuse_remote_code
from trakwomp.errors import UserError


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
        raise UserError(f"`model` hf:{folder}: no Hugging Face model there (no config.json); save one with "
                        "model.save_pretrained(FOLDER)")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"`model` hf:{folder}: the folder holds no weights ({' or '.join(WEIGHT_FILES[:2])})")
    refuse_remote_code(path / "config.json", f"`model` hf:{folder}")
    transformers = import_transformers(f"`model` hf:{folder}")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                                  attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise UserError(f"`model` hf:{folder}: cannot load the model: {str(e).splitlines()[0]}") from None
    return HuggingFaceCausalLM(model.float())
