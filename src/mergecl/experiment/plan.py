"""What mergecl can do and what a config would do, without doing it: ``mergecl list`` and
``mergecl run CONFIG --dry-run``.

``catalogue()`` reads the declarations only (the registered rules, trainings, sources and backbones,
their option schemas, the packaged configs): nothing here is a table to keep in step. Plugins that
are loaded (``--plugin``, ``$MERGECL_PLUGINS``, entry points) are listed like the built-ins.

``plan(config)`` is a run's plan: the config checked as ``load_config`` checks it, the scenario of
the first seed cut as the runner cuts it (``run_scenario``: the data is loaded, no model is built),
the trainings and the methods that share each, the training steps and evaluations a run makes, and
a rough cost in forward passes (no timings: they depend on the model and the machine). Nothing is
written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergecl.options import RANGE_WORDS

SECTIONS = ("methods", "rules", "presets", "sources", "backbones")
FILES_IN_WORDS = {  # Source.files, in words
    "data_root": "a folder: <data root>/{name}, or the one data.root names",
    "folder": "a folder you name in data.root",
    "packaged": "shipped inside mergecl or one of its dependencies",
    "hub": "fetched by the loader from a hub (data.root: the hub's cache)",
}


# --- the catalogue --------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def schema_fields(schema: Any, skip: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The options of a schema (an ``Options`` model): name, type, default (or required), range and
    description, as its declaration has them."""
    from mergecl.models.registry import _type_name

    fields = []
    for key, info in schema.model_fields.items():
        if key in skip:
            continue
        ranges = [
            f"{symbol} {getattr(m, attr)}" for m in info.metadata for attr, symbol in RANGE_WORDS if hasattr(m, attr)
        ]
        entry: dict[str, Any] = {"name": key, "type": _type_name(info.annotation)}
        if info.is_required():
            entry["required"] = True
        else:
            entry["default"] = _jsonable(info.get_default(call_default_factory=True))
        if ranges:
            entry["range"] = ", ".join(ranges)
        if info.description:
            entry["description"] = info.description
        fields.append(entry)
    return fields


def _rules() -> dict[str, Any]:
    from mergecl.merging.engine import EngineOptions
    from mergecl.merging.registry import all_rules

    items = []
    for name, rule in all_rules().items():
        items.append(
            {
                "name": name,
                "summary": rule.summary,
                "lam": rule.lam,  # None: the rule computes its own
                "granularity": rule.granularity,
                "inputs": {
                    key: {"per_task": spec.per_task, "non_negative": spec.non_negative}
                    for key, spec in rule.inputs.items()
                },
                "max_models": rule.max_models,
                "continual": rule.continual,
                "options": schema_fields(rule.options),
            }
        )
    return {"items": items, "every_rule": schema_fields(EngineOptions)}


def _methods() -> dict[str, Any]:
    import mergecl.methods  # noqa: F401  (the built-in trainings register)
    from mergecl.methods.registry import MergeMethodOptions, cl_rules
    from mergecl.methods.trainings import TRAININGS

    items = [
        {
            "name": training.method,
            "training": training.name,
            "summary": training.summary,
            "continues": training.continues,
            "trains": training.step is not None,
            "options": schema_fields(training.options),
        }
        for training in TRAININGS.values()
    ]
    rules = cl_rules()
    forms = [
        {"form": "RULE", "summary": "the merge rule over the Seq-FT task vectors after every step", "rules": rules},
        {"form": "seq_ft+RULE", "summary": "the same, said explicitly"},
        *(
            {
                "form": f"{t.method}+RULE",
                "summary": f"the merge rule over {t.method}'s task vectors (each task from theta_0)",
            }
            for t in TRAININGS.values()
            if t.independent
        ),
        {"form": "NAME@TAG", "summary": "NAME again with its own method_options (keyed by the full name)"},
    ]
    return {"items": items, "forms": forms, "merge_options": schema_fields(MergeMethodOptions)}


