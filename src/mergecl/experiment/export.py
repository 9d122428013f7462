"""`mergecl export`: the model a method of a run has after a step, as a directory that loads without
mergecl.

The weights are exactly those the run evaluated: theta_0 and the task vectors the run stored
(``seedN/base.safetensors``, ``seedN/<training>/task<t>.safetensors``), combined as the runner
combines them (``methods/merged.py``'s ``merged_model`` for a merge; ``lam: auto`` takes the lam
the run chose at that step, recorded in progress.json). LoRA adapters are folded into the weights
(peft's merge), so the export is a plain model. The encoder and the head are written apart:

DIR/
  model.safetensors         the encoder: a backbone that declares ``export`` (``hf_text``,
                            ``hf_clip``) gives its own library's model, loadable as it is
                            (``transformers.AutoModel.from_pretrained(DIR)``, and
                            ``sentence_transformers.SentenceTransformer(DIR)`` when the base was a
                            sentence-transformers model); any other backbone, the encoder's state
                            dict as mergecl's backbone builds it (``mergecl_head.json`` says which)
  config.json, tokenizer..  the base model's other files (``merging.engine.companion_files``)
  mergecl_head.safetensors  the head: ``weight`` [classes, dim] (and ``bias`` for a linear head)
  mergecl_head.json         class names in head order, the head's kind and logit formula (zero-shot:
                            ``scale * normalize(features) @ weight.T``; linear: ``features @ weight.T
                            + bias``), how features are computed, the task sequence, the run
  README.md                 a model card: base, method, tasks, the run's numbers for the method
  .mergecl-output           the marker of a mergecl output (``--force`` replaces only such a folder)

The directory is written atomically, never over what mergecl did not write
(``merging.checkpoints.check_output``, ``--force`` as for ``mergecl merge``). A run that kept no
tensors (``keep_vectors: false``) cannot be exported afterwards: its config's ``export:`` key does
it at the end of the run (``Runner.export_models``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from mergecl.errors import MergeclError
from mergecl.evaluation.results import RunResults
from mergecl.experiment.config import RunConfig, load_config
from mergecl.experiment.rundir import RunDir
from mergecl.merging.checkpoints import check_output, write_checkpoint
from mergecl.merging.engine import companion_files
from mergecl.methods.merged import TaskVectors, merged_model
from mergecl.methods.registry import MethodSpec, resolve_methods
from mergecl.methods.trainings import registered_training
from mergecl.models.base import Learner
from mergecl.models.factory import build_learner
from mergecl.models.heads import LinearHead, ZeroShotHead
from mergecl.models.lora import lora_pairs
from mergecl.models.registry import Standalone, check_model_spec

__all__ = ["HEAD_INFO", "HEAD_WEIGHTS", "Exported", "export", "export_model", "read_head", "write_model"]

HEAD_WEIGHTS = "mergecl_head.safetensors"
HEAD_INFO = "mergecl_head.json"
EXPORT_VERSION = 1


@dataclass(frozen=True)
class Exported:
    """What ``export`` wrote."""

    path: Path
    method: str
    seed: int
    step: int  # 1-based: the model after this step
    num_steps: int
    standalone: bool  # a model of its own library (transformers), or the encoder's mergecl state dict
    what: str  # the directory's content, in words

    def __str__(self) -> str:
        return f"{self.method} (seed {self.seed}, step {self.step} of {self.num_steps}) to {self.path}: {self.what}"


def export(
    run_dir: str | os.PathLike,
    method: str,
    out: str | os.PathLike,
    *,
    seed: int | None = None,
    step: int | None = None,
    force: bool = False,
) -> Exported:
    """Write the model ``method`` of the run in ``run_dir`` has after ``step`` (1-based; default: the
    last step evaluated) on ``seed`` (default: the run's first seed) to the directory ``out``.

    >>> done = export("runs/clinc", "magmax", "magmax-model")  # doctest: +SKIP
    >>> import transformers
    >>> model = transformers.AutoModel.from_pretrained(done.path)  # doctest: +SKIP
    """
    rundir = RunDir(run_dir)
    if not rundir.path.is_dir():
        raise MergeclError(f"{rundir.path}: no such run directory")
    if not rundir.is_run():
        raise MergeclError(f"{rundir.path}: not a mergecl run (no mergecl-run.json, nor config.yaml + progress.json)")
    config = load_config(rundir.config_path)
    return export_model(rundir, config, rundir.read_progress(), method, out, seed=seed, step=step, force=force)


def export_model(
    rundir: RunDir,
    config: RunConfig,
    progress: Mapping[str, Any],
    method: str,
    out: str | os.PathLike,
    *,
    seed: int | None = None,
    step: int | None = None,
    force: bool = False,
) -> Exported:
    """``export`` of an open run (its config and progress in hand: the runner's ``export:`` key)."""
    from mergecl.experiment.runner import run_scenario

    spec = _method(rundir, config, method)
    seed = config.seeds[0] if seed is None else seed
    if seed not in config.seeds:
        raise MergeclError(f"{rundir.path}: seed {seed} is not a seed of this run (its seeds: {config.seeds})")
    seed_progress = progress["seeds"].get(str(seed), {})
    t = _step(rundir, seed_progress, method, seed, step)
    paths = _tensors(rundir, config, spec, seed, t)
    out = Path(out)
    check_output(out, [rundir.seed_dir(seed)], force)

    scenario = run_scenario(config, seed)
    torch.manual_seed(seed)  # as the runner builds it (a random head or encoder is replaced by theta_0 below)
    learner = build_learner(config.model, scenario.class_names, "cpu")
    base = rundir.load_tensors(rundir.base_path(seed))
    weights = _weights(config, spec, seed, t, base, paths, learner, seed_progress)
    learner.load_state_dict(weights)
    info = {
        "mergecl_export": EXPORT_VERSION,
        "run": str(rundir.path),
        "config": config.name,
        "method": method,
        "seed": seed,
        "step": t + 1,
        "num_steps": len(scenario.tasks),
        "class_names": list(scenario.class_names),
        "scenario": scenario.kind,
        "tasks": [{"name": task.name, "classes": list(task.classes)} for task in scenario.tasks],
        "classes_seen": scenario.seen_classes(t),
    }
    own_format, what = write_model(
        out, learner, config.model, info, lambda info, what: _card(rundir, info, seed_progress, what)
    )
    return Exported(out, method, seed, t + 1, len(scenario.tasks), own_format, what)


def write_model(
    out: Path,
    learner: Learner,
    model_spec: Mapping[str, Any],
    info: dict[str, Any],
    card: Callable[[dict[str, Any], str], str],
) -> tuple[bool, str]:
    """Write ``learner`` (built from ``model_spec``; its LoRA adapters are folded in, in place) as
    an export directory ``out`` (see the module docstring), atomically. ``info``: what
    mergecl_head.json records besides the model's own entries (class names, tasks, where the model
    comes from); ``card(info, what)``: the model card. Returns (a model of its own library?, what
    the directory holds, in words)."""
    encoder = _plain_state(learner.encoder)
    head, head_info = _head(learner.head)
    model = check_model_spec(model_spec)
    standalone = model.backbone.export(model, encoder) if model.backbone.export is not None else None
    own_format = standalone is not None
    if standalone is None:
        standalone = Standalone(
            encoder,
            loads_with=f"the state dict of mergecl's {model.name} encoder: build_learner(mergecl_head.json's model, "
            "class_names).encoder.load_state_dict(safetensors.torch.load_file(DIR/model.safetensors))",
            features=f"the {model.name} encoder's output",
        )
        what = f"the {model.name} encoder's weights (model.safetensors, mergecl's names: no standalone format)"
    else:
        what = f"loads with {standalone.loads_with}"
    what += f"; the head in {HEAD_WEIGHTS} + {HEAD_INFO}"
    info = {
        **info,
        "backbone": model.name,
        "model": {key: value for key, value in model_spec.items() if key != "lora"},  # adapters folded in
        "format": "standalone" if own_format else "encoder_state",
        "loads_with": standalone.loads_with,
        "features": standalone.features,
        "head": head_info,
    }
    files: dict[str, Path | bytes] = dict(companion_files(standalone.files_from)) if standalone.files_from else {}
    files.update(standalone.files)
    files[HEAD_WEIGHTS] = save(head, metadata={"format": "pt"})
    files[HEAD_INFO] = (json.dumps(info, indent=1) + "\n").encode("utf-8")
    files["README.md"] = card(info, what).encode("utf-8")
    tensors = {key: value.detach().cpu().contiguous() for key, value in standalone.weights.items()}
    specs = [(key, value.dtype, tuple(value.shape)) for key, value in tensors.items()]
    chunks = (value.reshape(-1) for value in tensors.values())
    where = {k: info[k] for k in ("method", "seed", "step") if k in info}
    metadata = {"format": "pt", "mergecl_export": json.dumps(where)}
    write_checkpoint(out, specs, chunks, metadata, extra_files=files)
    return own_format, what


def read_head(directory: str | os.PathLike) -> tuple[dict[str, Any], nn.Module] | None:
    """(mergecl_head.json, the head module) of an export directory; None when it has no head files."""
    from mergecl.merging.checkpoints import read_safetensors

    directory = Path(directory)
    if not (directory / HEAD_INFO).is_file():
        return None
    try:
        info = json.loads((directory / HEAD_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MergeclError(f"{directory / HEAD_INFO}: cannot be read ({err})") from None
    names = info.get("class_names") if isinstance(info, dict) else None
    if not isinstance(info, dict) or not isinstance(info.get("head"), dict) or not isinstance(names, list):
        raise MergeclError(f"{directory / HEAD_INFO}: not a mergecl head (no 'head' and 'class_names')")
    tensors = read_safetensors(directory / HEAD_WEIGHTS)
    kind = info["head"].get("type")
    if kind == "zero_shot":
        head: nn.Module = ZeroShotHead(tensors["weight"], scale=float(info["head"]["scale"]))
        head.load_state_dict({"weight": tensors["weight"]})  # as written: not normalised a second time
    elif kind == "linear":
        weight = tensors["weight"]
        head = LinearHead(weight.shape[1], weight.shape[0])
        head.load_state_dict({"weight": weight, "bias": tensors["bias"]})
    else:
        raise MergeclError(f"{directory / HEAD_INFO}: head type {kind!r} (expected zero_shot or linear)")
    return info, head


# --- the model ----------------------------------------------------------------------------------


def _method(rundir: RunDir, config: RunConfig, method: str) -> MethodSpec:
    specs = {spec.name: spec for spec in resolve_methods(config.methods)}
    if method not in specs:
        raise MergeclError(f"{rundir.path}: no method {method!r} in this run (its methods: {', '.join(specs)})")
    return specs[method]


def _step(rundir: RunDir, seed_progress: Mapping[str, Any], method: str, seed: int, step: int | None) -> int:
    """The 0-based step to export: ``step`` (1-based) if the run evaluated it, else the last evaluated."""
    failed = seed_progress.get("failed", {}).get(method)
    if failed:
        raise MergeclError(f"{rundir.path}: {method} failed on seed {seed} ({failed}); it has no model to export")
    rows = seed_progress.get("rows", {}).get(method, [])
    done = [t for t, row in enumerate(rows) if row is not None]
    if not done:
        raise MergeclError(f"{rundir.path}: {method} has no evaluated step on seed {seed} yet")
    if step is None:
        return done[-1]
    if step - 1 not in done:
        steps = f"step {done[0] + 1}" if len(done) == 1 else f"steps {done[0] + 1}-{done[-1] + 1}"
        raise MergeclError(f"step {step}: out of range; {method} on seed {seed} of {rundir.path} has {steps}")
    return step - 1


def _tensors(rundir: RunDir, config: RunConfig, spec: MethodSpec, seed: int, t: int) -> list[Path]:
    """The task-vector files of the model after step t (checked present, with theta_0)."""
    paths = []
    if registered_training(spec.training).step is not None:
        paths = [rundir.vector_path(seed, spec.training, i) for i in range(t + 1)]
        if spec.rule is None:
            paths = paths[-1:]
    missing = [path for path in [rundir.base_path(seed), *paths] if not path.is_file()]
    if missing:
        if not config.keep_vectors:
            raise MergeclError(
                f"{rundir.path}: the run kept no tensors (keep_vectors: false); export with the config key "
                f"`export: [{spec.name}]`, which writes RUN/export/{spec.name}/ at the end of the run"
            )
        raise MergeclError(f"{rundir.path}: {missing[0].relative_to(rundir.path)} is missing; it cannot be exported")
    return paths


def _weights(config: RunConfig, spec: MethodSpec, seed: int, t: int, base, paths, learner: Learner, seed_progress):
    """The full state the run evaluated for ``spec`` after step t (``Runner.weights``, with an auto lam
    taken from the run's record instead of chosen again)."""
    from mergecl.experiment.runner import Runner
    from mergecl.models.base import tuned_keys

    if registered_training(spec.training).step is None:
        return base
    if spec.rule is None:
        return Runner.rebuild(base, RunDir.load_tensors(paths[-1]))
    options = dict(config.method_options.get(spec.name, {}))
    if options.get("lam") == "auto":
        recorded = seed_progress.get("method_info", {}).get(spec.name, {}).get(str(t), {})
        if "lam" not in recorded:
            raise MergeclError(f"progress.json: no lam recorded for {spec.name} at step {t + 1} of seed {seed}")
        options["lam_grid"] = [recorded["lam"]]  # the same computation as the run's, with its choice
    vectors = TaskVectors(paths, base, tuned_keys(learner), RunDir.load_tensors, lora_pairs(learner))
    merged = merged_model(spec.rule, vectors, options, seed, lambda state: [0.0], f"method_options.{spec.name}")
    return merged.state


@torch.no_grad()
def _plain_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's state with LoRA adapters merged into their layers (peft's merge) and removed:
    the keys of the plain model."""
    from peft.tuners.lora import LoraLayer

    for module in encoder.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    state = {}
    for key, value in encoder.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    return state


def _head(head: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if isinstance(head, ZeroShotHead):
        info = {"type": "zero_shot", "scale": head.scale, "logits": "scale * normalize(features) @ weight.T"}
        return {"weight": head.weight.detach().cpu().contiguous()}, info
    if isinstance(head, LinearHead):
        tensors = {"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu().contiguous()}
        return tensors, {"type": "linear", "logits": "features @ weight.T + bias"}
    raise MergeclError(f"export: a head of type {type(head).__name__} cannot be written")


# --- the model card -----------------------------------------------------------------------------


def _card(rundir: RunDir, info: dict[str, Any], seed_progress: Mapping[str, Any], what: str) -> str:
    method, seed, step = info["method"], info["seed"], info["step"]
    row = seed_progress["rows"][method][step - 1]
    lines = [
        "---",
        "tags: [mergecl, continual-learning]",
        "---",
        f"# {method}, exported by mergecl",
        "",
        f"The model of method `{method}` after step {step} of {info['num_steps']} (seed {seed}) of the run "
        f"`{info['config']}` ({rundir.path.name}); its weights are exactly those the run evaluated.",
        "",
        f"- backbone: `{info['backbone']}`, model block `{json.dumps(info['model'], sort_keys=True)}`",
        f"- what is here: {what}",
        f"- load: {info['loads_with']}",
        f"- features: {info['features']}",
        f"- head: {info['head']['type']}, logits = {info['head']['logits']} ({HEAD_WEIGHTS}; class names in "
        f"{HEAD_INFO})",
        "",
        f"## Tasks ({info['scenario']}-incremental)",
        "",
        "| step | task | accuracy after step " + str(step) + " |",
        "|---:|:---|---:|",
    ]
    for i, task in enumerate(info["tasks"]):
        accuracy = f"{row[i]:.2f}" if i < len(row) and row[i] is not None else "-"
        lines.append(f"| {i + 1} | {task['name']} | {accuracy} |")
    results = rundir.read_json("results.json")
    if results is not None:
        entry = RunResults.from_json(results).methods.get(method)
        summary = entry.seeds.get(str(seed)) if entry is not None and entry.seeds else entry
        if summary is not None and getattr(summary, "failed", None) is None:
            lines += ["", f"## The run's numbers for {method} (seed {seed}, percent)", ""]
            for metric in ("final_acc", "avg_incremental_acc", "bwt", "forgetting", "all_class_acc"):
                value = summary.value(metric)
                if value is not None:
                    lines.append(f"- {metric}: {value:.2f}")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import json, torch",
        "from safetensors.torch import load_file",
        "head, info = load_file('DIR/mergecl_head.safetensors'), json.load(open('DIR/mergecl_head.json'))",
        "# features as 'features' above, then the logits of the head; the class is info['class_names'][argmax]",
        "```",
        "",
        "`mergecl eval DIR CONFIG` gives its accuracy on each task of a config's scenario.",
        "",
    ]
    return "\n".join(lines)
