"""The model a merge method has after step t: its training's stored task vectors tau_1..tau_t merged
into theta_0 by the method's rule, with its method_options.

The recipe (``merged_model``):

1. a rule that makes random draws gets the run's seed, unless the options give one (``needs_seed``);
2. the space the rule merges in (``merge_space``): the stored task vectors as they are (``factors``:
   the tuned entries; for a LoRA model its A and B factors), or (``dense``) LoRA's weight changes
   s (B A - B_0 A_0), folded into the base weights after the merge;
3. the merge, ``theta_0 + lam * rule(tau_1..tau_t)``, by the engine's public ``merge``;
   with ``lam: auto``, lam is the point of ``lam_grid`` (default ``LAM_GRID``) whose model scores
   best on the validation splits of the tasks seen so far (``choose_lam``; ties: the smaller lam;
   a lam that breaks the model is never chosen unless every one does). The rule is merged once at
   lam 1 and scaled: theta_0 + lam * (merged_1 - theta_0) is the merge at lam, up to rounding.

The runner gives the inputs (paths, theta_0, a way to score a model on validation) and persists the
result; what was chosen on the way (``{"lam": 0.3}``) comes back in ``Merged.info``.

A rule with a running form (``running_form``) can instead go on from step t-1 to step t
(``RunningMerge``: its state after t-1 task vectors, plus tau_t): step t then costs one task
vector, not t. ``mergecl learn`` keeps that state between invocations; the runner keeps it between
the steps of a stream, for the rules whose running form is their merge exactly (no random draws).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergecl.errors import MergeclError
from mergecl.merging.engine import merge
from mergecl.merging.registry import Running, get_rule
from mergecl.models.lora import LoraPair, dense_task_vector, fold_dense
from mergecl.tensors import squared_norm
from mergecl.training.loop import NonFiniteError

__all__ = [
    "LAM_GRID",
    "Merged",
    "RunningMerge",
    "TaskVectors",
    "choose_lam",
    "merge_space",
    "merged_model",
    "model_norm",
    "needs_seed",
    "running_form",
]

LAM_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

State = dict[str, Tensor]


@dataclass(frozen=True)
class TaskVectors:
    """A training's stored task vectors after step t, and what they are relative to."""

    paths: Sequence[Path]  # tau_1..tau_t: one file per step, as the run directory stores them
    base: Mapping[str, Tensor]  # theta_0: every entry of the state
    tuned: Sequence[str]  # the entries the task vectors cover (what training can change)
    load: Callable[[Path], State]  # reads one stored file
    lora: Sequence[LoraPair] = ()  # the model's LoRA adapters, for ``space: dense``


@dataclass(frozen=True)
class Merged:
    state: State  # the full state of the merged model
    info: dict[str, float] = field(default_factory=dict)  # what was chosen on the way: {"lam": 0.3}


@dataclass(frozen=True)
class Space:
    """What the engine merges (paths or state dicts), the base they merge into, and merged part -> the
    model's full state."""

    vectors: list[Path] | list[State]
    base: State
    finish: Callable[[State], State]


def needs_seed(rule: str, options: Mapping[str, Any]) -> bool:
    """Whether the merge makes random draws (the rule's declared ``draws``, e.g. random_mix's choices,
    or DARE's drops): it then gets a seed."""
    return bool(get_rule(rule).draws) or bool(options.get("dare"))


def merged_model(
    rule: str,
    vectors: TaskVectors,
    options: Mapping[str, Any],
    seed: int,
    validate: Callable[[State], list[float]],
    where: str = "method_options",
) -> Merged:
    """The merged model (see the module docstring). ``options``: the method's method_options, as the
    config gives them; ``validate(state)``: the validation accuracy of that model on each task seen so
    far (only called with ``lam: auto``); ``where``: the options' place in the config, for errors."""
    options = dict(options)
    if needs_seed(rule, options):
        options.setdefault("seed", seed)
    grid = options.pop("lam_grid", None) or LAM_GRID
    space = merge_space(vectors, options.pop("space", "factors"), where)
    if options.get("lam") != "auto":
        return Merged(space.finish(merge(space.base, space.vectors, rule, task_vectors=True, **options)))
    del options["lam"]
    unit = merge(space.base, space.vectors, rule, task_vectors=True, lam=1.0, **options)
    direction = {k: unit[k].float() - v.float() for k, v in space.base.items() if v.is_floating_point()}

    def at(lam: float) -> State:
        return space.finish(_along(space.base, direction, lam))

    lam = choose_lam(grid, lambda lam: _mean(validate(at(lam))))
    return Merged(at(lam), {"lam": lam})


def running_form(rule: str, options: Mapping[str, Any]) -> Running | None:
    """The rule's running form, if a merge with these method options may go on from it: declared
    (with its coefficient, for a rule whose ``prepare`` computes one), and no option that needs
    every task vector at once (``dare``, ``space``, ``include``, ...)."""
    declared = get_rule(rule)
    if not set(options) <= {"lam", "lam_grid", "seed", *declared.options.model_fields}:
        return None
    return declared.running_form(norms_kept=True)  # RunningMerge keeps the task vectors' norms


