"""Evaluation layer: continual-learning metrics over accuracy matrices, and run reports.

Pure: no models and no data. ``metrics`` turns an accuracy matrix into numbers; ``report`` turns a
results dict (one ``metrics.summarize`` entry per method) into tables, CSV and PNG plots.
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

__all__ = [
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
