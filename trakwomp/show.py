"""`show`: the train examples that most support and most oppose one target, as a PNG grid of
the images with their labels and scores, and as rows for a CSV or JSON table.

Row 1 holds the target, then its k most positive scores tau_i(z) (train examples whose presence
raises the target's margin); row 2 its k most negative ones (whose presence lowers it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import make_grid, save_image

from trakwomp.bindings import stored_dataset
from trakwomp.data import Dataset, load_dataset
from trakwomp.errors import UserError
from trakwomp.estimator import relative_soft_threshold
from trakwomp.export import strongest
from trakwomp.store import Store
from trakwomp.stored_scores import find_view_scores

TILE = 96  # pixels per image side in the grid
CAPTION = 28  # pixels of caption under each image


def show(
    store: str | Path,
    target: int,
    k: int = 8,
    png: str | Path | None = None,
    targets: Dataset | None = None,
    dims: int | None = None,
    blocks: int | None = None,
    ridge: float = 0.0,
    models: list[int] | None = None,
    threshold: float = 0.0,
) -> list[dict]:
    """The k train examples that most support and most oppose target `target` of the stored
    scores of the view and models (`targets`: which scored target set, needed if several are,
    or if the stored spec no longer finds them); drawn to `png` if given."""
    if k < 1:
        raise UserError("--k must be at least 1")
    handle = Store.open(store)
    key = find_view_scores(handle, targets, dims, blocks, ridge, models)
    recorded = handle.manifest["targets"][handle.manifest["scores"][key]["targets"]]
    if targets is None:
        targets = load_dataset(recorded["spec"])
        if targets.fingerprint().sha256 != recorded["sha256"]:
            raise UserError(f"the targets at {recorded['spec']!r} are not those scored (fingerprint differs); "
                            "pass --targets (and --target-indices) as given to `trakwomp score`")
    tau = handle.array(f"scores/{key}/tau")
    if not 0 <= target < tau.shape[0]:
        raise UserError(f"--target {target} is out of range: the scores hold targets 0 to {tau.shape[0] - 1}")
    row = relative_soft_threshold(torch.from_numpy(tau[target:target + 1]), threshold).numpy()[0]
    train = stored_dataset(handle, verify=False)
    rows = [{"target": target, "target_label": targets.classes[int(targets.labels[target])],
             "target_path": targets.path(target), "direction": direction, "rank": rank, "train_index": i,
             "train_label": train.classes[int(train.labels[i])], "train_path": train.path(i), "score": float(row[i])}
            for direction, rank, i in strongest(row, k)]
    if png is not None:
        draw_grid(rows, targets, train, k, png)
    return rows


def draw_grid(rows: list[dict], targets: Dataset, train: Dataset, k: int, png: str | Path) -> None:
    """Row 1: the target and its supporting train examples; row 2: its opposing ones."""
    target = rows[0]["target"]
    first = [tile(targets[target][0], f"target {target}", rows[0]["target_label"])]
    second = [tile(torch.ones(3, 8, 8), "opposing:", "")]
    for r in rows:
        image = tile(train[r["train_index"]][0], f"{r['score']:+.3g}", f"{r['train_label']} #{r['train_index']}")
        (first if r["direction"] == "supports" else second).append(image)
    grid = make_grid(first + second, nrow=k + 1, padding=4, pad_value=1.0)
    try:
        save_image(grid, png)
    except OSError as e:
        raise UserError(f"cannot write {str(png)!r}: {e.strerror or e}") from None


def tile(image: torch.Tensor, line1: str, line2: str) -> torch.Tensor:
    """An image scaled to TILE x TILE on white, with two lines of caption under it."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise UserError(f"show draws images (channels x height x width), not examples of shape {tuple(image.shape)}")
    picture = to_pil_image(image.clamp(0, 1).expand(3, -1, -1)).resize((TILE, TILE), Image.NEAREST)
    canvas = Image.new("RGB", (TILE, TILE + CAPTION), "white")
    canvas.paste(picture, (0, 0))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    draw.text((2, TILE + 2), line1, fill="black", font=font)
    draw.text((2, TILE + 14), line2[:16], fill="black", font=font)
    return pil_to_tensor(canvas).float() / 255

