"""``data.orders: K``: K task orders per seed, each run as a seed of its own (seed + k x 1,000,000);
order 0 is the scenario's own, so ``orders: 1`` (the default) is the run of before, number for number."""

import itertools
import json

import pytest
import torch

from mergecl import MergeclError
from mergecl.data.scenarios import reorder, task_orders
from mergecl.experiment.combine import combine
from mergecl.experiment.config import dump_config, parse_config, run_seeds, seed_and_order
from mergecl.experiment.plan import plan
from mergecl.experiment.runner import run, run_scenario

SMALL = {
    "name": "small-orders-test",
    "seeds": [0],
    "data": {"source": "digits", "scenario": "class", "n_tasks": 3},
    "model": {"name": "mlp", "in_dim": 64, "hidden": [16]},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.01},
    "methods": ["seq_ft", "magmax", "ind_ft+average"],
}


def with_orders(k, **more):
    return parse_config({**SMALL, "data": {**SMALL["data"], "orders": k}, **more})


def test_task_orders_are_distinct_seeded_and_start_with_the_scenarios_own():
    every = task_orders(3, 0, 6)
    assert every[0] == [0, 1, 2]
    assert sorted(map(tuple, every)) == sorted(itertools.permutations(range(3)))
    assert task_orders(3, 0, 2) == every[:2]  # asking for more keeps the first ones
    assert task_orders(10, 0, 3) == task_orders(10, 0, 3) and task_orders(10, 0, 3) != task_orders(10, 1, 3)
    assert task_orders(1, 5, 1) == [[0]]
    with pytest.raises(MergeclError, match="data.orders is 7, but 3 task"):
        task_orders(3, 0, 7)


def test_the_config_key_its_seeds_and_its_record():
    assert "orders:" not in dump_config(parse_config(SMALL))  # one order: recorded as before the key
    config = with_orders(3, seeds=[0, 7])
    assert "orders: 3" in dump_config(config)
    assert run_seeds(config) == [0, 1_000_000, 2_000_000, 7, 1_000_007, 2_000_007]
    assert [seed_and_order(config, s) for s in run_seeds(config)][4] == (7, 1)
    assert run_seeds(parse_config(dict(SMALL, seeds=[3_000_000]))) == [3_000_000]
    assert seed_and_order(parse_config(dict(SMALL, seeds=[3_000_000])), 3_000_000) == (3_000_000, 0)
    with pytest.raises(MergeclError, match="with data.orders > 1 every seed is below 1,000,000"):
        with_orders(2, seeds=[1_000_000])
    with pytest.raises(MergeclError, match="data.orders"):
        with_orders(0)


def test_an_order_is_the_seeds_tasks_in_another_order():
    config = with_orders(2)
    own, other = run_scenario(config, 0), run_scenario(config, 1_000_000)
    order = task_orders(3, 0, 2)[1]
    assert order != [0, 1, 2]
    assert [task.classes for task in other.tasks] == [own.tasks[i].classes for i in order]
    assert [task.index for task in other.tasks] == [0, 1, 2]
    for task, i in zip(other.tasks, order, strict=True):
        assert torch.equal(task.train.inputs, own.tasks[i].train.inputs) and task.name == own.tasks[i].name
    assert [task.classes for task in run_scenario(parse_config(SMALL), 0).tasks] == [t.classes for t in own.tasks]
    with pytest.raises(MergeclError, match="each of the 3 tasks once"):
        reorder(own, [0, 0, 1])


def test_given_task_groups_are_permuted_as_groups():
    domains = ["banking", "credit_cards", "home", "auto_and_commute"]
    data = {"source": "clinc150_mini", "order": "groups", "n_tasks": None, "eval_per_class": 2}
    config = parse_config(
        {**SMALL, "data": {**data, "orders": 3, "options": {"domains": domains}}, "model": {"name": "hf_text"}}
    )
    names = [[task.name for task in run_scenario(config, k * 1_000_000).tasks] for k in range(3)]
    assert names[0] == domains
    assert all(sorted(n) == sorted(domains) for n in names) and len({tuple(n) for n in names}) == 3


