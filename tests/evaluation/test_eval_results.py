"""Typed results: what a seed's and a method's numbers are, results.json's round trip, final-only and
failed methods, seeds at different steps, and the report of each."""

import json
import re

import pytest

from mergecl.errors import MergeclError
from mergecl.evaluation.report import format_table, write_report
from mergecl.evaluation.results import FINAL_ONLY, MethodResult, RunMeta, RunResults, SeedSummary

FULL = [[90.0, 99.0, 5.0], [95.0, 85.0, 20.0], [60.0, 75.0, 95.0]]  # final 76.67, BWT -20, forgetting 22.5
OTHER = [[80.0, 10.0, 0.0], [85.0, 75.0, 0.0], [70.0, 65.0, 90.0]]  # final 75, BWT -10, forgetting 12.5
META = RunMeta(config="toy", scenario="class-incremental", task_names=["a", "b", "c"], num_tasks=3, seeds=[0, 1])


def cells(table, method):
    (line,) = [line for line in table.splitlines() if line.startswith(method + " ")]
    return re.split(r"\s{2,}", line.strip())


def through_json(results):
    """results.json written and read back, as `mergecl report RUN_DIR` reads it."""
    return RunResults.from_json(json.loads(json.dumps(results.to_json(), allow_nan=False)))


def test_a_seed_summary_holds_the_metrics_of_its_matrix():
    seed = SeedSummary.of_rows(FULL, all_class_acc=40.0, wall_time_s=3.0, val_rows=OTHER)
    assert seed.final_acc == pytest.approx(230 / 3) and seed.bwt == pytest.approx(-20.0)
    assert seed.forgetting == pytest.approx(22.5) and seed.all_class_acc == 40.0 and seed.wall_time_s == 3.0
    assert seed.val.final_acc == pytest.approx(75.0) and seed.val.wall_time_s is None


def test_the_mean_over_seeds_with_std_and_the_seeds_kept():
    seeds = {"0": SeedSummary.of_rows(FULL, 40.0, 3.0), "1": SeedSummary.of_rows(OTHER, 50.0, 5.0)}
    result = MethodResult.mean_of(seeds, coverage={"0": 3, "1": 3}, step_info={"lam": [0.5, 0.3, 0.2]})
    assert result.final_acc == pytest.approx((230 / 3 + 75.0) / 2)
    assert result.bwt == pytest.approx(-15.0) and result.all_class_acc == 45.0 and result.wall_time_s == 4.0
    assert result.std["wall_time_s"] == pytest.approx(2**0.5)
    assert result.matrix[2] == pytest.approx([65.0, 70.0, 92.5])
    assert set(result.seeds) == {"0", "1"} and result.seeds_in_numbers() == ["0", "1"]
    one = MethodResult.mean_of({"0": seeds["0"]}, coverage={"0": 3})
    assert one.final_acc == seeds["0"].final_acc and one.std == {} and one.seeds is None


def test_results_round_trip_through_json():
    seeds = {"0": SeedSummary.of_rows(FULL, 40.0, 3.0, FULL), "1": SeedSummary.of_rows(OTHER, 50.0, 5.0, OTHER)}
    joint = {s: SeedSummary.of_final_row([90.0, 92.0, 94.0], 91.0, 1.0, [[88.0, 89.0, 90.0]]) for s in "01"}
    results = RunResults(
        {
            "magmax": MethodResult.mean_of(seeds, {"0": 3, "1": 3}, {"lam": [0.5, 0.4, 0.3]}),
            "joint": MethodResult.mean_of(joint, {"0": 3, "1": 3}),
            "lwf": MethodResult.failure("lwf, seed 0, task 2: training loss became nan"),
        },
        META,
    )
    assert through_json(results) == results
    text = json.dumps(results.to_json(), indent=1)
    assert json.dumps(through_json(results).to_json(), indent=1) == text  # results.json: same bytes


def test_a_final_only_methods_validation_accuracy_is_the_mean_of_its_row():
    # its one validation row was once summarized as step 1 of a matrix: task 1's accuracy alone
    joint = {s: SeedSummary.of_final_row([90.0, 92.0, 94.0], val_rows=[[88.0, 89.0, 96.0 + int(s)]]) for s in "01"}
    assert joint["0"].val.final_acc == pytest.approx(91.0) and joint["0"].val.avg_incremental_acc is None
    result = MethodResult.mean_of(joint, {"0": 3, "1": 3})
    assert result.val == pytest.approx({"final_acc": 91.0 + 1 / 6})
    assert through_json(RunResults({"joint": result}, META)).methods["joint"].val == result.val


