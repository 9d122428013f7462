"""Runs: results.json shape, resume after a kill at arbitrary moments gives the same numbers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mergecl import MergeclError
from mergecl.experiment.config import load_config, parse_config
from mergecl.experiment.rundir import RunDir
from mergecl.experiment.runner import run

SMALL = {
    "name": "small",
    "seeds": [0],
    "data": {"source": "digits", "scenario": "class", "n_tasks": 3},
    "model": {"name": "mlp", "in_dim": 64, "hidden": [32]},
    "train": {"epochs": 4, "batch_size": 32, "lr": 0.01},
    "methods": ["seq_ft", "magmax", "ties", "random_mix", "ind_ft+average", "lwf", "ewc", "joint", "zero_shot"],
    "method_options": {"ewc": {"lam": 100.0}},
}


def strip_times(results):
    """results without the run's metadata and every wall time (also per seed and their std)."""

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "wall_time_s"}
        return node

    return strip({k: v for k, v in results.items() if k != "run"})


def write_config(tmp_path, data):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """SMALL run once, without interruption: (results, run directory)."""
    return run(parse_config(SMALL), out=tmp_path_factory.mktemp("small") / "run", echo=lambda m: None)


def test_results_json_has_every_method_and_metric(small_run):
    results, out = small_run
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk["methods"]) == set(SMALL["methods"])
    for name, entry in on_disk["methods"].items():
        assert len(entry["accuracy_matrix"]) == 3 and all(len(r) == 3 for r in entry["accuracy_matrix"]), name
        for key in ("final_acc", "avg_incremental_acc", "bwt", "forgetting", "all_class_acc", "wall_time_s"):
            assert isinstance(entry[key], float), (name, key)
    m = on_disk["methods"]
    assert m["joint"]["final_acc"] > 80  # the upper bound learns digits
    assert m["seq_ft"]["bwt"] < -20  # sequential fine-tuning forgets (class-incremental, linear head)
    # zero_shot is theta_0 at every step: its entries only differ through the classes in play, so
    # A[t][t+1] (seen after t plus task t+1's own) equals A[t+1][t+1] (the same classes), but not A[0][0]
    zero_shot = m["zero_shot"]["accuracy_matrix"]
    for t in range(2):
        assert zero_shot[t][t + 1] == zero_shot[t + 1][t + 1], t
    assert zero_shot[0][0] > zero_shot[2][0]  # 2 classes in play, then 6: an untrained model does worse
    for f in ("report.md", "results.csv", "acc_over_tasks.png", "heatmap_magmax.png", "config.yaml"):
        assert (out / f).exists(), f
    assert (out / "seed0" / "seq" / "task2.safetensors").exists()


class Stop(Exception):
    """Raised from the per-step printer: the run stops right after a committed step."""


def test_a_run_stopped_between_steps_and_resumed_gives_the_uninterrupted_numbers(tmp_path, small_run):
    expected = strip_times(small_run[0])
    out = tmp_path / "stopped"
    printed = []

    def stop_at(count):
        def echo(message):
            printed.append(message)
            if len(printed) == count:
                raise Stop(message)

        return echo

    with pytest.raises(Stop):  # in the middle of the first streams (each line is a committed step)
        run(parse_config(SMALL), out=out, echo=stop_at(4), report=False)
    partial = json.loads((out / "progress.json").read_text())["seeds"]["0"]["rows"]
    assert 0 < sum(map(len, partial.values())) < 3 * len(SMALL["methods"])
    with pytest.raises(Stop):  # again, later, in a resumed run
        run(resume=out, echo=stop_at(len(printed) + 9), report=False)
    resumed, _ = run(resume=out, echo=lambda m: None, report=False)
    assert strip_times(resumed) == expected
    assert resumed["methods"]["seq_ft"]["accuracy_matrix"] == small_run[0]["methods"]["seq_ft"]["accuracy_matrix"]


