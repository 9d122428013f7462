"""Tables, CSV and plots from the results of a run (finished or half-finished).

Every function takes the typed results (``results.RunResults``) or a results dict (results.json,
also of older runs), which it reads with ``RunResults.from_json`` first: a malformed one is one
``MergeclError`` naming the key, before any file is written. See ``results`` for what a method's
entry holds; here:

- a method whose model broke (a non-finite loss, weight or output) shows "failed" in every metric
  column, never a number, and report.md lists the messages;
- a metric that is None is shown as "-"; a final-only method (joint training on every task) has
  only its final and all-class accuracy, and no heatmap;
- the number of tasks of the run is ``run.num_tasks``, else the number of task names, else the width
  of the widest accuracy matrix;
- a half-finished run may have seeds at different steps: the numbers are those of the seeds that went
  furthest (the runner never averages seeds at different steps), and every output says which seeds
  and steps they cover whenever that is not simply every seed at the same step (a note under the
  tables, a ``coverage`` column in the CSV).

Figures (``write_report``): a heatmap of the accuracy matrix per method (the mean over seeds, said in its
title), ACC_t over tasks (the mean over seeds, a band of ± 1 std over seeds when there are several) and
final ACC against BWT (one point per method, error bars of ± 1 std over seeds); each as PNG at 300 dpi
and, as asked, SVG and PDF (vector, text kept as text). Plots use matplotlib's object API (``Figure``),
never pyplot: no display is needed and the caller's global backend is left alone. Every file is written
atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mergecl.atomic import atomic_write_bytes, atomic_write_text
from mergecl.errors import MergeclError
from mergecl.evaluation import metrics
from mergecl.evaluation.results import MethodResult, RunResults

__all__ = [
    "DEFAULT_FORMATS",
    "FORMATS",
    "METRIC_COLUMNS",
    "acc_over_tasks_figure",
    "acc_over_tasks_png",
    "coverage_notes",
    "failures",
    "figure_bytes",
    "format_table",
    "heatmap_figure",
    "heatmap_png",
    "markdown_table",
    "parse_formats",
    "tradeoff_figure",
    "write_csv",
    "write_report",
]

Results = RunResults | Mapping[str, Any]  # typed, or a results dict (results.json)

# (metric, column header); the order of the tables and of the CSV.
METRIC_COLUMNS: tuple[tuple[str, str], ...] = (
    ("final_acc", "final ACC"),
    ("avg_incremental_acc", "avg inc ACC"),
    ("bwt", "BWT"),
    ("forgetting", "forgetting"),
    ("all_class_acc", "all-class ACC"),
    ("wall_time_s", "time"),
)
MISSING = "-"
FAILED = "failed"  # in every metric cell of a failed method


# --------------------------------------------------------------------------------------------------
# What the outputs show of a method


def _task_names(results: RunResults) -> list[str] | None:
    names = results.run.task_names
    return [str(n) for n in names] if names else None


def _matrix(result: MethodResult) -> np.ndarray | None:
    """An every-step method's accuracy matrix as an (s, T) array; None: final only, or no matrix."""
    return None if result.steps is None else metrics.as_accuracy_matrix(result.matrix)


