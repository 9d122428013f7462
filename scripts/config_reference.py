"""Write docs/reference/config.md, the config reference, from the config schemas.

Every key of a run config (``RunConfig`` and the models nested in it), the ``model:`` options of
every backbone, the ``data.options`` of every data source and the ``method_options`` of every
method, each with its type, default, constraints and description, read from the pydantic schemas
and the registries: nothing here is a table to keep in step. A field's description is its
``Field(description=...)``, else the comment beside or above its declaration, else a line of
``DESCRIPTIONS`` below (tests/test_docs_site.py fails on a key with none, and when the committed
page differs from what this script writes).

    python scripts/config_reference.py          # (re)write docs/reference/config.md
    python scripts/config_reference.py --check  # exit 1 when the committed page is out of date

Only mergecl's own rules, methods, backbones and sources are listed (plugins: ``mergecl list``).
"""

from __future__ import annotations

import argparse
import ast
import collections.abc
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from mergecl.options import RANGE_WORDS

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "reference" / "config.md"

# Descriptions of the keys whose declaration has neither a description nor a comment, by dotted path.
DESCRIPTIONS = {
    "name": "the run's name: the run directory is runs/NAME-TIME unless --out names one",
    "device": "auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:1, mps, ...",
    "data": "the data source and how it is cut into tasks (below)",
    "model": "the backbone and its options (below: the keys every backbone takes and each backbone's own)",
    "train": "the training settings of every training method (below)",
    "methods": "the CL methods to run and compare (docs/methods.md); methods that differ only in their "
    "merge rule share one training",
    "method_options": "options by method name (or training name, e.g. seq): each checked against that "
    "method's schema (below)",
    "loggers": "experiment loggers, each a name (csv, tensorboard, wandb, mlflow) or {name: ..., its options}; "
    "none by default (docs/loggers.md)",
    "data.options": "the source's own options (Data sources, below), checked against its schema",
    "data.source": "the data source (a registered name; its options: below)",
    "data.root": "the folder the source reads; null = <data root>/<source> ($MERGECL_DATA, else ~/.cache/mergecl/data)",
    "data.scenario": "class-, task- or domain-incremental, or permuted inputs",
    "data.n_tasks": "how many tasks the classes (or permutations) are split into; null (the default) = the "
    "source's own tasks where it gives them (a task column, one data set per task, order: groups), else 5",
    "data.order": "the class order: seeded (shuffled by the run's seed), sorted, groups (the source's class "
    "groups, e.g. CLINC150's domains), paper (a paper preset's order), or a list of class indices",
    "data.val_fraction": "share of each task's training data held out for validation when the source has no "
    "validation split",
    "data.train_per_class": "at most this many training examples per class (seeded draw); null = all",
    "data.eval_per_class": "at most this many validation and test examples per class; null = all",
    "train.optimizer": "the optimiser",
    "train.lr": "learning rate (peak, after warm-up)",
    "train.weight_decay": "decoupled weight decay (AdamW) or L2 penalty (SGD)",
    "train.batch_size": "training batch size (under torchrun: per process)",
    "train.warmup_steps": "linear warm-up steps at the start of each task",
    "train.schedule": "learning-rate schedule within a task",
    "train.grad_clip": "clip the gradient norm to this; null = no clipping",
    "train.eval_batch_size": "evaluation batch size",
    "train.label_smoothing": "label smoothing of the cross-entropy loss",
    "train.plateau_factor": "schedule plateau: divide the LR by this after plateau_patience epochs without progress",
    "train.plateau_min_factor": "schedule plateau: stop once the LR falls below lr times this",
    "seeds": "the seeds to run, each a full run of every method (results: mean and std over them; "
    "numpy's seeds are 0 .. 2**32 - 1)",
    "eval_future": "evaluate every task after every step (the full accuracy matrix); false: only the tasks "
    "seen so far (about half the evaluation)",
    "keep_vectors": "false: delete a seed's tensors once it has finished (its numbers stay; no export later)",
    "export": "the models to export at the end of the run (below); null: none",
    "export.seed": "the seed whose models are exported; null: the run's first seed",
    # data.options of the built-in sources (the same name means the same thing in every source)
    "data.options.val_fraction": "the validation share (of the training data, or of what is not test)",
    "data.options.test_fraction": "the test share, when the files have no test split",
    "data.options.text_column": "the column of the inputs (texts)",
    "data.options.label_column": "the column of the labels",
    "data.options.config": "the hub data set's configuration name; null = its default",
    "data.options.train_split": "the hub split used for training",
    "data.options.val_split": "the hub split used for validation; null = val_fraction of the training split",
    "data.options.test_split": "the hub split used for testing",
    # method_options of the built-in training methods (docs/methods.md has the formulas)
    "method_options.lwf.lam": "weight of the distillation loss on the previous model's outputs",
    "method_options.lwf.temperature": "distillation temperature",
    "method_options.ewc.lam": "weight of the EWC penalty",
    "method_options.ewc.fisher_labels": "Fisher estimate from the model's own predictions or the true labels",
    "method_options.gpm.project_head": "project the head's gradients too; auto: only when one head is shared by "
    "every task (domain-incremental, permuted)",
    "method_options.became.fisher_labels": "Fisher estimate from the model's own predictions or the true labels",
    "method_options.became.stage2_lr": "learning rate of the second stage; null = the train section's lr",
    "method_options.became.project_head": "as gpm's project_head",
    "method_options.gpm_one_over_t.stage2_lr": "learning rate of the second stage; null = the train section's lr",
    "method_options.gpm_one_over_t.project_head": "as gpm's project_head",
    "method_options.seq_became.fisher_labels": "Fisher estimate from the model's own predictions or the true labels",
    "method_options.pam.align_at_end": "also align once after the task's last step",
    "method_options.pam.scope": "the top-p fraction by magnitude per tensor, or over all trained entries",
    "method_options.pam.reset": "reset a conflicting entry to the global model's value, or to zero",
    "method_options.pam.merge": "the global model after a task: the running mean of the task models, or the "
    "mean of the previous global model and the task model",
}