def _presets() -> dict[str, Any]:
    import yaml

    from mergecl.experiment.config import CONFIG_DIR, packaged_configs

    items = []
    for name, path in packaged_configs().items():
        text = path.read_text(encoding="utf-8")
        comments = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
        data = yaml.safe_load(text) or {}
        items.append(
            {
                "name": name,
                "run_name": data.get("name") if isinstance(data, dict) else None,
                "summary": comments[0] if comments else "",
                "path": str(path.relative_to(CONFIG_DIR)),
            }
        )
    return {"items": items}


def _sources() -> dict[str, Any]:
    import mergecl.data  # noqa: F401  (the built-in sources register)
    from mergecl.data.registry import SOURCES, data_root

    items = [
        {
            "name": name,
            "summary": source.summary,
            "files": source.files,
            "where": FILES_IN_WORDS[source.files].format(name=name),
            "layout": source.layout,
            "download": bool(source.remotes),
            "options": schema_fields(source.options),
        }
        for name, source in SOURCES.items()
    ]
    return {"items": items, "data_root": str(data_root())}


def _backbones() -> dict[str, Any]:
    import mergecl.models  # noqa: F401  (the built-in backbones register)
    from mergecl.models.lora import LoraOptions
    from mergecl.models.registry import BACKBONES, KINDS, ModelOptions

    items = [
        {
            "name": name,
            "summary": backbone.summary,
            "kinds": [KINDS[k] for k in backbone.kinds] or ["any"],
            "text_side": backbone.text_side,
            "pretrained": backbone.pretrained,
            "lora_targets": _jsonable(backbone.lora_targets),
            "inputs": backbone.inputs,
            "options": schema_fields(backbone.options),
        }
        for name, backbone in BACKBONES.items()
    ]
    return {
        "items": items,
        "every_backbone": schema_fields(ModelOptions, skip=("name",)),
        "lora": schema_fields(LoraOptions),
    }


def catalogue(sections: Sequence[str] = SECTIONS) -> dict[str, Any]:
    """What this mergecl (with the plugins loaded) offers, by section; JSON-able."""
    makers = {"methods": _methods, "rules": _rules, "presets": _presets, "sources": _sources, "backbones": _backbones}
    return {section: makers[section]() for section in sections}


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if isinstance(value, (list, dict, int, float)) else repr(value)


def _field_lines(fields: list[dict[str, Any]], indent: str) -> list[str]:
    lines = []
    for f in fields:
        default = "required" if f.get("required") else f"default {_show(f.get('default'))}"
        parts = [f["type"], default] + ([f["range"]] if "range" in f else [])
        about = f": {f['description']}" if "description" in f else ""
        lines.append(f"{indent}{f['name']} ({', '.join(parts)}){about}")
    return lines


