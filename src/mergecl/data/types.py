"""The data types every layer above data/ speaks.

A ``Split`` is a list of inputs and their global class ids. Inputs are whatever the model's
``prepare`` understands: a float tensor [N, ...] (small images, vectors), a list of strings (text),
or a list of image file paths (large image datasets are read lazily). A ``Task`` is one step of a
continual-learning sequence; a ``Scenario`` is the sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

InputKind = Literal["tensor", "text", "image_path"]
ScenarioKind = Literal["class", "domain", "task"]


@dataclass
class Split:
    inputs: torch.Tensor | Sequence[str]
    labels: torch.Tensor  # int64, global class ids
    kind: InputKind = "tensor"

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.labels):
            raise ValueError(f"split has {len(self.inputs)} inputs but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor | Sequence[int]) -> Split:
        index = torch.as_tensor(index, dtype=torch.long)
        if isinstance(self.inputs, torch.Tensor):
            inputs = self.inputs[index]
        else:
            inputs = [self.inputs[i] for i in index.tolist()]
        return Split(inputs, self.labels[index], self.kind)

    @staticmethod
    def concat(splits: Sequence[Split]) -> Split:
        if not splits:
            raise ValueError("nothing to concatenate")
        kind = splits[0].kind
        labels = torch.cat([s.labels for s in splits])
        if isinstance(splits[0].inputs, torch.Tensor):
            inputs = torch.cat([s.inputs for s in splits])
        else:
            inputs = [x for s in splits for x in s.inputs]
        return Split(inputs, labels, kind)


@dataclass
class Dataset:
    """A source: the whole labelled data set before it is cut into tasks."""

    name: str
    class_names: list[str]
    train: Split
    test: Split
    val: Split | None = None  # None: scenarios carve a seeded validation part out of train
    # domain-incremental sources: the domain of each example (same order as the split), and names
    domain_names: list[str] = field(default_factory=list)
    train_domains: torch.Tensor | None = None
    val_domains: torch.Tensor | None = None
    test_domains: torch.Tensor | None = None
    # class-incremental sources with a natural grouping (CLINC150 domains): class id -> group
    class_groups: dict[str, list[int]] = field(default_factory=dict)
    # a source that gives its own tasks (the files source's task column) says what gives them, e.g.
    # "task column 'year'": the domain fields then hold each example's task and ``class_groups``
    # each task's classes (when disjoint); every scenario kind takes those tasks (scenarios.py)
    given_tasks: str = ""


@dataclass
class Task:
    index: int  # 0-based position in the sequence
    name: str
    classes: list[int]  # global class ids this task trains on (and, task-incremental, its head)
    train: Split
    val: Split
    test: Split


@dataclass
class Scenario:
    kind: ScenarioKind
    tasks: list[Task]
    class_names: list[str]  # indexed by global class id
    name: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def seen_classes(self, t: int) -> list[int]:
        """Global class ids of tasks 0..t (in task order, no repeats)."""
        seen: list[int] = []
        for task in self.tasks[: t + 1]:
            seen.extend(c for c in task.classes if c not in seen)
        return seen
