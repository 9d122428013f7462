"""Sources declare themselves (``register_source``): every declaration agrees with its loader, the
registry reads only declarations, and a run config's ``data`` is checked against them when read."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Annotated

import pytest
import torch
from pydantic import Field, TypeAdapter

import mergecl.data
from mergecl.data import SOURCES, register_source, source_names
from mergecl.data.download import Remote, how_to_get
from mergecl.data.registry import get_source, read_source_options
from mergecl.data.types import Dataset, Split
from mergecl.errors import MergeclError
from mergecl.experiment.config import DataConfig, load_config, parse_config
from mergecl.options import Options

# ------------------------------------------------------------- every declaration, generated from the registry

STRICT = Options.model_config


@pytest.mark.parametrize("name", source_names())
def test_the_schema_is_the_loaders_options(name: str) -> None:
    """Fields = the loader's parameters but root and seed; same defaults; required exactly when the
    loader has no default. A new source is checked here without writing a test."""
    source = SOURCES[name]
    assert source.name == name and source.summary.strip() and "\n" not in source.summary
    assert issubclass(source.options, Options)
    params = inspect.signature(source.loader).parameters
    options = {k: p for k, p in params.items() if k not in ("root", "seed")}
    fields = source.options.model_fields
    assert list(fields) == [k for k in fields if k in options] and set(fields) == set(options), name
    for key, param in options.items():
        info = fields[key]
        if param.default is inspect.Parameter.empty:
            assert info.is_required(), f"{name}.{key}: the loader needs it, the schema has a default"
        else:
            assert not info.is_required() and info.default == param.default, f"{name}.{key}: defaults differ"
            typed = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            TypeAdapter(typed, config=STRICT).validate_python(info.default)  # a default passes its own schema
    assert ("root" in params) == source.needs_root, name
    assert ("seed" in params) == source.takes_seed, name
    if source.files == "hub":
        assert "cache_dir" in fields
    assert not source.remotes or source.needs_root
    for remote in source.remotes:
        assert remote.url.startswith(("http://", "https://")) and "/" not in remote.filename


def test_the_built_in_sources_and_their_families() -> None:
    modules = {name: SOURCES[name].loader.__module__.rsplit(".", 1)[-1] for name in source_names()}
    assert {n: m for n, m in modules.items() if m in ("digits", "intents", "images", "hub")} == {
        "digits": "digits", "mnist": "digits",
        "clinc150": "intents", "clinc150_mini": "intents", "banking77": "intents", "banking77_mini": "intents",
        "image_folder": "images", "cifar100": "images", "imagenet_r": "images", "cub200": "images",
        "cars": "images", "domainnet": "images", "hf": "hub",
    }  # fmt: skip
    files = {name: SOURCES[name].files for name in modules}
    assert [n for n, f in files.items() if f == "packaged"] == ["digits", "clinc150_mini", "banking77_mini"]
    assert [n for n, f in files.items() if f == "folder"] == ["image_folder", "files"]
    assert [n for n, f in files.items() if f == "hub"] == ["hf"]


# --------------------------------------------------------------------------- a source registered in a test


def _vectors(n: int, classes: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.rand(n, 4, generator=g), torch.arange(n) % classes)


class _ToyOptions(Options):
    classes: int = Field(3, ge=2)
    scale: float = Field(1.0, gt=0)


@pytest.fixture
def declare():
    """``declare(name, loader, **declaration)``: register a source for this test only."""
    saved = dict(SOURCES)
    yield register_source
    SOURCES.clear()
    SOURCES.update(saved)


def test_a_registered_source_is_read_through_its_declaration(declare, tmp_path: Path, monkeypatch) -> None:
    calls = []

    def load_toy(root: Path, seed: int = 0, classes: int = 3, scale: float = 1.0) -> Dataset:
        calls.append((root, seed, classes, scale))
        split = _vectors(12, classes, seed)
        return Dataset("toy", [str(c) for c in range(classes)], split, split)

    declare("toy", load_toy, summary="a toy", options=_ToyOptions)
    assert "toy" in mergecl.data.SOURCE_NAMES and "toy" in mergecl.data.registry.SOURCE_NAMES
    monkeypatch.setenv("MERGECL_DATA", str(tmp_path))
    ds = get_source("toy", seed=4, classes=4)
    assert calls[-1] == (tmp_path / "toy", 4, 4, 1.0) and len(ds.class_names) == 4  # schema defaults fill
    get_source("toy", "~/elsewhere")
    assert calls[-1][0] == Path("~/elsewhere").expanduser()
    with pytest.raises(MergeclError, match=r"^toy.classes: Input should be greater than or equal to 2, got 1$"):
        get_source("toy", classes=1)
    with pytest.raises(MergeclError, match=r"^toy.scale: Input should be a valid number, got '2'$"):
        get_source("toy", scale="2")
    with pytest.raises(MergeclError, match=r"toy: unknown option 'clases' \(options of toy: classes, scale\)"):
        get_source("toy", clases=2)
    with pytest.raises(MergeclError, match="has no download recipe; put the files in"):
        get_source("toy", download=True)
    assert "see docs" in how_to_get("toy", tmp_path)


def test_where_the_files_come_from_decides_the_root(declare, tmp_path: Path) -> None:
    seen = {}

    def packaged(seed: int = 0) -> Dataset:
        seen["packaged"] = seed
        split = _vectors(6, 2, seed)
        return Dataset("p", ["a", "b"], split, split)

    def folder(root: Path) -> Dataset:
        seen["folder"] = root
        return packaged()

    def hub(cache_dir: str | None = None) -> Dataset:  # no seed parameter: none is passed
        seen["hub"] = cache_dir
        return packaged()

    class HubOptions(Options):
        cache_dir: str | None = None

    declare("t_packaged", packaged, summary="p", files="packaged")
    declare("t_folder", folder, summary="f", files="folder", layout="root/<thing>")
    declare("t_hub", hub, summary="h", options=HubOptions, files="hub")
    get_source("t_packaged", tmp_path, seed=7)  # a root is ignored
    assert seen["packaged"] == 7
    with pytest.raises(MergeclError, match=r"^data source 't_folder' needs a root folder \(root/<thing>\)$"):
        get_source("t_folder")
    get_source("t_folder", tmp_path)
    assert seen["folder"] == tmp_path
    get_source("t_hub")
    assert seen["hub"] is None
    get_source("t_hub", tmp_path)
    assert seen["hub"] == str(tmp_path)  # a root is the hub's cache
    get_source("t_hub", tmp_path, cache_dir="/explicit")
    assert seen["hub"] == "/explicit"


def test_a_declared_download_recipe_is_what_prepare_fetches(declare, tmp_path: Path) -> None:
    served = tmp_path / "served.json"
    served.write_text(json.dumps({"x": [[0.0, 1.0], [1.0, 0.0]], "y": [0, 1]}))

    def load_pairs(root: Path) -> Dataset:
        data = json.loads((root / "pairs.json").read_text())
        split = Split(torch.tensor(data["x"]), torch.tensor(data["y"]))
        return Dataset("pairs", ["a", "b"], split, split)

    declare("pairs", load_pairs, summary="two pairs", remotes=[Remote(served.as_uri(), "pairs.json")])
    ds = get_source("pairs", tmp_path / "pairs", download=True)
    assert ds.train.labels.tolist() == [0, 1] and (tmp_path / "pairs" / "pairs.json").is_file()
    assert served.as_uri() in how_to_get("pairs", tmp_path)


def test_a_declaration_is_checked_against_its_loader(declare) -> None:
    def load(root: Path, seed: int = 0, classes: int = 3) -> Dataset:
        raise AssertionError("never called")

    class Wrong(Options):
        clases: int = 3

    class Root(Options):
        root: str = "x"

    with pytest.raises(MergeclError, match=r"register_source\('w'\): .*load has no parameter 'clases'"):
        declare("w", load, summary="s", options=Wrong)
    with pytest.raises(MergeclError, match="'root' and 'seed' are not options"):
        declare("w", load, summary="s", options=Root)
    with pytest.raises(MergeclError, match="has no parameter 'root'"):
        declare("w", lambda classes=3: None, summary="s")
    with pytest.raises(MergeclError, match="parameter 'classes' of .* is not an option"):
        declare("w", lambda classes: None, summary="s", files="packaged")
    with pytest.raises(MergeclError, match="a hub source has the option 'cache_dir'"):
        declare("w", lambda: None, summary="s", files="hub")
    with pytest.raises(MergeclError, match="a download recipe needs a folder"):
        declare("w", lambda: None, summary="s", files="packaged", remotes=[Remote("https://x/y", "y")])
    with pytest.raises(MergeclError, match="files must be one of data_root, folder, packaged, hub"):
        declare("w", load, summary="s", files="web")
    with pytest.raises(MergeclError, match="options must be a subclass"):
        declare("w", load, summary="s", options=dict)
    with pytest.raises(MergeclError, match="a source name is"):
        declare("../w", load, summary="s")
    with pytest.raises(MergeclError, match=r"data source 'mnist' is already registered \(by .*digits.load_mnist\)"):
        declare("mnist", load, summary="s")
    assert "w" not in SOURCES


# ------------------------------------------------------------------------- a run config, checked when read


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"source": "mnits"}, "data.source: unknown data source 'mnits'; valid: digits, mnist, "),
        ({"source": "clinc150", "options": {"domains": "banking"}},
         "data.options.domains: Input should be a valid list, got 'banking'"),
        ({"source": "clinc150", "options": {"domains": ["banking", 3]}},
         "data.options.domains[1]: Input should be a valid string, got 3"),
        ({"source": "clinc150", "options": {"domain": ["banking"]}},
         "data.options: unknown option 'domain' (options of clinc150: domains, variant)"),
        ({"source": "cifar100", "options": {"test_fraction": 0.2}},
         "data.options: unknown option 'test_fraction' (cifar100 takes no options)"),
        ({"source": "digits", "options": {"val_fraction": 1.5}},
         "data.options.val_fraction: Input should be less than 1, got 1.5"),
        ({"source": "digits", "options": {"val_fraction": "0.1"}},
         "data.options.val_fraction: Input should be a valid number, got '0.1'"),
        ({"source": "digits", "options": {"val_fraction": 0.6, "test_fraction": 0.4}},
         "data.options: val_fraction + test_fraction must be below 1"),
        ({"source": "mnist", "options": {"val_fraction": True}},
         "data.options.val_fraction: Input should be a valid number, got True"),
        ({"source": "domainnet", "options": {"domains": ["clipart", "cartoon"]}},
         "data.options.domains[1]: Input should be 'clipart', 'infograph', 'painting', 'quickdraw', 'real' or"),
        ({"source": "hf"}, "data.options: data source 'hf' needs the option 'hub_id'"),
        ({"source": "hf", "options": {"hub_id": "x", "val_split": 3}},
         "data.options.val_split: Input should be a valid string, got 3"),
    ],
)  # fmt: skip
def test_config_time_errors_are_one_line_naming_the_key(data: dict, message: str) -> None:
    with pytest.raises(MergeclError) as err:
        parse_config({"data": data}, "run.yaml")
    text = str(err.value)
    assert text.startswith("run.yaml: " + message) and "\n" not in text, text


def test_a_yaml_config_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  source: clinc150_mini\n  options: {domains: banking}\n")
    with pytest.raises(MergeclError, match=r"bad.yaml: data.options.domains: Input should be a valid list"):
        load_config(path)


def test_good_data_blocks_pass_and_a_root_is_needed_only_when_the_data_is_loaded() -> None:
    assert DataConfig(source="image_folder").root is None  # no root: an error only when loading
    checked = DataConfig(source="clinc150_mini", options={"domains": ["travel", "banking"]})
    assert checked.options == {"domains": ["travel", "banking"]}  # kept as given: the runner passes it on
    DataConfig(source="hf", options={"hub_id": "PolyAI/banking77", "val_split": None})
    DataConfig(source="domainnet", options={"domains": ["real", "clipart"]})
    assert read_source_options("mnist", {"val_fraction": 0}, "x").val_fraction == 0


def test_every_packaged_config_has_valid_data_options() -> None:
    import yaml

    from mergecl.experiment.config import packaged_configs

    for name, path in packaged_configs().items():
        data = yaml.safe_load(path.read_text()).get("data", {})
        try:
            DataConfig.model_validate(data)
        except MergeclError as err:
            raise AssertionError(f"{name}: {err}") from None


def test_a_plugin_source_is_checked_at_config_time(declare) -> None:
    declare("toy", lambda seed=0, classes=3, scale=1.0: None, summary="a toy", files="packaged", options=_ToyOptions)
    assert DataConfig(source="toy", options={"classes": 5}).options == {"classes": 5}
    with pytest.raises(MergeclError, match=r"^run.yaml: data.options.scale: Input should be greater than 0, got 0"):
        parse_config({"data": {"source": "toy", "options": {"scale": 0}}}, "run.yaml")


def test_a_plugin_module_registers_a_source_from_outside_mergecl(declare, tmp_path: Path) -> None:
    from mergecl.plugins import load_plugins

    plugin = tmp_path / "my_vectors_source.py"
    plugin.write_text(
        "import torch\n"
        "from pydantic import Field\n"
        "from mergecl.data import Dataset, Split, register_source\n"
        "from mergecl.options import Options\n\n"
        "class VectorOptions(Options):\n"
        "    n: int = Field(8, ge=2)\n\n"
        "def load(seed: int = 0, n: int = 8) -> Dataset:\n"
        "    split = Split(torch.rand(n, 2, generator=torch.Generator().manual_seed(seed)), torch.arange(n) % 2)\n"
        "    return Dataset('vectors', ['a', 'b'], split, split)\n\n"
        "register_source('plugin_vectors', load, summary='random vectors', options=VectorOptions, files='packaged')\n"
    )
    assert load_plugins([str(plugin)]) == [str(plugin)]
    assert "plugin_vectors" in source_names() and len(get_source("plugin_vectors", n=6).train) == 6
    assert DataConfig(source="plugin_vectors", options={"n": 4}).options == {"n": 4}
    with pytest.raises(MergeclError, match=r"^run.yaml: data.options.n: Input should be greater than or equal to 2"):
        parse_config({"data": {"source": "plugin_vectors", "options": {"n": 1}}}, "run.yaml")
