"""`mergecl eval MODEL CONFIG`: the accuracy of one model on each task of a config's scenario, with
the metrics and tables of a run.

MODEL is a directory: an export (``mergecl export``, or a run's ``export:`` key: its head files say
the classes and the head), or a Hugging Face model directory without a head (e.g. ``mergecl merge``
into a directory), whose zero-shot head is built from the config's class names through the backbone
(as a run builds theta_0's). The model is built as the config's ``model:`` block says, from MODEL's
weights (LoRA, if the config has it, is already folded into an export).

The scenario is the config's for one seed (``seed``; default: the config's first seed): its tasks'
test splits, evaluated as the runner evaluates a step's row (``Runner.row``: the classes seen after
the step, plus the task's own; task-incremental: the task's own; domain: all), after the export's
step (an export of step t of a run reproduces the run's row t) or else the last step. The result
is typed like a run's: a one-method ``RunResults`` evaluated "final only" (its final ACC is the mean
over the tasks seen by that step), plus the per-task accuracies.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergecl.errors import MergeclError
from mergecl.evaluation.report import format_table
from mergecl.evaluation.results import MethodResult, RunMeta, RunResults, SeedSummary
from mergecl.experiment.config import RunConfig, load_config, parse_config
from mergecl.experiment.export import read_head
from mergecl.experiment.runner import Runner, pick_device, run_scenario
from mergecl.merging.checkpoints import read_safetensors
from mergecl.models.factory import build_learner
from mergecl.models.registry import check_inputs, check_model_spec
from mergecl.training.loop import accuracy_from_logits, predict_splits

__all__ = ["Evaluation", "as_config", "evaluate"]


@dataclass(frozen=True)
class Evaluation:
    """One model on a config's scenario."""

    model: Path
    name: str  # the method it came from (an export), else the directory's name
    config: str
    seed: int  # the seed whose scenario was evaluated
    step: int  # 1-based: the columns are those of the run's row after this step
    task_names: list[str]
    accuracies: list[float]  # per task, percent (tasks after ``step`` only with the config's eval_future)
    results: RunResults  # one method, as a run's results.json types it

    @property
    def final_acc(self) -> float:
        """The mean accuracy over the tasks seen by ``step`` (the run's ACC after that step)."""
        return self.results.methods[self.name].final_acc

    @property
    def all_class_acc(self) -> float | None:
        return self.results.methods[self.name].all_class_acc

    def table(self) -> str:
        """Per-task accuracies, then the run's table of metrics."""
        width = max(len(name) for name in self.task_names[: len(self.accuracies)])
        lines = [f"{'task'.ljust(width)}  accuracy", f"{'-' * width}  --------"]
        lines += [f"{n.ljust(width)}  {a:8.2f}" for n, a in zip(self.task_names, self.accuracies, strict=False)]
        where = f"seed {self.seed}'s scenario of {self.config}, columns of step {self.step} of {len(self.task_names)}"
        return "\n".join(lines) + f"\n({where})\n\n" + format_table(self.results)


def as_config(config: RunConfig | str | os.PathLike | Mapping[str, Any] | None) -> RunConfig:
    """A run config from a RunConfig, a YAML path, a packaged config's name, a dict, or None (the
    embedded default)."""
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, Mapping):
        return parse_config(dict(config), "config")
    return load_config(config)


def evaluate(
    model: str | os.PathLike,
    config: RunConfig | str | os.PathLike | Mapping[str, Any],
    *,
    seed: int | None = None,
    step: int | None = None,
) -> Evaluation:
    """The accuracy of the model in directory ``model`` on each task of ``config``'s scenario for
    ``seed`` (default: the config's first seed), with the columns of step ``step`` (1-based; default:
    the export's step, else the last).

    >>> result = evaluate("magmax-model", "my-run.yaml")  # doctest: +SKIP
    >>> result.accuracies, result.final_acc  # doctest: +SKIP
    """
    config = as_config(config)
    directory = Path(model)
    if not directory.is_dir():
        raise MergeclError(f"{directory}: no such model directory (an export of mergecl export, or a HF model)")
    seed = config.seeds[0] if seed is None else seed
    scenario = run_scenario(config, seed)
    check_inputs(config.model, scenario.tasks[0].train.kind, config.data.source)
    device = pick_device(config.device)
    head = read_head(directory)
    if head is None:  # a model without a head: the config's zero-shot head, built through the backbone
        block = {**_plain(config.model), "pretrained": str(directory)}
        if check_model_spec(block).head != "zero_shot":
            raise MergeclError(
                f"{directory}: no mergecl_head.json, and the config's model has no zero-shot head to build "
                "(a linear head is trained: export the run's model with mergecl export)"
            )
        learner = build_learner(block, scenario.class_names, device)
        name, exported_step = directory.name, None
    else:
        info, module = head
        block = {**_plain(info.get("model") or config.model), "head": "linear"}
        if info.get("format") == "standalone":
            block["pretrained"] = str(directory)
        learner = build_learner(block, scenario.class_names, device)
        if info.get("format") != "standalone":
            learner.encoder.load_state_dict(read_safetensors(directory / "model.safetensors"))
        learner.head = _in_order(module, list(info["class_names"]), scenario.class_names, directory).to(device)
        name, exported_step = str(info.get("method") or directory.name), info.get("step")
    last = len(scenario.tasks)
    if step is None:
        step = exported_step if isinstance(exported_step, int) and 1 <= exported_step <= last else last
    if not 1 <= step <= last:
        raise MergeclError(f"step {step}: out of range; the scenario has steps 1-{last}")
    t = step - 1
    tasks = scenario.tasks if config.eval_future else scenario.tasks[: t + 1]
    logits = predict_splits(learner, [task.test for task in tasks], config.train.eval_batch_size, f"evaluating {name}")
    row = Runner.row(scenario, t, "test", logits)
    all_class = None
    if t == last - 1:  # as a run: the all-class accuracy of the model after the last step
        labels = torch.cat([task.test.labels for task in scenario.tasks])
        all_class = accuracy_from_logits(torch.cat(logits), labels, list(range(scenario.num_classes)))
    summary = SeedSummary.of_final_row(row[: t + 1], all_class)
    meta = RunMeta(
        config=config.name,
        scenario=scenario.name or scenario.kind,
        kind=scenario.kind,
        task_names=[task.name for task in scenario.tasks],
        num_tasks=last,
        seeds=[seed],
    )
    results = RunResults({name: MethodResult.mean_of({str(seed): summary})}, meta)
    return Evaluation(directory, name, config.name, seed, step, meta.task_names or [], row, results)


def _plain(model: Mapping[str, Any]) -> dict[str, Any]:
    """A model block without LoRA (an export has its adapters folded in)."""
    return {key: value for key, value in model.items() if key != "lora"}


def _in_order(head: torch.nn.Module, names: list[str], wanted: list[str], directory: Path) -> torch.nn.Module:
    """The head with its rows in the order of ``wanted`` (the scenario's class names)."""
    if names == wanted:
        return head
    if sorted(names) != sorted(wanted):
        extra = sorted(set(wanted) - set(names))[:3] or sorted(set(names) - set(wanted))[:3]
        raise MergeclError(
            f"{directory}: the head's {len(names)} classes are not the config's {len(wanted)} (e.g. {extra}); "
            "evaluate with the config of the run it came from"
        )
    index = torch.tensor([names.index(name) for name in wanted])
    head.load_state_dict({key: value[index] for key, value in head.state_dict().items()})
    return head