def test_two_orders_run_as_two_seeds_and_order_0_is_the_run_of_before(tmp_path):
    before, _ = run(parse_config(SMALL), out=tmp_path / "one", echo=lambda m: None)
    results, out = run(with_orders(2), out=tmp_path / "two", echo=lambda m: None)
    progress = json.loads((out / "progress.json").read_text())
    assert sorted(progress["seeds"]) == ["0", "1000000"]
    one = json.loads((tmp_path / "one" / "progress.json").read_text())
    assert progress["seeds"]["0"]["rows"] == one["seeds"]["0"]["rows"]  # order 0: the same numbers
    assert progress["seeds"]["1000000"]["rows"] != one["seeds"]["0"]["rows"]
    assert (out / "seed1000000" / "seq" / "task2.safetensors").exists()
    assert results["run"]["seeds"] == [0, 1_000_000] and "task_names" not in results["run"]
    assert before["run"]["seeds"] == [0] and before["run"]["task_names"]
    assert results["run"]["orders"] == 2 and "orders" not in before["run"]  # the report says "streams"
    magmax = results["methods"]["magmax"]
    assert set(magmax["seeds"]) == {"0", "1000000"} and "final_acc" in magmax["std"]
    assert magmax["final_acc"] == pytest.approx(sum(s["final_acc"] for s in magmax["seeds"].values()) / 2, abs=1e-6)
    assert "task order 1 of seed 0" in (out / "logs" / "run.log").read_text()
    assert plan(with_orders(2), "orders.yaml")["seeds"] == [0, 1_000_000]

    # runs side by side combine, with their orders
    run(with_orders(2, seeds=[1]), out=tmp_path / "s1", echo=lambda m: None)
    combined, path = combine([out, tmp_path / "s1"], tmp_path / "all")
    assert combined["run"]["seeds"] == [0, 1_000_000, 1, 1_000_001] and combined["run"]["orders"] == 2
    assert (path / "seed1000001").is_dir() and set(combined["methods"]["magmax"]["seeds"]) == {
        "0",
        "1000000",
        "1",
        "1000001",
    }


def test_ind_ft_is_trained_once_per_seed_and_shared_by_every_order(tmp_path):
    """Ind-FT's task vector of a task does not depend on the order (it starts from theta_0, which
    every order of a seed shares): order k's step t is order 0's vector of the same task, copied,
    not trained again; Seq-FT is trained in each order."""
    from safetensors.torch import load_file

    config = with_orders(3, methods=["ind_ft", "ind_ft+average", "seq_ft"])
    run(config, out=tmp_path / "run", report=False, echo=lambda message: None)
    orders = task_orders(3, 0, 3)
    seed_dir = lambda seed: tmp_path / "run" / f"seed{seed}"  # noqa: E731
    assert torch.equal(load_file(seed_dir(0) / "base.safetensors")["head.weight"],
                       load_file(seed_dir(2_000_000) / "base.safetensors")["head.weight"])  # fmt: skip
    for k in (1, 2):
        for t, j in enumerate(orders[k]):
            mine = load_file(seed_dir(k * 1_000_000) / "ind" / f"task{t}.safetensors")
            first = load_file(seed_dir(0) / "ind" / f"task{j}.safetensors")
            assert mine.keys() == first.keys() and all(torch.equal(mine[key], first[key]) for key in mine)
            same_file = (seed_dir(k * 1_000_000) / "ind" / f"task{t}.safetensors").stat().st_ino
            assert same_file == (seed_dir(0) / "ind" / f"task{j}.safetensors").stat().st_ino  # a hard link
    log = (tmp_path / "run" / "logs" / "run.log").read_text()
    assert log.count("of seed 0's order") == 6  # 2 orders x 3 tasks copied
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert (
        "ind" not in progress["seeds"]["1000000"]["train_time"]
        and progress["seeds"]["1000000"]["train_time"]["seq"] > 0
    )
    # the dry run counts Ind-FT's training once per seed, Seq-FT's once per order
    planned = plan(config, "orders.yaml")
    ind, seq = (next(t for t in planned["trainings"] if t["training"] == name) for name in ("ind", "seq"))
    assert ind["independent"] and not seq["independent"]
    assert planned["training_steps"] == ind["steps_per_seed"] + 3 * seq["steps_per_seed"]
