"""Streams: how each method trains one step; and which logit columns each evaluation uses.

A stream is a name, whether it continues from its own previous model, and a step function: a short
recipe over the training loop and its hooks, no trainer hierarchy. A step starts from weights the
runner gives (theta_0, or theta_0 + tau_{t-1} rebuilt from the run directory, the same way whether
the run was resumed or not) and returns the stream's carried state (EWC's running Fisher) and
per-step info to log (BECAME's lambda*). New methods register a Stream from their own module,
with the schema of their options (``mergecl/options.py``): the config is checked against it when it
is read, and the step gets the typed options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field
from torch import Tensor

from mergecl.data.types import Scenario, Split
from mergecl.options import Options
from mergecl.models.base import Learner
from mergecl.training.fisher import diagonal_fisher
from mergecl.training.loop import TrainSettings, TrainStats, train_task
from mergecl.training.regularizers import EWC, LwF, online_fisher


def train_classes(scenario: Scenario, t: int) -> list[int]:
    """Logit columns task t trains on: its own classes, or every class (domain-incremental)."""
    if scenario.kind == "domain":
        return list(range(scenario.num_classes))
    return list(scenario.tasks[t].classes)


def eval_classes(scenario: Scenario, t: int, i: int) -> list[int]:
    """Columns for A[t][i]: the classes seen after step t, plus task i's own (so a future task's
    zero-shot accuracy is visible); task-incremental: task i's head; domain: all classes."""
    if scenario.kind == "domain":
        return list(range(scenario.num_classes))
    if scenario.kind == "task":
        return list(scenario.tasks[i].classes)
    seen = scenario.seen_classes(t)
    return seen + [c for c in scenario.tasks[i].classes if c not in seen]


def joint_data(scenario: Scenario, t: int) -> Split:
    return Split.concat([task.train for task in scenario.tasks[: t + 1]])


@dataclass
class Step:
    """Everything one step of a stream sees. ``learner`` already holds the step's start weights."""

    learner: Learner
    scenario: Scenario
    t: int
    settings: TrainSettings
    seed: int
    options: Options  # method_options[stream], checked against the stream's schema
    carried: dict[str, Tensor] | None  # the stream's state after step t-1 (None at t = 0)

    @property
    def task(self):
        return self.scenario.tasks[self.t]

    @property
    def desc(self) -> str:
        return f"task {self.t + 1}/{len(self.scenario.tasks)}"

    def train(self, data: Split | None = None, classes: list[int] | None = None, hooks=(), settings=None):
        """Train on this step's task (or ``data`` over ``classes``) with ``hooks``."""
        return train_task(
            self.learner,
            self.task.train if data is None else data,
            train_classes(self.scenario, self.t) if classes is None else classes,
            self.scenario.num_classes,
            settings or self.settings,
            self.seed,
            hooks,
            self.desc,
            val=self.task.val if data is None else None,  # the plateau schedule watches it
        )


@dataclass
class StepResult:
    stats: TrainStats | None = None
    carried: dict[str, Tensor] | None = None  # saved with the step; handed to step t+1
    info: dict[str, float] = field(default_factory=dict)  # logged per step into results.json


@dataclass(frozen=True)
class Stream:
    name: str
    summary: str
    continues: bool  # True: step t starts from the stream's model after t-1; False: from theta_0
    step: Callable[[Step], StepResult] | None  # None: no training (zero-shot)
    options: type[Options] = Options  # the schema of method_options.<method>; default: none


STREAMS: dict[str, Stream] = {}


def register(stream: Stream) -> Stream:
    STREAMS[stream.name] = stream
    return stream


class JointOptions(Options):
    final_only: bool = False  # train once, on every task, at the last step (no rows before it)


class LwFOptions(Options):
    lam: float = Field(0.3, ge=0)
    temperature: float = Field(2.0, gt=0)


class EWCOptions(Options):
    lam: float = Field(1e6, ge=0)
    decay: float = Field(0.5, ge=0, le=1)  # F <- decay F + (1 - decay) F_t
    fisher_labels: Literal["predicted", "true"] = "predicted"


def _plain(step: Step) -> StepResult:
    return StepResult(step.train())


def _joint(step: Step) -> StepResult:
    scenario, t = step.scenario, step.t
    # one head over every class seen (task-incremental too: its per-task heads are column subsets)
    classes = scenario.seen_classes(t) if scenario.kind != "domain" else train_classes(scenario, t)
    return StepResult(step.train(joint_data(scenario, t), classes))


def _lwf(step: Step) -> StepResult:
    hooks = []
    if step.t > 0:
        scenario = step.scenario
        old = scenario.seen_classes(step.t - 1) if scenario.kind != "domain" else train_classes(scenario, step.t)
        hooks.append(LwF(step.learner, old, lam=step.options.lam, temperature=step.options.temperature))
    return StepResult(step.train(hooks=hooks))


def _ewc(step: Step) -> StepResult:
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


register(Stream("seq", "sequential fine-tuning: task t starts from the model after task t-1", True, _plain))
register(Stream("ind", "independent fine-tuning: every task starts from theta_0", False, _plain))
register(
    Stream("joint", "joint training on all tasks seen so far, from theta_0 (upper bound)", False, _joint, JointOptions)
)
register(Stream("zero_shot", "no training: theta_0 (lower bound)", False, None))
register(
    Stream("lwf", "sequential fine-tuning + distillation of the previous model on old classes", True, _lwf, LwFOptions)
)
register(Stream("ewc", "sequential fine-tuning + EWC penalty (online Fisher)", True, _ewc, EWCOptions))
