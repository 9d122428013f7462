"""Cut a ``Dataset`` into a continual-learning ``Scenario``: a sequence of ``Task``s.

- class-incremental: disjoint groups of classes, one per task (``class_incremental``);
- task-incremental: the same cut, but each task is evaluated with its own head (``task_incremental``);
- domain-incremental: one task per domain, every task has every class (``domain_incremental``);
- permuted: one fixed pixel permutation per task, every class in every task (``permuted``).

Labels stay global class ids everywhere; a task's ``classes`` says which ids it trains on (sorted,
which is also the local head order MagMax uses). Validation: the source's own val split when it
has one, else a seeded stratified ``val_fraction`` (default 10%) of train, carved once from the
whole source before the cut, so the same seed gives the same validation examples whatever the
number of tasks. Same arguments and seed -> the identical scenario.

A source that gives its own tasks (``Dataset.given_tasks``: the ``files`` source's task column)
is not cut: class- and task-incremental scenarios make one task per ``class_groups`` entry (the
classes of the task's rows; ``n_tasks`` null or equal, ``order`` not a list), domain-incremental
ones one task per domain (the task of each example).

Task orders (a run's ``data.orders``): ``task_orders(n, seed, count)`` gives ``count`` distinct
orders of a scenario's n tasks, the first the scenario's own, and ``reorder`` puts its tasks in one
of them. They permute the tasks as cut (a class group, a given task, a domain, a permutation), so
every order of one seed has the same tasks, splits and subsamples.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergecl.data.orders import paper_class_order
from mergecl.data.registry import get_source
from mergecl.data.splits import seeded_permutation, stratified_split, subsample_per_class
from mergecl.data.types import Dataset, Scenario, Split, Task
from mergecl.errors import MergeclError

Order = str | Sequence[int]
ORDERS = ("seeded", "natural", "groups", "paper")
KINDS = ("class", "task", "domain", "permuted")
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TASKS = 5  # n_tasks None: the source's own tasks where it gives them, else this many

__all__ = [
    "build_scenario",
    "class_incremental",
    "class_order",
    "domain_incremental",
    "permuted",
    "reorder",
    "split_classes",
    "subsample_per_class",
    "task_incremental",
    "task_orders",
    "with_val",
]


def with_val(ds: Dataset, val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0) -> Dataset:
    """``ds`` with a validation split: its own, or a seeded stratified carve-out of train.

    Domain-labelled sources are stratified by (domain, class), so every domain keeps its share.
    """
    if ds.val is not None:
        return ds
    strata = ds.train.labels
    if ds.train_domains is not None:
        strata = ds.train_domains * len(ds.class_names) + ds.train.labels
    keep, take = stratified_split(strata, val_fraction, seed)
    domains = ds.train_domains
    return dataclasses.replace(
        ds,
        train=ds.train.subset(keep),
        val=ds.train.subset(take),
        train_domains=None if domains is None else domains[keep],
        val_domains=None if domains is None else domains[take],
    )


def class_order(ds: Dataset, order: Order = "seeded", seed: int = 0) -> list[int]:
    """The sequence of all class ids: 'natural' 0..C-1, 'seeded' a permutation from ``seed``,
    'paper' the fixed order of the paper for this source (``mergecl.data.orders``), or a list."""
    n = len(ds.class_names)
    if not isinstance(order, str):
        chosen = [int(c) for c in order]
        if sorted(chosen) != list(range(n)):
            raise MergeclError(f"class order must list each of the {n} class ids 0..{n - 1} exactly once")
        return chosen
    if order == "natural":
        return list(range(n))
    if order == "seeded":
        return seeded_permutation(n, seed)
    if order == "paper":
        return paper_class_order(ds.name, n)
    if order == "groups":
        return [c for group in ds.class_groups.values() for c in group]
    raise MergeclError(f"unknown class order {order!r}; valid: {', '.join(ORDERS)} or a list of class ids")


def split_classes(order: Sequence[int], n_tasks: int) -> list[list[int]]:
    """Task t gets ``order[floor(n*t/T) : floor(n*(t+1)/T)]``, sorted (MagMax's cut)."""
    n = len(order)
    if not 1 <= n_tasks <= n:
        raise MergeclError(f"n_tasks must be between 1 and the number of classes ({n}), got {n_tasks}")
    bounds = [n * t // n_tasks for t in range(n_tasks + 1)]
    return [sorted(order[bounds[t] : bounds[t + 1]]) for t in range(n_tasks)]


def _of_classes(split: Split, classes: list[int]) -> Split:
    return split.subset(torch.isin(split.labels, torch.tensor(classes)).nonzero().flatten())


def _preview(names: list[str], classes: list[int], limit: int = 4) -> str:
    shown = ", ".join(names[c] for c in classes[:limit])
    return shown + (", ..." if len(classes) > limit else "")


def class_incremental(
    ds: Dataset,
    n_tasks: int | None = None,
    order: Order = "seeded",
    seed: int = 0,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    kind: str = "class",
) -> Scenario:
    """Disjoint class groups, one per task, in ``order`` (see ``class_order``).

    ``order="groups"`` makes one task per ``ds.class_groups`` entry (CLINC150: 10 domains), named
    after the group, as a source's own tasks are (``given_tasks``); ``n_tasks`` None takes them, and
    otherwise cuts the classes into ``DEFAULT_TASKS``.
    """
    if kind not in ("class", "task"):
        raise MergeclError(f"class_incremental makes 'class' or 'task' scenarios, not {kind!r}")
    ds = with_val(ds, val_fraction, seed)
    if ds.given_tasks:  # the source's own tasks (a task column): one per class group, in its order
        _check_given_tasks(ds, order, kind)
        order = "groups"
    if order == "groups":
        if not ds.class_groups:
            raise MergeclError(f"source {ds.name!r} has no class groups; use order 'seeded' or 'natural'")
        if n_tasks is not None and n_tasks != len(ds.class_groups):
            n = len(ds.class_groups)
            if ds.given_tasks:
                raise MergeclError(
                    f"the {ds.given_tasks} of {ds.name!r} makes {n} tasks, but n_tasks is {n_tasks} "
                    "(leave n_tasks out to take them)"
                )
            raise MergeclError(f"order 'groups' makes {n} tasks for {ds.name!r}, but n_tasks is {n_tasks}")
        class_order(ds, [c for g in ds.class_groups.values() for c in g])  # every class exactly once
        names = list(ds.class_groups)
        cut = [sorted(g) for g in ds.class_groups.values()]
    else:
        cut = split_classes(class_order(ds, order, seed), DEFAULT_TASKS if n_tasks is None else n_tasks)
        names = [f"task{t + 1} (classes {_preview(ds.class_names, c)})" for t, c in enumerate(cut)]
    assert ds.val is not None
    tasks = [
        Task(t, names[t], c, _of_classes(ds.train, c), _of_classes(ds.val, c), _of_classes(ds.test, c))
        for t, c in enumerate(cut)
    ]
    return Scenario(kind, tasks, list(ds.class_names), f"{ds.name} {kind}-incremental ({len(tasks)} tasks)")


def _check_given_tasks(ds: Dataset, order: Order, kind: str) -> None:
    """A source that gives its tasks: no other order, and (class/task) disjoint classes per task."""
    if not isinstance(order, str) or order == "paper":
        raise MergeclError(f"source {ds.name!r} gives its tasks ({ds.given_tasks}): order {order!r} does not apply")
    if ds.class_groups or ds.train_domains is None:
        return
    first: dict[int, int] = {}
    for label, task in zip(ds.train.labels.tolist(), ds.train_domains.tolist(), strict=True):
        if first.setdefault(label, task) != task:
            tasks = ds.domain_names[first[label]], ds.domain_names[task]
            raise MergeclError(
                f"source {ds.name!r}: class {ds.class_names[label]!r} is in tasks {tasks[0]!r} and {tasks[1]!r} "
                f"({ds.given_tasks}); {kind}-incremental tasks have disjoint classes (scenario: domain takes "
                "tasks that share classes)"
            )


def task_incremental(
    ds: Dataset,
    n_tasks: int | None = None,
    order: Order = "seeded",
    seed: int = 0,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> Scenario:
    """The class-incremental cut, evaluated per task with the task's own head (kind 'task')."""
    return class_incremental(ds, n_tasks, order, seed, val_fraction, kind="task")


def domain_incremental(
    ds: Dataset,
    domain_order: Sequence[str] | None = None,
    seed: int = 0,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> Scenario:
    """One task per domain (in ``domain_order``: a list, 'paper' for MagMax's, default
    ``ds.domain_names``); all classes in each."""
    if not ds.domain_names or ds.train_domains is None or ds.test_domains is None:
        raise MergeclError(f"source {ds.name!r} has no domains; domain-incremental needs a source such as domainnet")
    if ds.val is not None and ds.val_domains is None:
        raise MergeclError(f"source {ds.name!r} has a val split without val domains")
    ds = with_val(ds, val_fraction, seed)
    if domain_order == "paper":
        from mergecl.data.orders import PAPER_DOMAIN_ORDERS

        if ds.name not in PAPER_DOMAIN_ORDERS:
            raise MergeclError(
                f"no paper domain order for source {ds.name!r} (known: {', '.join(PAPER_DOMAIN_ORDERS)})"
            )
        domain_order = PAPER_DOMAIN_ORDERS[ds.name]
    chosen = list(domain_order) if domain_order is not None else list(ds.domain_names)
    unknown = [d for d in chosen if d not in ds.domain_names]
    if unknown or len(set(chosen)) != len(chosen) or not chosen:
        raise MergeclError(f"domain order {chosen} must name distinct domains of: {', '.join(ds.domain_names)}")
    everything = list(range(len(ds.class_names)))
    tasks = []
    for t, domain in enumerate(chosen):
        d = ds.domain_names.index(domain)
        parts = [
            split.subset((domains == d).nonzero().flatten())
            for split, domains in (
                (ds.train, ds.train_domains),
                (ds.val, ds.val_domains),
                (ds.test, ds.test_domains),
            )
        ]
        tasks.append(Task(t, domain, everything, *parts))
    return Scenario("domain", tasks, list(ds.class_names), f"{ds.name} domain-incremental ({len(tasks)} domains)")


def _permute(split: Split, perm: torch.Tensor) -> Split:
    x = split.inputs
    assert isinstance(x, torch.Tensor)
    return Split(x.reshape(len(x), -1)[:, perm].reshape(x.shape), split.labels, split.kind)


def permuted(
    ds: Dataset,
    n_tasks: int,
    seed: int = 0,
    identity_first: bool = True,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> Scenario:
    """Permuted-MNIST style: task t applies one fixed seeded permutation to the flattened inputs.

    Every task holds every example and every class (domain-incremental). Task 0 keeps the original
    inputs when ``identity_first`` (the common protocol), else it is permuted too.
    """
    if not isinstance(ds.train.inputs, torch.Tensor):
        raise MergeclError(f"permuted tasks need tensor inputs; {ds.name!r} has {ds.train.kind} inputs")
    if n_tasks < 1:
        raise MergeclError(f"n_tasks must be >= 1, got {n_tasks}")
    ds = with_val(ds, val_fraction, seed)
    assert ds.val is not None
    size = ds.train.inputs[0].numel()
    rng = np.random.RandomState(seed)
    everything = list(range(len(ds.class_names)))
    tasks = []
    for t in range(n_tasks):
        identity = identity_first and t == 0
        perm = torch.arange(size) if identity else torch.from_numpy(rng.permutation(size)).long()
        parts = [_permute(s, perm) for s in (ds.train, ds.val, ds.test)]
        tasks.append(Task(t, "original" if identity else f"permutation {t + 1}", everything, *parts))
    return Scenario("domain", tasks, list(ds.class_names), f"permuted {ds.name} ({n_tasks} tasks)")


def build_scenario(
    kind: str,
    source: Dataset | str,
    n_tasks: int | None = None,
    order: Order = "seeded",
    seed: int = 0,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    train_per_class: int | None = None,
    eval_per_class: int | None = None,
    domain_order: Sequence[str] | None = None,
    identity_first: bool = True,
    root: str | Path | None = None,
    source_options: dict[str, Any] | None = None,
) -> Scenario:
    """The entry point of a run config: source (a ``Dataset`` or a registry name) -> Scenario.

    ``kind``: 'class', 'task', 'domain' or 'permuted'. ``eval_per_class`` caps each task's val
    and test examples per class (seeded; quick smoke runs). ``train_per_class`` caps each task's
    training examples per class (seeded), for CPU-sized benchmarks.
    """
    if kind not in KINDS:
        raise MergeclError(f"unknown scenario kind {kind!r}; valid: {', '.join(KINDS)}")
    if isinstance(source, str):
        source = get_source(source, root, seed, **(source_options or {}))
    if kind in ("class", "task"):
        scenario = class_incremental(source, n_tasks, order, seed, val_fraction, kind=kind)
    elif kind == "domain":
        scenario = domain_incremental(source, domain_order, seed, val_fraction)
    else:
        scenario = permuted(source, DEFAULT_TASKS if n_tasks is None else n_tasks, seed, identity_first, val_fraction)
    if train_per_class is not None:
        for task in scenario.tasks:
            task.train = subsample_per_class(task.train, train_per_class, seed + task.index)
    if eval_per_class is not None:
        for task in scenario.tasks:
            task.val = subsample_per_class(task.val, eval_per_class, seed + task.index)
            task.test = subsample_per_class(task.test, eval_per_class, seed + task.index)
    return scenario


def task_orders(n: int, seed: int, count: int) -> list[list[int]]:
    """``count`` distinct orders of n tasks: the identity first, then seeded random permutations
    (a generator seeded from ``seed``; one equal to an earlier order is drawn again). Order k does
    not depend on ``count``: asking for more orders keeps the first ones."""
    possible = 1
    for i in range(2, n + 1):
        possible *= i
        if possible >= count:
            break
    if count > possible:
        raise MergeclError(f"data.orders is {count}, but {n} task(s) have only {possible} different orders")
    rng = np.random.RandomState(zlib.crc32(f"{seed}:task orders".encode()))
    orders = [list(range(n))]
    while len(orders) < count:
        drawn = [int(i) for i in rng.permutation(n)]
        if drawn not in orders:
            orders.append(drawn)
    return orders


def reorder(scenario: Scenario, order: Sequence[int]) -> Scenario:
    """The scenario with its tasks in ``order`` (task i of the result is task ``order[i]``), renumbered."""
    if sorted(order) != list(range(len(scenario.tasks))):
        raise MergeclError(f"a task order must list each of the {len(scenario.tasks)} tasks once, got {list(order)}")
    tasks = [dataclasses.replace(scenario.tasks[old], index=new) for new, old in enumerate(order)]
    return dataclasses.replace(scenario, tasks=tasks)
