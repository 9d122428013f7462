"""Continual-learning metrics over an accuracy matrix (docs/methods.md#evaluation-and-metrics).

``A[t][i]`` is the accuracy (in percent) on task ``i``'s test set of the model that exists after
training step ``t``; ``t, i`` run over ``0..T-1``. Every function here is pure and works on a run in
progress too: with only the first ``s`` rows present, "last" means row ``s-1`` and the metrics are
those of a ``s``-task run over tasks ``0..s-1``.

Accepted inputs: a 2-D numpy array or a list of rows. Entries of future tasks (``i > t``) may be
missing: rows may be short (a lower-triangular list), or hold ``None``/NaN there. Those entries are
never used by the metrics (they only show forward transfer in the plots). Entries ``i <= t`` must be
finite numbers. The functions are unit-agnostic: fractions in ``[0, 1]`` give results in fractions.

Definitions (``L`` = index of the last row present):

- ``ACC_t = mean_{i<=t} A[t][i]``; final ACC = ``ACC_L``; average incremental ACC = ``mean_t ACC_t``.
- ``BWT = mean_{i<L} (A[L][i] - A[i][i])`` (Lopez-Paz & Ranzato 2017).
- ``forgetting = mean_{i<L} max_{i<=t<L} (A[t][i] - A[L][i])`` (Chaudhry et al. 2018). The max starts
  at ``t = i``: before task ``i`` is trained its accuracy is zero-shot/forward transfer, not knowledge
  that can be forgotten. Note that Avalanche's ``Forgetting`` metric differs: it takes ``A[i][i]``
  instead of the max, i.e. it is exactly ``-BWT`` per task.
- With a single row there is no earlier task: ``bwt`` and ``forgetting`` return ``None`` (undefined),
  not ``0.0``, so that a table shows "-" instead of a reassuring but meaningless zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mergecl.errors import MergeclError

__all__ = [
    "AccuracyMatrixLike",
    "as_accuracy_matrix",
    "avg_incremental_acc",
    "bwt",
    "final_acc",
    "forgetting",
    "incremental_accs",
    "summarize",
]

AccuracyMatrixLike = Sequence[Sequence[Any]] | np.ndarray

SUMMARY_KEYS = ("accuracy_matrix", "final_acc", "avg_incremental_acc", "bwt", "forgetting", "all_class_acc")


def _to_float(value: Any, t: int, i: int) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MergeclError(f"accuracy matrix: entry A[{t}][{i}] is not a number: {value!r}") from None


def as_accuracy_matrix(matrix: AccuracyMatrixLike) -> np.ndarray:
    """Validate ``matrix`` and return it as a float64 array of shape ``(s, T)``.

    Short rows are padded with NaN. Raises ``MergeclError`` when the matrix is empty, not 2-D, or an
    entry the metrics need (``A[t][i]`` with ``i <= t``) is missing or not finite.
    """
    if isinstance(matrix, np.ndarray) and matrix.dtype == object:
        matrix = matrix.tolist()  # may hold None or ragged rows: take the list path
    if isinstance(matrix, np.ndarray):
        if matrix.ndim != 2:
            raise MergeclError(f"accuracy matrix: expected 2 dimensions, got shape {matrix.shape}")
        try:
            array = matrix.astype(np.float64)
        except (TypeError, ValueError):
            raise MergeclError("accuracy matrix: entries must be numbers") from None
    else:
        if isinstance(matrix, str | bytes) or not isinstance(matrix, Sequence):
            raise MergeclError(f"accuracy matrix: expected a list of rows, got {type(matrix).__name__}")
        rows = []
        for t, row in enumerate(matrix):
            if isinstance(row, str | bytes) or not isinstance(row, Sequence | np.ndarray):
                raise MergeclError(f"accuracy matrix: row {t} is not a list of numbers: {row!r}")
            rows.append([_to_float(v, t, i) for i, v in enumerate(row)])
        # At least one column per row, so that a short row is reported as its missing entry A[t][t].
        width = max([len(r) for r in rows] + [len(rows)])
        array = np.full((len(rows), width), np.nan)
        for t, row in enumerate(rows):
            array[t, : len(row)] = row
    steps, tasks = array.shape
    if steps == 0 or tasks == 0:
        raise MergeclError("accuracy matrix: it is empty (no evaluated step yet)")
    if steps > tasks:
        raise MergeclError(f"accuracy matrix: {steps} rows but only {tasks} tasks; row t must hold tasks 0..t")
    bad = np.argwhere(np.tril(~np.isfinite(array)))  # only entries i <= t are required
    if len(bad):
        t, i = (int(x) for x in bad[0])
        shown = "missing (None or NaN)" if np.isnan(array[t, i]) else f"{array[t, i]}"
        raise MergeclError(
            f"accuracy matrix: entry A[{t}][{i}] is {shown}; row {t} needs finite accuracies on tasks 0..{t}"
        )
    return array


def incremental_accs(matrix: AccuracyMatrixLike) -> list[float]:
    """``[ACC_0, ..., ACC_L]`` with ``ACC_t = mean_{i<=t} A[t][i]``: the accuracy over tasks seen so far."""
    a = as_accuracy_matrix(matrix)
    return [float(np.mean(a[t, : t + 1])) for t in range(a.shape[0])]


def final_acc(matrix: AccuracyMatrixLike) -> float:
    """Mean accuracy of the last model present over the tasks it has seen (``ACC_L``)."""
    return incremental_accs(matrix)[-1]


def avg_incremental_acc(matrix: AccuracyMatrixLike) -> float:
    """Mean of ``ACC_t`` over the steps present (Rebuffi et al. 2017)."""
    return float(np.mean(incremental_accs(matrix)))


def bwt(matrix: AccuracyMatrixLike) -> float | None:
    """Backward transfer ``mean_{i<L}(A[L][i] - A[i][i])``; negative = forgetting. ``None`` for one row."""
    a = as_accuracy_matrix(matrix)
    last = a.shape[0] - 1
    if last == 0:
        return None
    idx = np.arange(last)
    return float(np.mean(a[last, idx] - a[idx, idx]))


def forgetting(matrix: AccuracyMatrixLike) -> float | None:
    """Average forgetting ``mean_{i<L} max_{i<=t<L}(A[t][i] - A[L][i])``. ``None`` for one row.

    It can be negative when every old task ends above its best earlier accuracy (positive transfer).
    """
    a = as_accuracy_matrix(matrix)
    last = a.shape[0] - 1
    if last == 0:
        return None
    per_task = [float(np.max(a[i:last, i]) - a[last, i]) for i in range(last)]
    return float(np.mean(per_task))


def _json_matrix(a: np.ndarray) -> list[list[float | None]]:
    # Plain floats and None (not NaN) so that the summary is valid JSON.
    return [[float(v) if math.isfinite(v) else None for v in row] for row in a]


def summarize(matrix: AccuracyMatrixLike, all_class_acc: float | None = None) -> dict[str, Any]:
    """All metrics of one run in one JSON-ready dict (the per-method entry of a results dict).

    ``all_class_acc`` is MagMax's extra metric (top-1 of the final model on the union of all test sets,
    head over all classes); it cannot be derived from the matrix, so the caller passes it through.
    """
    a = as_accuracy_matrix(matrix)
    return {
        "accuracy_matrix": _json_matrix(a),
        "final_acc": final_acc(a),
        "avg_incremental_acc": avg_incremental_acc(a),
        "bwt": bwt(a),
        "forgetting": forgetting(a),
        "all_class_acc": None if all_class_acc is None else float(all_class_acc),
    }
