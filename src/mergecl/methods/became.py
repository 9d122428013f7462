"""BECAME (Bayesian continual learning with adaptive model merging, METHODS.md §2) and GPM.

Streams (method name = stream name; options under ``method_options.<name>``):

- ``gpm``: gradient projection memory alone. Task 1 plain training; later tasks projected
  training from the previous model; then the memory update.
- ``became``: per task t (METHODS.md §2) -- t = 1: plain training, Lambda_1 = F(theta*_1).
  t >= 2: stage 1 projected training from theta*_{t-1} -> theta_gp; stage 2 unprojected training
  from a copy of theta_gp with a fresh optimiser -> theta_hat; F at theta_hat;
  lam* = sum F d^2 / sum (F + Lambda_{t-1}) d^2 with d = theta_hat - theta_gp;
  theta*_t = (1 - lam*) theta_gp + lam* theta_hat; Lambda_t = F(theta*_t) + gamma Lambda_{t-1};
  GPM memory update from theta*_t. The merged model is the stream's model; lam* is logged.
- ``gpm_one_over_t``: the same two stages, merged with lam = 1/t (no Fisher).
- ``seq_became``: BECAME's merge on plain sequential fine-tuning (no projection, one stage):
  theta*_{t-1} -> theta_hat, merged with theta*_{t-1} as theta_gp.

Options (defaults): ``eps`` 0.97 and ``eps_step`` 0.003 (the threshold after task t, 0-based, is
eps + eps_step * t, at most 1), ``samples`` 125 (examples for the representations),
``project_head`` "auto" (project the head only when it is shared by every task: domain-incremental
and permuted scenarios, as GPM's permuted-MNIST code; task- and class-incremental heads are not
projected), ``stage2_epochs`` / ``stage2_lr`` (default: the train section's epochs and lr, as the
release's run script: lr2 = lr, the same epoch budget), ``gamma`` 1.0, ``fisher_labels``
"predicted" (or "true").

Carried state (saved after every step, so runs resume): the GPM bases (``gpm/<layer>``) and the
prior precision Lambda_t (``prior/<parameter>``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from mergecl.errors import MergeclError
from mergecl.merging.engine import merge_checkpoints
from mergecl.methods.streams import Step, StepResult, Stream, register, train_classes
from mergecl.models.base import Learner
from mergecl.training.fisher import diagonal_fisher
from mergecl.training.gpm import (
    GPMemory,
    GradientProjection,
    eps_at,
    frozen,
    projectable_layers,
    unprojected_params,
)
from mergecl.training.loop import TrainStats, train_task

PRIOR_PREFIX = "prior/"
GPM_OPTIONS: dict[str, Any] = {"eps": 0.97, "eps_step": 0.003, "samples": 125, "project_head": "auto"}
STAGE2_OPTIONS: dict[str, Any] = {"stage2_epochs": None, "stage2_lr": None}
FISHER_OPTIONS: dict[str, Any] = {"gamma": 1.0, "fisher_labels": "predicted"}


# --- options -----------------------------------------------------------------------------------


def read_options(stream: str, given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with ``given``; an unknown key or a bad value names the key."""
    where = f"method_options.{stream}"
    for key in given:
        if key not in defaults:
            raise MergeclError(f"{where}: unknown option '{key}' (allowed: {', '.join(sorted(defaults))})")
    options = {**defaults, **given}
    for key in ("eps", "eps_step", "gamma", "stage2_epochs", "stage2_lr"):
        value = options.get(key)
        if key in options and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise MergeclError(f"{where}.{key}: expected a number, got {value!r}")
    if "eps" in options and not 0.0 < options["eps"] <= 1.0:
        raise MergeclError(f"{where}.eps: must be in (0, 1], got {options['eps']}")
    if "samples" in options and (not isinstance(options["samples"], int) or options["samples"] < 1):
        raise MergeclError(f"{where}.samples: expected a positive integer, got {options['samples']!r}")
    if "project_head" in options and options["project_head"] not in ("auto", True, False):
        raise MergeclError(f"{where}.project_head: expected auto, true or false, got {options['project_head']!r}")
    if "fisher_labels" in options and options["fisher_labels"] not in ("predicted", "true"):
        raise MergeclError(f"{where}.fisher_labels: expected predicted or true, got {options['fisher_labels']!r}")
    for key in ("stage2_epochs", "stage2_lr"):
        if options.get(key) is not None and options[key] <= 0:
            raise MergeclError(f"{where}.{key}: must be > 0, got {options[key]}")
    return options


