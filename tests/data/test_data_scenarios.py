"""Scenario invariants: disjoint classes, every example in exactly one task, global labels, val carved
without overlap, fixed orders, determinism. Synthetic sources carry each example's id as its input,
so membership can be checked exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergecl.data.orders import PAPER_CLASS_ORDERS, PAPER_DOMAIN_ORDERS, paper_class_order
from mergecl.data.registry import get_source
from mergecl.data.scenarios import (
    build_scenario,
    class_incremental,
    domain_incremental,
    permuted,
    split_classes,
    subsample_per_class,
    task_incremental,
    with_val,
)
from mergecl.data.types import Dataset, Scenario, Split
from mergecl.errors import MergeclError


def ids_split(start: int, labels: list[int]) -> Split:
    """Inputs [N, 1] holding a unique example id (start, start+1, ...)."""
    ids = torch.arange(start, start + len(labels), dtype=torch.float32).unsqueeze(1)
    return Split(ids, torch.tensor(labels, dtype=torch.long))


def synthetic(n_classes: int = 10, per_class: int = 20, val: bool = False, name: str = "toy") -> Dataset:
    labels = [c for _ in range(per_class) for c in range(n_classes)]
    train = ids_split(0, labels)
    test = ids_split(100_000, labels[: n_classes * 3])
    return Dataset(
        name,
        [f"c{i}" for i in range(n_classes)],
        train,
        test,
        ids_split(200_000, labels[: n_classes * 2]) if val else None,
    )


def ids(split: Split) -> list[int]:
    return split.inputs[:, 0].long().tolist()


def check_class_incremental(sc: Scenario, ds: Dataset) -> None:
    n = len(ds.class_names)
    seen: list[int] = []
    for task in sc.tasks:
        assert task.classes == sorted(task.classes) and not set(task.classes) & set(seen)
        seen += task.classes
        for split in (task.train, task.val, task.test):
            assert set(split.labels.tolist()) <= set(task.classes)  # global ids, only this task's
    assert sorted(seen) == list(range(n))
    carved = with_val(ds, 0.1, 0) if ds.val is None else ds
    for part in ("train", "val", "test"):
        all_ids = [i for t in sc.tasks for i in ids(getattr(t, part))]
        assert len(all_ids) == len(set(all_ids)) == len(getattr(carved, part))  # each example once
    train_ids = {i for t in sc.tasks for i in ids(t.train)}
    val_ids = {i for t in sc.tasks for i in ids(t.val)}
    assert not train_ids & val_ids
    if ds.val is None:
        assert train_ids | val_ids == set(ids(ds.train))  # val is carved out of train, nothing lost


@pytest.mark.parametrize("order", ["seeded", "natural", [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]])
@pytest.mark.parametrize("n_tasks", [1, 3, 5, 10])
def test_class_incremental_invariants(order, n_tasks: int) -> None:
    ds = synthetic()
    sc = class_incremental(ds, n_tasks, order, seed=0)
    assert sc.kind == "class" and len(sc.tasks) == n_tasks and sc.class_names == ds.class_names
    assert [t.index for t in sc.tasks] == list(range(n_tasks))
    check_class_incremental(sc, ds)


@settings(max_examples=25, deadline=None)
@given(
    n_classes=st.integers(2, 12),
    per_class=st.integers(1, 8),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
    has_val=st.booleans(),
)
def test_class_incremental_properties(n_classes: int, per_class: int, data, seed: int, has_val: bool) -> None:
    n_tasks = data.draw(st.integers(1, n_classes))
    ds = synthetic(n_classes, per_class, val=has_val)
    sc = class_incremental(ds, n_tasks, "seeded", seed)
    check_class_incremental(sc, ds)
    sizes = [len(t.classes) for t in sc.tasks]
    assert max(sizes) - min(sizes) <= 1


def test_val_is_a_stratified_ten_percent_of_train() -> None:
    sc = class_incremental(synthetic(per_class=20), 2, "natural", seed=0)
    for task in sc.tasks:
        assert torch.bincount(task.val.labels).tolist()[task.classes[0] :] == [2] * 5
        assert torch.bincount(task.train.labels).tolist()[task.classes[0] :] == [18] * 5


def test_given_val_split_is_used_as_is() -> None:
    ds = synthetic(val=True)
    sc = class_incremental(ds, 2, "natural", seed=0)
    assert sum(len(t.val) for t in sc.tasks) == len(ds.val)
    assert sum(len(t.train) for t in sc.tasks) == len(ds.train)


def test_same_seed_same_scenario_other_seed_other_order() -> None:
    def build(seed: int) -> Scenario:
        return build_scenario("class", synthetic(20), n_tasks=4, order="seeded", seed=seed)

    a, b, c = build(7), build(7), build(8)
    assert [t.classes for t in a.tasks] == [t.classes for t in b.tasks]
    assert [t.name for t in a.tasks] == [t.name for t in b.tasks]
    for ta, tb in zip(a.tasks, b.tasks, strict=True):
        for part in ("train", "val", "test"):
            assert torch.equal(getattr(ta, part).inputs, getattr(tb, part).inputs)
            assert torch.equal(getattr(ta, part).labels, getattr(tb, part).labels)
    assert [t.classes for t in a.tasks] != [t.classes for t in c.tasks]


def test_natural_order_and_names() -> None:
    sc = class_incremental(synthetic(), 5, "natural", seed=0)
    assert [t.classes for t in sc.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert sc.tasks[0].name == "task1 (classes c0, c1)"
    assert class_incremental(synthetic(), 2, "natural").tasks[0].name == "task1 (classes c0, c1, c2, c3, ...)"


def test_bad_arguments() -> None:
    ds = synthetic()
    with pytest.raises(MergeclError, match=r"n_tasks must be between 1 and the number of classes \(10\), got 11"):
        class_incremental(ds, 11)
    with pytest.raises(MergeclError, match="n_tasks must be between"):
        class_incremental(ds, 0)
    with pytest.raises(MergeclError, match="each of the 10 class ids"):
        class_incremental(ds, 2, [0, 1, 2])
    with pytest.raises(MergeclError, match="unknown class order 'random'"):
        class_incremental(ds, 2, "random")
    with pytest.raises(MergeclError, match="has no class groups"):
        class_incremental(ds, order="groups")
    with pytest.raises(MergeclError, match="unknown scenario kind 'online'"):
        build_scenario("online", ds, 2)


def test_n_tasks_left_out_takes_the_sources_own_tasks_else_five() -> None:
    ds = synthetic()
    assert [t.classes for t in class_incremental(ds).tasks] == [t.classes for t in class_incremental(ds, 5).tasks]
    assert len(build_scenario("permuted", ds).tasks) == 5


def test_groups_order_makes_one_task_per_group() -> None:
    ds = synthetic(6)
    ds.class_groups = {"kitchen": [4, 0, 2], "travel": [1, 3, 5]}
    sc = class_incremental(ds, order="groups")
    assert [t.name for t in sc.tasks] == ["kitchen", "travel"]
    assert [t.classes for t in sc.tasks] == [[0, 2, 4], [1, 3, 5]]
    check_class_incremental(sc, ds)
    with pytest.raises(MergeclError, match="makes 2 tasks .* but n_tasks is 3"):
        class_incremental(ds, 3, order="groups")
    ds.class_groups = {"a": [0, 1], "b": [1, 2, 3, 4, 5]}
    with pytest.raises(MergeclError, match="exactly once"):
        class_incremental(ds, order="groups")


def test_task_incremental_is_the_same_cut_with_kind_task() -> None:
    ds = synthetic()
    ti, ci = task_incremental(ds, 5, seed=3), class_incremental(ds, 5, seed=3)
    assert ti.kind == "task" and [t.classes for t in ti.tasks] == [t.classes for t in ci.tasks]
    assert build_scenario("task", ds, 5, seed=3).kind == "task"


def test_split_classes_uses_magmax_floor_boundaries() -> None:
    cut = split_classes(list(range(196)), 5)
    assert [len(c) for c in cut] == [39, 39, 39, 39, 40]
    assert [len(c) for c in split_classes(list(range(10)), 3)] == [3, 3, 4]


# ----------------------------------------------------------------------------------- paper orders


def test_paper_orders_are_permutations() -> None:
    sizes = {"cifar100": 100, "imagenet_r": 200, "cub200": 200, "cars": 196, "domainnet": 345}
    for name, n in sizes.items():
        assert sorted(PAPER_CLASS_ORDERS[name]) == list(range(n)), name
    assert PAPER_CLASS_ORDERS["cifar100"][:5] == [70, 89, 11, 13, 63]
    assert PAPER_CLASS_ORDERS["cars"] == list(range(196))
    assert len(set(PAPER_DOMAIN_ORDERS["imagenet_r"])) == 15
    assert sorted(PAPER_DOMAIN_ORDERS["domainnet"]) == [
        "clipart",
        "infograph",
        "painting",
        "quickdraw",
        "real",
        "sketch",
    ]


def test_paper_order_fallback_is_the_pycil_convention() -> None:
    np.random.seed(1993)
    assert paper_class_order("tinyimagenet", 20) == np.random.permutation(20).tolist()
    with pytest.raises(MergeclError, match="has 100 classes but the data has 99"):
        paper_class_order("cifar100", 99)


def test_paper_order_cuts_cifar100_like_magmax() -> None:
    sc = class_incremental(synthetic(100, 1, name="cifar100"), 10, order="paper")
    assert sc.tasks[0].classes == sorted([70, 89, 11, 13, 63, 53, 86, 57, 41, 43])


# -------------------------------------------------------------------------------- domain, permuted


def with_domains(n_domains: int = 3) -> Dataset:
    ds = synthetic(4, 30)
    ds.domain_names = [f"d{i}" for i in range(n_domains)]
    ds.train_domains = torch.arange(len(ds.train)) % n_domains
    ds.test_domains = torch.arange(len(ds.test)) % n_domains
    return ds


def test_domain_incremental_one_task_per_domain_all_classes() -> None:
    ds = with_domains()
    sc = domain_incremental(ds, seed=0)
    assert sc.kind == "domain" and [t.name for t in sc.tasks] == ["d0", "d1", "d2"]
    carved = with_val(ds, 0.1, 0)
    for task in sc.tasks:
        assert task.classes == [0, 1, 2, 3]
        d = ds.domain_names.index(task.name)
        assert all(i % 3 == d for i in ids(task.train) + ids(task.val))
        assert all((i - 100_000) % 3 == d for i in ids(task.test))
        assert set(task.val.labels.tolist()) == {0, 1, 2, 3}  # stratified by (domain, class)
        assert not set(ids(task.train)) & set(ids(task.val))
    assert sum(len(t.train) + len(t.val) for t in sc.tasks) == len(ds.train) == len(carved.train) + len(carved.val)
    order = domain_incremental(ds, ["d2", "d0"])
    assert [t.name for t in order.tasks] == ["d2", "d0"] and order.tasks[0].index == 0


def test_domain_incremental_errors() -> None:
    with pytest.raises(MergeclError, match="has no domains"):
        domain_incremental(synthetic())
    with pytest.raises(MergeclError, match="must name distinct domains of: d0, d1, d2"):
        domain_incremental(with_domains(), ["d0", "d9"])


def test_permuted_tasks() -> None:
    ds = synthetic(3, 4)
    x = torch.arange(len(ds.train) * 6, dtype=torch.float32).reshape(-1, 1, 2, 3)
    ds.train = Split(x, ds.train.labels)
    ds.test = Split(torch.arange(len(ds.test) * 6, dtype=torch.float32).reshape(-1, 1, 2, 3), ds.test.labels)
    sc = permuted(ds, 4, seed=1)
    assert sc.kind == "domain" and len(sc.tasks) == 4
    carved = with_val(ds, 0.1, 1)
    assert torch.equal(sc.tasks[0].train.inputs, carved.train.inputs)  # task 0: the original inputs
    for task in sc.tasks:
        assert task.classes == [0, 1, 2] and task.train.inputs.shape[1:] == (1, 2, 3)
        assert torch.equal(task.train.labels, carved.train.labels)
        # one permutation per task, the same for every split: recover it from the first rows
        perm = (task.train.inputs.reshape(len(task.train), -1)[0] - carved.train.inputs.reshape(-1, 6)[0]).long()
        flat = carved.test.inputs.reshape(len(carved.test), -1)
        assert torch.equal(task.test.inputs.reshape(len(flat), -1), flat[:, perm + torch.arange(6)])
    perms = {tuple(t.train.inputs[0].flatten().tolist()) for t in sc.tasks}
    assert len(perms) == 4
    again = permuted(ds, 4, seed=1)
    assert all(torch.equal(a.test.inputs, b.test.inputs) for a, b in zip(sc.tasks, again.tasks, strict=True))
    assert not torch.equal(permuted(ds, 2, seed=2).tasks[1].test.inputs, sc.tasks[1].test.inputs)
    assert not torch.equal(permuted(ds, 1, identity_first=False).tasks[0].test.inputs, carved.test.inputs)


def test_permuted_needs_tensors() -> None:
    ds = Dataset(
        "t",
        ["a"],
        Split(["x", "y"], torch.zeros(2, dtype=torch.long), "text"),
        Split(["z"], torch.zeros(1, dtype=torch.long), "text"),
    )
    with pytest.raises(MergeclError, match="need tensor inputs"):
        permuted(ds, 2)


# ---------------------------------------------------------------------------- subsampling, builder


def test_subsample_per_class() -> None:
    split = synthetic(5, 10).train
    small = subsample_per_class(split, 3, seed=0)
    assert torch.bincount(small.labels).tolist() == [3] * 5
    assert set(ids(small)) <= set(ids(split)) and ids(small) == sorted(ids(small))
    assert ids(subsample_per_class(split, 3, seed=0)) == ids(small)
    assert ids(subsample_per_class(split, 3, seed=1)) != ids(small)
    assert len(subsample_per_class(split, 50, seed=0)) == len(split)


def test_build_scenario_from_a_registry_name_with_a_train_cap() -> None:
    sc = build_scenario("class", "digits", n_tasks=5, order="natural", seed=0, train_per_class=10)
    assert [t.classes for t in sc.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert all(torch.bincount(t.train.labels, minlength=10).max() == 10 for t in sc.tasks)
    assert len(sc.tasks[0].test) > 20  # test and val are not capped
    digits = get_source("digits", seed=0)
    full = class_incremental(digits, 5)
    for part in ("train", "val", "test"):
        assert sum(len(getattr(t, part)) for t in full.tasks) == len(getattr(digits, part))


def test_clinc150_domains_as_tasks(text_dataset) -> None:
    ds = text_dataset("clinc150")  # the full data, or the subset shipped in mergecl
    per_class_train, per_class_test = len(ds.train) // 150, len(ds.test) // 150
    sc = build_scenario("class", ds, order="groups")
    assert len(sc.tasks) == 10 and sc.tasks[0].name == "banking"
    assert all(len(t.classes) == 15 for t in sc.tasks)
    assert all(len(t.train) == 15 * per_class_train and len(t.test) == 15 * per_class_test for t in sc.tasks)
    seeded = build_scenario("class", ds, n_tasks=10, order="seeded", seed=0)
    assert [t.classes for t in seeded.tasks] != [t.classes for t in sc.tasks]
