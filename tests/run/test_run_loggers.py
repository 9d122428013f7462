"""Experiment loggers (docs/loggers.md) with the real libraries: a tiny digits run with all four,
interrupted after its first step and resumed, read back by each library's own reader."""

import csv
import glob
import struct

import pytest

from mergecl import MergeclError
from mergecl.experiment import runner as runner_module
from mergecl.experiment.config import parse_config
from mergecl.experiment.runner import run

TINY = {
    "name": "tiny-loggers",
    "seeds": [0],
    "data": {"source": "digits", "scenario": "class", "n_tasks": 2},
    "model": {"name": "mlp", "in_dim": 64, "hidden": [32]},
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "grad_clip": 1.0},
    "methods": ["seq_ft", "magmax"],
    "method_options": {"magmax": {"lam": "auto", "lam_grid": [0.5, 1.0]}},
    "loggers": ["tensorboard", "csv", {"name": "wandb", "project": "mergecl-test"}, "mlflow"],
}


def wandb_history(run_dir):
    """The history rows of every W&B offline run file under ``run_dir``, in the order written: the
    .wandb file is W&B's transaction log (LevelDB log format: 32 KiB blocks of records with a 7-byte
    header; the file starts with ':W&B', 0xBEE1, version) of wandb's own protobuf ``Record``s."""
    from wandb.proto.wandb_internal_pb2 import Record

    rows = []
    for path in sorted(glob.glob(str(run_dir / "logs" / "wandb" / "*run-*" / "run-*.wandb"))):
        data = open(path, "rb").read()
        assert data[:4] == b":W&B"
        pos, pending = 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            chunk = data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind == 0 and length == 0:
                continue
            pending += chunk
            if kind in (1, 4):  # FULL or LAST: a whole record
                record = Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append(
                        {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                    )
    return rows


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """TINY, interrupted before its second training step and resumed: the run directory."""
    out = tmp_path_factory.mktemp("loggers") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    original = runner_module.Runner.train_or_load

    def interrupted(self, seed, training, t, *args):
        if t == 1:
            raise KeyboardInterrupt("stopped before step 2")
        return original(self, seed, training, t, *args)

    mp.setattr(runner_module.Runner, "train_or_load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(parse_config(TINY), out=out, echo=lambda m: None)
    mp.setattr(runner_module.Runner, "train_or_load", original)
    run(resume=out, echo=lambda m: None)
    yield out
    mp.undo()


def test_csv_has_every_step_and_row(logged_run):
    rows = list(csv.DictReader(open(logged_run / "logs" / "metrics.csv")))
    loss = [int(r["step"]) for r in rows if r["metric"] == "seed0/seq/loss"]
    assert loss == list(range(1, len(loss) + 1)) and len(loss) > 10  # the resumed run continued the counter
    for metric in ("seed0/seq/lr", "seed0/seq/grad_norm"):
        assert [int(r["step"]) for r in rows if r["metric"] == metric] == loss
    for method in ("seq_ft", "magmax"):
        for key in ("acc_task1", "acc_task2", "ACC"):
            assert [int(r["step"]) for r in rows if r["metric"] == f"seed0/{method}/{key}"] == [1, 2]
    assert [float(r["value"]) for r in rows if r["metric"] == "seed0/magmax/lam"][0] in (0.5, 1.0)
    assert len([r for r in rows if r["metric"] == "seed0/magmax/merge_time_s"]) == 2
    assert "seed0/seq_ft/merge_time_s" not in {r["metric"] for r in rows}
    assert open(logged_run / "logs" / "metrics.csv").read().count("metric,step") == 1  # appended


def test_tensorboard_event_files(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    csv_loss = [
        float(r["value"])
        for r in csv.DictReader(open(logged_run / "logs" / "metrics.csv"))
        if r["metric"] == "seed0/seq/loss"
    ]
    events = EventAccumulator(str(logged_run / "logs" / "tensorboard"))  # both event files: run and resume
    events.Reload()
    loss = events.Scalars("seed0/seq/loss")
    assert [e.step for e in loss] == list(range(1, len(csv_loss) + 1))
    assert [e.value for e in loss] == pytest.approx(csv_loss, rel=1e-6)
    assert [e.step for e in events.Scalars("seed0/magmax/ACC")] == [1, 2]
    assert [e.step for e in events.Scalars("seed0/seq_ft/acc_task2")] == [1, 2]
    assert len(events.Scalars("seed0/seq/grad_norm")) == len(csv_loss)


def test_mlflow_file_store(logged_run):
    import json

    from mlflow.tracking import MlflowClient

    state = json.loads((logged_run / "logs" / "loggers.json").read_text())
    client = MlflowClient(tracking_uri=(logged_run / "mlruns").resolve().as_uri())
    history = client.get_metric_history(state["mlflow_run_id"], "seed0/seq/loss")  # one run, resumed
    assert sorted(m.step for m in history) == list(range(1, state["steps"]["seed0/seq"] + 1))
    acc = client.get_metric_history(state["mlflow_run_id"], "seed0/magmax/ACC")
    assert sorted(m.step for m in acc) == [1, 2]
    assert len(client.get_metric_history(state["mlflow_run_id"], "seed0/magmax/lam")) == 2
    assert client.get_run(state["mlflow_run_id"]).info.status == "FINISHED"


def test_wandb_offline_run(logged_run):
    import json

    state = json.loads((logged_run / "logs" / "loggers.json").read_text())
    files = glob.glob(str(logged_run / "logs" / "wandb" / "*run-*" / f"run-{state['wandb_run_id']}.wandb"))
    assert len(files) == 2  # the run and its resume, under one id
    rows = wandb_history(logged_run)
    loss_steps = [json.loads(r["seed0/seq/step"]) for r in rows if "seed0/seq/loss" in r]
    assert loss_steps == list(range(1, state["steps"]["seed0/seq"] + 1))
    acc = [
        (json.loads(r["seed0/magmax/step"]), json.loads(r["seed0/magmax/ACC"])) for r in rows if "seed0/magmax/ACC" in r
    ]
    assert [step for step, _ in acc] == [1, 2] and all(0 <= value <= 100 for _, value in acc)
    assert sum("seed0/seq_ft/acc_task1" in r for r in rows) == 2


def test_no_loggers_no_key_and_bad_items_name_the_key():
    plain = {k: v for k, v in TINY.items() if k != "loggers"}
    assert "loggers" not in parse_config(plain).model_dump(mode="json")  # older runs: recorded config unchanged
    with pytest.raises(MergeclError, match=r"loggers\.0: unknown logger 'neptune'"):
        parse_config({**plain, "loggers": ["neptune"]})
    with pytest.raises(MergeclError, match=r"loggers\.0\.projekt: not an option of the wandb logger"):
        parse_config({**plain, "loggers": [{"name": "wandb", "projekt": "x"}]})


def test_loggers_change_no_number(logged_run, tmp_path):
    """The same run without loggers has the same results (and writes no logger file)."""
    import json

    plain = {k: v for k, v in TINY.items() if k != "loggers"}
    results, out = run(parse_config(plain), out=tmp_path / "plain", echo=lambda m: None)
    logged = json.loads((logged_run / "results.json").read_text())
    for name in ("seq_ft", "magmax"):
        assert results["methods"][name]["accuracy_matrix"] == logged["methods"][name]["accuracy_matrix"]
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["run.log"]
    assert not (out / "mlruns").exists()


@pytest.mark.slow  # ~50 s of torchrun processes, as tests/run/test_run_distributed.py
def test_only_rank_0_logs_under_torchrun(tmp_path):
    """Two processes (torchrun, gloo): one CSV row per step and value, one TensorBoard event file."""
    import os
    import subprocess
    import sys

    import yaml

    config = {**TINY, "device": "cpu", "methods": ["seq_ft"], "method_options": {}, "loggers": ["csv", "tensorboard"]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", MERGECL_QUIET="1")
    args = ["run", tmp_path / "config.yaml", "--out", tmp_path / "run", "--quiet", "--nproc", 2]
    done = subprocess.run([sys.executable, "-m", "mergecl", *map(str, args)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = list(csv.DictReader(open(tmp_path / "run" / "logs" / "metrics.csv")))
    loss = [int(r["step"]) for r in rows if r["metric"] == "seed0/seq/loss"]
    assert loss == list(range(1, len(loss) + 1)) and len(loss) > 10
    assert [int(r["step"]) for r in rows if r["metric"] == "seed0/seq_ft/ACC"] == [1, 2]
    assert len(list((tmp_path / "run" / "logs" / "tensorboard").iterdir())) == 1
