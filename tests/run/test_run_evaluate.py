"""`mergecl eval MODEL CONFIG`: one model's accuracy on each task of a config's scenario, computed as a
run computes a row. A Hugging Face directory without a head (the packaged all-MiniLM-L6-v2 itself)
gets the config's zero-shot head, so it reproduces the run's zero_shot method; an export's head is
read from its files (rows put in the config's class order)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergecl.cli import main
from mergecl.data.registry import get_source
from mergecl.errors import MergeclError
from mergecl.experiment.config import parse_config
from mergecl.experiment.evaluate import evaluate
from mergecl.experiment.export import HEAD_INFO, HEAD_WEIGHTS, export
from mergecl.experiment.runner import run
from mergecl.models.text import find_minilm


def test_a_hf_directory_without_a_head_gets_the_configs_zero_shot_head(tmp_path, capsys):
    pytest.importorskip("transformers")
    real = get_source("banking77_mini", seed=0)  # its first 12 intents, as a CSV
    rows = [
        {"text": text, "label": real.class_names[label], "split": split}
        for split, part in (("train", real.train), ("test", real.test))
        for text, label in zip(part.inputs, part.labels.tolist(), strict=True)
        if label < 12
    ]
    (tmp_path / "intents.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "name": "banking-zero-shot",
        "data": {"source": "files", "root": str(tmp_path / "intents.jsonl"), "n_tasks": 2, "eval_per_class": 5},
        "model": {"name": "hf_text"},
        "methods": ["zero_shot"],
    }
    results, _ = run(parse_config(config), out=tmp_path / "run", report=False, echo=lambda message: None)
    expected = results["methods"]["zero_shot"]["accuracy_matrix"][-1]
    (tmp_path / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    assert main(["eval", str(find_minilm()), str(tmp_path / "config.yaml")]) == 0
    printed = capsys.readouterr().out
    for accuracy in expected:
        assert f"{accuracy:8.2f}" in printed
    assert "seed 0's scenario of banking-zero-shot, columns of step 2 of 2" in printed
    assert f"{results['methods']['zero_shot']['final_acc']:.2f}" in printed  # the run's table


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    config = parse_config(
        {
            "name": "digits-eval",
            "data": {"source": "digits", "scenario": "class", "n_tasks": 2},
            "model": {"name": "mlp", "in_dim": 64, "hidden": [16]},
            "train": {"epochs": 2, "lr": 3.0e-3},
            "methods": ["seq_ft"],
        }
    )
    results, path = run(config, out=root / "run", report=False, echo=lambda message: None)
    done = export(path, "seq_ft", root / "seq_ft")
    return config, results["methods"]["seq_ft"], done.path


def test_an_export_evaluates_as_the_run_did_whatever_the_order_of_its_head(digits_export, tmp_path):
    config, result, model = digits_export
    found = evaluate(model, config)
    assert found.accuracies == result["accuracy_matrix"][-1]
    assert found.final_acc == result["final_acc"] and found.all_class_acc == result["all_class_acc"]
    assert found.results.methods["seq_ft"].evaluated == "final only" and found.step == 2
    # the head's rows in another order, its class names with them: the same accuracies
    shuffled = tmp_path / "shuffled"
    shutil.copytree(model, shuffled)
    info = json.loads((shuffled / HEAD_INFO).read_text())
    head = load_file(shuffled / HEAD_WEIGHTS)
    order = torch.randperm(len(info["class_names"]), generator=torch.Generator().manual_seed(0))
    info["class_names"] = [info["class_names"][i] for i in order]
    (shuffled / HEAD_INFO).write_text(json.dumps(info))
    save_file({key: value[order].contiguous() for key, value in head.items()}, shuffled / HEAD_WEIGHTS)
    assert evaluate(shuffled, config).accuracies == found.accuracies
    # step 1's columns: the classes of task 1 seen, plus each task's own
    assert evaluate(model, config, step=1).step == 1


def test_eval_errors_are_one_line(digits_export, tmp_path, capsys):
    config, _, model = digits_export
    with pytest.raises(MergeclError, match="no such model directory"):
        evaluate(tmp_path / "nothing", config)
    with pytest.raises(MergeclError, match="step 3: out of range; the scenario has steps 1-2"):
        evaluate(model, config, step=3)
    (tmp_path / "bare").mkdir()  # no head, and an MLP has no zero-shot head to build
    with pytest.raises(MergeclError, match="no mergecl_head.json, and the config's model has no zero-shot head"):
        evaluate(tmp_path / "bare", config)
    renamed = tmp_path / "renamed"
    shutil.copytree(model, renamed)
    info = json.loads((renamed / HEAD_INFO).read_text())
    info["class_names"][0] = "zero"
    (renamed / HEAD_INFO).write_text(json.dumps(info))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps(config.model_dump(mode="json")))
    assert main(["eval", str(renamed), str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "the head's 10 classes are not the config's 10 (e.g. ['0'])" in err and err.count("\n") == 1
