"""No broken model becomes a result (issue 12): a method whose loss, weights or outputs become
non-finite fails with one line naming the method, seed and task; the others go on; results and
the report say "failed", never a number; the exit status is 1; a resume keeps it failed."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from mergecl.errors import MergeclError
from mergecl.experiment.config import parse_config
from mergecl.experiment.runner import run

SMALL = {
    "name": "broken",
    "seeds": [0],
    "data": {"source": "digits", "scenario": "class", "n_tasks": 3},
    "model": {"name": "mlp", "in_dim": 64, "hidden": [32]},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.01},
}
LWF_NAN = "lwf, seed 0, task 2: training loss became nan at step 1 (lr 0.01; is the lr or a method option too large?)"


def quiet(message):
    pass


def strip_times(results):
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "wall_time_s"}
        return node

    return strip(results["methods"])


def test_a_diverging_method_fails_alone_and_the_run_says_so(tmp_path):
    # LwF's distillation weight 1e38 is a finite, accepted option whose loss overflows at task 2
    config = {**SMALL, "methods": ["seq_ft", "magmax", "lwf", "ewc"], "method_options": {"lwf": {"lam": 1e38}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    env = dict(os.environ, MERGECL_QUIET="1", OMP_NUM_THREADS="1")
    cli = [sys.executable, "-m", "mergecl", "run"]
    done = subprocess.run([*cli, str(path), "--out", str(out)], env=env, capture_output=True, text=True)

    assert done.returncode == 1, done.stderr
    assert f"failed: {LWF_NAN}\n" in done.stderr
    assert "not clean: 1 of 4 methods failed" in done.stdout
    (lwf_row,) = [line for line in done.stdout.splitlines() if line.startswith("lwf ")]
    assert lwf_row.split()[2:] == ["failed"] * 6  # tasks "-", then "failed" in every metric column
    assert f" {LWF_NAN}\n" in (out / "logs" / "run.log").read_text()

    results = json.loads((out / "results.json").read_text())
    assert results["methods"]["lwf"] == {"failed": LWF_NAN}
    for name in ("seq_ft", "magmax", "ewc"):  # the other methods went on to the end
        entry = results["methods"][name]
        assert len(entry["accuracy_matrix"]) == 3 and 20 < entry["final_acc"] <= 100, name
    assert (out / "seed0" / "lwf" / "task0.safetensors").exists()
    assert not (out / "seed0" / "lwf" / "task1.safetensors").exists()  # the broken step was never committed

    report = (out / "report.md").read_text()
    assert "| lwf | - | failed | failed | failed | failed | failed | failed |" in report
    assert f"- {LWF_NAN}\n" in report and not (out / "heatmap_lwf.png").exists()
    with open(out / "results.csv", newline="") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert rows["lwf"]["final_acc"] == "" and rows["lwf"]["failed"] == LWF_NAN and rows["ewc"]["failed"] == ""

    # a resume keeps the failure as it is: nothing is retrained, nothing changes, still not clean
    log = (out / "logs" / "run.log").read_text()
    again, _ = run(resume=out, echo=quiet)
    assert strip_times(again) == strip_times(results)
    assert (out / "logs" / "run.log").read_text().count(" lwf ") == log.count(" lwf ")
    assert not (out / "seed0" / "lwf" / "task1.safetensors").exists()


def test_a_diverging_lr_fails_every_method_of_that_training(tmp_path):
    # the issue's case: lr 1e30 made NaN weights that were reported as 10% with exit status 0
    config = {**SMALL, "train": {**SMALL["train"], "lr": 1.0e30}, "methods": ["seq_ft", "magmax", "zero_shot"]}
    results, out = run(parse_config(config), out=tmp_path / "r", echo=quiet, report=False)
    m = results["methods"]
    because = "seed 0, task 1: training loss became nan at step 2 (lr 1e+30; is the lr or a method option too large?)"
    assert m["seq_ft"] == {"failed": f"seq_ft, {because}"}
    assert m["magmax"] == {"failed": f"magmax, {because}"}  # its task vectors come from that training
    assert isinstance(m["zero_shot"]["final_acc"], float)  # no training: nothing broke
    assert not list((out / "seed0").glob("seq/task*.safetensors"))


def test_a_merge_that_breaks_the_model_fails_that_method_only(tmp_path):
    config = {
        **SMALL,
        "data": {**SMALL["data"], "n_tasks": 2},
        "train": {**SMALL["train"], "lr": 0.5},  # task vectors with entries above 1
        "methods": ["seq_ft", "task_arithmetic", "average", "magmax", "magmax@auto"],
        "method_options": {
            "task_arithmetic": {"lam": 3.0e38},  # theta_0 + lam * tau overflows float32
            "average": {"lam": 1.0e37},  # finite weights, but the logits overflow
            "magmax@auto": {"lam": "auto", "lam_grid": [0.5, 1.0e37]},  # the breaking lam is never chosen
        },
    }
    results, _ = run(parse_config(config), out=tmp_path / "r", echo=quiet, report=False)
    m = results["methods"]
    assert m["task_arithmetic"]["failed"].startswith(
        "task_arithmetic, seed 0, task 1: the task_arithmetic merge failed (tensor '"
    )
    assert "overflow" in m["task_arithmetic"]["failed"]
    assert re.fullmatch(
        r"average, seed 0, task 1: the model's outputs are not finite on \d+ of \d+ examples", m["average"]["failed"]
    )
    for name in ("seq_ft", "magmax", "magmax@auto"):
        assert isinstance(m[name]["final_acc"], float), name
    assert m["magmax@auto"]["step_info"]["lam"] == [0.5, 0.5]


def test_a_data_or_backbone_error_leaves_no_run_directory(tmp_path):
    # the first seed's data is read and checked before the run directory exists: a fixed config
    # then starts afresh in the same place (no "already holds a run")
    (tmp_path / "intents.csv").write_text("text,label,split\nhi,greet,train\nbye,leave,train\nyo,greet,test\n")
    config = {"data": {"source": "files", "root": str(tmp_path / "intents.csv"), "n_tasks": 1}, "methods": ["seq_ft"]}
    out = tmp_path / "run"
    with pytest.raises(MergeclError, match=r"model\.name: mlp takes tensors, but data source 'files' gives text"):
        run(parse_config({**config, "model": {"name": "mlp", "in_dim": 8}}), out=out, echo=lambda m: None)
    assert not out.exists()
    bad_column = {**config, "data": {**config["data"], "options": {"text_column": "utterance"}}}
    with pytest.raises(MergeclError, match="no column 'utterance'"):
        run(parse_config({**bad_column, "model": {"name": "hf_text"}}), out=out, echo=lambda m: None)
    assert not out.exists()