def test_amp_reads_old_booleans_and_names_a_bad_value(tmp_path):
    assert parse_config(dict(SMALL, train={"amp": True})).train.amp == "auto"
    assert parse_config(dict(SMALL, train={"amp": False})).train.amp == "off"
    assert load_config(write_config(tmp_path, dict(SMALL, train={"amp": "bf16"}))).train.amp == "bf16"
    with pytest.raises(MergeclError, match=r"train.amp: Input should be 'auto', 'bf16' or 'off'"):
        parse_config(dict(SMALL, train={"amp": "fp16"}))


def test_config_errors_name_the_key(tmp_path):
    bad = dict(SMALL, data={"source": "digits", "n_taks": 3})
    with pytest.raises(MergeclError, match=r"unknown key 'data.n_taks'"):
        load_config(write_config(tmp_path, bad))
    with pytest.raises(MergeclError, match=r"train.lr: Input should be greater than 0"):
        parse_config(dict(SMALL, train={"lr": -1}))
    with pytest.raises(MergeclError, match="unknown method 'magmix'"):
        run(parse_config(dict(SMALL, methods=["magmix"])), out=tmp_path / "r", echo=lambda m: None)
    with pytest.raises(MergeclError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_an_existing_run_is_not_overwritten(tmp_path):
    small = dict(SMALL, methods=["seq_ft"], data=dict(SMALL["data"], n_tasks=2), method_options={})
    run(parse_config(small), out=tmp_path / "r", echo=lambda m: None)
    with pytest.raises(MergeclError, match="already holds a run; continue it with --resume"):
        run(parse_config(small), out=tmp_path / "r", echo=lambda m: None)


@pytest.mark.slow  # ~50 s of subprocesses; the default suite resumes in-process (test_a_run_stopped_between_...)
def test_resume_after_kills_gives_the_same_numbers(tmp_path):
    config = write_config(tmp_path, SMALL)
    env = dict(os.environ, MERGECL_QUIET="1")
    reference = tmp_path / "reference"
    done = subprocess.run(
        [sys.executable, "-m", "mergecl", "run", str(config), "--out", str(reference), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    expected = strip_times(json.loads((reference / "results.json").read_text()))

    interrupted = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "mergecl", "run", str(config), "--out", str(interrupted), "--quiet"]
    kills = 0
    # kill -9 when 2, then 9, then 16 task vectors are on disk (mid-stream, between and inside steps)
    for target in (2, 9, 16):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if len(list(interrupted.glob("seed0/*/task*.safetensors"))) >= target:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.01)
        proc.wait()
        cmd = [sys.executable, "-m", "mergecl", "run", "--resume", str(interrupted), "--quiet"]
    assert kills >= 2, "the run finished before it could be interrupted"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert strip_times(json.loads((interrupted / "results.json").read_text())) == expected
    assert not list(Path(interrupted).rglob("*.tmp"))


def test_cli_run_and_report(tmp_path, monkeypatch, capsys):
    from mergecl.cli import main

    small = dict(SMALL, methods=["seq_ft", "magmax"], data=dict(SMALL["data"], n_tasks=2), method_options={})
    config = write_config(tmp_path, small)
    monkeypatch.setenv("MERGECL_QUIET", "1")
    assert main(["run", str(config), "--out", str(tmp_path / "r")]) == 0  # in-process: the CLI's own code
    printed = capsys.readouterr()
    assert "magmax" in printed.out and "final ACC" in printed.out, printed.err
    (tmp_path / "r" / "report.md").unlink()
    assert main(["report", str(tmp_path / "r")]) == 0 and (tmp_path / "r" / "report.md").exists()
    capsys.readouterr()
    bad = write_config(tmp_path, dict(small, methods=["magmax"], train={"epoch": 3}))
    assert main(["run", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"mergecl: error: {bad}: unknown key 'train.epoch'"


def test_a_run_with_the_real_minilm_and_a_zero_shot_head(tmp_path, text_data):
    config = {
        "name": "clinc-smoke",
        "data": {
            **text_data("clinc150"),
            "scenario": "class",
            "order": "groups",  # one task per domain: 2 tasks of 15 intents
            "n_tasks": None,
            "options": {"domains": ["banking", "home"]},
            "train_per_class": 2,
            "eval_per_class": 2,
        },
        "model": {"name": "hf_text", "head": "zero_shot"},
        "train": {"lr": 5e-5, "epochs": 1, "batch_size": 16},
        "methods": ["zero_shot", "seq_ft", "magmax"],
    }
    results, out = run(parse_config(config), out=tmp_path / "r", echo=lambda m: None, report=False)
    m = results["methods"]
    assert m["zero_shot"]["all_class_acc"] > 30  # 30 intents: chance is 3.3%
    assert m["seq_ft"]["accuracy_matrix"] != m["zero_shot"]["accuracy_matrix"]  # training changed the model
    assert (out / "seed0" / "seq" / "task1.safetensors").exists()


def test_lam_auto_picks_on_validation_and_is_logged(tmp_path):
    config = dict(
        SMALL,
        methods=["magmax", "magmax@auto", "ind_ft+ties@auto"],
        method_options={"magmax@auto": {"lam": "auto"}, "ind_ft+ties@auto": {"lam": "auto", "lam_grid": [0.5, 1.0]}},
        eval_val=True,
    )
    results, _ = run(parse_config(config), out=tmp_path / "r", echo=lambda m: None, report=False)
    m = results["methods"]
    lams = m["magmax@auto"]["step_info"]["lam"]
    assert len(lams) == 3 and all(lam in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0) for lam in lams)
    assert set(m["ind_ft+ties@auto"]["step_info"]["lam"]) <= {0.5, 1.0}
    assert "step_info" not in m["magmax"]
    for entry in m.values():
        assert 0 <= entry["val"]["final_acc"] <= 100
    # the chosen lam maximises validation accuracy: the auto variant is at least as good on val as 0.5
    assert m["magmax@auto"]["val"]["final_acc"] >= m["magmax"]["val"]["final_acc"] - 1e-9


def test_joint_final_only_reports_final_and_all_class_accuracy(tmp_path):
    config = dict(SMALL, methods=["seq_ft", "joint"], method_options={"joint": {"final_only": True}})
    results, out = run(parse_config(config), out=tmp_path / "r", echo=lambda m: None)
    joint = results["methods"]["joint"]
    assert joint["final_acc"] > 80 and joint["all_class_acc"] > 80 and joint["bwt"] is None
    assert len(joint["final_row"]) == 3 and "accuracy_matrix" not in joint
    assert not (out / "seed0" / "joint" / "task0.safetensors").exists()  # trained once, at the end
    assert (out / "seed0" / "joint" / "task2.safetensors").exists() and (out / "report.md").exists()


def test_eval_future_off_keeps_the_metrics_and_drops_the_upper_triangle(tmp_path):
    config = dict(
        SMALL,
        seeds=[0, 1],
        methods=["seq_ft", "magmax", "magmax@auto"],
        method_options={"magmax@auto": {"lam": "auto", "lam_grid": [0.5, 1.0]}},
    )
    full, _ = run(parse_config(config), out=tmp_path / "full", echo=lambda m: None, report=False)
    seen, out = run(parse_config(dict(config, eval_future=False)), out=tmp_path / "seen", echo=lambda m: None)
    for name, entry in seen["methods"].items():
        matrix = entry["accuracy_matrix"]
        assert all(v is None for t, row in enumerate(matrix) for v in row[t + 1 :]), name
        reference = full["methods"][name]
        for key in ("final_acc", "avg_incremental_acc", "bwt", "forgetting", "all_class_acc"):
            assert entry[key] == pytest.approx(reference[key]), (name, key)
        assert all(row[: t + 1] == reference["accuracy_matrix"][t][: t + 1] for t, row in enumerate(matrix)), name
    assert (out / "heatmap_magmax.png").exists() and (out / "report.md").exists()


def test_plateau_settings_reach_the_training_loop():
    from mergecl.training.loop import TrainSettings

    config = parse_config({"train": {"schedule": "plateau", "plateau_patience": 2, "plateau_min_factor": 0.01}})
    settings = TrainSettings(**config.train.model_dump())
    assert (settings.plateau_patience, settings.plateau_factor, settings.plateau_min_factor) == (2, 2.0, 0.01)
    with pytest.raises(MergeclError, match="train.plateau_factor"):
        parse_config({"train": {"plateau_factor": 1.0}})


def test_a_non_numeric_method_option_names_the_key(tmp_path):
    config = dict(SMALL, methods=["ewc"], method_options={"ewc": {"lam": "1e3"}})  # YAML 1.1 reads 1e3 as text
    with pytest.raises(MergeclError, match="method_options.ewc.lam: Input should be a valid number, got '1e3'"):
        run(parse_config(config), out=tmp_path / "r", echo=lambda m: None, report=False)


def test_resume_removes_the_temp_files_a_killed_run_left(tmp_path):
    config = dict(SMALL, methods=["seq_ft"], method_options={})
    _, out = run(parse_config(config), out=tmp_path / "r", echo=lambda m: None, report=False)
    stale = [out / ".results.json.k1ll3d.tmp", out / "seed0" / "seq" / ".task1.safetensors.x.tmp"]
    for path in stale:
        path.write_text("half a write")
    keep = out / "seed0" / "seq" / "task1.safetensors"
    run(resume=out, echo=lambda m: None, report=False)
    assert not any(path.exists() for path in stale) and keep.exists()


def test_seeds_added_to_a_finished_run_whose_tensors_were_deleted(tmp_path):
    quiet = lambda m: None  # noqa: E731
    small = {**SMALL, "methods": ["seq_ft", "magmax", "ind_ft+average", "joint"], "method_options": {}}
    both, _ = run(parse_config({**small, "seeds": [0, 1]}), out=tmp_path / "both", echo=quiet, report=False)
    _, out = run(parse_config(small), out=tmp_path / "one", echo=quiet, report=False)
    for tensors in out.rglob("*.safetensors"):  # a finished seed needs none of them to be extended
        tensors.unlink()
    with pytest.raises(MergeclError, match="extends a resumed run"):
        run(parse_config(small), out=tmp_path / "new", seeds=[0, 1], echo=quiet, report=False)
    with pytest.raises(MergeclError, match=r"missing \[0\]"):
        run(resume=out, seeds=[1], echo=quiet, report=False)
    extended, _ = run(resume=out, seeds=[0, 1], echo=quiet, report=False)
    assert strip_times(extended) == strip_times(both)
    assert load_config(out / "config.yaml").seeds == [0, 1]
    assert not (out / "seed0" / "seq" / "task0.safetensors").exists()  # seed 0 was not retrained
    assert not (out / "seed0" / "base.safetensors").exists()  # nor its model built and written again


def test_keep_vectors_false_deletes_each_finished_seed_and_changes_no_number(tmp_path):
    quiet = lambda m: None  # noqa: E731
    small = {**SMALL, "seeds": [0, 1], "methods": ["seq_ft", "magmax", "ewc"]}
    kept, _ = run(parse_config(small), out=tmp_path / "kept", echo=quiet, report=False)
    lean, out = run(parse_config({**small, "keep_vectors": False}), out=tmp_path / "lean", echo=quiet, report=False)
    assert strip_times(lean) == strip_times(kept)
    assert not list(out.rglob("*.safetensors")) and (out / "results.json").exists()
    again, _ = run(resume=out, echo=quiet, report=False)  # finished seeds: nothing to redo
    assert strip_times(again) == strip_times(kept)


def test_combine_gathers_seeds_run_side_by_side_into_the_run_of_all_seeds(tmp_path):
    from mergecl.experiment.combine import combine

    config = dict(SMALL, seeds=[0, 1], methods=["seq_ft", "magmax", "ewc", "zero_shot"])
    reference, _ = run(parse_config(config), out=tmp_path / "both", echo=lambda m: None)
    run(parse_config(dict(config, seeds=[1])), out=tmp_path / "s1", echo=lambda m: None)
    run(parse_config(dict(config, seeds=[0], keep_vectors=False)), out=tmp_path / "s0", echo=lambda m: None)
    before = {p: p.read_bytes() for p in sorted((tmp_path / "s1").rglob("*")) if p.is_file()}

    results, out = combine([tmp_path / "s1", tmp_path / "s0"], tmp_path / "all")
    assert strip_times(results) == strip_times(reference)
    assert load_config(out / "config.yaml").seeds == [1, 0] and len(results["run"]["combined_from"]) == 2
    assert json.loads((out / "results.json").read_text()) == results and (out / "report.md").exists()
    assert (out / "seed1" / "seq" / "task2.safetensors").exists() and not (out / "seed0").exists()
    assert {p: p.read_bytes() for p in sorted((tmp_path / "s1").rglob("*")) if p.is_file()} == before
    # a combined run is a run: resuming it finds every seed finished and changes no number
    again, _ = run(resume=out, echo=lambda m: None)
    assert strip_times(again) == strip_times(reference)

    with pytest.raises(MergeclError, match="seed 1 is also in an earlier run"):
        combine([tmp_path / "s1", tmp_path / "both"], tmp_path / "x")
    run(parse_config(dict(config, seeds=[2], train={**config["train"], "lr": 0.02})), out=tmp_path / "s2", echo=print)
    with pytest.raises(MergeclError, match="differs from .* in more than seeds and keep_vectors"):
        combine([tmp_path / "s1", tmp_path / "s2"], tmp_path / "x")
    with pytest.raises(MergeclError, match="already exists"):
        combine([tmp_path / "s1", tmp_path / "s0"], tmp_path / "all")
    with pytest.raises(MergeclError, match="nothing: no such run directory"):
        combine([tmp_path / "s1", tmp_path / "nothing"], tmp_path / "x")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.yaml").write_text("seeds: [5]\n")
    with pytest.raises(MergeclError, match="plain: not a mergecl run"):
        combine([tmp_path / "s1", tmp_path / "plain"], tmp_path / "x")
    with pytest.raises(MergeclError, match="s1: given twice"):
        combine([tmp_path / "s1", tmp_path / "s0", tmp_path / "s1" / "."], tmp_path / "x")
    # checked as --resume checks a run: an edited config.yaml is not trusted
    edited = tmp_path / "s0" / "config.yaml"
    original = edited.read_text()
    edited.write_text(original.replace("lr: 0.01", "lr: 0.02"))
    with pytest.raises(MergeclError, match="differs from the config the run was started with in train.lr"):
        combine([tmp_path / "s1", tmp_path / "s0"], tmp_path / "x")
    edited.write_text(original)
    # a run still running (it holds its lock) is refused: its seeds are still being written
    running = RunDir(tmp_path / "s0")
    running.lock()
    try:
        with pytest.raises(MergeclError, match="s0: in use by another mergecl process"):
            combine([tmp_path / "s1", tmp_path / "s0"], tmp_path / "x")
    finally:
        running.unlock()
    assert not (tmp_path / "x").exists()
    from mergecl.cli import main

    assert main(["combine", str(tmp_path / "cli"), str(tmp_path / "s0"), str(tmp_path / "s1")]) == 0
    assert load_config(tmp_path / "cli" / "config.yaml").seeds == [0, 1]
    assert main(["combine", str(tmp_path / "cli2"), str(tmp_path / "s0")]) == 2  # one run: nothing to combine
