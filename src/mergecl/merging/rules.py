"""Merge rules: small pure functions over task vectors.

A task vector is tau_t = theta_t - theta_0 (METHODS.md notation). Every rule here takes the task
vectors of ONE tensor (or of one chunk of it: all rules are element-wise, so a chunk is as good as a
whole tensor) and returns the merged task vector; the caller adds it to theta_0 and applies lam.

Rules take ``taus`` as an *iterable* and, where the rule allows it, consume it one vector at a
time: the streaming engine feeds them a generator that reads each checkpoint's chunk on demand, so
memory stays O(1) in the number of task vectors. Only TIES needs all of them at once.

Randomness never comes from a global RNG: rules that draw (random_mix, dare) take the draws as
arguments, made by the engine from a seed, the tensor name and the element position, so a result
does not depend on how the tensor was chunked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def average(taus: Iterable[Tensor]) -> Tensor:
    """Mean task vector: theta_0 + mean_t tau_t is weight averaging of the fine-tuned models."""
    total, count = None, 0
    for tau in taus:
        total = tau.clone() if total is None else total.add_(tau)
        count += 1
    return total.div_(count)


def task_arithmetic(taus: Iterable[Tensor]) -> Tensor:
    """Sum of task vectors (Ilharco et al.); the caller scales it by lam."""
    total = None
    for tau in taus:
        total = tau.clone() if total is None else total.add_(tau)
    return total


def magmax(taus: Iterable[Tensor]) -> Tensor:
    """Per entry, the signed value of the largest |tau_t|; ties go to the LATER task.

    A running fold, exactly as METHODS.md §1: m = tau_1; m = where(|tau_t| >= |m|, tau_t, m).
    The select is written as float arithmetic (a 0/1 weight and lerp, exact for those weights)
    because bool masks and where() are several times slower on CPU.
    """
    best = best_abs = tau_abs = take = None
    for tau in taus:
        if best is None:
            best, best_abs = tau.clone(), tau.abs()
            tau_abs, take = torch.empty_like(best), torch.empty_like(best)
            continue
        torch.abs(tau, out=tau_abs)
        torch.sub(tau_abs, best_abs, out=take).sign_().add_(1.0).clamp_(max=1.0)  # 1 where |tau| >= |m|
        best.lerp_(tau, take)
        torch.maximum(best_abs, tau_abs, out=best_abs)
    return best


def random_mix(taus: Iterable[Tensor], pick: Tensor) -> Tensor:
    """Each entry copies tau_k with k = pick[entry] (drawn uniformly by the caller, seeded)."""
    mixed = None
    pick = pick.to(torch.float32)
    for t, tau in enumerate(taus):
        if mixed is None:
            mixed, take = torch.zeros_like(tau), torch.empty_like(tau)
        # take = 1 where pick == t else 0, in float arithmetic (faster than a bool mask; see magmax)
        torch.sub(pick, t, out=take).abs_().clamp_(max=1.0).neg_().add_(1.0)
        mixed.lerp_(tau, take)
    return mixed


def one_over_t(taus: Iterable[Tensor], start: int = 1) -> Tensor:
    """Running 1/t merge: m <- m + (tau_j - m) / t, t = start, start + 1, ...

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


def fisher_weighted(taus: Iterable[Tensor], fishers: Iterable[Tensor]) -> Tensor:
    """Diagonal-Fisher-weighted average: sum_t F_t tau_t / sum_t F_t (Matena & Raffel).

    Entries where every Fisher is zero carry no information about any task: they fall back to
    the plain average, rather than to 0/0.
    """
    num = den = plain = None
    count = 0
    for tau, fisher in zip(taus, fishers, strict=True):
        if num is None:
            num, den, plain = tau * fisher, fisher.clone(), tau.clone()
        else:
            num.addcmul_(tau, fisher)
            den.add_(fisher)
            plain.add_(tau)
        count += 1
    informed = den > 0
    return torch.where(informed, num / torch.where(informed, den, 1.0), plain / count)


# --- TIES (Yadav et al.), as in the MagMax release -------------------------------------------


def ties_kth(num_entries: int, keep: float) -> int:
    """The k of 'keep |x| >= k-th smallest |x|' with k = D - int(keep * D) (0: keep all)."""
    return num_entries - int(keep * num_entries)


