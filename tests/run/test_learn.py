"""`mergecl learn`: one model kept up to date task after task, across separate commands.

The equivalence test runs the real packaged all-MiniLM-L6-v2 on real Banking77 intents (the subset
shipped in the package), three tasks of four intents, through ``init`` + three ``add``s and through
``mergecl run`` over the same tasks and settings: the accuracy matrices must be equal, for a rule
with a running form (MagMax: O(1) state), a rule that keeps every task vector (TIES) and a plain
training (Seq-FT). The other tests check the gate, promote / reject, the kept versions, the state
sizes, the lock, a killed add and the one-line errors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mergecl.cli import main
from mergecl.data.registry import get_source
from mergecl.errors import MergeclError
from mergecl.experiment import learn
from mergecl.experiment.config import parse_config
from mergecl.experiment.runner import run

pytest.importorskip("transformers")

TRAIN = {"optimizer": "adamw", "lr": 3.0e-4, "weight_decay": 0.1, "epochs": 1, "batch_size": 16, "warmup_steps": 2,
         "grad_clip": 1.0, "eval_batch_size": 64}  # fmt: skip
TASKS = 3
PER_TASK = 4  # intents


def _rows(first: int, count: int) -> list[dict]:
    real = get_source("banking77_mini", seed=0)
    rows = []
    for split, part in (("train", real.train), ("validation", real.val), ("test", real.test)):
        for text, label in zip(part.inputs, part.labels.tolist(), strict=True):
            if first <= label < first + count:
                rows.append({"text": text, "label": real.class_names[label], "split": split})
    return rows


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("learn-data")
    paths = []
    for t in range(TASKS):
        path = root / f"task{t + 1}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in _rows(t * PER_TASK, PER_TASK)))
        paths.append(path)
    return paths


def _learn_config(tmp_path: Path, method: str, **extra) -> Path:
    config = {"method": method, "train": TRAIN, **extra}
    path = tmp_path / f"learn-{method.replace('+', '-')}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def _learn_all(tmp_path: Path, method: str, files: list[Path], **extra) -> learn.LearnStatus:
    directory = tmp_path / f"model-{method.replace('+', '-')}"
    learn.init(directory, _learn_config(tmp_path, method, **extra))
    for t, path in enumerate(files):
        done = learn.add(directory, f"task{t + 1}", path, max_drop=100.0, echo=lambda m: None)
        assert done.promoted
    return learn.status(directory)


def test_init_and_adds_give_the_accuracy_matrix_of_a_run_over_the_same_tasks(tmp_path, task_files):
    combined = tmp_path / "all.jsonl"
    combined.write_text("".join(
        json.dumps({**json.loads(line), "task": f"task{t + 1}"}) + "\n"
        for t, path in enumerate(task_files) for line in path.read_text().splitlines()
    ))  # fmt: skip
    methods = ["magmax", "ind_ft+ties", "seq_ft"]
    config = parse_config({
        "name": "learn-equivalence",
        "seeds": [0],
        "eval_future": False,
        "data": {"source": "files", "root": str(combined), "n_tasks": None, "options": {"task_column": "task"}},
        "model": {"name": "hf_text", "head": "zero_shot"},
        "train": TRAIN,
        "methods": methods,
    })  # fmt: skip
    results, _ = run(config, out=tmp_path / "run", report=False, echo=lambda m: None)
    for method in methods:
        status = _learn_all(tmp_path, method, task_files)
        expected = results["methods"][method]["accuracy_matrix"]  # None beyond the tasks seen
        assert status.matrix == [row[: t + 1] for t, row in enumerate(expected)], method
        assert status.tasks == ["task1", "task2", "task3"]
    # the running form keeps one state whatever the number of tasks; TIES keeps every task vector
    magmax = learn.status(tmp_path / "model-magmax")
    ties = learn.status(tmp_path / "model-ind_ft-ties")
    assert sum(1 for f in magmax.state_files if f.startswith("vectors")) == 0
    assert sum(1 for f in ties.state_files if f.startswith("vectors")) == TASKS
    assert "O(1)" in str(magmax) and "every task vector is kept" in str(ties)
