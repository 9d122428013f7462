"""Data: sources (a labelled data set) and scenarios (that data cut into a sequence of tasks).

from mergecl.data import get_source, build_scenario
ds = get_source("clinc150")                       # reads $MERGECL_DATA/clinc150
scenario = build_scenario("class", ds, order="groups")   # 10 tasks, one per CLINC domain

A new source declares itself with ``register_source`` in its own module (docs/extending.md).
"""

from typing import Any

from mergecl.data import sources  # noqa: F401  (registers the built-in sources)
from mergecl.data.orders import PAPER_CLASS_ORDERS, PAPER_DOMAIN_ORDERS, paper_class_order
from mergecl.data.registry import SOURCES, Source, data_root, get_source, register_source, source_names
from mergecl.data.scenarios import (
    build_scenario,
    class_incremental,
    domain_incremental,
    permuted,
    subsample_per_class,
    task_incremental,
)
from mergecl.data.types import Dataset, Scenario, Split, Task

__all__ = [
    "PAPER_CLASS_ORDERS",
    "PAPER_DOMAIN_ORDERS",
    "SOURCES",
    "SOURCE_NAMES",
    "Dataset",
    "Source",
    "Scenario",
    "Split",
    "Task",
    "build_scenario",
    "class_incremental",
    "data_root",
    "domain_incremental",
    "get_source",
    "paper_class_order",
    "permuted",
    "register_source",
    "source_names",
    "subsample_per_class",
    "task_incremental",
]


def __getattr__(attr: str) -> Any:
    if attr == "SOURCE_NAMES":  # always current: plugins may register sources after import
        return source_names()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