# --- reading a schema ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    key: str  # dotted path as written in a config (``data.n_tasks``)
    type: str
    default: str  # or "required"
    constraints: str
    description: str


def _comments(cls: type) -> dict[str, str]:
    """Field name -> the comment beside its declaration, or else the comment block just above it."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comment_at: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comment_at[token.start[0]] = token.string.lstrip("#").strip()
    body = ast.parse(source).body[0]
    found = {}
    for node in getattr(body, "body", []):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        beside = [comment_at[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in comment_at]
        above: list[str] = []
        n = node.lineno - 1
        while n >= 1 and lines[n - 1].strip().startswith("#"):
            above.insert(0, comment_at.get(n, ""))
            n -= 1
        text = " ".join(beside) or " ".join(above)
        if text:
            found[node.target.id] = text
    return found


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (itself, or inside ``X | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def type_name(annotation: Any) -> str:
    """A type as a config writer sees it: ``list[int] or null``, ``one of class, task``, ``mapping``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(_show(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {type_name(args[1])}" if len(args) == 2 else "mapping"
    if annotation is type(None):
        return "null"
    if annotation is typing.Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return {"str": "text", "int": "integer", "float": "number", "bool": "true or false"}.get(
        getattr(annotation, "__name__", ""), getattr(annotation, "__name__", str(annotation))
    )


def _bounds(metadata: list[Any]) -> list[str]:
    flat = [inner for m in metadata for inner in (m.metadata if isinstance(m, FieldInfo) else [m])]
    return [f"{symbol} {_show(getattr(m, attr))}" for m in flat for attr, symbol in RANGE_WORDS if hasattr(m, attr)]


def constraints(info: Any) -> str:
    """The field's bounds, and those of its list items (``each >= 0``)."""
    out = _bounds(info.metadata)
    for arg in typing.get_args(info.annotation) or ():
        for inner in [arg, *typing.get_args(arg)]:
            if typing.get_origin(inner) is typing.Annotated:
                item = _bounds(list(typing.get_args(inner)[1:]))
                if item:
                    out.append("each " + ", ".join(item))
    return ", ".join(dict.fromkeys(out))


def rows(schema: type[BaseModel], prefix: str = "", skip: tuple[str, ...] = (), nested: bool = True) -> Iterator[Row]:
    """A row per key of ``schema`` (dotted paths under ``prefix``); with ``nested``, the keys of the
    models nested in it follow their own key."""
    comments: dict[str, str] = {}
    for cls in reversed(schema.__mro__):
        if isinstance(cls, type) and issubclass(cls, BaseModel) and cls is not BaseModel:
            comments.update(_comments(cls))
    for key, info in schema.model_fields.items():
        if key in skip:
            continue
        path = f"{prefix}{key}"
        inner = _model_in(info.annotation)
        if info.is_required():
            default = "required"
        else:
            value = info.get_default(call_default_factory=True)
            default = "(below)" if isinstance(value, BaseModel) else _show(value)
        description = info.description or DESCRIPTIONS.get(path) or comments.get(key, "")
        yield Row(path, type_name(info.annotation), default, constraints(info), description)
        if nested and inner is not None:
            yield from rows(inner, f"{path}.")


# --- the registries (mergecl's own entries only) --------------------------------------------------


def _ours(module: str | None) -> bool:
    return (module or "").startswith("mergecl.")


def builtin_backbones() -> dict[str, Any]:
    from mergecl.models import BACKBONES

    return {name: b for name, b in BACKBONES.items() if _ours(getattr(b.build, "__module__", None))}


def builtin_sources() -> dict[str, Any]:
    from mergecl.data import SOURCES

    return {name: s for name, s in SOURCES.items() if _ours(getattr(s.loader, "__module__", None))}


def builtin_trainings() -> dict[str, Any]:
    import mergecl.methods  # noqa: F401  (the built-in trainings register on import)
    from mergecl.methods import trainings

    return {t.method: t for name, t in trainings.TRAININGS.items() if _ours(trainings._OWNERS.get(name))}


def builtin_cl_rules() -> dict[str, Any]:
    from mergecl.merging import all_rules

    return {name: r for name, r in all_rules().items() if r.continual and _ours(r.fn.__module__)}


# --- the page -------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def table(items: list[Row]) -> list[str]:
    if not items:
        return ["No options of its own.", ""]
    out = ["| key | type | default | constraints | description |", "|:---|:---|:---|:---|:---|"]
    for r in items:
        default = r.default if r.default in ("required", "(below)") else f"`{r.default}`"
        cells = [f"`{r.key}`", r.type, default, r.constraints, r.description]
        out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return [*out, ""]


def all_sections() -> list[tuple[str, list[Row]]]:
    """(heading, rows) for every table of the page, in order (what the test walks too)."""
    from mergecl.experiment.config import DataConfig, ExportConfig, RunConfig
    from mergecl.merging.engine import EngineOptions
    from mergecl.methods.registry import MergeMethodOptions
    from mergecl.models.lora import LoraOptions
    from mergecl.models.registry import ModelOptions
    from mergecl.training.settings import TrainSettings

    sections = [
        ("Top-level keys", list(rows(RunConfig, nested=False))),
        ("data", list(rows(DataConfig, "data.", nested=False))),
        ("train", list(rows(TrainSettings, "train."))),
        ("export", list(rows(ExportConfig, "export."))),
        ("Keys every backbone takes", list(rows(ModelOptions, "model.", nested=False))),
        ("model.lora", list(rows(LoraOptions, "model.lora."))),
    ]
    for name, backbone in builtin_backbones().items():
        sections.append((f"backbone `{name}`", list(rows(backbone.options, "model."))))
    for name, source in builtin_sources().items():
        sections.append((f"source `{name}`", list(rows(source.options, "data.options."))))
    for method, training in builtin_trainings().items():
        sections.append((f"method `{method}`", list(rows(training.options, f"method_options.{method}."))))
    sections.append(("Options of every merge method", [*rows(MergeMethodOptions, "method_options.RULE."),
                                                       *rows(EngineOptions, "method_options.RULE.")]))  # fmt: skip
    for name, rule in builtin_cl_rules().items():
        sections.append((f"rule `{name}`", list(rows(rule.options, f"method_options.{name}."))))
    from mergecl.experiment.learn import LearnConfig, LearnPolicy

    sections.append(("learn", list(rows(LearnConfig, nested=False))))
    sections.append(("learn.policy", list(rows(LearnPolicy, "policy."))))
    return sections


def _summary(text: str) -> str:
    """A declaration's summary as one sentence of prose (no HTML: ``root/<class>`` stays text)."""
    text = " ".join(text.split()).rstrip(".").replace("<", "&lt;")
    return text[:1].upper() + text[1:]


def render() -> str:
    from mergecl.models.registry import KINDS

    sections = dict(all_sections())
    out = [
        "# Config reference",
        "",
        "<!-- Generated by scripts/config_reference.py from the config schemas: do not edit by hand. -->",
        "",
        "Every key a run config takes (`mergecl run CONFIG`), read from the schemas that check a config",
        "when it is loaded: an unknown key, a wrong type or a value out of range stops the run before it",
        "starts, with one line naming the key. `mergecl run CONFIG --dry-run` checks a config and prints",
        "its plan; `mergecl list` prints the same options, plugins included. The types are YAML's: a",
        "number is written as a number (`1.0e-3`, not `'1e-3'`), `null` is YAML's null.",
        "",
        "```yaml",
        "name: digits-cil",
        "seeds: [0]",
        "data: {source: digits, scenario: class, n_tasks: 5, order: seeded}",
        "model: {name: mlp, in_dim: 64, hidden: [256, 256]}",
        "train: {optimizer: adamw, lr: 0.001, epochs: 5, batch_size: 32}",
        "methods: [seq_ft, magmax, average, ties, ind_ft+magmax, lwf, ewc, joint]",
        "method_options: {magmax: {lam: 0.5}, lwf: {lam: 0.3, temperature: 2}, ewc: {lam: 1.0e+6}}",
        "export: [magmax]",
        "```",
        "",
        "## Run config",
        "",
        "### Top-level keys",
        "",
        *table(sections["Top-level keys"]),
        "### `data`",
        "",
        "Where the examples come from (`data.source`, with its own `data.options`: "
        "[Data sources](#data-sources)) and how they are cut into tasks.",
        "",
        *table(sections["data"]),
        "### `train`",
        "",
        "The training settings every training method uses (a method may change some: [Methods](../methods.md)).",
        "",
        *table(sections["train"]),
        "### `export`",
        "",
        "`export: [magmax]` (or `export: magmax`) is short for `export: {methods: [magmax]}`: the models",
        "written into `RUN/export/<method>/` at the end of the run, as `mergecl export` writes them.",
        "",
        *table(sections["export"]),
        "## Model",
        "",
        "The `model:` block: `name` (a backbone), the keys every backbone takes, and the backbone's own.",
        "",
        "### Keys every backbone takes",
        "",
        *table(sections["Keys every backbone takes"]),
        "### `model.lora`",
        "",
        "Train peft LoRA adapters instead of the encoder's weights, for every method of the run.",
        "",
        *table(sections["model.lora"]),
    ]
    for name, backbone in builtin_backbones().items():
        facts = [f"inputs: {', '.join(KINDS[k] for k in backbone.kinds) or 'any'}"]
        if backbone.text_side:
            facts.append("text side (head `zero_shot` by default)")
        if backbone.pretrained is not None:
            facts.append(f"`pretrained` default `{backbone.pretrained}`")
        if backbone.lora_targets is not None:
            facts.append(f"LoRA targets `{_show(backbone.lora_targets)}`")
        out += [f"### `{name}`", "", f"{_summary(backbone.summary)} ({'; '.join(facts)}).", ""]
        out += table(sections[f"backbone `{name}`"])
    out += [
        "## Data sources",
        "",
        "`data.source` names one; `data.options` holds its options. Your own files: [Your own data](../sources.md).",
        "",
    ]
    where = {
        "data_root": "reads a folder: `data.root`, else `<data root>/{name}`",
        "folder": "reads the folder `data.root` names",
        "packaged": "shipped inside mergecl or a dependency",
        "hub": "fetched from a hub (`data.root`: the hub's cache)",
    }
    for name, source in builtin_sources().items():
        download = "; `mergecl.data.download.prepare` downloads it" if source.remotes else ""
        files = where[source.files].format(name=name)
        out += [f"### `{name}`", "", f"{_summary(source.summary)} ({files}{download}).", ""]
        out += table(sections[f"source `{name}`"])
    out += [
        "## Method options",
        "",
        "`method_options: {NAME: {...}}`: the options of the method `NAME` of `methods:` (a tagged name",
        "such as `magmax@auto` has its own). A training method's options are its training's; a merge",
        "method (a rule, `seq_ft+RULE`, `ind_ft+RULE`) takes the options of every merge method and its",
        "rule's own. What each method does: [Methods and merge rules](../methods.md).",
        "",
        "### Training methods",
        "",
    ]
    for method, training in builtin_trainings().items():
        out += [f"#### `{method}`", "", f"{_summary(training.summary)}.", ""]
        out += table(sections[f"method `{method}`"])
    out += [
        "### Options of every merge method",
        "",
        "`RULE` stands for the method's name (`magmax`, `ind_ft+ties`, `magmax@auto`, ...).",
        "",
        *table(sections["Options of every merge method"]),
        "### Merge rules",
        "",
    ]
    for name, rule in builtin_cl_rules().items():
        lam = "computed by the rule" if rule.lam is None else _show(rule.lam)
        out += [f"#### `{name}`", "", f"{_summary(rule.summary)} (default lam: {lam}).", ""]
        out += table(sections[f"rule `{name}`"])
    out += [
        "## Learn config",
        "",
        "`mergecl learn init DIR --config LEARN.yaml` ([Keeping a model up to date](../guides/learn.md)): every",
        "key optional; `model`, `method_options` and `train` are the blocks of a run config above, `data` the",
        "options of the `files` source (each task's file; no `train`/`test`/`task_column`).",
        "",
        *table(sections["learn"]),
        "### `policy`",
        "",
        *table(sections["learn.policy"]),
    ]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed page is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if current != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
