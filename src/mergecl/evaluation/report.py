"""Tables, CSV and plots from the results dict of a run (finished or half-finished).

The results dict::

    {
      "run": {"config": "clinc150-magmax", "scenario": "class-incremental",
              "task_names": ["t1", ...], "machine": "...", ...},          # optional metadata
      "methods": {
        "magmax": {"accuracy_matrix": [[...], ...], "final_acc": 81.2, "avg_incremental_acc": 85.0,
                   "bwt": -3.1, "forgetting": 4.0, "all_class_acc": 79.9,   # any may be None/absent
                   "wall_time_s": 61.5,                                      # optional
                   "seeds": {...},                                           # optional, only counted
                   "std": {"final_acc": 0.4, ...},                           # optional, over seeds
                   "coverage": {"0": 5, "1": 5, "2": 3}},                    # optional, steps per seed
        ...
      }
    }

A method whose model broke (a non-finite loss, weight or output) has only ``{"failed": "<message>"}``:
every output shows "failed" for it, never a number, and report.md lists the messages.

A metric that is absent from a method's entry but derivable from its accuracy matrix is computed from
the matrix (so a run that has only stored its matrix so far still gets a full table); a metric that is
present but ``None`` is shown as "-". The number of tasks of the run is ``run.num_tasks``, else the
length of ``run.task_names``, else the width of the widest accuracy matrix.

A half-finished run may have seeds at different steps. ``coverage`` gives the steps each seed has
done; the numbers are those of the seeds that went furthest (the runner never averages seeds at
different steps), and every output says which seeds and steps they cover whenever that is not
simply every seed at the same step (a note under the tables, a ``coverage`` column in the CSV).

Plots use matplotlib's object API (``Figure`` + Agg canvas), never pyplot: no display is needed and the
caller's global backend is left alone. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mergecl.atomic import atomic_write_bytes, atomic_write_text
from mergecl.errors import MergeclError
from mergecl.evaluation import metrics

__all__ = [
    "METRIC_COLUMNS",
    "acc_over_tasks_png",
    "format_table",
    "heatmap_png",
    "markdown_table",
    "write_csv",
    "write_report",
]

# (key in a method entry, column header); the order of the tables and of the CSV.
METRIC_COLUMNS: tuple[tuple[str, str], ...] = (
    ("final_acc", "final ACC"),
    ("avg_incremental_acc", "avg inc ACC"),
    ("bwt", "BWT"),
    ("forgetting", "forgetting"),
    ("all_class_acc", "all-class ACC"),
    ("wall_time_s", "time"),
)
_DERIVED = {
    "final_acc": metrics.final_acc,
    "avg_incremental_acc": metrics.avg_incremental_acc,
    "bwt": metrics.bwt,
    "forgetting": metrics.forgetting,
}
MISSING = "-"
FAILED = "failed"  # in every metric cell of a failed method


# --------------------------------------------------------------------------------------------------
# Reading the results dict


@dataclass
class _Row:
    """One method, normalized: what every output format needs."""

    method: str
    matrix: np.ndarray | None  # validated (s, T) array, or None when the entry has no matrix
    values: dict[str, float | None]
    stds: dict[str, float | None]
    n_seeds: int | None
    coverage: dict[str, int] | None = None  # steps done per seed
    in_numbers: list[str] | None = None  # the seeds the numbers average

    failed: str | None = None  # the method's model broke: this message, and no number

    @property
    def steps(self) -> int | None:
        """Number of steps evaluated so far (rows of the matrix)."""
        return None if self.matrix is None else self.matrix.shape[0]


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise MergeclError(f"results: {where} must be a number or null, got {value!r}")
    return float(value)


def _methods(results: Mapping[str, Any]) -> Mapping[str, Any]:
    if not isinstance(results, Mapping):
        raise MergeclError(f"results: expected a dict with a 'methods' key, got {type(results).__name__}")
    methods = results.get("methods")
    if not isinstance(methods, Mapping):
        raise MergeclError("results: 'methods' must be a dict of method name -> metrics")
    return methods


def _run_meta(results: Mapping[str, Any]) -> Mapping[str, Any]:
    run = results.get("run") or {}
    if not isinstance(run, Mapping):
        raise MergeclError("results: 'run' must be a dict of run metadata")
    return run


def _task_names(results: Mapping[str, Any]) -> list[str] | None:
    names = _run_meta(results).get("task_names")
    if isinstance(names, list | tuple) and names:
        return [str(n) for n in names]
    return None


def _rows(results: Mapping[str, Any]) -> list[_Row]:
    rows = []
    for name, entry in _methods(results).items():
        if not isinstance(entry, Mapping):
            raise MergeclError(f"results: method {name!r} must map to a dict of metrics")
        if "failed" in entry:  # never a number, whatever else the entry holds
            rows.append(_failed_row(name, entry["failed"]))
            continue
        matrix = None
        if entry.get("accuracy_matrix") is not None:
            try:
                matrix = metrics.as_accuracy_matrix(entry["accuracy_matrix"])
            except MergeclError as err:
                raise MergeclError(f"results: method {name!r}: {err}") from None
        values: dict[str, float | None] = {}
        for key, _ in METRIC_COLUMNS:
            if key in entry:
                values[key] = _number(entry[key], f"methods.{name}.{key}")
            elif key in _DERIVED and matrix is not None:
                values[key] = _DERIVED[key](matrix)
            else:
                values[key] = None
        std = entry.get("std") or {}
        if not isinstance(std, Mapping):
            raise MergeclError(f"results: methods.{name}.std must be a dict of metric -> value")
        stds = {key: _number(std.get(key), f"methods.{name}.std.{key}") for key, _ in METRIC_COLUMNS}
        seeds = entry.get("seeds")
        n_seeds = len(seeds) if isinstance(seeds, Mapping | list | tuple) else None
        rows.append(_Row(str(name), matrix, values, stds, n_seeds, *_coverage(name, entry)))
    return rows


def _coverage(name: Any, entry: Mapping[str, Any]) -> tuple[dict[str, int] | None, list[str] | None]:
    """(steps done per seed, the seeds in the numbers). Without ``coverage`` (results written before
    it), the per-seed matrices tell the steps, and every seed of them is in the numbers."""
    coverage = entry.get("coverage")
    if coverage is not None:
        if not isinstance(coverage, Mapping) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in coverage.values()
        ):
            raise MergeclError(f"results: methods.{name}.coverage must map seeds to numbers of steps")
        steps = {str(seed): int(v) for seed, v in coverage.items()}
        furthest = max(steps.values(), default=0)
        return steps, [seed for seed, v in steps.items() if v == furthest and v > 0]
    seeds = entry.get("seeds")
    if isinstance(seeds, Mapping) and all(
        isinstance(s, Mapping) and isinstance(s.get("accuracy_matrix"), list) for s in seeds.values()
    ):
        steps = {str(seed): len(s["accuracy_matrix"]) for seed, s in seeds.items()}
        return (steps, list(steps)) if steps else (None, None)
    return None, None


def _seed_list(seeds: list[str]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(seeds)


def _coverage_note(row: _Row, num_tasks: int | None) -> str | None:
    """Which seeds and steps a row's numbers cover, when not simply every seed at the same step."""
    if not row.coverage or row.in_numbers is None:
        return None

    def at(seed: str) -> str:
        steps = row.coverage[seed]
        return f"{seed} (not started)" if steps == 0 else f"{seed} (step {steps}/{num_tasks or steps})"

    steps_in = {row.coverage[seed] for seed in row.in_numbers}
    left_out = [seed for seed in row.coverage if seed not in row.in_numbers]
    if len(steps_in) > 1:  # results written before coverage: seeds at different steps averaged
        return f"{row.method}: the numbers average seeds at different steps: {', '.join(map(at, row.in_numbers))}"
    if not left_out:
        return None
    (steps,) = steps_in or {0}
    covered = f"{_seed_list(row.in_numbers)} at step {steps}/{num_tasks or steps}" if row.in_numbers else "no seed"
    return f"{row.method}: the numbers cover {covered}; not in them: {', '.join(map(at, left_out))}"


