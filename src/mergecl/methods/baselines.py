"""The baseline training methods: Seq-FT, Ind-FT, joint training, zero-shot, LwF and EWC.

Each is one ``register_training`` call at the bottom: training name (its directory in a run), the
method name a config lists, a summary, whether it continues from its own previous model, its step
and its options. ``seq`` and ``ind`` are also the task vectors that merge rules combine
(``magmax`` = ``seq_ft+magmax``, ``ind_ft+magmax``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mergecl.methods.trainings import Step, StepResult, joint_data, register_training, train_classes
from mergecl.options import Options
from mergecl.training.fisher import diagonal_fisher
from mergecl.training.regularizers import EWC, LwF, online_fisher


class JointOptions(Options):
    final_only: bool = False  # train once, on every task, at the last step (no rows before it)


class LwFOptions(Options):
    lam: float = Field(0.3, ge=0)
    temperature: float = Field(2.0, gt=0)


class EWCOptions(Options):
    lam: float = Field(1e6, ge=0)
    decay: float = Field(0.5, ge=0, le=1)  # F <- decay F + (1 - decay) F_t
    fisher_labels: Literal["predicted", "true"] = "predicted"


def plain_step(step: Step) -> StepResult:
    return StepResult(step.train())


def joint_step(step: Step) -> StepResult:
    scenario, t = step.scenario, step.t
    # one head over every class seen (task-incremental too: its per-task heads are column subsets)
    classes = scenario.seen_classes(t) if scenario.kind != "domain" else train_classes(scenario, t)
    return StepResult(step.train(joint_data(scenario, t), classes))


def lwf_step(step: Step) -> StepResult:
    hooks = []
    if step.t > 0:
        scenario = step.scenario
        old = scenario.seen_classes(step.t - 1) if scenario.kind != "domain" else train_classes(scenario, step.t)
        hooks.append(LwF(step.learner, old, lam=step.options.lam, temperature=step.options.temperature))
    return StepResult(step.train(hooks=hooks))


def ewc_step(step: Step) -> StepResult:
    hooks = []
    if step.t > 0 and step.carried is not None:
        anchor = {n: p.detach().clone() for n, p in step.learner.named_parameters() if p.requires_grad}
        hooks.append(EWC(anchor, step.carried, lam=step.options.lam))
    stats = step.train(hooks=hooks)
    fisher = diagonal_fisher(
        step.learner,
        step.task.train,
        train_classes(step.scenario, step.t),
        step.scenario.num_classes,
        labels=step.options.fisher_labels,
    )
    return StepResult(stats, online_fisher(step.carried, fisher, decay=step.options.decay))


register_training(
    "seq", plain_step, method="seq_ft", summary="sequential fine-tuning: task t starts from the model after task t-1"
)
register_training(
    "ind",
    plain_step,
    method="ind_ft",
    continues=False,
    independent=True,
    summary="independent fine-tuning: every task starts from theta_0",
)
register_training(
    "joint",
    joint_step,
    continues=False,
    options=JointOptions,
    summary="joint training on all tasks seen so far, from theta_0 (upper bound)",
)
register_training("zero_shot", None, continues=False, summary="no training: theta_0 (lower bound)")
register_training(
    "lwf",
    lwf_step,
    options=LwFOptions,
    summary="sequential fine-tuning + distillation of the previous model on old classes",
)
register_training("ewc", ewc_step, options=EWCOptions, summary="sequential fine-tuning + EWC penalty (online Fisher)")
