"""KnOTS (Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025), a ``tensor`` rule.

Per 2-D weight matrix (for a LoRA model: the dense updates s (B_t A_t - B_0 A_0), the engine's task
vectors in ``space: dense``), the T task matrices [out, in] are put side by side, [out, T in], and
decomposed once, U S [V_1 .. V_T]; singular values <= ``min_singular`` are dropped (computed in
float64, as the release does). Each task is then S V_t [k, in]: its coordinates in the shared basis
U. Those T matrices are merged by the inner rule ``merge`` (TIES by default: each task's top
``keep`` entries by |x|, elected sign, disjoint mean), and the merged update is U times the merged
coordinates. ``basis: input`` aligns the input side instead (the matrices transposed, [in, T out]).
Other tensors (biases, norms, convolutions) take the inner rule directly, as the release's
``merge_other_params`` path does; the release's LoRA models have none.

The inner rules are mergecl's own functions (ties.ties, rules.task_arithmetic, rules.average).
The release takes TIES's top-k (and the majority sign) over the whole model's concatenated
coordinates per task; here they are per tensor.

Memory: the T task matrices of one tensor, their concatenation and its SVD.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from mergecl.merging.registry import register_rule
from mergecl.merging.rules import average, task_arithmetic
from mergecl.merging.ties import ties
from mergecl.options import Options

Inner = Literal["ties", "task_arithmetic", "average"]


class KnotsOptions(Options):
    merge: Inner = Field(
        "ties", description="the merge of the tasks' coordinates in the shared basis (the release's default: TIES)"
    )
    keep: float = Field(
        0.2, gt=0, le=1, description="ties: fraction of each task's coordinates kept (the release's topK / 100)"
    )
    basis: Literal["output", "input"] = Field(
        "output",
        description="the side the shared basis spans: output ([out, T in], the release's default) or input "
        "(the matrices transposed, [in, T out]: the release's concat_across_output: False)",
    )
    min_singular: float = Field(
        1e-5, ge=0, description="singular values <= this are dropped from the shared basis (the release's 1e-5)"
    )


def inner_merge(taus: list[Tensor], merge: Inner, keep: float) -> Tensor:
    """The inner rule over T tensors of one shape."""
    if merge == "ties":
        return ties(taus, keep=keep)
    if merge == "task_arithmetic":
        return task_arithmetic(iter(taus))
    return average(iter(taus))


def knots_coordinates(taus: list[Tensor], min_singular: float = 1e-5) -> tuple[Tensor, list[Tensor]]:
    """U [out, k] and each task's S V_t [k, in] from one SVD of the matrices side by side [out, T in]."""
    width = taus[0].shape[1]
    u, s, vh = torch.linalg.svd(torch.cat(taus, dim=1).double(), full_matrices=False)
    kept = s > min_singular
    dtype = taus[0].dtype
    u, s, vh = u[:, kept].to(dtype), s[kept].to(dtype), vh[kept].to(dtype)
    return u, [s[:, None] * v for v in vh.split(width, dim=1)]


@register_rule("knots", granularity="tensor", lam=0.6, options=KnotsOptions)
def knots(
    taus: Iterable[Tensor],
    merge: Inner = "ties",
    keep: float = 0.2,
    basis: Literal["output", "input"] = "output",
    min_singular: float = 1e-5,
) -> Tensor:
    """Per matrix: one SVD of the task matrices side by side, the tasks' coordinates merged by `merge` (KnOTS).

    Other tensors: `merge` applied to the task vectors directly.
    """
    taus = list(taus)
    if taus[0].dim() != 2:
        return inner_merge(taus, merge, keep)
    transpose = basis == "input"
    if transpose:
        taus = [tau.T for tau in taus]
    u, coordinates = knots_coordinates(taus, min_singular)
    del taus
    merged = u @ inner_merge(coordinates, merge, keep)
    return merged.T.contiguous() if transpose else merged