def test_a_final_only_method_has_its_final_numbers_only():
    seed = SeedSummary.of_final_row([90.0, 80.0, 70.0], all_class_acc=79.0, wall_time_s=2.0)
    assert seed.evaluated == FINAL_ONLY and seed.final_acc == 80.0 and seed.all_class_acc == 79.0
    assert (seed.avg_incremental_acc, seed.bwt, seed.forgetting) == (None, None, None)
    joint = MethodResult.mean_of({"0": seed}, coverage={"0": 3})
    entry = joint.to_json()
    assert entry["final_row"] == [90.0, 80.0, 70.0] and "accuracy_matrix" not in entry
    assert through_json(RunResults({"joint": joint})).methods["joint"].final_only
    assert cells(format_table(RunResults({"joint": joint}, META)), "joint") == [
        "joint",
        "-",  # no steps: evaluated once, after the last
        "80.00",
        "-",
        "-",
        "-",
        "79.00",
        "2.0s",
    ]


def test_a_final_only_method_gets_no_heatmap(tmp_path):
    joint = MethodResult.mean_of({"0": SeedSummary.of_final_row([90.0, 80.0, 70.0])}, {"0": 3})
    seq = MethodResult.mean_of({"0": SeedSummary.of_rows(FULL)}, {"0": 3})
    names = [p.name for p in write_report(RunResults({"seq_ft": seq, "joint": joint}, META), tmp_path)]
    assert "heatmap_seq_ft.png" in names and "heatmap_joint.png" not in names
    assert "| joint | - | 80.00 |" in (tmp_path / "report.md").read_text()


def test_a_failed_method_is_never_a_number(tmp_path):
    message = "average, seed 0, task 2: the model's outputs are not finite on 3 of 40 examples"
    results = RunResults({"average": MethodResult.failure(message)}, META)
    assert results.to_json()["methods"]["average"] == {"failed": message}
    assert results.failures() == [message]
    # a failure wins over any number the entry holds
    read = RunResults.from_json({"methods": {"average": {"failed": message, "final_acc": 50.0}}})
    assert read.methods["average"].final_acc is None and read.failures() == [message]
    assert cells(format_table(results), "average")[2:] == ["failed"] * 6
    write_report(results, tmp_path)
    assert f"- {message}\n" in (tmp_path / "report.md").read_text()


def test_seeds_at_different_steps_the_numbers_cover_the_furthest():
    ahead = SeedSummary.of_rows(FULL)
    result = MethodResult.mean_of({"0": ahead}, coverage={"0": 3, "1": 1, "2": 0})
    assert result.final_acc == ahead.final_acc  # seed 1's one row is never mixed in
    assert result.seeds_in_numbers() == ["0"] and result.steps_per_seed() == {"0": 3, "1": 1, "2": 0}
    table = format_table(RunResults({"magmax": result}, META))
    assert "magmax: the numbers cover seed 0 at step 3/3; not in them: 1 (step 1/3), 2 (not started)" in table
    back = through_json(RunResults({"magmax": result}, META)).methods["magmax"]
    assert back.coverage == {"0": 3, "1": 1, "2": 0} and back.seeds_in_numbers() == ["0"]


def test_an_older_results_dict_is_read_and_what_is_absent_derived():
    old = {"methods": {"m": {"accuracy_matrix": FULL, "bwt": None}}, "run": {"name": "old", "note": "x"}}
    m = RunResults.from_json(old).methods["m"]
    assert m.final_acc == pytest.approx(230 / 3) and m.forgetting == pytest.approx(22.5)  # absent: derived
    assert m.bwt is None  # present but null: stays missing
    assert m.coverage is None and m.steps == 3
    meta = RunResults.from_json(old).run
    assert meta.title == "old" and meta.to_json() == {"name": "old", "note": "x"}


def test_combined_metadata_says_where_the_seeds_came_from(tmp_path):
    meta = RunMeta.from_json({**META.to_json(), "seeds": [1, 0], "combined_from": ["runs/s1", "runs/s0"]})
    assert meta.combined_from == ["runs/s1", "runs/s0"] and meta.extra == {}
    assert RunMeta.from_json(meta.to_json()) == meta
    write_report(RunResults({}, meta), tmp_path)
    assert "- **combined_from**: runs/s1, runs/s0\n" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"methods": {"m": {"final_row": "x"}}}, "final_row must be a list"),
        ({"methods": {"m": {"coverage": {"0": -1}}}}, "methods.m.coverage must map seeds"),
        ({"methods": {"m": {"seeds": {"0": 3}}}}, "methods.m.seeds.0 must be a dict"),
        ({"methods": {"m": {"seeds": {"0": {"final_acc": "x"}}}}}, r"methods\.m\.seeds\.0\.final_acc must be a number"),
        ({"methods": {"m": {"step_info": {"lam": 0.5}}}}, "step_info.lam must be a list"),
        ({"methods": {}, "run": {"num_tasks": "3"}}, "run.num_tasks must be a number"),
        ({"methods": {}, "run": {"orders": "2"}}, "run.orders must be a number of task orders"),
        ({"methods": {"m": {"failed": 1}}}, "methods.m.failed must be the failure's message"),
    ],
)
def test_a_malformed_results_dict_names_the_key(data, message):
    with pytest.raises(MergeclError, match=message):
        RunResults.from_json(data)
