"""Training methods: how a method trains task after task, declared once, in its own module.

A *training* is a name, the plain method that evaluates its model, a one-line summary, whether step
t continues from its own model after t-1 (or starts from theta_0 again), the schema of its options,
and a step function: a short recipe over the training loop and its hooks, no trainer hierarchy.
``register_training`` is the whole declaration; the method name, ``mergecl`` config checks and the
runner all read it. A step starts from weights the runner gives (theta_0, or theta_0 + tau_{t-1}
rebuilt from the run directory, the same way whether the run was resumed or not) and returns the
training's carried state (EWC's running Fisher) and per-step info to log (BECAME's lambda*).

Names: the training's ``name`` is what a run directory stores (``seedN/<name>/task<t>.safetensors``,
its keys in progress.json) and seeds its steps; its ``method`` is what a config lists (``seq_ft``
trains ``seq``). A tagged method (``pam@zero``) runs the training ``pam`` again as ``pam@zero``, with
its own options; ``registered_training("pam@zero")`` is the registered ``pam``.

The built-in trainings register when ``mergecl.methods`` is imported (``baselines``, ``became``,
``pam``); a plugin (``mergecl/plugins.py``) calls ``register_training`` the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from mergecl.data.types import Scenario, Split
from mergecl.errors import MergeclError
from mergecl.models.base import Learner
from mergecl.options import Options
from mergecl.training.loop import TrainSettings, TrainStats, train_task


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
    """Everything one step of a training sees. ``learner`` already holds the step's start weights."""

    learner: Learner
    scenario: Scenario
    t: int  # the task to train, 0-based
    settings: TrainSettings  # the run config's train section
    seed: int
    options: Options  # the method's options, read by its training's schema
    carried: dict[str, Tensor] | None  # the training's state after step t-1 (None at t = 0)

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
class Training:
    name: str  # its directory in a run and its seeds: never renamed once runs exist
    method: str  # the plain method that evaluates the trained model (``seq_ft`` for ``seq``)
    summary: str
    continues: bool  # True: step t starts from the training's model after t-1; False: from theta_0
    step: Callable[[Step], StepResult] | None  # None: no training, the model is theta_0 (zero-shot)
    options: type[Options] = Options  # the schema of method_options.<method>; default: no options
    # step t depends on task t alone (from theta_0, no carried state): its task vector is the same in
    # every task order of a seed (data.orders), so the runner trains it once per seed
    independent: bool = False


TRAININGS: dict[str, Training] = {}  # by name, in the order registered


def register_training(
    name: str,
    step: Callable[[Step], StepResult] | None,
    *,
    summary: str,
    method: str | None = None,
    continues: bool = True,
    options: type[Options] = Options,
    independent: bool = False,
) -> Training:
    """Declare a training method: the training ``name`` and the plain method ``method`` (default:
    the same name) that a config lists. Registering a name again replaces it only from the module
    that registered it (a re-run notebook cell, a reloaded module); from another module it is an error."""
    method = name if method is None else method
    for what, value in (("training", name), ("method", method)):
        if not value or not value.replace("_", "").isalnum() or not value.isascii():
            raise MergeclError(f"register_training: {what} name {value!r}: use letters, digits and '_'")
    if not (isinstance(options, type) and issubclass(options, Options)):
        raise MergeclError(f"register_training {name}: options must be an Options subclass, got {options!r}")
    owner = sys._getframe(1).f_globals.get("__name__", "?")  # the module that declares it
    replaced = [other for other in TRAININGS.values() if other.name == name or other.method == method]
    for other in replaced:
        if _OWNERS[other.name] != owner:
            clash = f"training '{name}'" if other.name == name else f"method '{method}'"
            raise MergeclError(f"register_training: {clash} is registered already (by {_OWNERS[other.name]})")
    for other in replaced:  # re-registered by the module that declared it: replaced
        del TRAININGS[other.name]
    if independent and continues:
        raise MergeclError(f"register_training {name}: an independent training starts from theta_0 (continues=False)")
    TRAININGS[name] = training = Training(name, method, summary, continues, step, options, independent)
    _OWNERS[name] = owner
    return training


_OWNERS: dict[str, str] = {}  # training name -> the module that registered it


def registered_training(name: str) -> Training:
    """The registered training a run's training ``name`` runs: ``pam@zero`` -> ``pam``."""
    base = name.partition("@")[0]
    if base not in TRAININGS:
        raise MergeclError(f"unknown training '{base}' (registered: {', '.join(TRAININGS)})")
    return TRAININGS[base]


def plain_methods() -> dict[str, str]:
    """Plain method name -> the training whose model it evaluates (``seq_ft`` -> ``seq``)."""
    return {training.method: training.name for training in TRAININGS.values()}