def project_head(step: Step, options: dict[str, Any]) -> bool:
    if options["project_head"] == "auto":
        return step.scenario.kind == "domain"  # one head shared by every task (permuted too)
    return bool(options["project_head"])


# --- pieces of a step --------------------------------------------------------------------------


def train_stage(
    step: Step,
    memory: GPMemory | None,
    options: dict[str, Any],
    epochs: float | None = None,
    lr: float | None = None,
    seed_offset: int = 0,
) -> TrainStats:
    """One training run on the step's task (a fresh optimiser). With ``memory``: projected
    gradients and everything but the projected weights frozen (GPM after task 1)."""
    settings = step.settings
    if epochs is not None or lr is not None:
        settings = replace(settings, epochs=epochs or settings.epochs, lr=lr or settings.lr)
    hooks = []
    context: Any = nullcontext()
    if memory is not None:
        head = project_head(step, options)
        layers = projectable_layers(step.learner, head)
        hooks.append(GradientProjection(step.learner, layers, memory.bases))
        context = frozen(unprojected_params(step.learner, layers, head))
    with context:
        return train_task(
            step.learner,
            step.task.train,
            train_classes(step.scenario, step.t),
            step.scenario.num_classes,
            settings,
            step.seed + seed_offset,
            hooks,
            step.desc,
            val=step.task.val,
        )


def update_memory(step: Step, memory: GPMemory, options: dict[str, Any]) -> None:
    layers = projectable_layers(step.learner, project_head(step, options))
    eps = eps_at(step.t, options["eps"], options["eps_step"])
    memory.update(step.learner, step.task.train, layers, eps, options["samples"], step.seed)


def fisher_at(step: Step, options: dict[str, Any]) -> dict[str, Tensor]:
    """Diagonal Fisher of the learner's current weights on the task (the release's batch size)."""
    fisher = diagonal_fisher(
        step.learner,
        step.task.train,
        train_classes(step.scenario, step.t),
        step.scenario.num_classes,
        labels=options["fisher_labels"],
        batch_size=step.settings.batch_size,
    )
    return {k: v.cpu() for k, v in fisher.items()}


def snapshot(learner: Learner) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in learner.state_dict().items()}


def full(state: dict[str, Tensor], partial: dict[str, Tensor]) -> dict[str, Tensor]:
    """``partial`` (keyed by parameter) completed with zeros for every other float tensor of
    ``state`` (buffers, frozen parameters: their d is 0, so they do not change lam*)."""
    return {
        k: partial[k].float() if k in partial else torch.zeros(v.shape, dtype=torch.float32)
        for k, v in state.items()
        if v.is_floating_point()
    }


def became_merge(
    theta_gp: dict[str, Tensor], theta_hat: dict[str, Tensor], fisher: dict[str, Tensor], prior: dict[str, Tensor]
) -> tuple[dict[str, Tensor], float]:
    """theta* = theta_gp + lam* (theta_hat - theta_gp) with BECAME's lam* (by the merge engine)."""
    result = merge_checkpoints(
        theta_gp, [theta_hat], "became", fisher=full(theta_gp, fisher), prior_precision=full(theta_gp, prior)
    )
    assert result.state is not None
    return result.state, float(result.info["lambda"])


def one_over_t_merge(theta_gp: dict[str, Tensor], theta_hat: dict[str, Tensor], t: int) -> dict[str, Tensor]:
    """theta* = (1 - 1/t) theta_gp + (1/t) theta_hat (t 1-based)."""
    result = merge_checkpoints(theta_gp, [theta_hat], "one_over_t", start=t)
    assert result.state is not None
    return result.state


def next_prior(fisher: dict[str, Tensor], prior: dict[str, Tensor] | None, gamma: float) -> dict[str, Tensor]:
    """Lambda_t = F_t(theta*_t) + gamma Lambda_{t-1} (Lambda_1 = F_1)."""
    if prior is None:
        return {k: v.clone() for k, v in fisher.items()}
    return {k: v + gamma * prior[k] if k in prior else v.clone() for k, v in fisher.items()}


def require(prior: dict[str, Tensor] | None, stream: str, t: int) -> dict[str, Tensor]:
    if prior is None:
        raise MergeclError(f"{stream}: step {t + 1} found no prior precision from step {t} (incomplete run directory?)")
    return prior


