"""Evaluation layer: continual-learning metrics over accuracy matrices, typed run results, and reports.

Pure: no models and no data. ``metrics`` turns an accuracy matrix into numbers; ``results`` holds a
run's results typed (per seed, per method, the run's metadata; results.json is their ``to_json()``);
``report`` turns them (or a results.json dict) into tables, CSV and PNG plots.
"""

from mergecl.evaluation.metrics import (
    as_accuracy_matrix,
    avg_incremental_acc,
    bwt,
    final_acc,
    forgetting,
    incremental_accs,
    summarize,
)
from mergecl.evaluation.report import format_table, markdown_table, write_csv, write_report
from mergecl.evaluation.results import EVERY_STEP, FINAL_ONLY, MethodResult, RunMeta, RunResults, SeedSummary

__all__ = [
    "EVERY_STEP",
    "FINAL_ONLY",
    "MethodResult",
    "RunMeta",
    "RunResults",
    "SeedSummary",
    "as_accuracy_matrix",
    "avg_incremental_acc",
    "bwt",
    "final_acc",
    "forgetting",
    "format_table",
    "incremental_accs",
    "markdown_table",
    "summarize",
    "write_csv",
    "write_report",
]
