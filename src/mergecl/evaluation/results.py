"""The results of a run, typed: what results.json holds and what the report reads.

- ``SeedSummary``: one method on one seed: its accuracy matrix and the metrics of it
  (``metrics.summarize``), its wall time, and its validation summary (``eval_val``).
- ``MethodResult``: one method over the run's seeds: the mean (and std) over the seeds that went
  furthest, the per-seed summaries when there are several, how far each seed went (``coverage``),
  per-step values a method or its training logged (``step_info``: an auto lam, BECAME's lambda*);
  or, when its model broke, only the failure's message (``failed``): never a number.
- ``RunMeta``: what the run was (config, scenario, task names, seeds, machine, the runs it was
  combined from).
- ``RunResults``: the methods and the metadata; ``to_json()`` is results.json, ``from_json()`` reads
  it back (also the results.json of older runs, whose entries may lack keys: a metric absent from an
  entry but derivable from its accuracy matrix is derived; one present but null stays missing).

A method is evaluated ``EVERY_STEP`` (its matrix has a row per step done) or ``FINAL_ONLY`` (e.g.
joint training on every task at once: one model, evaluated after the last step; its matrix is that one
row, and only the final and all-class accuracies are defined). In results.json a final-only method
has ``final_row`` instead of ``accuracy_matrix``.

Pure: numbers and lists in, numbers and lists out; a malformed results dict is a ``MergeclError``
naming the key.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mergecl.errors import MergeclError
from mergecl.evaluation import metrics

__all__ = [
    "EVERY_STEP",
    "FINAL_ONLY",
    "METRICS",
    "MethodResult",
    "RunMeta",
    "RunResults",
    "SeedSummary",
    "mean_per_step",
]

EVERY_STEP = "every step"
FINAL_ONLY = "final only"
# the numbers of a summary, in results.json's order; the last is not a metric of the matrix
METRICS = ("final_acc", "avg_incremental_acc", "bwt", "forgetting", "all_class_acc", "wall_time_s")
_DERIVED = {  # the metrics a matrix gives
    "final_acc": metrics.final_acc,
    "avg_incremental_acc": metrics.avg_incremental_acc,
    "bwt": metrics.bwt,
    "forgetting": metrics.forgetting,
}
Matrix = list[list[float | None]]


# --------------------------------------------------------------------------------------------------
# One method on one seed


@dataclass(frozen=True)
class SeedSummary:
    """One method's numbers on one seed. ``matrix``: every step: row t = accuracies of the model after
    step t (None: not evaluated); final only: the one row after the last step. None: not recorded."""

    evaluated: str = EVERY_STEP
    matrix: Matrix | None = None
    final_acc: float | None = None
    avg_incremental_acc: float | None = None
    bwt: float | None = None
    forgetting: float | None = None
    all_class_acc: float | None = None
    wall_time_s: float | None = None  # None: not measured (a validation summary)
    val: SeedSummary | None = None  # the same metrics on the validation splits (``eval_val``)

    @property
    def final_only(self) -> bool:
        return self.evaluated == FINAL_ONLY

    @classmethod
    def of_rows(
        cls,
        rows: metrics.AccuracyMatrixLike,
        all_class_acc: float | None = None,
        wall_time_s: float | None = None,
        val_rows: metrics.AccuracyMatrixLike | None = None,
    ) -> SeedSummary:
        """The summary of an accuracy matrix (rows so far) and what goes with it."""
        summary = metrics.summarize(rows, all_class_acc)
        numbers = {key: summary[key] for key in METRICS[:-1]}
        val = cls.of_rows(val_rows) if val_rows else None
        return cls(EVERY_STEP, summary["accuracy_matrix"], **numbers, wall_time_s=wall_time_s, val=val)

    @classmethod
    def of_final_row(
        cls,
        row: list[float],
        all_class_acc: float | None = None,
        wall_time_s: float | None = None,
        val_rows: metrics.AccuracyMatrixLike | None = None,
    ) -> SeedSummary:
        """The summary of a final-only method: the final accuracy is the mean of its one row; the
        metrics over steps are undefined. Its validation summary is of its last validation row the
        same way (summarized as a matrix, that one row was step 1: only task 1 counted)."""
        val = cls.of_final_row(list(val_rows[-1])) if val_rows else None
        final = sum(row) / len(row)
        return cls(FINAL_ONLY, [row], final, all_class_acc=all_class_acc, wall_time_s=wall_time_s, val=val)

    def value(self, metric: str) -> float | None:
        return getattr(self, metric)

    def to_json(self) -> dict[str, Any]:
        numbers = {key: self.value(key) for key in METRICS[:-1]}
        matrix = _matrix_json(self.evaluated, self.matrix)
        # results.json's order: the matrix first, a final-only row after the numbers
        out = {**numbers, **matrix} if self.final_only else {**matrix, **numbers}
        if self.wall_time_s is not None:
            out["wall_time_s"] = self.wall_time_s
        if self.val is not None:
            out["val"] = self.val.to_json()
        return out

    @classmethod
    def from_json(cls, entry: Any, where: str) -> SeedSummary:
        if not isinstance(entry, Mapping):
            raise MergeclError(f"results: {where} must be a dict of metrics")
        evaluated, matrix = _read_matrix(entry, where)
        numbers = _read_numbers(entry, evaluated, matrix, where)
        val = cls.from_json(entry["val"], f"{where}.val") if entry.get("val") is not None else None
        return cls(evaluated, matrix, **numbers, val=val)


# --------------------------------------------------------------------------------------------------
# One method over the seeds


@dataclass(frozen=True)
class MethodResult:
    """One method of a run: the mean over the seeds that went furthest (``coverage`` says how far each
    seed went), or ``failed``: the message of the first failure, and no number."""

    evaluated: str = EVERY_STEP
    matrix: Matrix | None = None  # the mean matrix over the seeds' common rows (see SeedSummary)
    final_acc: float | None = None
    avg_incremental_acc: float | None = None
    bwt: float | None = None
    forgetting: float | None = None
    all_class_acc: float | None = None
    wall_time_s: float | None = None
    std: dict[str, float] = field(default_factory=dict)  # metric -> std over seeds (several seeds only)
    val: dict[str, float] | None = None  # mean validation final_acc and avg_incremental_acc
    seeds: dict[str, SeedSummary] | None = None  # the summaries averaged, when there are several
    coverage: dict[str, int] | None = None  # steps done per seed of the run; None: not recorded
    step_info: dict[str, list[float]] | None = None  # e.g. {"lam": [0.5, 0.3, ...]}, mean over seeds
    failed: str | None = None

    @property
    def final_only(self) -> bool:
        return self.evaluated == FINAL_ONLY

    @classmethod
    def failure(cls, message: str) -> MethodResult:
        return cls(failed=message)

    @classmethod
    def mean_of(
        cls,
        per_seed: dict[str, SeedSummary],
        coverage: dict[str, int] | None = None,
        step_info: dict[str, list[float]] | None = None,
    ) -> MethodResult:
        """The mean over seeds (std when there are several); the matrix is the mean of the common rows.
        The summaries are of one method, all at the same step (the runner never mixes steps)."""
        summaries = list(per_seed.values())
        evaluated = summaries[0].evaluated
        matrices = [s.matrix or [] for s in summaries]
        rows = min(len(m) for m in matrices)
        width = max((len(m[t]) for m in matrices for t in range(rows)), default=0)
        matrix = [
            [_mean_or_none([m[t][i] if i < len(m[t]) else None for m in matrices]) for i in range(width)]
            for t in range(rows)
        ]
        means: dict[str, float | None] = {}
        std: dict[str, float] = {}
        for metric in METRICS:
            values = [s.value(metric) for s in summaries if s.value(metric) is not None]
            means[metric] = statistics.fmean(values) if values else None
            if len(values) > 1:
                std[metric] = statistics.stdev(values)
        val = None
        if all(s.val is not None for s in summaries):  # a final-only method's val has no avg_incremental_acc
            metrics_of_val = [m for m in ("final_acc", "avg_incremental_acc") if summaries[0].val.value(m) is not None]
            val = {m: statistics.fmean(s.val.value(m) for s in summaries) for m in metrics_of_val}
        return cls(
            evaluated,
            matrix,
            **means,
            std=std,
            val=val,
            seeds=dict(per_seed) if len(summaries) > 1 else None,
            coverage=coverage,
            step_info=step_info or None,
        )

    def value(self, metric: str) -> float | None:
        return getattr(self, metric)

    @property
    def steps(self) -> int | None:
        """Steps evaluated so far: the rows of an every-step matrix (None: final only, or no matrix)."""
        return None if self.final_only or self.matrix is None else len(self.matrix)

    def steps_per_seed(self) -> dict[str, int] | None:
        """Steps each seed of the run has done: ``coverage``; in results written before it, the rows of
        the per-seed matrices (None when they are not all there)."""
        if self.coverage is not None:
            return self.coverage
        seeds = self.seeds or {}
        if seeds and all(not s.final_only and s.matrix is not None for s in seeds.values()):
            return {seed: len(s.matrix) for seed, s in seeds.items()}
        return None

    def seeds_in_numbers(self) -> list[str] | None:
        """The seeds the numbers average: those at the furthest step (in results written before
        ``coverage``: every seed listed, whatever its step)."""
        steps = self.steps_per_seed()
        if steps is None:
            return None
        if self.coverage is None:
            return list(steps)
        furthest = max(steps.values(), default=0)
        return [seed for seed, done in steps.items() if done == furthest and done > 0]

    def to_json(self) -> dict[str, Any]:
        if self.failed is not None:
            return {"failed": self.failed}
        out = {**_matrix_json(self.evaluated, self.matrix), **{key: self.value(key) for key in METRICS}}
        if self.std:
            out["std"] = dict(self.std)
        if self.val is not None:
            out["val"] = dict(self.val)
        if self.seeds is not None:
            out["seeds"] = {seed: summary.to_json() for seed, summary in self.seeds.items()}
        if self.coverage is not None:
            out["coverage"] = dict(self.coverage)
        if self.step_info:
            out["step_info"] = {key: list(values) for key, values in self.step_info.items()}
        return out

    @classmethod
    def from_json(cls, name: str, entry: Any) -> MethodResult:
        if not isinstance(entry, Mapping):
            raise MergeclError(f"results: method {name!r} must map to a dict of metrics")
        where = f"methods.{name}"
        if "failed" in entry:  # never a number, whatever else the entry holds
            if not isinstance(entry["failed"], str):
                raise MergeclError(f"results: {where}.failed must be the failure's message")
            return cls.failure(entry["failed"])
        evaluated, matrix = _read_matrix(entry, f"method {name!r}")
        numbers = _read_numbers(entry, evaluated, matrix, where)
        std = entry.get("std") or {}
        if not isinstance(std, Mapping):
            raise MergeclError(f"results: {where}.std must be a dict of metric -> value")
        stds = {key: _number(value, f"{where}.std.{key}") for key, value in std.items()}
        val = entry.get("val")
        if val is not None:
            if not isinstance(val, Mapping):
                raise MergeclError(f"results: {where}.val must be a dict of metric -> value")
            val = {key: _number(value, f"{where}.val.{key}") for key, value in val.items()}
        seeds = entry.get("seeds")
        if seeds is not None:
            if not isinstance(seeds, Mapping):
                raise MergeclError(f"results: {where}.seeds must be a dict of seed -> metrics")
            seeds = {str(seed): SeedSummary.from_json(s, f"{where}.seeds.{seed}") for seed, s in seeds.items()}
        return cls(
            evaluated,
            matrix,
            **numbers,
            std={key: value for key, value in stds.items() if value is not None},
            val=val,
            seeds=seeds,
            coverage=_read_coverage(entry.get("coverage"), where),
            step_info=_read_step_info(entry.get("step_info"), where),
        )


# --------------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class RunMeta:
    """What the run was; every field optional (a run in progress, or results written by hand)."""

    config: str | None = None
    scenario: str | None = None
    kind: str | None = None
    task_names: list[str] | None = None
    num_tasks: int | None = None
    seeds: list[int] | None = None
    orders: int | None = None  # task orders per seed (> 1): the run's "seeds" are streams (seed x order)
    machine: str | None = None
    combined_from: list[str] | None = None  # the runs ``mergecl combine`` gathered
    extra: dict[str, Any] = field(default_factory=dict)  # other keys of results written elsewhere

    def to_json(self) -> dict[str, Any]:
        known = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**{k: v for k, v in known.items() if v is not None}, **self.extra}

    @classmethod
    def from_json(cls, run: Any) -> RunMeta:
        run = {} if run is None else run
        if not isinstance(run, Mapping):
            raise MergeclError("results: 'run' must be a dict of run metadata")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in run.items() if k not in known}
        meta = cls(**{k: v for k, v in run.items() if k in known}, extra=extra)
        if meta.num_tasks is not None and (isinstance(meta.num_tasks, bool) or not isinstance(meta.num_tasks, int)):
            raise MergeclError(f"results: run.num_tasks must be a number of tasks, got {meta.num_tasks!r}")
        if meta.orders is not None and (isinstance(meta.orders, bool) or not isinstance(meta.orders, int)):
            raise MergeclError(f"results: run.orders must be a number of task orders, got {meta.orders!r}")
        if meta.task_names is not None and not isinstance(meta.task_names, list | tuple):
            raise MergeclError(f"results: run.task_names must be a list of names, got {meta.task_names!r}")
        return meta

    @property
    def title(self) -> str | None:
        return self.config or self.extra.get("name")

    @property
    def unit(self) -> str:
        """What a run's seeds are, in words: "seeds", or "streams" with several task orders per seed."""
        return "streams" if self.orders is not None and self.orders > 1 else "seeds"