def format_catalogue(listing: dict[str, Any]) -> str:
    """The catalogue as text: one line per item, its options indented under it."""
    out: list[str] = []
    if "methods" in listing:
        section = listing["methods"]
        out.append("methods (a config's `methods:`; options under `method_options.NAME`):")
        for item in section["items"]:
            how = "continues" if item["continues"] else "each task from theta_0"
            if not item["trains"]:
                how = "trains nothing"
            trains = f"training {item['training']}: " if item["training"] != item["name"] else ""
            out.append(f"  {item['name']:<16} {item['summary']} [{trains}{how}]")
            out += _field_lines(item["options"], " " * 6)
        out.append("  merge methods, named from a rule without inputs (see rules):")
        for form in section["forms"]:
            tail = f": {', '.join(form['rules'])}" if "rules" in form else ""
            out.append(f"  {form['form']:<16} {form['summary']}{tail}")
        out.append("  a merge method's options: the rule's own and every merge's (see rules), and")
        out += _field_lines(section["merge_options"], " " * 6)
        out.append("")
    if "rules" in listing:
        section = listing["rules"]
        out.append("rules (mergecl merge --method NAME; lam: the default coefficient):")
        for item in section["items"]:
            lam = "computed" if item["lam"] is None else f"{item['lam']:g}"
            cl = "" if item["continual"] else "; merge only (needs inputs)"
            if item["max_models"] is not None:
                cl += f"; at most {item['max_models']} fine-tuned model(s)"
            out.append(f"  {item['name']:<16} {item['summary']} (lam {lam}, granularity {item['granularity']}{cl})")
            out += _field_lines(item["options"], " " * 6)
            for key, spec in item["inputs"].items():
                count = "one per task vector" if spec["per_task"] else "one"
                sign = ", non-negative" if spec["non_negative"] else ""
                out.append(f"      input {key}: a checkpoint ({count}{sign}), --{key.replace('_', '-')} FILE")
        out.append("  every rule also takes:")
        out += _field_lines(section["every_rule"], " " * 6)
        out.append("")
    if "presets" in listing:
        out.append("presets (packaged configs: mergecl run NAME):")
        for item in listing["presets"]["items"]:
            named = f" (name: {item['run_name']})" if item["run_name"] not in (None, item["name"]) else ""
            out.append(f"  {item['name']:<30} {item['summary']}{named}")
        out.append("")
    if "sources" in listing:
        root = listing["sources"]["data_root"]
        out.append(f"sources (a config's data.source; options under data.options; <data root>: {root}):")
        for item in listing["sources"]["items"]:
            out.append(f"  {item['name']:<16} {item['summary']}")
            download = "; a download recipe: mergecl.data.download.prepare" if item["download"] else ""
            layout = f" ({item['layout']})" if item["layout"] else ""
            out.append(f"      files: {item['where']}{layout}{download}")
            out += _field_lines(item["options"], " " * 6)
        out.append("")
    if "backbones" in listing:
        section = listing["backbones"]
        out.append("backbones (a config's model.name; its options beside it in model:):")
        for item in section["items"]:
            extras = [f"data: {' or '.join(item['kinds'])}"]
            if item["text_side"]:
                extras.append("text side: head zero_shot by default")
            if item["pretrained"] is not None:
                extras.append(f"pretrained default {item['pretrained']!r}")
            out.append(f"  {item['name']:<16} {item['summary']} ({'; '.join(extras)})")
            out += _field_lines(item["options"], " " * 6)
        out.append("  every backbone takes:")
        out += _field_lines(section["every_backbone"], " " * 6)
        out.append("  model.lora:")
        out += _field_lines(section["lora"], " " * 6)
        out.append("")
    return "\n".join(out).rstrip("\n")


# --- the plan of a run ----------------------------------------------------------------------------


def _steps(examples: int, batch_size: int, epochs: float) -> int:
    """Optimiser steps of one task as the training loop counts them."""
    return max(1, math.ceil(epochs * math.ceil(examples / batch_size)))


def plan_trainings(config: Any, train_sizes: Sequence[int]) -> list[dict[str, Any]]:
    """The trainings of a run of ``config`` (a checked ``RunConfig``) on tasks of ``train_sizes``
    training examples: each with the methods sharing it and its optimiser steps per task and per seed
    as the training loop counts them (0 where it trains nothing; a final-only training all at the
    last task). The plan (``--dry-run``) prints them; the runner's whole-run bar counts them."""
    from mergecl.methods.registry import resolve_methods
    from mergecl.methods.trainings import registered_training
    from mergecl.options import read_options

    settings = config.train
    per_task = [_steps(size, settings.batch_size, settings.epochs) for size in train_sizes]
    specs = resolve_methods(config.methods)
    trainings = []
    for training in dict.fromkeys(spec.training for spec in specs):
        registered = registered_training(training)
        methods = [spec for spec in specs if spec.training == training]
        keys = [training] + [spec.name for spec in methods if spec.rule is None]
        key = next((k for k in keys if k in config.method_options), training)
        options = read_options(registered.options, config.method_options.get(key, {}), f"method_options.{key}")
        final_only = bool(getattr(options, "final_only", False))
        if registered.step is None:
            steps = [0] * len(per_task)
        elif final_only:  # trained once, at the last step, on every task
            steps = [0] * (len(per_task) - 1) + [_steps(sum(train_sizes), settings.batch_size, settings.epochs)]
        else:
            steps = per_task
        trainings.append(
            {
                "training": training,
                "summary": registered.summary,
                "continues": registered.continues,
                "independent": registered.independent,  # with data.orders: trained once per seed
                "final_only": final_only,
                "methods": [spec.name for spec in methods],
                "steps_per_task": steps,
                "steps_per_seed": sum(steps),
            }
        )
    return trainings


