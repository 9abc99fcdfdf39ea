"""`show`: the train examples that most support and most oppose one target, as a PNG grid of
images or a self-contained HTML page of texts, and as rows for a CSV or JSON table.

Supporting examples have the k most positive scores tau_i(z) (their presence raises the
target's output f), opposing ones the k most negative (their presence lowers it). In the PNG,
row 1 holds the target and its supporting images, row 2 the opposing ones.
"""

from __future__ import annotations

from collections.abc import Sequence
import html
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import make_grid, save_image

from trakwomp.analysis.groups import GroupScores, group_scores
from trakwomp.data.base import Dataset
from trakwomp.data.groups import Groups
from trakwomp.errors import UserError
from trakwomp.outputs import check_output, write_atomically
from trakwomp.stages.bindings import stored_dataset
from trakwomp.stages.export import strongest_rows
from trakwomp.stages.selection import Selection
from trakwomp.stages.stored_scores import iterate_targets, scores_array
from trakwomp.store import Store

TILE = 96  # pixels per image side in the grid
CAPTION = 28  # pixels of caption under each image
CHART_WIDTH, CHART_LABELS, CHART_ROW = 960, 250, 22  # pixels: the group chart, its names column, a bar's row
SUPPORTS, OPPOSES = (59, 111, 182), (217, 130, 43)


def show(
    store: str | Path,
    target: int,
    k: int = 8,
    out: str | Path | None = None,
    selection: Selection = Selection(),
) -> list[dict]:
    """The k train examples that most support and most oppose target `target` of the selected
    stored scores (`selection.targets`: which scored target set, needed if several are, or if
    the stored spec no longer finds them); drawn to `out` if given: a PNG grid of images, or an
    HTML page of texts."""
    if k < 1:
        raise UserError("`k` must be at least 1")
    handle = Store.open(store)
    key = selection.key(handle, top_k=k)
    targets = selection.scored_targets(handle, key)
    num_targets = handle.array(scores_array(handle, key)).shape[0]
    if not 0 <= target < num_targets:
        raise UserError(f"`target` {target} is out of range: the scores hold targets 0 to {num_targets - 1}")
    [(_, index, scores)] = iterate_targets(handle, key, selection.threshold, range(target, target + 1))
    train = stored_dataset(handle)
    rows = strongest_rows(targets, target, train, scores, k, index)
    if out is not None:
        suffix, what, draw = DRAWINGS[train.preview]
        check_output("`out`", out, (suffix,), store, f"show draws {what}")
        draw(rows, targets, train, k, out)
    return rows


def show_groups(
    store: str | Path,
    k: int = 12,
    out: str | Path | None = None,
    chosen_targets: list[int] | None = None,
    target_set: str | Path | None = None,
    groups: Groups | str | Path | None = None,
    selection: Selection = Selection(),
) -> GroupScores:
    """The k groups of largest |score| for the chosen targets (default: all scored targets), drawn
    to `out` (a PNG bar chart) if given; see `group_scores`."""
    if k < 1:
        raise UserError("`k` must be at least 1")
    check_output("`out`", out, (".png",), store, "show `by_group` draws a PNG bar chart")
    scores = group_scores(store, groups, selection, chosen_targets, target_set)
    if out is not None:
        draw_group_chart(scores, k, out)
    return scores