@dataclass(frozen=True)
class RunResults:
    methods: dict[str, MethodResult]
    run: RunMeta = field(default_factory=RunMeta)

    def to_json(self) -> dict[str, Any]:
        """results.json's content."""
        return {"methods": {name: result.to_json() for name, result in self.methods.items()}, "run": self.run.to_json()}

    @classmethod
    def from_json(cls, data: Any) -> RunResults:
        if not isinstance(data, Mapping):
            raise MergeclError(f"results: expected a dict with a 'methods' key, got {type(data).__name__}")
        methods = data.get("methods")
        if not isinstance(methods, Mapping):
            raise MergeclError("results: 'methods' must be a dict of method name -> metrics")
        run = RunMeta.from_json(data.get("run"))  # checked first: a bad 'run' is named as such
        return cls({str(name): MethodResult.from_json(str(name), entry) for name, entry in methods.items()}, run)

    @classmethod
    def read(cls, results: RunResults | Mapping[str, Any]) -> RunResults:
        """Typed results as they are, or a results dict (results.json, also of older runs) read."""
        return results if isinstance(results, RunResults) else cls.from_json(results)

    def failures(self) -> list[str]:
        """The message of every failed method (a model that broke: non-finite loss, weights or outputs)."""
        return [result.failed for result in self.methods.values() if result.failed is not None]

    @property
    def num_tasks(self) -> int | None:
        """The run's number of tasks: ``run.num_tasks``, else its task names, else the widest matrix."""
        if self.run.num_tasks is not None and self.run.num_tasks > 0:
            return self.run.num_tasks
        if self.run.task_names:
            return len(self.run.task_names)
        widths = [len(row) for r in self.methods.values() if not r.final_only for row in (r.matrix or [])]
        return max(widths) if widths else None