def plan(config: Any, source: str, out: str | Path | None = None) -> dict[str, Any]:
    """The plan of a run of ``config`` (a checked ``RunConfig``; ``source``: where it was read from):
    JSON-able; builds the first seed's scenario (loads the data), builds no model, writes nothing."""
    from mergecl.experiment.config import run_seeds
    from mergecl.experiment.runner import pick_device, run_scenario
    from mergecl.methods.merged import LAM_GRID
    from mergecl.methods.registry import resolve_methods
    from mergecl.models.registry import check_inputs

    device = pick_device(config.device)
    seed = config.seeds[0]
    scenario = run_scenario(config, seed)
    check_inputs(config.model, scenario.tasks[0].train.kind, config.data.source)  # as the runner, before a model
    tasks = [
        {
            "name": task.name,
            "classes": len(task.classes),
            "class_names": [scenario.class_names[c] for c in task.classes],
            "train": len(task.train),
            "val": len(task.val),
            "test": len(task.test),
        }
        for task in scenario.tasks
    ]
    n = len(tasks)
    settings = config.train
    trainings = plan_trainings(config, [task["train"] for task in tasks])
    specs = resolve_methods(config.methods)
    final = {name for t in trainings if t["final_only"] for name in t["methods"]}
    zero_shot = {name for t in trainings if t["steps_per_seed"] == 0 and not t["final_only"] for name in t["methods"]}
    # evaluations: a model (a method after a step) on a task's test split; zero-shot's once per task
    evaluated = 0
    for spec in specs:
        if spec.name in zero_shot:
            evaluated += n
            continue
        for t in [n - 1] if spec.name in final else range(n):
            evaluated += n if config.eval_future else t + 1
    merges = sum(1 if spec.name in final else n for spec in specs if spec.rule is not None)
    # on the validation splits: every row again with eval_val; lam: auto scores each lam of its grid
    # on the tasks seen at every step
    val_evaluated = evaluated if config.eval_val else 0
    for spec in specs:
        given = config.method_options.get(spec.name, {})
        if spec.rule is not None and given.get("lam") == "auto":
            grid = len(given.get("lam_grid") or LAM_GRID)
            val_evaluated += grid * sum(t + 1 for t in ([n - 1] if spec.name in final else range(n)))
    test_examples = sum(task["test"] for task in tasks)
    mean_test = test_examples / n
    train_examples = sum(t["steps_per_seed"] for t in trainings) * settings.batch_size
    eval_examples = round(evaluated * mean_test)
    eval_examples += round(val_evaluated * sum(task["val"] for task in tasks) / n)
    seeds = len(run_seeds(config))  # with data.orders, each seed's orders are seeds of the run
    # an independent training (each task from theta_0) is trained in a seed's first order only
    steps = sum(t["steps_per_seed"] * (len(config.seeds) if t["independent"] else seeds) for t in trainings)
    return {
        "config": source,
        "name": config.name,
        "out": str(out) if out is not None else None,
        "device": str(device),
        "seeds": run_seeds(config),
        "orders": config.data.orders,
        "scenario": {
            "kind": scenario.kind,
            "name": scenario.name,
            "source": config.data.source,
            "classes": scenario.num_classes,
            "seed": seed,
            "tasks": tasks,
        },
        "train": {"batch_size": settings.batch_size, "epochs": settings.epochs},
        "trainings": trainings,
        "training_steps_per_seed": sum(t["steps_per_seed"] for t in trainings),
        "training_steps": steps,
        "evaluations_per_seed": evaluated,
        "val_evaluations_per_seed": val_evaluated,
        "merges_per_seed": merges,
        "cost": {
            "unit": "forward passes over one example (a training example about 3: forward and backward)",
            "train_per_seed": 3 * train_examples,
            "eval_per_seed": eval_examples,
            "total": 3 * steps * settings.batch_size + seeds * eval_examples,
        },
    }


