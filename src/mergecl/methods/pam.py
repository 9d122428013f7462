"""PAM: continual training with weights kept sign-aligned to a global model, merged by averaging
(Sokar et al. 2025; docs/methods.md#pam). The paper's code is not public: each unknown is an option.

Training ``pam`` (method ``pam``; variants ``pam@TAG`` with their own options). Its model after step
t is the global G_t. With a LoRA model (``model.lora``) G is the global LoRA and only the adapters
train; without one PAM works on every trainable weight.

Task t starts a task model L_t as a copy of G_{t-1} (theta_0's adapter for t = 1) and fine-tunes it.
From task 2 on, every ``align_every`` optimiser steps (and once after the last step when
``align_at_end``), the entries of L_t whose sign disagrees with G's (L * G < 0: a zero has no
sign), among G's top-``p`` fraction of entries by magnitude (``scope``: per tensor, or over all
trained tensors at once), are reset -- to G's value (``reset: value``) or to zero (``reset: zero``).
It is a hard reset of the weights, not a loss term; the optimiser state is kept. After the task,
G_t = running mean of L_1..L_t (``merge: mean``) or (G_{t-1} + L_t) / 2 (``merge: half``).
A and B of LoRA are aligned and averaged entry by entry, separately: G must stay a LoRA, which
the product B A would not be. Buffers (BatchNorm statistics) are not averaged: G_t keeps L_t's.

Options (defaults): ``p`` 0.5, ``align_every`` 10, ``align_at_end`` true, ``scope`` "tensor",
``reset`` "value", ``merge`` "mean". ``p`` 0 never resets (continual LoRA averaging).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from mergecl import distributed
from mergecl.methods.trainings import Step, StepResult, register_training
from mergecl.models.base import Learner
from mergecl.options import Options
from mergecl.training.loop import Hook


class PamOptions(Options):
    p: float = Field(0.5, ge=0, le=1)  # the fraction of G's entries (by magnitude) kept aligned
    align_every: int = Field(10, ge=1)  # optimiser steps between alignments
    align_at_end: bool = True
    scope: Literal["tensor", "global"] = "tensor"
    reset: Literal["value", "zero"] = "value"
    merge: Literal["mean", "half"] = "mean"


# --- the math: small pure functions --------------------------------------------------------------


def top_fraction_masks(tensors: dict[str, Tensor], p: float, scope: str) -> dict[str, Tensor]:
    """True at the top-``p`` fraction of entries by magnitude, per tensor or over all of them."""
    if scope == "global":
        flat = torch.cat([t.detach().abs().flatten().float() for t in tensors.values()])
        threshold = _threshold(flat, p)
        return {name: t.detach().abs().float() >= threshold for name, t in tensors.items()}
    return {
        name: t.detach().abs().float() >= _threshold(t.detach().abs().flatten().float(), p)
        for name, t in tensors.items()
    }


def _threshold(magnitudes: Tensor, p: float) -> float:
    """The magnitude of the k-th largest entry, k = round(p n); +inf when k = 0 (nothing selected)."""
    k = round(p * magnitudes.numel())
    if k == 0:
        return float("inf")
    return float(torch.topk(magnitudes, k, sorted=False).values.min())


def conflicts(task: Tensor, global_: Tensor, top: Tensor) -> Tensor:
    """Entries among ``top`` whose signs disagree (a zero agrees with anything)."""
    return top & (task * global_ < 0)


@torch.no_grad()
def align_(task: Tensor, global_: Tensor, top: Tensor, reset: str) -> int:
    """Reset the conflicting entries of ``task`` in place; return how many were reset. Element-wise
    only, so sharded tensors (the same layout for all three) work as whole ones do."""
    mask = conflicts(task, global_, top)
    replacement = global_.to(task.dtype) if reset == "value" else torch.zeros_like(task)
    task.copy_(torch.where(mask, replacement, task))
    return int(distributed.gathered(mask.sum()))


def running_mean(global_: Tensor, task: Tensor, count: int, merge: str) -> Tensor:
    """G_t from G_{t-1} and L_t, t = ``count`` (1-based): mean of L_1..L_t, or the 50/50 average."""
    weight = 1.0 / count if merge == "mean" else (1.0 if count == 1 else 0.5)
    return torch.lerp(global_.float(), task.float(), weight)  # exact L_1 at weight 1


# --- the training ----------------------------------------------------------------------------------


class Alignment(Hook):
    """Every ``every`` optimiser steps, reset the trained weights that disagree with G's top entries."""

    def __init__(self, global_: dict[str, Tensor], options: PamOptions) -> None:
        self.global_ = global_
        self.top = top_fraction_masks(global_, options.p, options.scope)
        self.every = options.align_every
        self.reset = options.reset
        self.resets = 0
        self.rounds = 0

    def after_step(self, learner: Learner, step: int) -> None:
        if step % self.every == 0:
            self.align(learner)

    @torch.no_grad()
    def align(self, learner: Learner) -> None:
        params = dict(learner.named_parameters())
        for name, g in self.global_.items():
            p = params[name]  # sharded under train.shard: full; G and its mask are then sharded alike
            like = distributed.laid_out_like
            self.resets += align_(p, like(g, p), like(self.top[name], p), self.reset)
        self.rounds += 1


def pam_step(step: Step) -> StepResult:
    options = step.options
    learner = step.learner
    trained = {name: p for name, p in learner.named_parameters() if p.requires_grad}
    global_ = {name: p.detach().clone() for name, p in trained.items()}  # G_{t-1}: the start weights
    hooks = []
    if step.t > 0 and options.p > 0:
        hooks.append(Alignment(global_, options))
    stats = step.train(hooks=hooks)
    info: dict[str, float] = {}
    if hooks:
        alignment = hooks[0]
        if options.align_at_end and stats.steps % alignment.every != 0:
            alignment.align(learner)
        rounds = max(1, alignment.rounds)
        info["reset_fraction"] = alignment.resets / rounds / max(1, sum(p.numel() for p in trained.values()))
    with torch.no_grad():
        for name, p in trained.items():  # the training's model after the step is G_t
            p.copy_(running_mean(global_[name], p, step.t + 1, options.merge).to(p.dtype))
    return StepResult(stats, info=info)


register_training(
    "pam",
    pam_step,
    options=PamOptions,
    summary="PAM: task model from G, sign-aligned to G's top-p entries while training, G <- running mean",
)
