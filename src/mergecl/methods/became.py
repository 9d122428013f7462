"""BECAME (Bayesian continual learning with adaptive model merging, docs/methods.md#became) and GPM.

Trainings (method name = training name; options under ``method_options.<name>``):

- ``gpm``: gradient projection memory alone. Task 1 plain training; later tasks projected
  training from the previous model; then the memory update.
- ``became``: per task t (docs/methods.md#became) -- t = 1: plain training, Lambda_1 = F(theta*_1).
  t >= 2: stage 1 projected training from theta*_{t-1} -> theta_gp; stage 2 unprojected training
  from a copy of theta_gp with a fresh optimiser -> theta_hat; F at theta_hat;
  lam* = sum F d^2 / sum (F + Lambda_{t-1}) d^2 with d = theta_hat - theta_gp;
  theta*_t = (1 - lam*) theta_gp + lam* theta_hat; Lambda_t = F(theta*_t) + gamma Lambda_{t-1};
  GPM memory update from theta*_t. The merged model is the training's model; lam* is logged.
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

from contextlib import nullcontext
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from mergecl.errors import MergeclError
from mergecl.merging.engine import merge_checkpoints
from mergecl.methods.trainings import Step, StepResult, register_training, train_classes
from mergecl.models.base import Learner
from mergecl.options import Options
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


# --- options: one schema per training, built from the three groups -------------------------------


class GPMOptions(Options):
    eps: float = Field(0.97, gt=0, le=1)  # the energy threshold after task 1
    eps_step: float = Field(0.003, ge=0)  # added per task (the threshold is at most 1)
    samples: int = Field(125, ge=1)  # examples for the representations
    project_head: Literal["auto"] | bool = "auto"


class Stage2Options(Options):
    stage2_epochs: float | None = Field(None, gt=0)  # None: the train section's
    stage2_lr: float | None = Field(None, gt=0)


class FisherOptions(Options):
    gamma: float = Field(1.0, ge=0)  # Lambda_t = F_t + gamma Lambda_{t-1}
    fisher_labels: Literal["predicted", "true"] = "predicted"


class BecameOptions(GPMOptions, Stage2Options, FisherOptions):
    pass


class GPMOneOverTOptions(GPMOptions, Stage2Options):
    pass


def project_head(step: Step, options: GPMOptions) -> bool:
    if options.project_head == "auto":
        return step.scenario.kind == "domain"  # one head shared by every task (permuted too)
    return options.project_head


# --- pieces of a step --------------------------------------------------------------------------


def train_stage(
    step: Step,
    memory: GPMemory | None,
    options: Any,
    epochs: float | None = None,
    lr: float | None = None,
    seed_offset: int = 0,
) -> TrainStats:
    """One training run on the step's task (a fresh optimiser). With ``memory``: projected
    gradients and everything but the projected weights frozen (GPM after task 1)."""
    settings = step.settings
    if epochs is not None or lr is not None:
        settings = settings.model_copy(update={"epochs": epochs or settings.epochs, "lr": lr or settings.lr})
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


def update_memory(step: Step, memory: GPMemory, options: GPMOptions) -> None:
    layers = projectable_layers(step.learner, project_head(step, options))
    eps = eps_at(step.t, options.eps, options.eps_step)
    memory.update(step.learner, step.task.train, layers, eps, options.samples, step.seed)


def fisher_at(step: Step, options: FisherOptions) -> dict[str, Tensor]:
    """Diagonal Fisher of the learner's current weights on the task (the release's batch size)."""
    fisher = diagonal_fisher(
        step.learner,
        step.task.train,
        train_classes(step.scenario, step.t),
        step.scenario.num_classes,
        labels=options.fisher_labels,
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


def require(prior: dict[str, Tensor] | None, training: str, t: int) -> dict[str, Tensor]:
    if prior is None:
        raise MergeclError(
            f"{training}: step {t + 1} found no prior precision from step {t} (incomplete run directory?)"
        )
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


# --- trainings ----------------------------------------------------------------------------------


def gpm_step(step: Step) -> StepResult:
    options = step.options
    memory = GPMemory.from_carried(step.carried)
    stats = train_stage(step, memory if step.t > 0 else None, options)
    update_memory(step, memory, options)
    return StepResult(stats, memory.carried(), {"basis_fill": memory.fill()})


def two_stage(step: Step, options: Any, memory: GPMemory) -> tuple[TrainStats, dict, dict]:
    """Stage 1 projected -> theta_gp; stage 2 unprojected, fresh optimiser -> theta_hat (in the learner)."""
    first = train_stage(step, memory, options)
    theta_gp = snapshot(step.learner)
    second = train_stage(step, None, options, options.stage2_epochs, options.stage2_lr, seed_offset=1)
    return joined(first, second), theta_gp, snapshot(step.learner)


def became_step(step: Step) -> StepResult:
    options = step.options
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
    prior = next_prior(fisher_at(step, options), prior, options.gamma)  # second pass, at theta*_t
    update_memory(step, memory, options)
    info["basis_fill"] = memory.fill()
    return StepResult(stats, carried_state(memory, prior), info)


def gpm_one_over_t_step(step: Step) -> StepResult:
    options = step.options
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
    options = step.options
    prior = read_prior(step.carried)
    info = {"lambda": 1.0}
    previous = snapshot(step.learner)  # theta*_{t-1}: the theta_gp of this variant
    stats = train_stage(step, None, options)
    if step.t > 0:
        prior = require(prior, "seq_became", step.t)
        merged, info["lambda"] = became_merge(previous, snapshot(step.learner), fisher_at(step, options), prior)
        step.learner.load_state_dict(merged)
    prior = next_prior(fisher_at(step, options), prior, options.gamma)
    return StepResult(stats, carried_state(None, prior), info)


register_training(
    "gpm", gpm_step, options=GPMOptions, summary="GPM: projected training after task 1, memory update after every task"
)
register_training(
    "became",
    became_step,
    options=BecameOptions,
    summary="GPM stage + unprojected stage, merged with BECAME's Bayesian lam*",
)
register_training(
    "gpm_one_over_t",
    gpm_one_over_t_step,
    options=GPMOneOverTOptions,
    summary="GPM stage + unprojected stage, merged with lam = 1/t",
)
register_training(
    "seq_became",
    seq_became_step,
    options=FisherOptions,
    summary="sequential fine-tuning merged with the previous model by BECAME's lam*",
)