def coverage_notes(results: Mapping[str, Any]) -> list[str]:
    """One line per method whose numbers do not cover every seed of the run at the same step."""
    rows = _rows(results)
    num_tasks = _num_tasks(results, rows)
    return [note for note in (_coverage_note(row, num_tasks) for row in rows) if note]


def _failed_row(name: Any, message: Any) -> _Row:
    if not isinstance(message, str):
        raise MergeclError(f"results: methods.{name}.failed must be the failure's message")
    nothing = {key: None for key, _ in METRIC_COLUMNS}
    return _Row(str(name), None, nothing, dict(nothing), None, failed=message)


def failures(results: Mapping[str, Any]) -> list[str]:
    """The message of every failed method (a model that broke: non-finite loss, weights or outputs)."""
    return [row.failed for row in _rows(results) if row.failed]


def _num_tasks(results: Mapping[str, Any], rows: list[_Row]) -> int | None:
    run = _run_meta(results)
    if isinstance(run.get("num_tasks"), int) and run["num_tasks"] > 0:
        return int(run["num_tasks"])
    names = _task_names(results)
    if names:
        return len(names)
    widths = [r.matrix.shape[1] for r in rows if r.matrix is not None]
    return max(widths) if widths else None


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


def _cells(row: _Row, num_tasks: int | None) -> list[str]:
    if row.failed:
        return [row.method, MISSING] + [FAILED] * len(METRIC_COLUMNS)
    tasks = MISSING if row.steps is None else f"{row.steps}/{num_tasks or row.steps}"
    return [row.method, tasks] + [_format_value(k, row.values[k], row.stds[k]) for k, _ in METRIC_COLUMNS]


