"""Continual TIES merging, as in FusionBench (``fusion_bench/method/opcm/ties_merging.py``,
``ContinualTiesMergingForCLIP``, with the TIES math of ``fusion_bench/method/ties_merging/
ties_merging_utils.py``).

The models arrive one at a time. The running merged task vector starts as M_1 = scale * tau_1; each
later task vector is TIES-merged with it as a two-row TIES and the result is added back:

    M_t = M_{t-1} + scale * TIES(M_{t-1}, tau_t)

where TIES of the two rows trims each to its top ``keep`` entries by magnitude (entries equal to the
k-th value kept), elects the sign of the two trimmed rows' sum per entry (a zero sum takes the
majority sign, that of the sum of the elected signs over the scope), and aggregates the entries
that agree with the elected sign: their SUM by default (the release's ``merge_func: sum``), or
their mean, or the largest magnitude with the elected sign.

scope ``global`` (the release's): every threshold is the exact k-th smallest magnitude over the
WHOLE model, so step t needs M_{t-1} of every tensor before any tensor can take step t. mergecl
keeps one tensor at a time (memory O(1) in the number of tasks): ``prepare`` finds the task
vectors' thresholds in one radix select (ties.kth_magnitudes), then, step by step, M_{t-1}'s
threshold (a radix select over M_{t-1}, refolded per tensor from tau_1..tau_{t-1} with the steps
found so far) and step t's majority sign. The merge pass then folds each tensor with those numbers.
Cost: 2 + 3 (T - 1) passes, the pass of step t reading t + 1 task vectors: about 1.5 T^2 reads of
a model in all. scope ``tensor``: each tensor's own thresholds and majority sign, one read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from mergecl.merging.registry import Chunk, MergeView, Prepared, TensorInfo, register_rule
from mergecl.merging.ties import at_least, kth_magnitudes, ties_disjoint_mean, ties_elect, ties_threshold
from mergecl.options import Options

Step = tuple[float, float, float]  # (M_{t-1}'s threshold, tau_t's threshold, majority sign) of one step


class ContinualTiesOptions(Options):
    keep: float = Field(
        0.2, gt=0, le=1, description="fraction of entries each of the two rows keeps (the release's threshold: 20 %)"
    )
    scale: float = Field(
        0.5, description="each step adds scale times the two-row TIES merge; M_1 = scale * tau_1 (scaling_factor)"
    )
    disjoint: Literal["sum", "mean", "max"] = Field(
        "sum", description="how the agreeing entries are aggregated (the release's merge_func)"
    )
    scope: Literal["global", "tensor"] = Field("global", description="thresholds over the whole model or per tensor")


# --- the math of one tensor -------------------------------------------------------------------


def trim(x: Tensor, threshold: Tensor | float, fp32_rank: bool = False) -> Tensor:
    """``x`` with the entries below ``threshold`` in magnitude zeroed (|x| >= threshold kept); with
    ``fp32_rank`` the magnitudes are compared in fp32, as a model-wide radix select ranked them."""
    magnitude = x.float().abs() if fp32_rank else x.abs()
    return x * at_least(magnitude, threshold).to(x.dtype)


def disjoint_merge(trimmed: Tensor, sign: Tensor, how: str = "sum") -> Tensor:
    """The entries of ``trimmed`` ([rows, ...]) that agree with the elected ``sign``, aggregated per
    entry: ``sum``, ``mean`` (over the agreeing entries, count clamped >= 1) or ``max`` (the largest
    agreeing magnitude times the elected sign). An elected sign of 0 selects the negative entries,
    as the release's ``disjoint_merge`` does (and ``max`` then gives 0)."""
    if how == "mean":
        return ties_disjoint_mean(trimmed, sign)
    s = sign - (1 - sign.abs())  # 0 -> -1
    agreeing = (trimmed * s).clamp_(min=0)  # |x| where x agrees with s, else 0
    if how == "sum":
        return s * agreeing.sum(dim=0)
    if how == "max":
        return sign * agreeing.amax(dim=0)
    raise ValueError(f"unknown disjoint aggregation {how!r}")


def continual_ties_step(
    merged: Tensor,
    tau: Tensor,
    keep: float = 0.2,
    scale: float = 0.5,
    disjoint: str = "sum",
    step: Step | None = None,
) -> Tensor:
    """M_t = M_{t-1} + scale * TIES(M_{t-1}, tau_t). ``step``: the model-wide thresholds and majority
    sign (global scope); without it, this tensor's own."""
    if step is None:
        thresholds = (ties_threshold(merged, keep), ties_threshold(tau, keep))
        trimmed = torch.stack([trim(merged, thresholds[0]), trim(tau, thresholds[1])])
        sign = ties_elect(trimmed)
    else:
        trimmed = torch.stack([trim(merged, step[0], fp32_rank=True), trim(tau, step[1], fp32_rank=True)])
        sign = ties_elect(trimmed, step[2])
    return merged + scale * disjoint_merge(trimmed, sign, disjoint)


