"""Tables the commands print (rich): top-k rows, predictions, groups.
"""

from __future__ import annotations

import re
from textwrap import shorten

from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Characters a terminal acts on instead of showing: C0 and C1 controls (ESC starts colours,
# hidden text, OSC 8 links and OSC 52 clipboard writes), DEL, and the bidirectional overrides
# that show text in another order than it is.
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
CONTROL_OR_NEWLINE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str, one_line: bool = False) -> str:
    """`text` with every control character written as its escape (ESC as \\x1b), so that what
    is printed is what the data hold and never acts on the terminal; with `one_line`, newlines
    and tabs too."""
    pattern = CONTROL_OR_NEWLINE if one_line else CONTROL
    return pattern.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def cell(value) -> str:
    """A value from the data (a label, a source, a path, a text) as rich prints it: control
    characters escaped (`printable`), and markup escaped, so that text such as "[/x]" shows as
    written; a real value to 4 digits."""
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else escape(printable(str(value)))


def train_text(row: dict, width: int) -> str:
    """A row's train example as "#index text", on one line and shortened to `width` characters."""
    return f"#{row['train_index']} {shorten(' '.join(row['train_text'].split()), width, placeholder=' ...')}"


def show_top_k(rows: list[dict], title: str) -> None:
    """A table of supporting and opposing train examples, target by target."""
    text = "train_text" in (rows[0] if rows else {})
    table = Table("target", "source" if text else "label", "", "train example", "source" if text else "label", "score",
                  title=title)
    for row in rows:
        first = row["rank"] == 1
        head = first and row["direction"] == "supports"
        if text:
            example = train_text(row, 100)
            cells = (row["target_source"] if head else "", example, row["train_source"])
        else:
            cells = (row["target_label"] if head else "", row["train_path"] or str(row["train_index"]), row["train_label"])
        table.add_row(str(row["target"]) if head else "", *map(cell, (cells[0], row["direction"] if first else "",
                                                                      cells[1], cells[2])), f"{row['score']:+.4g}")
    Console().print(table)


def show_tokens(tokens: list[dict], title: str) -> None:
    """Each answer token, how concentrated its support is, and its strongest supporting train example."""
    table = Table("position", "token", "concentration", "strongest support", "source", "score", title=title)
    for t in tokens:
        example = train_text(t, 80) if t["train_index"] is not None else "(none: no positive score)"
        table.add_row(str(t["position"]), cell(repr(t["token"])), f"{t['concentration']:.2f}", cell(example),
                      cell(t["train_source"]), f"{t['score']:+.4g}")
    Console().print(table)


def show_predictions(values, what: str, title: str, caption: str | None = None) -> None:
    table = Table("target", what, title=title, caption=caption)
    for t, value in enumerate(values):
        table.add_row(str(t), f"{value:+.4f}")
    Console().print(table)


def group_title(scores) -> str:
    which = f"target {scores.targets[0]}" if len(scores.targets) == 1 else f"the mean over {len(scores.targets)} targets"
    return f"Group scores for {which} (groups: {scores.origin}; scores/{scores.scores})"


def show_group_rows(rows: list[dict], title: str, notes: list[str]) -> None:
    """A table of groups: size, score, score per example, predicted change if removed (and that
    change calibrated, where the rows have it)."""
    calibrated = bool(rows) and "calibrated_change_if_removed" in rows[0]
    table = Table("rank", "group", "examples", "score", "per example", "change if removed",
                  *(["calibrated change"] if calibrated else []), title=cell(title), caption="\n".join(notes) or None)
    for row in rows:
        table.add_row(str(row["rank"]), cell(row["group"]), str(row["examples"]), f"{row['score']:+.4g}",
                      f"{row['score_per_example']:+.3g}", f"{row['change_if_removed']:+.4g}",
                      *([f"{row['calibrated_change_if_removed']:+.4g}"] if calibrated else []))
    Console().print(table)


def calibration_note(calibration) -> list[str]:
    if calibration is None:
        return ["change if removed: in score units (no LDS models on these targets to calibrate it)"]
    if not calibration.usable:
        return [f"change if removed: in score units; not calibrated: the {calibration.describe()} is not "
                "positive at p < 0.05 on these targets"]
    return [f"calibrated change: the change x {calibration.describe()} on these targets"]


def interval(low: float | None, high: float | None) -> str:
    return "" if low is None or high is None else f"[{low:+.3g}, {high:+.3g}]"


def show_verify(report) -> None:
    """verify's findings: per condition, the actual change of f (95% interval over seeds) and the
    predicted one, for the target set's mean, then target by target (up to 20)."""
    calibrated = report.conditions[0].calibrated is not None
    which = f"target {report.targets[0]}" if len(report.targets) == 1 else f"the mean of {len(report.targets)} targets"
    table = Table("condition", "removed", "actual change", "95% interval", "predicted", *(["calibrated"] if calibrated else []),
                  title=f"verify: {which}, {report.seeds} seed(s), removals ranked by {report.method} (scores/{report.scores})",
                  caption=verify_caption(report))
    for c in report.conditions:
        table.add_row(c.condition, str(c.removed), f"{c.mean_actual:+.4g}", interval(c.mean_low, c.mean_high),
                      f"{c.mean_predicted:+.4g}", *([f"{c.mean_calibrated:+.4g}"] if calibrated else []))
    Console().print(table)
    if len(report.targets) > 1:
        shown = report.targets[:20]
        per_target = Table("target", *(f"{c.condition} actual / predicted" for c in report.conditions), "order holds",
                           title="Target by target" + (f" (the first 20 of {len(report.targets)}; --json has all)"
                                                       if len(report.targets) > 20 else ""))
        for t, target in enumerate(shown):
            holds = all(checks[t] for checks in report.holds.values())
            per_target.add_row(str(target), *(f"{c.actual[t]:+.3g} / {c.predicted[t]:+.3g}" for c in report.conditions),
                               "yes" if holds else "no")
        Console().print(per_target)


def verify_caption(report) -> str:
    """The checks of sign and order on the set's mean, and the predicted-actual correlation."""
    checks = [f"{name.replace('_', ' ')}: {'yes' if values[-1] else 'no'}" for name, values in report.holds.items()]
    per_target = [f"{sum(values[:-1])} of {len(values) - 1} targets" for values in report.holds.values()]
    lines = [f"{check} ({count})" for check, count in zip(checks, per_target, strict=True)]
    if report.correlation is not None:
        lines.append(f"correlation of predicted and actual changes (targets x conditions): {report.correlation:+.2f}")
    lines.append("changes in f's units; predicted = minus the removed examples' scores"
                 + (", calibrated by the LDS models" if report.conditions[0].calibrated is not None else
                    " (score units: no usable LDS calibration on these targets)"))
    return "\n".join(lines)