def _seed_list(seeds: list[str]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(seeds)


def _coverage_note(name: str, result: MethodResult, num_tasks: int | None) -> str | None:
    """Which seeds and steps a method's numbers cover, when not simply every seed at the same step."""
    coverage, in_numbers = result.steps_per_seed(), result.seeds_in_numbers()
    if not coverage or in_numbers is None:
        return None

    def at(seed: str) -> str:
        steps = coverage[seed]
        return f"{seed} (not started)" if steps == 0 else f"{seed} (step {steps}/{num_tasks or steps})"

    steps_in = {coverage[seed] for seed in in_numbers}
    left_out = [seed for seed in coverage if seed not in in_numbers]
    if len(steps_in) > 1:  # results written before coverage: seeds at different steps averaged
        return f"{name}: the numbers average seeds at different steps: {', '.join(map(at, in_numbers))}"
    if not left_out:
        return None
    (steps,) = steps_in or {0}
    covered = f"{_seed_list(in_numbers)} at step {steps}/{num_tasks or steps}" if in_numbers else "no seed"
    return f"{name}: the numbers cover {covered}; not in them: {', '.join(map(at, left_out))}"


def coverage_notes(results: Results) -> list[str]:
    """One line per method whose numbers do not cover every seed of the run at the same step."""
    results = RunResults.read(results)
    notes = (_coverage_note(name, result, results.num_tasks) for name, result in results.methods.items())
    return [note for note in notes if note]


def failures(results: Results) -> list[str]:
    """The message of every failed method (a model that broke: non-finite loss, weights or outputs)."""
    return RunResults.read(results).failures()


# --------------------------------------------------------------------------------------------------
# Formatting cells


def _format_duration(seconds: float) -> str:
    # Round before choosing the unit, so that 59.97 s shows as "1m00s", never "60.0s".
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds < 59.95:
        return f"{seconds:.1f}s"
    if round(seconds) < 3600:
        minutes, secs = divmod(round(seconds), 60)
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours}h{minutes:02d}m"


def _format_value(key: str, value: float | None, std: float | None) -> str:
    if value is None:
        return MISSING
    fmt = _format_duration if key == "wall_time_s" else (lambda v: f"{v:.2f}")
    return fmt(value) if std is None else f"{fmt(value)} ± {fmt(std)}"


def _cells(name: str, result: MethodResult, num_tasks: int | None) -> list[str]:
    if result.failed is not None:
        return [name, MISSING] + [FAILED] * len(METRIC_COLUMNS)
    steps = result.steps
    tasks = MISSING if steps is None else f"{steps}/{num_tasks or steps}"
    return [name, tasks] + [_format_value(k, result.value(k), result.std.get(k)) for k, _ in METRIC_COLUMNS]


def _headers() -> list[str]:
    return ["method", "tasks"] + [header for _, header in METRIC_COLUMNS]


# --------------------------------------------------------------------------------------------------
# Tables


def format_table(results: Results) -> str:
    """A fixed-width plain-text table for the terminal: one row per method, every line the same width.

    Columns: method, tasks done / tasks, final ACC, avg inc ACC, BWT, forgetting, all-class ACC, time.
    Values are ``mean ± std`` when the entry has a std for that metric; missing values are "-".
    """
    results = RunResults.read(results)
    table = [_headers()] + [_cells(name, result, results.num_tasks) for name, result in results.methods.items()]
    widths = [max(len(line[c]) for line in table) for c in range(len(table[0]))]

    def render(line: list[str]) -> str:
        # Method name left-aligned, numbers right-aligned so that decimal points line up.
        parts = [line[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(line[1:], widths[1:], strict=True)]
        return "  ".join(parts)

    lines = [render(table[0]), "  ".join("-" * w for w in widths)] + [render(line) for line in table[1:]]
    notes = coverage_notes(results)
    return "\n".join(lines) + "\n" + "".join(f"\nnote: {note}" for note in notes) + ("\n" if notes else "")


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|")


def markdown_table(results: Results) -> str:
    """The same table as ``format_table`` as a GitHub-flavoured Markdown table."""
    results = RunResults.read(results)
    headers = _headers()
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|",
    ]
    for name, result in results.methods.items():
        lines.append("| " + " | ".join(_md_escape(c) for c in _cells(name, result, results.num_tasks)) + " |")
    return "\n".join(lines) + "\n"


def _csv_text(results: RunResults) -> str:
    num_tasks = results.num_tasks
    header = ["method", "steps_done", "num_tasks", "n_seeds"]
    for key, _ in METRIC_COLUMNS:
        header += [key, f"{key}_std"]
    header += ["seeds", "coverage"]  # the seeds in the numbers; seed:steps of every seed
    header.append("failed")  # the failure's message; empty for a method with numbers
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for name, result in results.methods.items():
        steps, n_seeds = result.steps, None if result.seeds is None else len(result.seeds)
        line: list[Any] = [name, steps, num_tasks if steps is not None else None, n_seeds]
        for key, _ in METRIC_COLUMNS:
            line += [result.value(key), result.std.get(key)]
        line += [" ".join(result.seeds_in_numbers() or []) or None, _coverage_cell(result)]
        line.append(result.failed)
        # Full precision (repr) for numbers, empty cells for missing values.
        writer.writerow(["" if v is None else v for v in line])
    return buffer.getvalue()