def _headers() -> list[str]:
    return ["method", "tasks"] + [header for _, header in METRIC_COLUMNS]


# --------------------------------------------------------------------------------------------------
# Tables


def format_table(results: Mapping[str, Any]) -> str:
    """A fixed-width plain-text table for the terminal: one row per method, every line the same width.

    Columns: method, tasks done / tasks, final ACC, avg inc ACC, BWT, forgetting, all-class ACC, time.
    Values are ``mean ± std`` when the entry has a std for that metric; missing values are "-".
    """
    rows = _rows(results)
    num_tasks = _num_tasks(results, rows)
    table = [_headers()] + [_cells(r, num_tasks) for r in rows]
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


def markdown_table(results: Mapping[str, Any]) -> str:
    """The same table as ``format_table`` as a GitHub-flavoured Markdown table."""
    rows = _rows(results)
    num_tasks = _num_tasks(results, rows)
    headers = _headers()
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_md_escape(c) for c in _cells(row, num_tasks)) + " |")
    return "\n".join(lines) + "\n"


def _csv_text(results: Mapping[str, Any]) -> str:
    rows = _rows(results)
    num_tasks = _num_tasks(results, rows)
    header = ["method", "steps_done", "num_tasks", "n_seeds"]
    for key, _ in METRIC_COLUMNS:
        header += [key, f"{key}_std"]
    header += ["seeds", "coverage"]  # the seeds in the numbers; seed:steps of every seed
    header.append("failed")  # the failure's message; empty for a method with numbers
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        line: list[Any] = [row.method, row.steps, num_tasks if row.steps is not None else None, row.n_seeds]
        for key, _ in METRIC_COLUMNS:
            line += [row.values[key], row.stds[key]]
        line += [" ".join(row.in_numbers or []) or None, _coverage_cell(row)]
        line.append(row.failed)
        # Full precision (repr) for numbers, empty cells for missing values.
        writer.writerow(["" if v is None else v for v in line])
    return buffer.getvalue()


def _coverage_cell(row: _Row) -> str | None:
    return " ".join(f"{seed}:{steps}" for seed, steps in row.coverage.items()) if row.coverage else None


