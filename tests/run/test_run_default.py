"""The embedded default run (`mergecl run` with no config): real model, real data, shipped in the package."""

import sys

import pytest

from mergecl.cli import main
from mergecl.data.registry import get_source
from mergecl.experiment.config import DEFAULT_CONFIG, load_config, packaged_configs
from mergecl.models.text import find_minilm


def test_the_default_is_the_packaged_minilm_on_the_shipped_clinc150_subset():
    config = load_config()
    assert DEFAULT_CONFIG.parent.name == "configs" and config.name == "clinc150-mini-cil"
    assert config.model["name"] == "hf_text" and config.model.get("pretrained") is None  # the packaged MiniLM
    assert (find_minilm() / "model.safetensors").is_file()
    assert config.data.source == "clinc150_mini" and config.data.root is None  # nothing to download
    assert {"zero_shot", "seq_ft", "magmax"} <= set(config.methods) and len(config.seeds) == 3
    data = get_source(config.data.source, **config.data.options)
    assert list(data.class_groups) == config.data.options["domains"]  # one task per listed domain
    per_class = len(data.train) // len(data.class_names)
    assert per_class >= config.data.train_per_class and len(data.test) // len(data.class_names) >= 6


def test_the_digits_smoke_run_stays_a_named_config():
    assert load_config("digits").data.source == "digits" and "digits" in packaged_configs()


def test_without_transformers_the_default_run_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    code = main(["run", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("mergecl: error: transformers is not installed") and "pip install" in err[0]


@pytest.mark.parametrize("name", ["clinc150_mini", "banking77_mini"])
def test_the_shipped_subsets_load_without_any_data_folder(monkeypatch, tmp_path, name):
    monkeypatch.setenv("MERGECL_DATA", str(tmp_path / "nothing-here"))
    monkeypatch.chdir(tmp_path)
    assert len(get_source(name).test) > 0