def _coverage_cell(result: MethodResult) -> str | None:
    coverage = result.steps_per_seed()
    return " ".join(f"{seed}:{steps}" for seed, steps in coverage.items()) if coverage else None


def write_csv(results: Results, path: str | os.PathLike[str]) -> Path:
    """Write one CSV row per method (metric and ``<metric>_std`` columns, full precision). Atomic."""
    return atomic_write_text(path, _csv_text(RunResults.read(results)))


# --------------------------------------------------------------------------------------------------
# Plots
#
# Every figure is built once and saved in each format asked for: PNG at print resolution (``DPI``),
# SVG with its text as text (searchable, editable), PDF with TrueType fonts; saved with
# ``bbox_inches="tight"`` so that no label is cut, and without a date so that the files of the same
# results are the same bytes. A method keeps its colour, line style and marker (``_style``) in every
# figure of a report.

FORMATS = ("png", "svg", "pdf")
DEFAULT_FORMATS = ("png", "svg")  # report.md shows the PNGs; the SVGs are for papers and slides
DPI = 300
# Okabe-Ito: told apart also by colour-blind readers and in greyscale together with styles and markers
_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_TICK_WRAP = 16  # characters per line of a task name on an axis


def _style(index: int) -> dict[str, Any]:
    """The colour, line style and marker of the index-th method: every triple differs for the first 40
    methods, and lines with equal values stay visible (different dashes, hollow markers of different
    shapes drawn over each other)."""
    return {
        "color": _COLOURS[index % len(_COLOURS)],
        "linestyle": _LINESTYLES[index % len(_LINESTYLES)],
        "marker": _MARKERS[index % len(_MARKERS)],
    }


def parse_formats(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"png,svg"`` (or a list) as a tuple of formats, checked; PNG always among them (report.md shows it)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    formats = [item.strip().lower().lstrip(".") for item in items if item.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise MergeclError(
            f"figure format {', '.join(map(repr, unknown)) or 'list empty'}: choose among {', '.join(FORMATS)}"
        )
    return tuple(f for f in FORMATS if f in formats or f == "png")


def figure_bytes(fig: Any, fmt: str = "png") -> bytes:
    """The bytes of a figure in one format (png at ``DPI``, svg with text as text, pdf with TrueType)."""
    from matplotlib import rc_context

    if fmt not in FORMATS:
        raise MergeclError(f"figure format {fmt!r}: choose among {', '.join(FORMATS)}")
    metadata = {"png": {"Software": None}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}[fmt]
    buffer = io.BytesIO()
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "mergecl", "pdf.fonttype": 42}):
        fig.savefig(buffer, format=fmt, dpi=DPI, bbox_inches="tight", pad_inches=0.05, metadata=metadata)
    return buffer.getvalue()


def _figure_png(fig: Any) -> bytes:
    return figure_bytes(fig, "png")


def _tick_labels(names: list[str] | None, count: int) -> list[str]:
    """Full task names (never cut); numbers 1..count when the names are missing or too few."""
    if names and len(names) >= count:
        return [str(n) for n in names[:count]]
    return [str(i + 1) for i in range(count)]


def _wrapped(label: str) -> str:
    import textwrap

    return textwrap.fill(label, _TICK_WRAP, break_long_words=False, break_on_hyphens=False) or label


def _seed_words(result: MethodResult | None, unit: str = "seeds") -> str | None:
    """What a method's numbers average, in words: "mean over 3 seeds", "seed 0" (``unit``: "streams"
    for a run with several task orders per seed); None: not known."""
    if result is None:
        return None
    seeds = result.seeds_in_numbers() or (list(result.seeds) if result.seeds else None)
    if not seeds:
        return None
    return f"{unit[:-1]} {seeds[0]}" if len(seeds) == 1 else f"mean over {len(seeds)} {unit}"