def write_csv(results: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write one CSV row per method (metric and ``<metric>_std`` columns, full precision). Atomic."""
    return atomic_write_text(path, _csv_text(results))


# --------------------------------------------------------------------------------------------------
# Plots


def _figure_png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _tick_labels(names: list[str] | None, count: int) -> list[str]:
    if names and len(names) >= count:
        return [n if len(n) <= 14 else n[:13] + "…" for n in names[:count]]
    return [str(i + 1) for i in range(count)]


def heatmap_png(
    method: str, matrix: np.ndarray, num_tasks: int | None = None, task_names: list[str] | None = None
) -> bytes:
    """PNG bytes of one accuracy matrix: rows = model after step t, columns = task i, cells annotated.

    All ``num_tasks`` rows are drawn; steps not run yet stay grey. The red staircase separates tasks
    already trained (left, ``i <= t``) from future tasks (right: zero-shot / forward transfer).
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    steps, width = matrix.shape
    size = max(width, steps, num_tasks or 0)
    grid = np.full((size, size), np.nan)
    grid[:steps, :width] = matrix
    vmax = max(100.0, float(np.nanmax(matrix)))  # percent; never let one method rescale the colours

    side = min(2.0 + 0.75 * size, 22.0)
    fig = Figure(figsize=(side + 1.6, side), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="#e6e6e6")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, label="accuracy (%)", shrink=0.8)

    if size <= 25:  # beyond that the numbers are unreadable; the colours remain
        fontsize = 10 if size <= 8 else 9  # cells keep a fixed size (the figure grows with T)
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

    labels = _tick_labels(task_names, size)
    rotate = bool(task_names) and len(task_names) >= size  # names are long: slant them; numbers stay upright
    ax.set_xticks(range(size), labels, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    ax.set_yticks(range(size), labels)
    ax.set_xlim(-0.5, size - 0.5)
    ax.set_ylim(size - 0.5, -0.5)
    ax.set_xlabel("evaluated on task i")
    ax.set_ylabel("model after training task t")
    done = "" if steps >= size else f"  ({steps}/{size} tasks done)"
    ax.set_title(f"{method}{done}")
    return _figure_png(fig)


def acc_over_tasks_png(curves: Mapping[str, list[float]], num_tasks: int | None = None) -> bytes:
    """PNG bytes of ``ACC_t`` against the number of tasks trained, one line per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.5, 4.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    longest = max([len(c) for c in curves.values()] + [num_tasks or 0, 1])
    styles = [("-", "o"), ("--", "s"), (":", "^")]  # the 10 colours repeat: a new line style per round
    lines = []
    for i, (method, accs) in enumerate(curves.items()):
        linestyle, marker = styles[i // 10 % len(styles)]
        label = f"{method} ({accs[-1]:.1f})" if accs else method
        (line,) = ax.plot(range(1, len(accs) + 1), accs, f"C{i % 10}", ls=linestyle, marker=marker, ms=4, label=label)
        lines.append((accs[-1] if accs else float("-inf"), line))
    top = max([max(c) for c in curves.values() if c] + [100.0])
    ax.set_ylim(0.0, top * 1.02)
    ax.set_xlim(0.75, longest + 0.25)
    ax.set_xticks(range(1, longest + 1) if longest <= 25 else np.linspace(1, longest, 10, dtype=int))
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("ACC_t: mean accuracy on tasks seen (%)")
    ax.set_title("Accuracy over tasks")
    ax.grid(True, alpha=0.3)
    if curves:  # outside the axes, best final ACC first
        ranked = [line for _, line in sorted(lines, key=lambda pair: -pair[0])]
        ax.legend(handles=ranked, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="final ACC")
    return _figure_png(fig)


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


def _matrix_markdown(matrix: np.ndarray, names: list[str] | None) -> str:
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


def _report_markdown(results: Mapping[str, Any], heatmaps: list[tuple[_Row, str]], has_curves: bool) -> str:
    run = _run_meta(results)
    title = run.get("config") or run.get("name")
    parts = [f"# mergecl report{f': {title}' if title else ''}\n"]
    if run:
        meta = [f"- **{_md_escape(str(k))}**: {_md_escape(_format_meta(v))}" for k, v in run.items()]
        parts.append("\n".join(meta))
        parts.append("")
    notes = coverage_notes(results)
    failed = failures(results)
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
        parts += ["## Accuracy over tasks\n", "![ACC_t per method](acc_over_tasks.png)\n"]
    if heatmaps:
        parts.append("## Accuracy matrices\n")
        parts.append(
            "Row t = model after training task t, column i = test set of task i (italic in the "
            "images: tasks not trained yet).\n"
        )
        names = _task_names(results)
        for row, filename in heatmaps:
            alt = re.sub(r"[\[\]]", "", row.method)
            parts += [
                f"### {_md_escape(row.method)}\n",
                f"![{alt}]({filename})\n",
                _matrix_markdown(row.matrix, names),
            ]
    return "\n".join(parts)


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write report.md, results.csv, ``heatmap_<method>.png`` per method and ``acc_over_tasks.png``.

    Works on half-finished runs (fewer matrix rows than tasks). Methods without an accuracy matrix
    appear in the tables only. Returns the paths written, report.md first.
    """
    out = Path(out_dir)
    rows = _rows(results)  # validates everything before the first file is written
    num_tasks = _num_tasks(results, rows)
    names = _task_names(results)
    taken: set[str] = set()
    heatmaps = [(row, f"heatmap_{_slug(row.method, taken)}.png") for row in rows if row.matrix is not None]
    curves = {row.method: metrics.incremental_accs(row.matrix) for row in rows if row.matrix is not None}

    written = [out / "report.md", out / "results.csv"]
    images = []
    for row, filename in heatmaps:
        png = heatmap_png(row.method, row.matrix, num_tasks, names)
        images.append(atomic_write_bytes(out / filename, png))
    if curves:
        images.append(atomic_write_bytes(out / "acc_over_tasks.png", acc_over_tasks_png(curves, num_tasks)))
    write_csv(results, out / "results.csv")
    # report.md last: once it exists, everything it links to exists too.
    atomic_write_text(out / "report.md", _report_markdown(results, heatmaps, bool(curves)))
    return written + images
