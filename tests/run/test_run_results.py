"""A run's results from its progress.json: seeds at different steps, a final-only method (its rows
before the last are null on disk), a method failed on one seed, a method with no row yet."""

import pytest

from mergecl.evaluation.results import FINAL_ONLY, RunMeta
from mergecl.experiment.config import parse_config
from mergecl.experiment.runner import results_from_progress

CONFIG = parse_config(
    {
        "seeds": [0, 1],
        "data": {"source": "digits", "n_tasks": 3},
        "methods": ["seq_ft", "magmax", "joint", "lwf"],
        "method_options": {"joint": {"final_only": True}},
    }
)
META = RunMeta(config="toy", task_names=["a", "b", "c"], num_tasks=3, seeds=[0, 1])
ROW = {1: [90.0, 10.0, 0.0], 2: [80.0, 70.0, 0.0], 3: [60.0, 50.0, 40.0]}  # row t: after step t


def seed(rows, **extra):
    return {
        "rows": rows,
        "all_class_acc": {name: 50.0 for name, r in rows.items() if len(r) == 3 and r[-1] is not None},
        "train_time": {"seq": 2.0, "joint": 4.0},
        "method_time": {name: 1.0 for name in rows},
        **extra,
    }


def test_results_from_progress():
    progress = {
        "seeds": {
            "0": seed(
                {"seq_ft": [ROW[1], ROW[2], ROW[3]], "magmax": [ROW[1], ROW[2]], "joint": [None, None, ROW[3]]},
                failed={"lwf": "lwf, seed 0, task 2: training loss became nan"},
                method_info={"magmax": {"0": {"lam": 0.5}, "1": {"lam": 0.3}}},
            ),
            "1": seed(
                {"seq_ft": [ROW[1]], "magmax": [ROW[1], ROW[2]], "joint": [None, None]},
                method_info={"magmax": {"0": {"lam": 0.7}, "1": {"lam": 0.3}}},
            ),
        }
    }
    results = results_from_progress(CONFIG, progress, META)
    seq, magmax, joint = (results.methods[name] for name in ("seq_ft", "magmax", "joint"))

    # seed 1 stopped after step 1: the numbers are seed 0's at step 3, never a mix of steps
    assert seq.coverage == {"0": 3, "1": 1} and seq.seeds_in_numbers() == ["0"]
    assert seq.final_acc == pytest.approx(50.0) and seq.steps == 3 and seq.seeds is None
    assert seq.wall_time_s == 3.0 and seq.all_class_acc == 50.0

    # both seeds at step 2: averaged, the lam each chose is averaged per step
    assert magmax.coverage == {"0": 2, "1": 2} and set(magmax.seeds) == {"0", "1"}
    assert magmax.step_info == {"lam": pytest.approx([0.6, 0.3])}

    # joint: evaluated once, after the last step; seed 1 has not got there
    assert joint.evaluated == FINAL_ONLY and joint.matrix == [ROW[3]] and joint.final_acc == pytest.approx(50.0)
    assert (joint.avg_incremental_acc, joint.bwt, joint.forgetting) == (None, None, None)
    assert joint.coverage == {"0": 3, "1": 0} and joint.wall_time_s == 5.0

    assert results.methods["lwf"].failed == "lwf, seed 0, task 2: training loss became nan"
    assert results.run == META
    on_disk = results.to_json()["methods"]
    assert "final_row" in on_disk["joint"] and "accuracy_matrix" not in on_disk["joint"]


def test_the_per_step_values_are_those_of_the_seeds_and_steps_in_the_numbers():
    # seed 1 stopped after step 1, and seed 0's training logged step 3 before its row was evaluated
    progress = {
        "seeds": {
            "0": seed({"magmax": [ROW[1], ROW[2]]}, method_info={"magmax": {"0": {"lam": 0.5}, "1": {"lam": 0.3}}}),
            "1": seed({"magmax": [ROW[1]]}, method_info={"magmax": {"0": {"lam": 0.9}}}),
        }
    }
    progress["seeds"]["0"]["method_info"]["magmax"]["2"] = {"lam": 0.1}
    magmax = results_from_progress(CONFIG, progress, META).methods["magmax"]
    assert magmax.seeds_in_numbers() == ["0"] and magmax.steps == 2
    assert magmax.step_info == {"lam": pytest.approx([0.5, 0.3])}


def test_a_method_without_a_row_is_not_in_the_results_yet():
    progress = {"seeds": {"0": seed({"seq_ft": [ROW[1]]})}}
    assert list(results_from_progress(CONFIG, progress, RunMeta()).methods) == ["seq_ft"]


def test_a_failure_on_several_seeds_is_counted():
    failed = {"lwf": "lwf, seed 0, task 2: boom"}
    progress = {"seeds": {"0": seed({}, failed=failed), "1": seed({}, failed={"lwf": "lwf, seed 1, task 3: boom"})}}
    lwf = results_from_progress(CONFIG, progress, META).methods["lwf"]
    assert lwf.failed == "lwf, seed 0, task 2: boom (and 1 more seed(s))"
