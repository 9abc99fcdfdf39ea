"""Memory: what featurizing will need, estimated before any work, against what the machine has.

The estimate adds up what the featurizing loop holds at its peak:

- what the process holds now (libraries, data, the model built to check it), on the CPU its
  resident memory, on a GPU what torch has allocated there;
- more copies of the model: on the CPU 4 (a checkpoint and the model it is checked in, the
  registered weights read back and the model they load into), on a GPU 1; of a frozen base (a
  LoRA fine-tune's), whose weights are never stored, 1 on the CPU;
- per-example gradients (not for `factored`): 3 x batch x p floats (the mapped gradients, their
  parameter-major copy, and autograd's per-example weight gradients on the way);
- activations: what autograd saves for the backward pass, measured on one forward pass of the
  longest example, times the batch (times 2 for `factored`, whose hooks also hold the gradient
  at every layer output);
- the projection: `sjlt` index tables (12 bytes per parameter and block, plus 8 bytes per
  projected dim and tile of parameters), a `gaussian`/`rademacher` matrix cache (up to 2 GiB,
  and a 1 GiB gradient buffer beyond), or the factored side matrices;
- the row chunk of features being gathered (3 copies of rows x dims floats), on the CPU.

The budget (`--max-memory`) is the most the process may hold: by default what it holds now
plus what the machine has free.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from pathlib import Path

import torch
from torch import nn

from trakwomp.data.base import Dataset, load_batch
from trakwomp.errors import UserError
from trakwomp.tasks.base import Task

if TYPE_CHECKING:
    from trakwomp.features.settings import FeatureSettings

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'8G', '512M', '2.5G' or a number of bytes -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"malformed `max_memory` {text!r}: expected a size like 8G, 512M or 2.5G")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def size(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def held_bytes(device: torch.device) -> int:
    """What this process holds now: its resident memory (Linux; 0 where unknown), or on a GPU
    what torch has allocated there."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    statm = Path("/proc/self/statm")
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") if statm.is_file() else 0


def free_bytes(device: torch.device) -> int | None:
    """Memory the machine has free: on a GPU its free memory, on Linux the smaller of MemAvailable
    and the cgroup's limit less its usage; None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    found = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo.read_text(), flags=re.MULTILINE) if meminfo.is_file() else None
    if not found:
        return None
    free = int(found.group(1)) * 1024
    limit, usage = Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")
    if limit.is_file() and usage.is_file() and limit.read_text().strip().isdigit():
        free = min(free, int(limit.read_text()) - int(usage.read_text()))
    return free


def check_dense_fits(need: int, what: str, advice: str, limit: int | None = None) -> None:
    """Refuse, before it is allocated, a dense array of `need` bytes (with its temporaries) that
    the machine has no free memory for, or, given `limit` (the most the process may hold, on the
    CPU), that would take the process beyond it."""
    if limit is not None:
        held = held_bytes(torch.device("cpu"))
        if held + need > limit:
            raise UserError(f"{what} need {size(need)}, and {size(held)} is held: more than the {size(limit)} "
                            f"allowed; {advice}")
        return
    free = free_bytes(torch.device("cpu"))
    if free is not None and need > free:
        raise UserError(f"{what} need {size(need)} of memory, and {size(free)} is free; {advice}")


def saved_activation_bytes(model: nn.Module, data: Dataset, task: Task, device: torch.device) -> int:
    """Bytes autograd saves for the backward pass of the task's output on the longest example of
    `data`, beyond the model's own parameters and buffers (which it saves by reference)."""
    longest = int(data.lengths.argmax()) if data.lengths is not None else 0
    batch = load_batch(data, [longest]).to(device)
    model.to(device).eval()
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:  # weights saved for backward are the model's own memory
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        task.outputs(model(*batch.inputs), batch)
    return sum(seen.values())


@dataclass
class MemoryNeed:
    """Bytes needed once (`fixed`) and per example of a batch (`per_example`), by what they are for,
    each with the setting that changes it."""

    fixed: dict[str, tuple[int, str]] = field(default_factory=dict)
    per_example: dict[str, tuple[int, str]] = field(default_factory=dict)

    def total(self, batch_size: int) -> int:
        return sum(b for b, _ in self.fixed.values()) + batch_size * sum(b for b, _ in self.per_example.values())


def featurize_need(model: nn.Module, method, layout, num_params: int, chunk_rows: int, activations: int,
                   device: torch.device) -> MemoryNeed:
    """The estimate described in the module docstring, for one model's featurization by the feature
    `method` (which adds its own terms); on a GPU, of its memory only (one more model copy, no row chunk)."""
    model_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    need = MemoryNeed()
    need.fixed["memory the process holds now"] = (held_bytes(device), "use a machine with more memory")
    if device.type == "cpu":
        need.fixed["model (4 more copies)"] = (4 * (model_bytes - frozen), "use a machine with more memory")
        if frozen:  # a LoRA model's base: its weights are never stored or read back, only rebuilt once
            need.fixed["frozen base (1 more copy)"] = (frozen, "use a machine with more memory")
        need.fixed[f"row chunk ({chunk_rows} rows x {layout.dims} dims)"] = (3 * 4 * chunk_rows * layout.dims,
                                                                             "lower `chunk_rows`")
    else:
        need.fixed["model (1 more copy)"] = (model_bytes, "use a machine with more memory")
    method.add_memory(need, layout, num_params, activations)
    return need


def fit_batch_size(need: MemoryNeed, batch_size: int, budget: int | None, stage: str) -> int:
    """`batch_size`, or the largest smaller one whose need fits `budget` bytes; refused in one line
    naming the setting to change when not even one example fits."""
    if budget is None or need.total(batch_size) <= budget:
        return batch_size
    per_example = sum(b for b, _ in need.per_example.values())
    fitting = (budget - need.total(0)) // per_example if per_example else 0
    if fitting >= 1:
        return int(fitting)
    items = {**need.fixed, **{f"{name} (1 example)": value for name, value in need.per_example.items()}}
    name, (largest, setting) = max(items.items(), key=lambda item: item[1][0])
    raise UserError(f"{stage} needs about {size(need.total(1))} with one example per batch, more than the "
                    f"{size(budget)} available; the largest part is the {name}, {size(largest)}: {setting}")


def batch_size_that_fits(net: nn.Module, data: Dataset, task: Task, settings: FeatureSettings, batch_size: int,
                         chunk_rows: int, device: torch.device, memory_limit: int | None, stage: str) -> int:
    """`batch_size`, or a smaller one if featurizing `data` would not fit in `memory_limit` bytes
    (the most the process may hold; default: what it holds now and what the device has free);
    refused in one line if one example does not fit."""
    free = free_bytes(device)
    budget = memory_limit if memory_limit is not None else None if free is None else held_bytes(device) + free
    chunk_rows = min(chunk_rows, len(data))
    activations = saved_activation_bytes(net, data, task, device)
    need = featurize_need(net, settings.method, settings.layout, settings.num_params, chunk_rows, activations, device)
    return fit_batch_size(need, batch_size, budget, stage)
