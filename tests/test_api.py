"""The Python API: ``from mergecl import run, merge, export, evaluate`` are functions (imported lazily),
``run`` takes a path, a packaged config's name, a dict or a RunConfig and returns typed results."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys

import pytest
import yaml

import mergecl
from mergecl.errors import MergeclError
from mergecl.evaluation.results import RunResults
from mergecl.experiment.config import parse_config

CONFIG = {
    "name": "digits-api",
    "data": {"source": "digits", "scenario": "class", "n_tasks": 2},
    "model": {"name": "mlp", "in_dim": 64, "hidden": [16]},
    "train": {"epochs": 1},
    "methods": ["seq_ft", "magmax"],
}


def test_the_public_names_are_functions_even_after_the_experiment_layer_is_imported():
    importlib.import_module("mergecl.experiment.runner")
    importlib.import_module("mergecl.experiment.export")
    importlib.import_module("mergecl.api")
    from mergecl import evaluate, export, merge, run

    for function in (run, merge, export, evaluate):
        assert inspect.isfunction(function), function
    assert run is mergecl.run and run.__module__ == "mergecl.api"
    assert merge.__module__ == "mergecl.merging.engine"
    assert set(mergecl.__all__) >= {"run", "merge", "export", "evaluate", "MergeclError"}


def test_import_mergecl_loads_no_layer_above_0():
    code = "import sys, mergecl; print(sorted(m for m in sys.modules if m.startswith('mergecl')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(loaded) == ["mergecl", "mergecl.errors"]


@pytest.mark.parametrize("form", ["dict", "path", "RunConfig"])
def test_run_takes_a_dict_a_path_or_a_runconfig_and_returns_typed_results(form, tmp_path):
    given = {"dict": CONFIG, "path": tmp_path / "c.yaml", "RunConfig": parse_config(CONFIG)}[form]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(CONFIG))
    done = mergecl.run(given, out=tmp_path / "run", quiet=True, report=False)
    assert isinstance(done.results, RunResults) and done.path == tmp_path / "run"
    on_disk = json.loads((done.path / "results.json").read_text())
    assert done.results.to_json() == on_disk
    assert done.methods == ["seq_ft", "magmax"]
    assert done.final_acc("magmax") == on_disk["methods"]["magmax"]["final_acc"]
    assert done.accuracy_matrix("seq_ft") == on_disk["methods"]["seq_ft"]["accuracy_matrix"]
    assert "magmax" in done.table()
    with pytest.raises(MergeclError, match="no method 'ties' in this run"):
        done.final_acc("ties")


def test_run_resumes_and_refuses_a_config_with_resume(tmp_path):
    done = mergecl.run(CONFIG, out=tmp_path / "run", quiet=True, report=False)
    again = mergecl.run(resume=done.path, quiet=True, report=False)
    assert again.results.to_json() == done.results.to_json()
    with pytest.raises(MergeclError, match="either a config or resume"):
        mergecl.run(CONFIG, resume=done.path)


def test_a_packaged_name_is_a_config():
    from mergecl.experiment.evaluate import as_config

    assert as_config("digits").name == "digits-cil"
    assert as_config(None).data.source == "clinc150_mini"  # the embedded default
    assert as_config({"name": "x"}).name == "x"
    with pytest.raises(MergeclError, match="no such config file or packaged config"):
        as_config("no-such-config")


def test_the_api_functions_have_docstrings_with_examples():
    for name in ("run", "export", "evaluate", "merge"):
        doc = getattr(mergecl, name).__doc__
        assert doc and ">>>" in doc, name
