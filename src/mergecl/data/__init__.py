"""Data: sources (a labelled data set) and scenarios (that data cut into a sequence of tasks).

from mergecl.data import get_source, build_scenario
ds = get_source("clinc150")                       # reads $MERGECL_DATA/clinc150
scenario = build_scenario("class", ds, order="groups")   # 10 tasks, one per CLINC domain
"""

from mergecl.data.orders import PAPER_CLASS_ORDERS, PAPER_DOMAIN_ORDERS, paper_class_order
from mergecl.data.registry import SOURCE_NAMES, data_root, get_source
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
    "SOURCE_NAMES",
    "Dataset",
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
    "subsample_per_class",
    "task_incremental",
]