# --------------------------------------------------------------------------------------------------
# Helpers


def mean_per_step(values: list[list[float]]) -> list[float]:
    """Per-step means of per-seed series, over the steps every series has."""
    steps = min(len(v) for v in values)
    return [statistics.fmean(v[t] for v in values) for t in range(steps)]


def _mean_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.fmean(values)  # None: not evaluated


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise MergeclError(f"results: {where} must be a number or null, got {value!r}")
    return float(value)


def _matrix_json(evaluated: str, matrix: Matrix | None) -> dict[str, Any]:
    """The matrix as results.json has it: ``accuracy_matrix``, or a final-only method's ``final_row``."""
    if matrix is None:
        return {}
    return {"final_row": matrix[0]} if evaluated == FINAL_ONLY else {"accuracy_matrix": matrix}


def _read_matrix(entry: Mapping[str, Any], where: str) -> tuple[str, Matrix | None]:
    """(how the method was evaluated, its matrix as JSON lists), the matrix checked."""
    if entry.get("final_row") is not None:
        row = entry["final_row"]
        if not isinstance(row, list) or not row:
            raise MergeclError(f"results: {where}: final_row must be a list of accuracies")
        for i, value in enumerate(row):
            _number(value, f"{where}.final_row[{i}]")
        return FINAL_ONLY, [list(row)]
    if entry.get("accuracy_matrix") is None:
        return EVERY_STEP, None
    try:
        metrics.as_accuracy_matrix(entry["accuracy_matrix"])
    except MergeclError as err:
        raise MergeclError(f"results: {where}: {err}") from None
    return EVERY_STEP, [list(row) for row in entry["accuracy_matrix"]]