def draw_group_chart(scores: GroupScores, k: int, png: str | Path) -> None:
    """Horizontal bars of the k strongest groups' scores, supporting (blue, right of zero) above
    opposing (orange, left), each with its name, size and value."""
    strongest = scores.strongest(k)
    values = scores.over_targets[strongest]
    scale = max(float(np.abs(values).max()), 1e-30)
    some_negative, all_negative = bool((values < 0).any()), bool((values < 0).all())
    left = CHART_LABELS + 60 if some_negative else CHART_LABELS
    span = CHART_WIDTH - left - 80
    both_signs = some_negative and bool((values > 0).any())
    zero = left + (span // 2 if both_signs else (span if all_negative else 0))  # x of the zero line
    unit = (span // 2 if both_signs else span) / scale
    top = 52
    image = Image.new("RGB", (CHART_WIDTH, top + CHART_ROW * len(strongest) + 40), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    which = f"target {scores.targets[0]}" if len(scores.targets) == 1 else f"mean over {len(scores.targets)} targets"
    draw.text((8, 6), f"Strongest {len(strongest)} of {len(scores.names)} groups ({scores.origin}), {which}",
              fill="black", font=font)
    draw.text((8, 22), f"score: the sum of a group's train scores; scores/{scores.scores}", fill="black", font=font)
    for row, (g, value) in enumerate(zip(strongest, values, strict=True)):
        y = top + row * CHART_ROW
        end = zero + value * unit
        draw.rectangle([min(zero, end), y + 3, max(zero, end), y + CHART_ROW - 3],
                       fill=SUPPORTS if value >= 0 else OPPOSES)
        draw.text((8, y + 5), f"{scores.names[g][:34]} ({scores.sizes[g]})", fill="black", font=font)
        draw.text((max(zero, end) + 4 if value >= 0 else min(zero, end) - 56, y + 5), f"{value:+.3g}",
                  fill="black", font=font)
    bottom = top + CHART_ROW * len(strongest)
    draw.line([zero, top - 4, zero, bottom + 2], fill="black")
    draw.text((8, bottom + 12), "blue: removing the group lowers the output; orange: raises it (as predicted)",
              fill="black", font=font)
    write_atomically(png, lambda f: image.save(f, format="PNG"))


def default_show_file(store: str | Path) -> str:
    """show.html for a store of texts, show.png for one of images."""
    handle = Store.open(store)
    return "show.html" if handle.manifest.tokenizer is not None else "show.png"


def token_section(tokens: Sequence[dict]) -> str:
    """The answer's tokens, each shaded by how concentrated its support is (darker: fewer train
    examples carry it), its strongest supporting train example in its tooltip, then a table."""
    def shaded(t: dict) -> str:
        tip = (f"#{t['train_index']} ({t['train_source'] or '-'}), score {t['score']:+.4g}: {t['train_text']}"
               if t["train_index"] is not None else "no train example supports it")
        return (f'<span style="background:rgba(230,120,0,{t["concentration"]:.3f})" title="{html.escape(tip)}">'
                f"{html.escape(t['token'])}</span>")

    body = "".join(f"<tr><td>{t['position']}</td><td><code>{html.escape(repr(t['token']))}</code></td>"
                   f"<td>{t['concentration']:.2f}</td><td>{t['score']:+.4g}</td><td>{'-' if t['train_index'] is None else t['train_index']}</td>"
                   f"<td>{html.escape(t['train_source'] or '-')}</td><td><pre>{html.escape(t['train_text'] or '')}</pre>"
                   "</td></tr>"
                   for t in tokens)
    return ("<h2>The answer token by token</h2><p>Shading: the share of a token's support held by its "
            "strongest train examples (darker: fewer examples carry it).</p><pre>"
            + "".join(shaded(t) for t in tokens) + "</pre><table><tr><th>position</th><th>token</th>"
            "<th>concentration</th><th>score</th><th>train index</th><th>source</th><th>strongest support</th></tr>"
            + body + "</table>")


def write_page(rows: Sequence[dict], targets: Dataset, train: Dataset, k: int, out: str | Path,
               tokens: Sequence[dict] = ()) -> None:
    """A self-contained HTML page: the target's text, then its supporting and opposing train
    texts with their sources and scores (and, given, the answer token by token). Every text is
    escaped, so markup in a text shows as text."""
    def text_cell(text: str) -> str:
        return f'<pre>{html.escape(text)}</pre>'

    first = rows[0]
    sections = [f"<h1>Target {first['target']}</h1>",
                f"<p>source: {html.escape(first['target_source'] or '-')}</p>{text_cell(first['target_text'])}"]
    if tokens:
        sections.append(token_section(tokens))
    for direction, title in (("supports", "Supporting train texts (raise the target's f)"),
                             ("opposes", "Opposing train texts (lower the target's f)")):
        body = "".join(f"<tr><td>{r['rank']}</td><td>{r['score']:+.4g}</td><td>{r['train_index']}</td>"
                       f"<td>{html.escape(r['train_source'] or '-')}</td><td>{text_cell(r['train_text'])}</td></tr>"
                       for r in rows if r["direction"] == direction)
        sections.append(f"<h2>{title}</h2><table><tr><th>rank</th><th>score</th><th>train index</th>"
                        f"<th>source</th><th>text</th></tr>{body}</table>")
    page = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>trakwomp show: target "
            f"{first['target']}</title><style>body{{font-family:sans-serif;max-width:60em;margin:auto}}"
            "pre{white-space:pre-wrap;margin:0}td,th{border-bottom:1px solid #ddd;padding:4px;"
            "vertical-align:top;text-align:left}</style></head><body>" + "".join(sections) + "</body></html>\n")
    write_atomically(out, lambda f: f.write(page.encode("utf-8")))


def draw_grid(rows: list[dict], targets: Dataset, train: Dataset, k: int, png: str | Path) -> None:
    """Row 1: the target and its supporting train examples; row 2: its opposing ones."""
    target = rows[0]["target"]
    first = [tile(targets[target][0], f"target {target}", rows[0]["target_label"])]
    second = [tile(torch.ones(3, 8, 8), "opposing:", "")]
    for r in rows:
        image = tile(train[r["train_index"]][0], f"{r['score']:+.3g}", f"{r['train_label']} #{r['train_index']}")
        (first if r["direction"] == "supports" else second).append(image)
    grid = make_grid(first + second, nrow=k + 1, padding=4, pad_value=1.0)
    write_atomically(png, lambda f: save_image(grid, f, format="png"))


def tile(image: torch.Tensor, line1: str, line2: str) -> torch.Tensor:
    """An image scaled to TILE x TILE on white, with two lines of caption under it."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise UserError(f"show draws images (channels x height x width), not examples of shape {tuple(image.shape)}")
    picture = to_pil_image(image.clamp(0, 1).expand(3, -1, -1)).resize((TILE, TILE), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (TILE, TILE + CAPTION), "white")
    canvas.paste(picture, (0, 0))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    draw.text((2, TILE + 2), line1, fill="black", font=font)
    draw.text((2, TILE + 14), line2[:16], fill="black", font=font)
    return pil_to_tensor(canvas).float() / 255



# How `show` draws the examples of a dataset, by its `preview`: (file suffix, what, drawing function).
DRAWINGS = {"image": (".png", "images as a PNG grid", draw_grid), "text": (".html", "texts as an HTML page", write_page)}
