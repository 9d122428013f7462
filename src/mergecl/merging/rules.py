"""The built-in merge rules: small pure functions over task vectors, each declared where it is written.

A task vector is tau_t = theta_t - theta_0. Every rule takes the task vectors of ONE tensor (or one
chunk of it: these rules are element-wise, so a chunk is as good as a whole tensor) and returns the
merged task vector; the engine adds lam times it to theta_0. ``register_rule`` (merging/registry.py)
declares what each needs; TIES, which needs whole-model passes, is in ties.py.

Folding rules consume ``taus`` one vector at a time: the engine feeds them a generator that reads
each checkpoint's chunk on demand, so memory stays O(1) in the number of task vectors.

Randomness never comes from a global RNG: rules that draw (random_mix, dare) take the draws as
arguments, made by the engine from a seed, the tensor name and the element position, so a result
does not depend on how the tensor was chunked.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from pydantic import Field
from torch import Tensor

from mergecl.merging.registry import Draw, Input, MergeView, Prepared, Running, register_rule
from mergecl.options import Options


@register_rule(
    "average",
    running=Running(lambda total, tau, t, g: total.add_(tau), lambda total, n: total / n),
    propagates_non_finite=True,
    fused="sum",
)
def average(taus: Iterable[Tensor]) -> Tensor:
    """theta_0 + lam * mean_t tau_t (weight averaging of the fine-tuned models)."""
    total, count = None, 0
    for tau in taus:
        total = tau.clone() if total is None else total.add_(tau)
        count += 1
    return total.div_(count)


@register_rule(
    "task_arithmetic",
    lam=0.3,
    running=Running(lambda total, tau, t, g: total.add_(tau)),
    propagates_non_finite=True,
    fused="sum",
)
def task_arithmetic(taus: Iterable[Tensor]) -> Tensor:
    """theta_0 + lam * sum_t tau_t (task arithmetic, Ilharco et al.)."""
    total = None
    for tau in taus:
        total = tau.clone() if total is None else total.add_(tau)
    return total


@register_rule(
    "magmax",
    lam=0.5,
    running=Running(lambda best, tau, t, g: magmax([best, tau])),
    propagates_non_finite=True,
    fold_buffers=3,  # best, |best| and the 0/1 weight
    fused="magmax",
)
def magmax(taus: Iterable[Tensor]) -> Tensor:
    """Each entry takes the signed tau_t of largest |tau_t|; ties go to the later task.

    A running fold (MagMax, Marczak et al.): m = tau_1; m = where(|tau_t| >= |m|, tau_t, m).
    The select is written as float arithmetic (a 0/1 weight and lerp, exact for those weights)
    because bool masks and where() are 3-4x slower on CPU. |m| is taken again at every step
    rather than kept: one buffer less, and 15-23 % faster (the buffers stay in the core's cache).
    """
    best = best_abs = take = None
    for tau in taus:
        if best is None:
            best, best_abs, take = tau.clone(), torch.empty_like(tau), torch.empty_like(tau)
            continue
        torch.abs(best, out=best_abs)
        torch.abs(tau, out=take)
        torch.ge(take, best_abs, out=take)  # 1.0 where |tau| >= |m|, 0.0 elsewhere
        best.lerp_(tau, take)
    return best


@register_rule(
    "random_mix",
    granularity="stack",
    draws={"pick": Draw("mix", lambda n, g, num_tasks: torch.randint(num_tasks, (n,), generator=g, dtype=torch.int64))},
    running=Running(lambda mixed, tau, t, g: reservoir_step(mixed, tau, t, g)),
    picks=True,
    fused="pick",
)
def random_mix(taus: Tensor, pick: Tensor) -> Tensor:
    """Each entry copies tau_k, k uniform at random (seeded): pick[entry] = k.

    One gather from the [T, n] stack: a fold needs two ops per task (a 0/1 weight, a lerp), four
    times the time of the gather and its stack. The pick never looks at the values (``picks``): the
    engine gathers from the checkpoints' stored values and subtracts the base from the picked ones.
    The unpicked entries are dropped, NaN or not: the engine checks every checkpoint
    (``propagates_non_finite`` is not declared)."""
    return taus.gather(0, pick.unsqueeze(0)).squeeze(0)


def reservoir_step(mixed: Tensor, tau: Tensor, t: int, generator: torch.Generator) -> Tensor:
    """random_mix as a running state (reservoir sampling): each entry takes tau_t's value with
    probability 1/(t+1) (t 0-based), so after T tasks it holds each task's with probability 1/T,
    as random_mix's draw gives; the draws themselves differ from random_mix's."""
    take = torch.rand(mixed.shape, generator=generator) * (t + 1) < 1.0
    return torch.where(take, tau, mixed)


class OneOverTOptions(Options):
    start: int = Field(1, ge=1, description="t of the first task vector")


@register_rule("one_over_t", options=OneOverTOptions, propagates_non_finite=True)
def one_over_t(taus: Iterable[Tensor], start: int = 1) -> Tensor:
    """Running 1/t merge: m += (tau_j - m) / t, t = start, start+1, ...

    With start=1 it is a running mean of the task vectors. With the merged model of tasks
    1..t-1 as theta_0 and the newly trained model as the only tau, start=t gives BECAME's 1/t
    baseline theta = (1 - 1/t) theta_prev + (1/t) theta_new.
    """
    merged = None
    for j, tau in enumerate(taus):
        t = start + j
        merged = torch.zeros_like(tau) if merged is None else merged
        merged = merged.add_(tau - merged, alpha=1.0 / t)
    return merged


@register_rule("fisher", inputs={"fisher": Input(non_negative=True)})
def fisher_weighted(taus: Iterable[Tensor], fisher: Iterable[Tensor]) -> Tensor:
    """sum_t F_t tau_t / sum_t F_t (diagonal Fisher weights, Matena & Raffel; needs `fisher`).

    Entries where every Fisher is zero carry no information about any task: they fall back to
    the plain average, rather than to 0/0.
    """
    num = den = plain = None
    count = 0
    for tau, f in zip(taus, fisher, strict=True):
        if num is None:
            num, den, plain = tau * f, f.clone(), tau.clone()
        else:
            num.addcmul_(tau, f)
            den.add_(f)
            plain.add_(tau)
        count += 1
    informed = den > 0
    return torch.where(informed, num / torch.where(informed, den, 1.0), plain / count)


# --- DARE (any rule's task vectors) and BECAME --------------------------------------------------


def dare(tau: Tensor, drop: Tensor, p: float) -> Tensor:
    """Drop-and-rescale: zero the entries where ``drop`` is True, scale the rest by 1/(1-p)."""
    if p == 0:
        return tau
    return torch.where(drop, tau.new_zeros(()), tau) / (1.0 - p)


def became_sums(delta: Tensor, fisher: Tensor, prior_precision: Tensor) -> tuple[float, float]:
    """The two sums of lam* for one tensor: (sum F d^2, sum (F + Lambda) d^2), in float64."""
    d2 = delta.double().square()
    f_d2 = (fisher.double() * d2).sum()
    return float(f_d2), float(f_d2 + (prior_precision.double() * d2).sum())


def became_coefficient(numerator: float, denominator: float) -> float:
    """lam* = sum F d^2 / sum (F + Lambda) d^2 (BECAME), one scalar for the whole model.

    A zero denominator means no information either way (d = 0 or all Fishers zero): lam* = 1
    keeps the newly trained model, which then equals the starting one wherever d = 0.
    """
    if denominator <= 0.0:
        return 1.0
    return numerator / denominator


def _became_lambda(view: MergeView, options: Options) -> Prepared:
    """lam* from its two sums over every merged coordinate (one streaming pass)."""
    numerator = denominator = 0.0
    for chunk in view.chunks(view.tensors()):
        (delta,) = chunk.taus
        (fisher,) = chunk.inputs["fisher"]
        (prior,) = chunk.inputs["prior_precision"]
        num, den = became_sums(delta, fisher, prior)
        numerator += num
        denominator += den
    lam = became_coefficient(numerator, denominator)
    return Prepared(lam=lam, info={"lambda": lam})


@register_rule(
    "became",
    lam=None,
    inputs={"fisher": Input(non_negative=True), "prior_precision": Input(per_task=False, non_negative=True)},
    max_models=1,
    prepare=_became_lambda,
    passes=lambda options: 1,
    summary="theta_gp + lam* (theta_hat - theta_gp), lam* = sum F d^2 / sum (F + Lambda) d^2 "
    "(needs `fisher` and `prior_precision`, one fine-tuned model)",
)
def became(taus: Iterator[Tensor], fisher: Iterator[Tensor], prior_precision: Iterator[Tensor]) -> Tensor:
    """theta_gp + lam* (theta_hat - theta_gp), lam* = sum F d^2 / sum (F + Lambda) d^2 (BECAME; needs
    `fisher` and `prior_precision`, one fine-tuned model). The Fisher and the prior only enter lam*."""
    return next(taus)