def ties_threshold(tau: Tensor, keep: float) -> Tensor:
    """|x| of the k-th smallest entry of one task vector (per-tensor scope)."""
    flat = tau.reshape(-1).abs()
    k = ties_kth(flat.numel(), keep)
    if k <= 0:
        return torch.zeros((), dtype=tau.dtype)
    return flat.kthvalue(k).values


def at_least(magnitude: Tensor, threshold: Tensor | float) -> Tensor:
    """1.0 where ``magnitude >= threshold``, else 0.0, with float ops only (in place on ``magnitude``):
    sign(m - th) + 1 is 2, 1 or 0. Bool masks and torch.where are 5-10x slower on CPU builds."""
    return magnitude.sub_(threshold).sign_().add_(1).clamp_(max=1)


def ties_trim(tau: Tensor, threshold: Tensor | float) -> Tensor:
    """Zero the entries below the threshold (keep |x| >= threshold)."""
    return tau * at_least(tau.abs(), threshold)


def ties_elect(trimmed: Tensor, majority_sign: Tensor | float | None = None) -> Tensor:
    """Elected sign per entry: sign of the sum over tasks; zero sums take the majority sign.

    ``trimmed`` is [T, ...]. The majority sign is that of the sum of the elected signs over the
    whole scope (one tensor, or the whole model for global scope, where the caller passes it).
    """
    sign = torch.sign(trimmed.sum(dim=0))
    if majority_sign is None:
        majority_sign = torch.sign(sign.sum())
    return sign + (1 - sign.abs()) * torch.as_tensor(majority_sign, dtype=sign.dtype)  # 0 -> majority


def ties_disjoint_mean(trimmed: Tensor, sign: Tensor) -> Tensor:
    """Mean over the tasks whose trimmed entry has the elected sign (count clamped >= 1); an
    elected sign of 0 (no majority anywhere) selects the negative entries, as the TIES release.

    Float ops only: with s = +-1, (x * s).clamp(min=0) is |x| where x agrees and 0 elsewhere."""
    s = sign - (1 - sign.abs())  # 0 -> -1
    agreeing = (trimmed * s).clamp_(min=0)
    count = agreeing.sign().sum(dim=0).clamp_(min=1)
    return s * agreeing.sum(dim=0) / count


def ties(
    taus: Iterable[Tensor],
    keep: float = 0.2,
    thresholds: Sequence[Tensor | float] | None = None,
    majority_sign: Tensor | float | None = None,
) -> Tensor:
    """Trim, elect sign, disjoint mean. Thresholds and majority sign default to this tensor's own
    (scope=tensor); the engine passes model-wide ones for scope=global."""
    taus = list(taus)
    if thresholds is None:
        thresholds = [ties_threshold(tau, keep) for tau in taus]
    trimmed = torch.stack([ties_trim(tau, th) for tau, th in zip(taus, thresholds, strict=True)])
    return ties_disjoint_mean(trimmed, ties_elect(trimmed, majority_sign))


# --- DARE and BECAME -------------------------------------------------------------------------


def dare(tau: Tensor, drop: Tensor, p: float) -> Tensor:
    """Drop-and-rescale: zero the entries where ``drop`` is True, scale the rest by 1/(1-p)."""
    if p == 0:
        return tau
    return torch.where(drop, torch.zeros((), dtype=tau.dtype), tau) / (1.0 - p)


def became_sums(delta: Tensor, fisher: Tensor, prior_precision: Tensor) -> tuple[float, float]:
    """The two sums of lam* for one tensor: (sum F d^2, sum (F + Lambda) d^2), in float64."""
    d2 = delta.double().square()
    f_d2 = (fisher.double() * d2).sum()
    return float(f_d2), float(f_d2 + (prior_precision.double() * d2).sum())


def became_coefficient(numerator: float, denominator: float) -> float:
    """lam* = sum F d^2 / sum (F + Lambda) d^2 (METHODS.md §2), one scalar for the whole model.

    A zero denominator means no information either way (d = 0 or all Fishers zero): lam* = 1
    keeps the newly trained model, which then equals the starting one wherever d = 0.
    """
    if denominator <= 0.0:
        return 1.0
    return numerator / denominator
