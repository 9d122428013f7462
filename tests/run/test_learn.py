"""`mergecl learn`: one model kept up to date task after task, across separate commands.

The equivalence test runs the real packaged all-MiniLM-L6-v2 on real Banking77 intents (the subset
shipped in the package), two tasks of three intents, through ``init`` + two ``add``s and through
``mergecl run`` over the same tasks and settings: the accuracy matrices must be equal, for rules
with a running form (MagMax, and OPCM with its model-wide coefficient, over Seq-FT: O(1) state) and
a rule that keeps every task vector (TIES over Ind-FT). The other tests check the gate, promote /
reject, the kept versions, the state sizes, the lock, a killed add and the one-line errors.
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

from mergecl.cli import main
from mergecl.data.registry import get_source
from mergecl.errors import MergeclError
from mergecl.experiment import learn
from mergecl.experiment.config import parse_config
from mergecl.experiment.runner import run

pytest.importorskip("transformers")

TRAIN = {"optimizer": "adamw", "lr": 3.0e-4, "weight_decay": 0.1, "epochs": 1, "batch_size": 16, "warmup_steps": 2,
         "grad_clip": 1.0, "eval_batch_size": 64}  # fmt: skip
TASKS = 2
PER_TASK = 3  # intents


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
    methods = ["magmax", "ind_ft+ties", "opcm"]  # Seq-FT alone: the gate test below
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
        assert status.tasks == ["task1", "task2"]
    # a running form keeps one state whatever the number of tasks (OPCM: and one norm per task);
    # TIES keeps every task vector
    magmax, opcm = learn.status(tmp_path / "model-magmax"), learn.status(tmp_path / "model-opcm")
    ties = learn.status(tmp_path / "model-ind_ft-ties")
    assert not any(f.startswith("vectors") for f in [*magmax.state_files, *opcm.state_files])
    assert sum(1 for f in ties.state_files if f.startswith("vectors")) == TASKS
    assert "O(1)" in str(magmax) and "O(1)" in str(opcm) and "every task vector is kept" in str(ties)


def test_a_task_of_learned_classes_is_a_new_domain_with_the_matrix_of_a_domain_incremental_run(tmp_path):
    """Classes are known by name: a task of learned classes (a new domain of them) is not refused,
    and init + adds of tasks over the same classes give the accuracy matrix of a domain-incremental
    run over the same tasks; a task may also mix learned and new classes."""
    rows = _rows(0, PER_TASK)
    halves: list[list[dict]] = [[], []]
    for split in ("train", "validation", "test"):
        part = [row for row in rows if row["split"] == split]
        for i, row in enumerate(part):  # every intent in both halves: two domains of the same classes
            halves[i % 2].append(row)
    files = []
    for t, half in enumerate(halves):
        files.append(tmp_path / f"domain{t + 1}.jsonl")
        files[-1].write_text("".join(json.dumps(row) + "\n" for row in half))
    combined = tmp_path / "domains.jsonl"
    combined.write_text("".join(
        json.dumps({**row, "task": f"task{t + 1}"}) + "\n" for t, half in enumerate(halves) for row in half
    ))  # fmt: skip
    config = parse_config({
        "name": "learn-domains",
        "seeds": [0],
        "eval_future": False,
        "data": {"source": "files", "root": str(combined), "scenario": "domain", "n_tasks": None,
                 "options": {"task_column": "task"}},
        "model": {"name": "hf_text", "head": "zero_shot"},
        "train": TRAIN,
        "methods": ["magmax"],
    })  # fmt: skip
    results, _ = run(config, out=tmp_path / "run", report=False, echo=lambda m: None)
    status = _learn_all(tmp_path, "magmax", files)
    expected = results["methods"]["magmax"]["accuracy_matrix"]
    assert status.matrix == [row[: t + 1] for t, row in enumerate(expected)]
    # a third task: the same three intents' test rows again under a new name, plus three new intents
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(row) + "\n" for row in [*halves[0], *_rows(PER_TASK, PER_TASK)]))
    said: list[str] = []
    done = learn.add(tmp_path / "model-magmax", "mixed", mixed, max_drop=100.0, echo=said.append)
    assert any("6 classes, 3 of them learned already" in line for line in said)
    assert len(done.row) == 3 and all(0 <= acc <= 100 for acc in done.row)
    head = json.loads((tmp_path / "model-magmax" / "model" / "mergecl_head.json").read_text())
    assert len(head["class_names"]) == 2 * PER_TASK  # each intent once, whichever tasks brought it
    assert [len(task["classes"]) for task in head["tasks"]] == [PER_TASK, PER_TASK, 2 * PER_TASK]


# --- the gate, promote, reject, versions ------------------------------------------------------


@pytest.fixture(scope="module")
def small_files(tmp_path_factory) -> list[Path]:
    """Three tasks of three intents: the first two with a split column, the third without (carved)."""
    root = tmp_path_factory.mktemp("learn-small")
    paths = []
    for t in range(3):
        rows = [row for row in _rows(3 * t, 3) if row["split"] != "validation"]
        if t == 2:
            rows = [{"text": row["text"], "label": row["label"]} for row in rows]
        path = root / f"small{t + 1}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(path)
    return paths


def _config(tmp_path: Path, **keys) -> Path:
    path = tmp_path / "learn.yaml"
    path.write_text(json.dumps({"train": {**TRAIN, "batch_size": 32}, **keys}))
    return path


def _ledger(directory: Path) -> dict:
    return json.loads((directory / "learn.json").read_text())


def test_the_gate_keeps_a_candidate_until_promote_or_reject(tmp_path, small_files, capsys):
    d = tmp_path / "model"
    config = _config(tmp_path, method="seq_ft", policy={"max_drop": 0, "keep_versions": 1})
    assert main(["learn", "init", str(d), "--config", str(config)]) == 0
    assert main(["learn", "add", str(d), "--task", "cards", "--data", str(small_files[0]), "--quiet"]) == 0
    assert os.readlink(d / "model") == os.path.join("models", "v1")
    # Seq-FT forgets: with max_drop 0 the second task's model is refused (exit 3), kept as a candidate
    assert main(["learn", "add", str(d), "--task", "rates", "--data", str(small_files[1]), "--quiet"]) == 3
    refused = _ledger(d)["candidate"]
    assert refused["drops"]["cards"] > 0 and "NOT promoted" in capsys.readouterr().out
    assert os.readlink(d / "model") == os.path.join("models", "v1")  # the deployed model is untouched
    assert os.readlink(d / "candidate") == os.path.join("models", "v2")
    assert [task["name"] for task in _ledger(d)["tasks"]] == ["cards"]
    report = (d / "reports" / "2-rates" / "report.md").read_text()
    assert "NOT promoted" in report and "| cards |" in report and (d / "reports" / "2-rates" / "accuracy.svg").is_file()

    # nothing new is learned while a candidate waits
    assert main(["learn", "add", str(d), "--task", "third", "--data", str(small_files[2]), "--quiet"]) == 2
    assert "waits for a decision" in capsys.readouterr().err
    # reject: as before the add
    assert main(["learn", "reject", str(d)]) == 0
    assert not os.path.lexists(d / "candidate") and not (d / "models" / "v2").exists()
    assert not (d / "tasks" / "rates.jsonl").exists() and not (d / "state" / "2").exists()
    assert [task["name"] for task in _ledger(d)["tasks"]] == ["cards"] and _ledger(d)["candidate"] is None
    # the same add again: the same model, the same numbers, refused again; promoted by hand
    assert main(["learn", "add", str(d), "--task", "rates", "--data", str(small_files[1]), "--quiet"]) == 3
    assert _ledger(d)["candidate"]["row"] == refused["row"]
    assert main(["learn", "promote", str(d)]) == 0
    ledger = _ledger(d)
    assert [task["name"] for task in ledger["tasks"]] == ["cards", "rates"] and ledger["matrix"][-1] == refused["row"]
    assert ledger["candidate"] is None and ledger["history"][-1]["event"] == "promoted by hand"
    assert os.readlink(d / "model") == os.path.join("models", "v2") and not os.path.lexists(d / "candidate")
    # a gate opened for one add; the versions kept
    assert main(["learn", "add", str(d), "--task", "third", "--data", str(small_files[2]), "--max-drop", "100"]) == 0
    ledger = _ledger(d)
    assert [task["name"] for task in ledger["tasks"]] == ["cards", "rates", "third"] and len(ledger["matrix"]) == 3
    assert ledger["tasks"][2]["examples"]["test"] == 18  # no split column: a fifth of each intent's 28 rows
    assert sorted(p.name for p in (d / "models").iterdir()) == ["v3"]  # keep_versions: 1
    assert os.readlink(d / "model") == os.path.join("models", "v3")
    assert sorted(p.name for p in (d / "state").iterdir()) == ["3"]
    capsys.readouterr()
    assert main(["learn", "status", str(d), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["tasks"] == ["cards", "rates", "third"] and len(status["matrix"]) == 3
    # the promoted model loads without mergecl, its head over every class learned
    import transformers

    transformers.AutoModel.from_pretrained(d / "model")
    head = json.loads((d / "model" / "mergecl_head.json").read_text())
    assert len(head["class_names"]) == 9 and [t["name"] for t in head["tasks"]] == ["cards", "rates", "third"]


# --- mistakes, the lock, a kill -----------------------------------------------------------------


@pytest.fixture(scope="module")
def learned(tmp_path_factory, small_files) -> Path:
    """A model directory that learned one task (Seq-FT + MagMax, the default method)."""
    root = tmp_path_factory.mktemp("learned")
    d = root / "model"
    learn.init(d, _config(root))
    learn.add(d, "cards", small_files[0], echo=lambda m: None)
    return d


def test_mistakes_are_one_line_errors_that_change_nothing(tmp_path, learned, small_files):
    ledger = (learned / "learn.json").read_bytes()
    no_label = tmp_path / "no-label.csv"
    no_label.write_text("text,intent\nhello,greet\n")
    cases = [
        (("cards", small_files[1]), "task 'cards' is learned already"),
        (("other", no_label), "no column 'label'"),
        (("other", tmp_path / "absent.csv"), "no such file"),
        (("../up", small_files[1]), "task name"),
    ]
    for (name, data), message in cases:
        with pytest.raises(MergeclError, match=message):
            learn.add(learned, name, data, echo=lambda m: None)
    assert (learned / "learn.json").read_bytes() == ledger
    with pytest.raises(MergeclError, match="no candidate model to promote"):
        learn.promote(learned)
    with pytest.raises(MergeclError, match="not a mergecl learn directory"):
        learn.add(tmp_path, "x", small_files[1])
    with pytest.raises(MergeclError, match="already a mergecl learn directory"):
        learn.init(learned)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    with pytest.raises(MergeclError, match="not an empty directory"):
        learn.init(tmp_path / "full")
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep me"
    for keys, message in [
        ({"methd": "magmax"}, "unknown key 'methd'"),
        ({"model": {"name": "hf_text", "head": "linear"}}, "needs a zero_shot head"),
        ({"method": "zero_shot"}, "trains nothing"),
        ({"method_options": {"lam": -1}}, "method_options.lam"),
        ({"data": {"task_column": "t"}}, "data.task_column"),
        ({"policy": {"max_drop": -1}}, "policy.max_drop"),
    ]:
        with pytest.raises(MergeclError, match=message):
            learn.init(tmp_path / "new", _config(tmp_path, **keys))
        assert not (tmp_path / "new").exists()


def test_a_second_process_is_refused_while_one_works_on_the_directory(learned, small_files):
    import fcntl

    fd = os.open(learned / ".mergecl.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(MergeclError, match="in use by another mergecl process"):
            learn.add(learned, "rates", small_files[1], echo=lambda m: None)
        assert time.monotonic() - started < 5
    finally:
        os.close(fd)


def test_a_killed_add_leaves_the_model_and_state_and_the_same_add_gives_the_same_numbers(
    tmp_path, learned, small_files
):
    import shutil

    killed, reference = tmp_path / "killed", tmp_path / "reference"
    shutil.copytree(learned, killed, symlinks=True)
    shutil.copytree(learned, reference, symlinks=True)
    before = {name: (killed / name).read_bytes() for name in ("learn.json", "mergecl-learn.json")}
    command = [
        sys.executable,
        "-m",
        "mergecl",
        "learn",
        "add",
        str(killed),
        "--task",
        "rates",
        "--data",
        str(small_files[1]),
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in process.stderr:  # killed while it trains
        if "training task 2" in line:
            break
    time.sleep(1.0)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert {name: (killed / name).read_bytes() for name in before} == before
    assert os.readlink(killed / "model") == os.path.join("models", "v1")
    done = learn.add(killed, "rates", small_files[1], echo=lambda m: None)  # re-run: tidies, then the same add
    expected = learn.add(reference, "rates", small_files[1], echo=lambda m: None)
    assert done.row == expected.row and done.before == expected.before
    assert sorted(p.name for p in (killed / "state").iterdir()) == ["2"]  # the state after 1 task is gone


def test_a_lora_model_learns_with_pam_and_exports_a_plain_model(tmp_path, small_files):
    """PAM on a LoRA model: its state is the LoRA factors (kilobytes, not the model), and the
    exported model has the adapters folded in (the keys of the plain transformers model)."""
    d = tmp_path / "pam"
    learn.init(d, _config(tmp_path, method="pam", model={"name": "hf_text", "head": "zero_shot", "lora": {"rank": 4}}))
    for t in range(2):
        done = learn.add(d, f"task{t + 1}", small_files[t], max_drop=100.0, echo=lambda m: None)
    status = learn.status(d)
    assert len(status.matrix) == 2 and done.promoted and status.state_bytes < 2**20
    from safetensors.torch import load_file

    keys = load_file(d / "model" / "model.safetensors")
    assert not any("lora" in key for key in keys) and any(key.endswith("query.weight") for key in keys)