def _read_numbers(entry: Mapping[str, Any], evaluated: str, matrix: Matrix | None, where: str) -> dict[str, Any]:
    """The metrics of an entry; one absent but derivable from an every-step matrix is derived."""
    numbers = {}
    for key in METRICS:
        if key in entry:
            numbers[key] = _number(entry[key], f"{where}.{key}")
        elif key in _DERIVED and matrix is not None and evaluated == EVERY_STEP:
            numbers[key] = _DERIVED[key](matrix)
        else:
            numbers[key] = None
    return numbers


def _read_coverage(coverage: Any, where: str) -> dict[str, int] | None:
    if coverage is None:
        return None
    if not isinstance(coverage, Mapping) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in coverage.values()
    ):
        raise MergeclError(f"results: {where}.coverage must map seeds to numbers of steps")
    return {str(seed): int(v) for seed, v in coverage.items()}


def _read_step_info(step_info: Any, where: str) -> dict[str, list[float]] | None:
    if step_info is None:
        return None
    if not isinstance(step_info, Mapping):
        raise MergeclError(f"results: {where}.step_info must be a dict of name -> per-step values")
    out = {}
    for key, values in step_info.items():
        if not isinstance(values, list):
            raise MergeclError(f"results: {where}.step_info.{key} must be a list of per-step values")
        out[str(key)] = [_number(v, f"{where}.step_info.{key}") for v in values]
    return out