def format_plan(p: dict[str, Any]) -> str:
    scenario, tasks, seeds = p["scenario"], p["scenario"]["tasks"], p["seeds"]
    n, s = len(tasks), len(seeds)
    lines = [
        f"dry run of {p['config']} ({p['name']}): nothing is trained, no run directory is created",
        f"device: {p['device']}",
        f"seeds: {', '.join(map(str, seeds))}",
        f"scenario: {scenario['name'] or scenario['kind'] + '-incremental'}, "
        f"source {scenario['source']}, {n} tasks, {scenario['classes']} classes (as cut for seed {scenario['seed']})",
    ]
    for i, task in enumerate(tasks):
        names = ", ".join(task["class_names"][:5]) + (", ..." if len(task["class_names"]) > 5 else "")
        lines.append(
            f"  task {i + 1} {task['name']!r}: {task['classes']} classes ({names}); "
            f"examples train {task['train']}, val {task['val']}, test {task['test']}"
        )
    methods = sum(len(t["methods"]) for t in p["trainings"])
    lines.append(f"trainings ({methods} methods share {len(p['trainings'])} trainings):")
    for t in p["trainings"]:
        if t["steps_per_seed"] == 0 and not t["final_only"]:
            how = "no training"
        elif t["final_only"]:
            how = f"once, on all tasks at the last step: {t['steps_per_seed']} steps per seed"
        else:
            start = "continues from its previous model" if t["continues"] else "each task from theta_0"
            how = f"{start}; {t['steps_per_seed']} steps per seed"
        lines.append(f"  {t['training']:<12} -> {', '.join(t['methods'])} ({how})")
    train = p["train"]
    lines.append(
        f"training steps: {p['training_steps_per_seed']} per seed, {p['training_steps']} in all "
        f"(train examples / batch size {train['batch_size']}, rounded up, x {train['epochs']:g} epochs, per task "
        "and training; a recipe that trains more, e.g. joint on all tasks seen or in two stages, takes more"
        + (
            "; a training whose tasks each start from theta_0, e.g. ind_ft, is trained once per seed and "
            "shared by its task orders)"
            if p["orders"] > 1
            else ")"
        )
    )
    lines.append(
        f"evaluations: {p['evaluations_per_seed']} per seed, {p['evaluations_per_seed'] * s} in all "
        f"(a model -- a method after a step -- on one task's test split; {p['merges_per_seed']} merges per seed)"
    )
    if p["val_evaluations_per_seed"]:
        lines.append(
            f"  and {p['val_evaluations_per_seed']} per seed on validation splits (eval_val: true; lam: auto "
            "scores each lam of its grid on the tasks seen)"
        )
    cost = p["cost"]
    lines.append(
        f"cost estimate: about {cost['total']:,} {cost['unit']}; "
        f"per seed {cost['train_per_seed']:,} training + {cost['eval_per_seed']:,} evaluation. "
        "Time per forward pass depends on the model and the machine: not estimated here"
    )
    if p["out"] is not None:
        lines.append(f"run directory (not created): {p['out']}")
    return "\n".join(lines)


def dry_run(config_name: str | Path | None, out: str | Path | None = None) -> dict[str, Any]:
    """``mergecl run CONFIG --dry-run``: the config read and checked as ``load_config`` does, then its plan."""
    from mergecl.experiment.config import DEFAULT_CONFIG, load_config, resolve_config_path

    config = load_config(config_name)
    source = str(resolve_config_path(config_name) if config_name is not None else DEFAULT_CONFIG)
    return plan(config, source, out)