def read_prior(carried: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    n = len(PRIOR_PREFIX)
    prior = {k[n:]: v for k, v in (carried or {}).items() if k.startswith(PRIOR_PREFIX)}
    return prior or None


def carried_state(memory: GPMemory | None, prior: dict[str, Tensor] | None) -> dict[str, Tensor]:
    out = memory.carried() if memory is not None else {}
    out.update({PRIOR_PREFIX + k: v.detach().cpu().float().contiguous() for k, v in (prior or {}).items()})
    return out


def joined(first: TrainStats, second: TrainStats) -> TrainStats:
    return TrainStats(first.steps + second.steps, first.examples + second.examples, first.losses + second.losses)


# --- streams -----------------------------------------------------------------------------------


def gpm_step(step: Step) -> StepResult:
    options = read_options("gpm", step.options, GPM_OPTIONS)
    memory = GPMemory.from_carried(step.carried)
    stats = train_stage(step, memory if step.t > 0 else None, options)
    update_memory(step, memory, options)
    return StepResult(stats, memory.carried(), {"basis_fill": memory.fill()})


def two_stage(step: Step, options: dict[str, Any], memory: GPMemory) -> tuple[TrainStats, dict, dict]:
    """Stage 1 projected -> theta_gp; stage 2 unprojected, fresh optimiser -> theta_hat (in the learner)."""
    first = train_stage(step, memory, options)
    theta_gp = snapshot(step.learner)
    second = train_stage(step, None, options, options["stage2_epochs"], options["stage2_lr"], seed_offset=1)
    return joined(first, second), theta_gp, snapshot(step.learner)


def became_step(step: Step) -> StepResult:
    options = read_options("became", step.options, {**GPM_OPTIONS, **STAGE2_OPTIONS, **FISHER_OPTIONS})
    memory = GPMemory.from_carried(step.carried)
    prior = read_prior(step.carried)
    info = {"lambda": 1.0}  # task 1: theta*_1 is the trained model
    if step.t == 0:
        stats = train_stage(step, None, options)
    else:
        prior = require(prior, "became", step.t)
        stats, theta_gp, theta_hat = two_stage(step, options, memory)
        merged, info["lambda"] = became_merge(theta_gp, theta_hat, fisher_at(step, options), prior)
        step.learner.load_state_dict(merged)
    prior = next_prior(fisher_at(step, options), prior, options["gamma"])  # second pass, at theta*_t
    update_memory(step, memory, options)
    info["basis_fill"] = memory.fill()
    return StepResult(stats, carried_state(memory, prior), info)


def gpm_one_over_t_step(step: Step) -> StepResult:
    options = read_options("gpm_one_over_t", step.options, {**GPM_OPTIONS, **STAGE2_OPTIONS})
    memory = GPMemory.from_carried(step.carried)
    info = {"lambda": 1.0}
    if step.t == 0:
        stats = train_stage(step, None, options)
    else:
        stats, theta_gp, theta_hat = two_stage(step, options, memory)
        step.learner.load_state_dict(one_over_t_merge(theta_gp, theta_hat, step.t + 1))
        info["lambda"] = 1.0 / (step.t + 1)
    update_memory(step, memory, options)
    info["basis_fill"] = memory.fill()
    return StepResult(stats, carried_state(memory, None), info)


def seq_became_step(step: Step) -> StepResult:
    options = read_options("seq_became", step.options, FISHER_OPTIONS)
    prior = read_prior(step.carried)
    info = {"lambda": 1.0}
    previous = snapshot(step.learner)  # theta*_{t-1}: the theta_gp of this variant
    stats = train_stage(step, None, options)
    if step.t > 0:
        prior = require(prior, "seq_became", step.t)
        merged, info["lambda"] = became_merge(previous, snapshot(step.learner), fisher_at(step, options), prior)
        step.learner.load_state_dict(merged)
    prior = next_prior(fisher_at(step, options), prior, options["gamma"])
    return StepResult(stats, carried_state(None, prior), info)


STREAMS: dict[str, tuple[str, Callable[[Step], StepResult]]] = {
    "gpm": ("GPM: projected training after task 1, memory update after every task", gpm_step),
    "became": ("GPM stage + unprojected stage, merged with BECAME's Bayesian lam*", became_step),
    "gpm_one_over_t": ("GPM stage + unprojected stage, merged with lam = 1/t", gpm_one_over_t_step),
    "seq_became": ("sequential fine-tuning merged with the previous model by BECAME's lam*", seq_became_step),
}
for _name, (_summary, _fn) in STREAMS.items():
    register(Stream(_name, _summary, True, _fn))
