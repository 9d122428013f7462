"""Method names, streams, and the logit columns of each evaluation."""

import pytest
import torch

from mergecl import MergeclError
from mergecl.data.types import Scenario, Split, Task
from mergecl.methods.registry import resolve_method, resolve_methods
from mergecl.methods.streams import eval_classes, train_classes


def test_names_resolve_to_streams_and_rules():
    assert resolve_method("seq_ft").stream == "seq" and resolve_method("seq_ft").rule is None
    assert (resolve_method("magmax").stream, resolve_method("magmax").rule) == ("seq", "magmax")
    assert (resolve_method("seq_ft+ties").stream, resolve_method("seq_ft+ties").rule) == ("seq", "ties")
    assert (resolve_method("ind_ft+magmax").stream, resolve_method("ind_ft+magmax").rule) == ("ind", "magmax")
    assert resolve_method("joint").stream == "joint" and resolve_method("ewc").stream == "ewc"
    with pytest.raises(MergeclError, match="unknown method 'ind_ft\\+magmix'"):
        resolve_method("ind_ft+magmix")
    with pytest.raises(MergeclError, match="listed twice"):
        resolve_methods(["magmax", "magmax"])


def scenario(kind):
    empty = Split(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    tasks = [Task(i, f"t{i}", cls, empty, empty, empty) for i, cls in enumerate([[3, 1], [0, 4], [2, 5]])]
    if kind == "domain":
        tasks = [Task(i, f"d{i}", list(range(6)), empty, empty, empty) for i in range(3)]
    return Scenario(kind, tasks, [str(c) for c in range(6)])


def test_eval_columns_per_scenario_kind():
    cil = scenario("class")
    assert eval_classes(cil, 0, 0) == [3, 1]
    assert eval_classes(cil, 1, 0) == [3, 1, 0, 4]
    assert eval_classes(cil, 0, 2) == [3, 1, 2, 5]  # a future task: seen classes + its own
    assert train_classes(cil, 1) == [0, 4]
    til = scenario("task")
    assert eval_classes(til, 2, 0) == [3, 1] and eval_classes(til, 0, 1) == [0, 4]
    dil = scenario("domain")
    assert eval_classes(dil, 0, 2) == list(range(6)) and train_classes(dil, 1) == list(range(6))