def continual_ties_fold(
    taus: Iterable[Tensor],
    keep: float = 0.2,
    scale: float = 0.5,
    disjoint: str = "sum",
    steps: Sequence[Step] | None = None,
) -> Tensor:
    """M_T of one tensor, folded over its task vectors in task order (``steps``: the model-wide
    numbers of steps 2..T, as many as there are task vectors after the first; None: per tensor)."""
    merged = None
    for i, tau in enumerate(taus):
        if merged is None:
            merged = scale * tau
        else:
            merged = continual_ties_step(merged, tau, keep, scale, disjoint, None if steps is None else steps[i - 1])
    return merged


# --- the whole-model passes of scope global ---------------------------------------------------


@dataclass
class _Running:
    """A MergeView whose one 'task vector' per tensor is the running merge M_{t-1} before step t (refolded
    from the task vectors with the steps found so far), optionally followed by tau_t itself."""

    view: MergeView
    steps: list[Step]
    options: ContinualTiesOptions
    with_next: bool = False

    @property
    def num_tasks(self) -> int:
        return 2 if self.with_next else 1

    def one_chunk(self, tensor: TensorInfo) -> bool:
        return self.view.one_chunk(tensor)

    def tensors(self) -> list[TensorInfo]:
        return self.view.tensors()

    def chunks(self, tensors: list[TensorInfo]) -> Iterator[Chunk]:
        return map(self._running, self.view.chunks(tensors))

    def map(self, fn: Callable[[Chunk], Any], tensors: list[TensorInfo]) -> Iterator[Any]:
        return self.view.map(lambda chunk: fn(self._running(chunk)), tensors)

    def _running(self, chunk: Chunk) -> Chunk:
        count = len(self.steps) + 1  # before step t, M_{t-1} folds tau_1..tau_{t-1}: steps 2..t-1 known
        o = self.options
        taus = iter(chunk.taus)
        before = [next(taus) for _ in range(count)]
        merged = continual_ties_fold(before, o.keep, o.scale, o.disjoint, self.steps)
        rows = [merged, next(taus)] if self.with_next else [merged]
        return Chunk(chunk.tensor, chunk.start, chunk.stop, [row.reshape(-1) for row in rows], {})


@dataclass
class _Flat:
    """``view`` with each tensor's task vectors flattened (the radix select counts flat tensors)."""

    view: MergeView

    @property
    def num_tasks(self) -> int:
        return self.view.num_tasks

    def one_chunk(self, tensor: TensorInfo) -> bool:
        return self.view.one_chunk(tensor)

    def tensors(self) -> list[TensorInfo]:
        return self.view.tensors()

    def chunks(self, tensors: list[TensorInfo]) -> Iterator[Chunk]:
        return map(self._flat, self.view.chunks(tensors))

    def map(self, fn: Callable[[Chunk], Any], tensors: list[TensorInfo]) -> Iterator[Any]:
        return self.view.map(lambda chunk: fn(self._flat(chunk)), tensors)

    @staticmethod
    def _flat(chunk: Chunk) -> Chunk:
        taus = (tau.reshape(-1) for tau in chunk.taus)
        return Chunk(chunk.tensor, chunk.start, chunk.stop, taus, chunk.inputs)


def _prepare(view: MergeView, options: ContinualTiesOptions) -> Prepared:
    if options.scope == "tensor":
        return Prepared()
    tensors = view.tensors()
    task_thresholds = kth_magnitudes(_Flat(view), tensors, options.keep)
    steps: list[Step] = []
    for t in range(1, view.num_tasks):  # step t + 1 (1-based) merges tau_{t+1} into M_t
        merged_threshold = kth_magnitudes(_Running(view, steps, options), tensors, options.keep)[0]
        thresholds = (merged_threshold, task_thresholds[t])
        total = 0
        for chunk in _Running(view, steps, options, with_next=True).chunks(tensors):
            trimmed = torch.stack([trim(x, th, fp32_rank=True) for x, th in zip(chunk.taus, thresholds, strict=True)])
            total += int(torch.sign(trimmed.sum(dim=0)).sum())
        steps.append((merged_threshold, task_thresholds[t], float((total > 0) - (total < 0))))
    found = {"steps": steps}
    return Prepared(kwargs=lambda tensor: found, info={"continual_ties_steps": list(steps)})


@register_rule(
    "continual_ties",
    granularity="tensor",
    lam=1.0,
    options=ContinualTiesOptions,
    prepare=_prepare,
    passes=lambda options: 5 if options.scope == "global" else 0,
    summary="in task order, the merged task vector plus scale x a two-row TIES (trim, elect, disjoint sum) "
    "of it and the new task vector (FusionBench's continual TIES)",
)
def continual_ties(
    taus: Iterable[Tensor],
    keep: float = 0.2,
    scale: float = 0.5,
    disjoint: str = "sum",
    scope: str = "global",
    steps: Sequence[Step] | None = None,
) -> Tensor:
    """Continual TIES: M_1 = scale tau_1, M_t = M_{t-1} + scale TIES(M_{t-1}, tau_t) (disjoint sum).

    ``steps`` (scope global) come from ``prepare``; without them each tensor uses its own."""
    return continual_ties_fold(taus, keep, scale, disjoint, steps if scope == "global" else None)