def heatmap_figure(
    method: str,
    matrix: np.ndarray,
    num_tasks: int | None = None,
    task_names: list[str] | None = None,
    seeds: str | None = None,
) -> Any:
    """The figure of one accuracy matrix: rows = model after step t, columns = task i, cells annotated.

    All ``num_tasks`` rows are drawn; steps not run yet stay grey. The red staircase separates tasks
    already trained (left, ``i <= t``) from future tasks (right: zero-shot / forward transfer).
    ``seeds`` says what the cells are (e.g. "mean over 3 seeds"), in the title.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    steps, width = matrix.shape
    size = max(width, steps, num_tasks or 0)
    grid = np.full((size, size), np.nan)
    grid[:steps, :width] = matrix
    vmax = max(100.0, float(np.nanmax(matrix)))  # percent; never let one method rescale the colours

    side = min(1.5 + 0.55 * size, 12.0)
    fig = Figure(figsize=(side + 1.4, side), layout="constrained")
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="#e6e6e6")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, label="accuracy (%)", shrink=0.8)

    if size <= 25:  # beyond that the numbers are unreadable; the colours remain
        fontsize = 9 if size <= 8 else 7  # cells keep a fixed size (the figure grows with T)
        for t in range(steps):
            for i in range(width):
                value = grid[t, i]
                if math.isfinite(value):
                    r, g, b, _ = cmap(value / vmax)
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                    ax.text(
                        i,
                        t,
                        f"{value:.1f}",
                        ha="center",
                        va="center",
                        fontsize=fontsize,
                        color="white" if dark else "black",
                        fontstyle="normal" if i <= t else "italic",
                    )

    # Staircase along the diagonal: cell (t, i) is "seen" when i <= t.
    xs, ys = [-0.5], [-0.5]
    for t in range(steps):  # only along the rows that exist: pending rows stay plain grey
        xs += [t + 0.5, t + 0.5]
        ys += [t - 0.5, t + 0.5]
    ax.plot(xs, ys, color="#d62728", linewidth=2.0)

    labels = [_wrapped(label) for label in _tick_labels(task_names, size)]
    rotate = bool(task_names) and len(task_names) >= size  # names: slanted; numbers stay upright
    ax.set_xticks(
        range(size),
        labels,
        rotation=40 if rotate else 0,
        ha="right" if rotate else "center",
        rotation_mode="anchor" if rotate else "default",
        fontsize=8 if rotate else None,
    )
    ax.set_yticks(range(size), labels, fontsize=8 if rotate else None)
    ax.set_xlim(-0.5, size - 0.5)
    ax.set_ylim(size - 0.5, -0.5)
    ax.set_xlabel("evaluated on task i")
    ax.set_ylabel("model after training task t")
    done = "" if steps >= size else f", {steps}/{size} tasks done"
    what = f"accuracy (%), {seeds}" if seeds else "accuracy (%)"
    ax.set_title(f"{method}\n{what}{done}", fontsize=10)
    return fig


def heatmap_png(
    method: str,
    matrix: np.ndarray,
    num_tasks: int | None = None,
    task_names: list[str] | None = None,
    seeds: str | None = None,
) -> bytes:
    """PNG bytes of ``heatmap_figure``."""
    return _figure_png(heatmap_figure(method, matrix, num_tasks, task_names, seeds))


def _band(result: MethodResult, steps: int) -> tuple[np.ndarray, int] | None:
    """(std over seeds of ACC_t per step, number of seeds) from the per-seed summaries of the seeds
    in the numbers; None: fewer than two seeds with a matrix of every step."""
    chosen = result.seeds_in_numbers() or list(result.seeds or {})
    curves = []
    for seed in chosen:
        summary = (result.seeds or {}).get(seed)
        if summary is None or summary.final_only or not summary.matrix or len(summary.matrix) < steps:
            continue
        matrix = metrics.as_accuracy_matrix(summary.matrix[:steps])
        curves.append(metrics.incremental_accs(matrix))
    if len(curves) < 2:
        return None
    return np.std(np.asarray(curves, dtype=float), axis=0, ddof=1), len(curves)


def acc_over_tasks_figure(
    curves: Mapping[str, list[float]],
    num_tasks: int | None = None,
    bands: Mapping[str, list[float] | np.ndarray] | None = None,
    seeds: str | None = None,
    unit: str = "seeds",
) -> Any:
    """``ACC_t`` against the number of tasks trained, one line per method; ``bands[method]``: the std over
    seeds per step, drawn as a shaded band of ± 1 std around the line (said in the legend's title).
    ``seeds`` (e.g. "mean over 3 seeds") goes in the title; ``unit``: what the seeds are ("streams" for
    a run with several task orders per seed)."""
    from matplotlib.figure import Figure

    bands = bands or {}
    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    longest = max([len(c) for c in curves.values()] + [num_tasks or 0, 1])
    lines = []
    for i, (method, accs) in enumerate(curves.items()):
        style = _style(i)
        xs = np.arange(1, len(accs) + 1)
        band = bands.get(method)
        label = method
        if accs:
            final = f"{accs[-1]:.1f}" + (f" ± {float(band[len(accs) - 1]):.1f}" if band is not None else "")
            label = f"{method} ({final})"
        (line,) = ax.plot(
            xs,
            accs,
            **style,
            linewidth=1.6,
            markersize=6.5 - 0.4 * (i % 4),
            markerfacecolor="none",
            markeredgewidth=1.3,
            label=label,
            zorder=3,
        )
        if band is not None and accs:
            spread = np.asarray(band, dtype=float)[: len(accs)]
            mean = np.asarray(accs, dtype=float)
            ax.fill_between(xs, mean - spread, mean + spread, color=style["color"], alpha=0.15, lw=0, zorder=2)
        lines.append((accs[-1] if accs else float("-inf"), line))
    top = max([max(c) for c in curves.values() if c] + [100.0])
    ax.set_ylim(0.0, top * 1.02)
    ax.set_xlim(0.75, longest + 0.25)
    ax.set_xticks(range(1, longest + 1) if longest <= 25 else np.linspace(1, longest, 10, dtype=int))
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("ACC$_t$: mean accuracy on tasks seen (%)")
    ax.set_title("Accuracy over tasks" + (f" ({seeds})" if seeds else ""), fontsize=11)
    ax.grid(True, alpha=0.3)
    if curves:  # outside the axes, best final ACC first
        ranked = [line for _, line in sorted(lines, key=lambda pair: -pair[0])]
        title = f"final ACC ± std\n(band: ± 1 std over {unit})" if bands else "final ACC"
        ax.legend(
            handles=ranked, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title=title, title_fontsize=8
        )
    return fig


def acc_over_tasks_png(
    curves: Mapping[str, list[float]],
    num_tasks: int | None = None,
    bands: Mapping[str, list[float] | np.ndarray] | None = None,
    seeds: str | None = None,
) -> bytes:
    """PNG bytes of ``acc_over_tasks_figure``."""
    return _figure_png(acc_over_tasks_figure(curves, num_tasks, bands, seeds))


def _tradeoff_points(results: RunResults) -> list[tuple[int, str, MethodResult]]:
    """(style index, name, result) of the methods with both a final ACC and a BWT."""
    return [
        (i, name, result)
        for i, (name, result) in enumerate(results.methods.items())
        if result.failed is None and result.final_acc is not None and result.bwt is not None
    ]


def tradeoff_figure(results: Results) -> Any:
    """Final ACC against BWT, one point per method (the stability/plasticity picture), with error bars
    of ± 1 std over seeds where the run has several; each point labelled with its method."""
    from matplotlib.figure import Figure

    results = RunResults.read(results)
    points = _tradeoff_points(results)
    fig = Figure(figsize=(6.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    with_std = False
    for i, name, result in points:
        style = _style(i)
        xerr, yerr = result.std.get("bwt"), result.std.get("final_acc")
        with_std = with_std or xerr is not None or yerr is not None
        ax.errorbar(
            [result.bwt],
            [result.final_acc],
            xerr=None if xerr is None else [xerr],
            yerr=None if yerr is None else [yerr],
            color=style["color"],
            marker=style["marker"],
            markersize=7,
            markerfacecolor="none",
            markeredgewidth=1.5,
            linestyle="none",
            elinewidth=1.0,
            capsize=3,
            label=name,
            zorder=3,
        )
    ax.axvline(0.0, color="0.5", linewidth=0.8, linestyle="--", zorder=1)
    if points:  # every point and its error bars inside, the line BWT = 0 too, room for the labels
        xlo = [r.bwt - r.std.get("bwt", 0.0) for _, _, r in points] + [0.0]
        xhi = [r.bwt + r.std.get("bwt", 0.0) for _, _, r in points] + [0.0]
        ylo = [r.final_acc - r.std.get("final_acc", 0.0) for _, _, r in points]
        yhi = [r.final_acc + r.std.get("final_acc", 0.0) for _, _, r in points]
        xpad = max(0.5, 0.06 * (max(xhi) - min(xlo)))
        ypad = max(0.5, 0.06 * (max(yhi) - min(ylo)))
        ax.set_xlim(min(xlo) - xpad, max(xhi) + 3 * xpad)
        ax.set_ylim(min(ylo) - ypad, max(yhi) + ypad)
    ax.set_xlabel("BWT (%): stability (0 = no forgetting, negative = forgetting)")
    ax.set_ylabel("final ACC (%): mean accuracy on all tasks")
    seeds, unit = _run_seed_words(results), results.run.unit
    bars = f"error bars: ± 1 std over {unit}" if with_std else f"single {unit[:-1]}: no error bars"
    ax.set_title(
        f"Final accuracy vs backward transfer\n({seeds}; {bars})"
        if seeds
        else f"Final accuracy vs backward transfer\n({bars})",
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    _place_labels(fig, ax, [(name, r.bwt, r.final_acc, _style(i)["color"]) for i, name, r in points])  # last
    return fig


LABEL_SIZE = 8.0  # points
LABEL_RINGS = (7.0, 13.0, 20.0, 28.0, 38.0, 50.0, 64.0, 80.0, 100.0, 125.0)  # offsets tried, in points
LABEL_ANGLES = (30, -30, 90, -90, 150, -150, 0, 180, 60, -60, 120, -120)  # degrees, right and up first


def _place_labels(fig: Any, ax: Any, labels: list[tuple[str, float, float, str]]) -> None:
    """Each (name, x, y, color) label beside its point where it overlaps no other label and no
    marker and stays inside the axes: tried on rings of growing radius around the point, nearest
    first; joined to its point by a thin line when it stands off. Sizes in points, measured from the
    text's outline, so the placement holds in every format and dpi; the axes' place is the
    constrained layout's (fixed first), and the labels take no part in it."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath

    fig.draw_without_rendering()
    to_points = 72.0 / fig.dpi
    box = ax.get_window_extent()
    frame = (box.x0 * to_points, box.y0 * to_points, box.x1 * to_points, box.y1 * to_points)
    at = [tuple(v * to_points for v in ax.transData.transform((x, y))) for _, x, y, _ in labels]
    marker = 5.0  # half the marker's box (markersize 7 and its edge)
    taken = [(px - marker, py - marker, px + marker, py + marker) for px, py in at]
    font = FontProperties(size=LABEL_SIZE)
    pad = 0.15 * LABEL_SIZE + 0.5  # the label's bbox pad, and a hair
    for (name, x, y, color), (px, py) in sorted(zip(labels, at, strict=True), key=lambda item: -item[1][1]):
        extents = TextPath((0, 0), name, prop=font).get_extents()
        width, height = extents.width + 2 * pad, LABEL_SIZE * 1.2 + 2 * pad
        best = None
        for radius in LABEL_RINGS:
            for angle in LABEL_ANGLES:
                dx, dy = radius * math.cos(math.radians(angle)), radius * math.sin(math.radians(angle))
                left = px + dx - width * (0.0 if dx > 1e-6 else 1.0 if dx < -1e-6 else 0.5)
                bottom = py + dy - height * (0.0 if dy > 1e-6 else 1.0 if dy < -1e-6 else 0.5)
                rect = (left, bottom, left + width, bottom + height)
                cost = sum(_overlap(rect, other) for other in taken) + _outside(rect, frame)
                if best is None or cost < best[0]:
                    best = (cost, radius, dx, dy, rect)
                if cost == 0.0:
                    break
            if best[0] == 0.0:
                break
        _, radius, dx, dy, rect = best
        taken.append(rect)
        ax.annotate(
            name,
            (x, y),
            xytext=(dx, dy),
            textcoords="offset points",
            ha="left" if dx > 1e-6 else "right" if dx < -1e-6 else "center",
            va="bottom" if dy > 1e-6 else "top" if dy < -1e-6 else "center",
            fontsize=LABEL_SIZE,
            color=color,
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
            arrowprops=None
            if radius == LABEL_RINGS[0]
            else {"arrowstyle": "-", "color": color, "linewidth": 0.6, "shrinkA": 0, "shrinkB": 4},
            annotation_clip=False,
            zorder=4,
        ).set_in_layout(False)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """The area two boxes (x0, y0, x1, y1) share."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _outside(rect: tuple[float, ...], frame: tuple[float, ...]) -> float:
    """How much of a box lies outside the frame (its area, weighted to count more than an overlap)."""
    inside = _overlap(rect, frame)
    return 10.0 * ((rect[2] - rect[0]) * (rect[3] - rect[1]) - inside)


def _run_seed_words(results: RunResults) -> str | None:
    """What the numbers of the run average, when every method with numbers says the same."""
    unit = results.run.unit
    words = {_seed_words(r, unit) for r in results.methods.values() if r.failed is None and r.steps is not None}
    words.discard(None)
    return words.pop() if len(words) == 1 else None


# --------------------------------------------------------------------------------------------------
# The report folder


def _slug(name: str, taken: set[str]) -> str:
    # Safe on every file system; unique case-insensitively (macOS, Windows).
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "method"
    slug, n = base, 2
    while slug.lower() in taken:
        slug, n = f"{base}-{n}", n + 1
    taken.add(slug.lower())
    return slug


def _format_meta(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def matrix_markdown(matrix: np.ndarray, names: list[str] | None) -> str:
    labels = _tick_labels(names, matrix.shape[1])
    lines = [
        "| after \\ on | " + " | ".join(_md_escape(x) for x in labels) + " |",
        "|:---|" + "---:|" * matrix.shape[1],
    ]
    for t, row in enumerate(matrix):
        cells = [f"{v:.2f}" if math.isfinite(v) else MISSING for v in row]
        lines.append(f"| {_md_escape(labels[t])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _failure_list(messages: list[str]) -> str:
    return "".join(f"- {_md_escape(message)}\n" for message in messages)


def _report_markdown(
    results: RunResults, heatmaps: list[tuple[str, np.ndarray, str]], has_curves: bool, has_tradeoff: bool
) -> str:
    run = results.run.to_json()
    title = results.run.title
    unit = results.run.unit
    parts = [f"# mergecl report{f': {title}' if title else ''}\n"]
    if run:
        meta = [f"- **{_md_escape(str(k))}**: {_md_escape(_format_meta(v))}" for k, v in run.items()]
        parts.append("\n".join(meta))
        parts.append("")
    notes = coverage_notes(results)
    failed = results.failures()
    parts += [
        "## Results\n",
        markdown_table(results),
        *([f"**Failed** (the model broke; no number is reported):\n\n{_failure_list(failed)}"] if failed else []),
        *(["**Seeds and steps:**\n", "".join(f"- {_md_escape(note)}\n" for note in notes)] if notes else []),
        "Percent. final ACC = mean accuracy of the last model on the tasks seen; avg inc ACC = mean of "
        "ACC_t over steps; BWT = mean(A[last][i] - A[i][i]) (negative = forgetting); forgetting = "
        "mean over old tasks of (best earlier accuracy - last accuracy); all-class ACC = final model on "
        "the union of all test sets with a head over all classes; tasks = steps done / tasks.\n",
    ]
    if has_curves:
        parts += [
            "## Accuracy over tasks\n",
            "![ACC_t per method](acc_over_tasks.png)\n",
            f"Mean over {unit}; the shaded band is ± 1 std over {unit} (when the run has several).\n",
        ]
    if has_tradeoff:
        parts += [
            "## Final ACC vs BWT\n",
            "![final ACC against BWT per method](final_acc_vs_bwt.png)\n",
            f"One point per method; error bars: ± 1 std over {unit} (when the run has several).\n",
        ]
    if heatmaps:
        parts.append("## Accuracy matrices\n")
        parts.append(
            "Row t = model after training task t, column i = test set of task i (italic in the "
            "images: tasks not trained yet); the mean over the seeds in the numbers.\n"
        )
        names = _task_names(results)
        for name, matrix, filename in heatmaps:
            alt = re.sub(r"[\[\]]", "", name)
            parts += [
                f"### {_md_escape(name)}\n",
                f"![{alt}]({filename})\n",
                matrix_markdown(matrix, names),
            ]
    return "\n".join(parts)


def write_report(
    results: Results, out_dir: str | os.PathLike[str], formats: str | tuple[str, ...] | list[str] = DEFAULT_FORMATS
) -> list[Path]:
    """Write report.md, results.csv and the figures: ``heatmap_<method>``, ``acc_over_tasks`` and
    ``final_acc_vs_bwt``, each in every format of ``formats`` (see ``parse_formats``; PNG always, since
    report.md shows the PNGs).

    Works on half-finished runs (fewer matrix rows than tasks). Methods without an accuracy matrix of
    every step (final only, failed) appear in the tables and the scatter only (final only: in neither,
    it has no BWT). Returns the paths written, report.md first.
    """
    out = Path(out_dir)
    formats = parse_formats(formats)  # checked, like the results, before the first file is written
    results = RunResults.read(results)
    num_tasks = results.num_tasks
    names = _task_names(results)
    matrices = {name: _matrix(result) for name, result in results.methods.items()}
    matrices = {name: matrix for name, matrix in matrices.items() if matrix is not None}
    taken: set[str] = set()
    heatmaps = [(name, matrix, f"heatmap_{_slug(name, taken)}") for name, matrix in matrices.items()]
    curves = {name: metrics.incremental_accs(matrix) for name, matrix in matrices.items()}
    bands = {}
    for name, curve in curves.items():
        band = _band(results.methods[name], len(curve))
        if band is not None:
            bands[name] = band[0]
    has_tradeoff = bool(_tradeoff_points(results))

    written = [out / "report.md", out / "results.csv"]
    images = []

    def save(fig: Any, stem: str) -> None:
        for fmt in formats:
            images.append(atomic_write_bytes(out / f"{stem}.{fmt}", figure_bytes(fig, fmt)))

    for name, matrix, stem in heatmaps:
        seeds = _seed_words(results.methods[name], results.run.unit)
        save(heatmap_figure(name, matrix, num_tasks, names, seeds), stem)
    if curves:
        seeds = _run_seed_words(results)
        save(acc_over_tasks_figure(curves, num_tasks, bands, seeds, results.run.unit), "acc_over_tasks")
    if has_tradeoff:
        save(tradeoff_figure(results), "final_acc_vs_bwt")
    write_csv(results, out / "results.csv")
    # report.md last: once it exists, everything it links to exists too.
    heatmap_pngs = [(name, matrix, f"{stem}.png") for name, matrix, stem in heatmaps]
    atomic_write_text(out / "report.md", _report_markdown(results, heatmap_pngs, bool(curves), has_tradeoff))
    return written + images