def model_norm(tensors: Mapping[str, Tensor]) -> float:
    """The norm of a whole model's tensors (float64 sums)."""
    return sum(squared_norm(v) for v in tensors.values()) ** 0.5


@dataclass
class RunningMerge:
    """A rule's running state over whole task vectors that arrive one at a time (``add``); ``model``
    gives the merged model after the tasks added so far. ``state`` and ``task_norms`` (kept only
    for a rule with a coefficient, e.g. OPCM's rescaling) are what a holder stores to go on later;
    ``count``: the task vectors folded in. Draws are seeded per tensor and task, as in
    ``mergecl merge --continual``."""

    rule: str
    options: Mapping[str, Any]  # the method's options (lam, lam_grid, seed, the rule's own)
    seed: int  # the run's seed: the draws' unless the options give one
    state: State | None = None
    task_norms: list[float] = field(default_factory=list)
    count: int = 0

    @property
    def running(self) -> Running:
        running = running_form(self.rule, self.options)
        assert running is not None, f"{self.rule}: no running form for these options"
        return running

    def add(self, tau: Mapping[str, Tensor]) -> None:
        running = self.running
        if running.coefficient is not None:
            self.task_norms.append(model_norm(tau))
        if self.state is None:
            self.state = {key: value.clone() for key, value in tau.items()}
        else:
            own = {key: self.options[key] for key in get_rule(self.rule).options.model_fields if key in self.options}
            seed = self.options.get("seed", self.seed)
            for key, value in self.state.items():
                generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:running:{key}:{self.count}".encode()))
                named = {"name": key} if running.named else {}
                self.state[key] = running.update(value, tau[key], self.count, generator, **own, **named)
        self.count += 1

    def model(
        self,
        vectors: TaskVectors,
        validate: Callable[[State], list[float]],
        where: str = "method_options",
    ) -> Merged:
        """theta_0 + lam * (the rule's merged task vector so far); ``vectors`` gives theta_0, the
        tuned entries and the LoRA pairs (its paths are not read). Task arithmetic over that one
        vector is the engine's same computation, and ``lam: auto`` its same choice."""
        assert self.state is not None, "add a task vector first"
        running = self.running
        unit = {key: running.finish(value.clone(), self.count) for key, value in self.state.items()}
        info: dict[str, float] = {}
        if running.coefficient is not None:
            factor = running.coefficient(self.task_norms, model_norm(unit))
            unit = {key: value * factor for key, value in unit.items()}
            info = {"lambda": factor}
        scaled = {key: self.options[key] for key in ("lam", "lam_grid") if key in self.options}
        scaled.setdefault("lam", get_rule(self.rule).lam)
        one = TaskVectors([unit], vectors.base, vectors.tuned, lambda x: x, vectors.lora)
        merged = merged_model("task_arithmetic", one, scaled, self.seed, validate, where)
        return Merged(merged.state, {**merged.info, **info})


def choose_lam(grid: Sequence[float], score: Callable[[float], float]) -> float:
    """The lam of ``grid`` with the best score; ties go to the smaller lam. A lam whose model breaks
    (``NonFiniteError``: non-finite outputs) scores -inf: it is chosen only if every lam breaks."""
    scores = []
    for lam in grid:
        try:
            value = score(lam)
        except NonFiniteError:
            value = float("-inf")
        scores.append((value, -lam))
    return -max(scores)[1]


def merge_space(vectors: TaskVectors, space: str, where: str = "method_options") -> Space:
    """``factors``: the stored task vectors over the tuned entries (LoRA: A and B separately).
    ``dense``: LoRA factors become weight changes s (B A - B_0 A_0); the merged change is folded into
    the base weights and the adapters are switched off."""
    base = dict(vectors.base)
    if space == "factors":
        return Space(list(vectors.paths), {k: base[k] for k in vectors.tuned}, lambda merged: {**base, **merged})
    if space != "dense":
        raise MergeclError(f"{where}.space: expected factors or dense, got {space!r}")
    if not vectors.lora:
        raise MergeclError(f"{where}.space: dense needs a LoRA model (model.lora)")
    lora = list(vectors.lora)
    factors = {key for pair in lora for key in (pair.a, pair.b)}
    dense = []
    for path in vectors.paths:
        tau = vectors.load(path)
        others = {k: v for k, v in tau.items() if k not in factors}  # e.g. a trained linear head
        dense.append({**others, **dense_task_vector(base, tau, lora)})
    return Space(dense, {k: base[k] for k in dense[0]}, lambda merged: fold_dense({**base, **merged}, merged, lora))


def _along(base: State, direction: State, lam: float) -> State:
    """theta_0 + lam * direction, each entry in its own dtype: (lam * d) + theta_0 in place, one
    fresh tensor per entry instead of two (IEEE products and sums commute: the same numbers)."""
    return {k: (direction[k] * lam).add_(v.float()).to(v.dtype) if k in direction else v for k, v in base.items()}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
