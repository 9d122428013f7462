"""The documentation site (mkdocs.yml, docs/) and its config reference.

(a) docs/reference/config.md is what scripts/config_reference.py writes from the schemas today: a
    new key, default, range or registered backbone, source, method or rule without a regenerated
    page fails here (``python scripts/config_reference.py`` rewrites it).
(b) Every key of the config schemas, walked recursively from ``RunConfig`` (and ``model:``'s, each
    backbone's, each source's, each method's and each merge rule's own), is in the reference, in its
    own section, with a description.
(c) When mkdocs is installed (the ``docs`` extra), ``mkdocs build --strict`` succeeds, as CI runs it:
    a broken link, a page missing from the nav or an API reference that does not resolve fails.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "config_reference.py"
REFERENCE = ROOT / "docs" / "reference" / "config.md"


def generator():
    spec = importlib.util.spec_from_file_location("mergecl_config_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def sections(markdown: str) -> dict[str, str]:
    """Heading text -> the text up to the next heading (of every heading of that text)."""
    parts = re.split(r"^(#{2,4} .*)$", markdown, flags=re.M)
    out: dict[str, str] = {}
    for i in range(1, len(parts) - 1, 2):
        title = parts[i].lstrip("#").strip()
        out[title] = out.get(title, "") + parts[i + 1]
    return out


def schema_keys(schema: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of ``schema`` as a dotted path, the keys of nested models included."""

    def models_in(annotation) -> list[type[BaseModel]]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in models_in(arg)]

    keys = []
    for key, info in schema.model_fields.items():
        keys.append(f"{prefix}{key}")
        for inner in models_in(info.annotation):
            keys += schema_keys(inner, f"{prefix}{key}.")
    return keys


def test_the_config_reference_is_up_to_date():
    written = REFERENCE.read_text(encoding="utf-8") if REFERENCE.exists() else ""
    assert written == generator().render(), (
        "docs/reference/config.md is out of date: run `python scripts/config_reference.py` and commit it"
    )


def test_every_schema_key_is_in_the_reference_with_a_description():
    from mergecl.experiment.config import RunConfig
    from mergecl.merging.engine import EngineOptions
    from mergecl.methods.registry import MergeMethodOptions
    from mergecl.models.registry import ModelOptions

    gen = generator()
    page = sections(gen.render())
    run_keys = schema_keys(RunConfig)
    assert {"seeds", "data.n_tasks", "train.lr", "export.methods"} <= set(run_keys)
    wanted: dict[str, list[str]] = {}

    def want(heading: str, keys: list[str]) -> None:
        wanted.setdefault(heading, []).extend(keys)

    for key in run_keys:  # data.n_tasks under '### `data`'; the top-level keys in their own table
        want(f"`{key.split('.')[0]}`" if "." in key else "Top-level keys", [key])
    for key in schema_keys(ModelOptions, "model."):  # model.lora.rank under '### `model.lora`'
        want("`model.lora`" if key.startswith("model.lora.") else "Keys every backbone takes", [key])
    for name, backbone in gen.builtin_backbones().items():
        want(f"`{name}`", schema_keys(backbone.options, "model."))
    for name, source in gen.builtin_sources().items():
        want(f"`{name}`", schema_keys(source.options, "data.options."))
    for method, training in gen.builtin_trainings().items():
        want(f"`{method}`", schema_keys(training.options, f"method_options.{method}."))
    want("Options of every merge method", schema_keys(MergeMethodOptions, "method_options.RULE."))
    want("Options of every merge method", schema_keys(EngineOptions, "method_options.RULE."))
    for name, rule in gen.builtin_cl_rules().items():
        want(f"`{name}`", schema_keys(rule.options, f"method_options.{name}."))
    assert len(gen.builtin_backbones()) >= 5 and len(gen.builtin_sources()) >= 10
    assert {"seq_ft", "pam", "ewc"} <= set(gen.builtin_trainings()) and "magmax" in gen.builtin_cl_rules()
    missing = []
    for heading, keys in wanted.items():
        text = page.get(heading, "")
        if keys and not text:
            missing.append(f"no section '{heading}'")
        missing += [f"{heading}: `{key}`" for key in keys if f"| `{key}` |" not in text]
    assert not missing, "keys missing from the config reference:\n" + "\n".join(missing)
    undescribed = [f"{title}: {row.key}" for title, rows in gen.all_sections() for row in rows if not row.description]
    assert not undescribed, "keys without a description (a Field description, a comment or DESCRIPTIONS):\n" + (
        "\n".join(undescribed)
    )


def test_the_reference_reads_types_defaults_and_ranges():
    from mergecl.training.settings import TrainSettings

    gen = generator()
    rows = {row.key: row for row in gen.rows(TrainSettings, "train.")}
    assert rows["train.lr"].type == "number" and rows["train.lr"].default == "0.001"
    assert rows["train.lr"].constraints == "> 0"
    assert rows["train.optimizer"].type == "one of adamw, sgd"
    assert rows["train.grad_clip"].type == "number or null"
    assert rows["train.shard"].type == "one of none, optimizer, full"
    assert "ZeRO-1" in rows["train.shard"].description  # the comment block above the field
    assert "plateau_factor" in rows["train.plateau_patience"].description  # the comment block above it
    from mergecl.experiment.config import RunConfig

    seeds = next(row for row in gen.rows(RunConfig, nested=False) if row.key == "seeds")
    assert seeds.constraints == "length >= 1, each >= 0, < 4294967296"


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    site = tmp_path / "site"
    for page in ("index.html", "reference/config/index.html", "reference/api/index.html", "methods/index.html"):
        assert (site / page).is_file(), page
    api = (site / "reference/api/index.html").read_text(encoding="utf-8")
    for name in ("register_rule", "register_training", "register_backbone", "register_source", "RunOutput"):
        assert name in api, f"the API reference lacks {name}"


def test_getting_started_shows_the_readmes_default_results():
    """docs/getting-started.md copies the README's default-run table (its first six columns)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- default-results -->\n(.*?)<!-- /default-results -->", readme, re.S)
    assert block, "README.md has no default-results block"
    page = (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
    for line in block.group(1).strip().splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")][:6]
        assert "| " + " | ".join(cells) + " |" in page, f"docs/getting-started.md lacks the README's row {cells}"
