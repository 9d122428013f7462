"""How each stream trains one step, and which logit columns each evaluation uses.

A step starts from weights the runner gives (theta_0, or theta_0 + tau_{t-1} rebuilt from the run
directory, the same way whether the run was resumed or not) and returns the trained learner plus
the stream's carried state (EWC's running Fisher). Each step is a short recipe over the training
loop and its hooks; no trainer hierarchy.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mergecl.data.types import Scenario, Split
from mergecl.models.base import Learner
from mergecl.training.fisher import diagonal_fisher
from mergecl.training.loop import Hook, TrainSettings, TrainStats, train_task
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


def train_step(
    stream: str,
    learner: Learner,
    scenario: Scenario,
    t: int,
    settings: TrainSettings,
    seed: int,
    options: dict[str, Any],
    carried: dict[str, Tensor] | None,
) -> tuple[TrainStats, dict[str, Tensor] | None]:
    """Train ``learner`` (already holding the step's starting weights) on step ``t`` of ``stream``."""
    task = scenario.tasks[t]
    desc = f"{stream} task {t + 1}/{len(scenario.tasks)}"
    classes = train_classes(scenario, t)
    hooks: list[Hook] = []
    data = task.train
    if stream == "joint":
        data = joint_data(scenario, t)
        # one head over every class seen (task-incremental too: its per-task heads are column subsets)
        classes = scenario.seen_classes(t) if scenario.kind != "domain" else classes
    elif stream == "lwf" and t > 0:
        old = scenario.seen_classes(t - 1) if scenario.kind != "domain" else classes
        hooks.append(LwF(learner, old, lam=options.get("lam", 0.3), temperature=options.get("temperature", 2.0)))
    elif stream == "ewc" and t > 0 and carried is not None:
        anchor = {n: p.detach().clone() for n, p in learner.named_parameters() if p.requires_grad}
        hooks.append(EWC(anchor, carried, lam=options.get("lam", 1e6)))
    stats = train_task(learner, data, classes, scenario.num_classes, settings, seed, hooks, desc)
    if stream == "ewc":
        fisher = diagonal_fisher(
            learner,
            task.train,
            train_classes(scenario, t),
            scenario.num_classes,
            labels=options.get("fisher_labels", "predicted"),
        )
        carried = online_fisher(carried, fisher, decay=options.get("decay", 0.5))
    return stats, carried
