"""Isotropic merging (Marczak et al., "No Task Left Behind", ICML 2025): Iso-C and Iso-CTS, two
``tensor`` rules.

Iso-C, per 2-D weight matrix: the sum of the task matrices, M = U S V^T, with every singular value
replaced by their mean: mean(S) U V^T (a flat spectrum). Iso-CTS keeps the top directions of M as a
common subspace and fills the rest of the rank with each task's own top directions outside it,
orthogonalises both sides and flattens the spectrum the same way. Other tensors (biases, norms,
convolutions, and the 2-D tensors ``mean_names`` matches) take the mean of the task vectors, as the
authors' release does.

Memory: the T task matrices of one tensor at a time (Iso-C: their running sum only).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from pydantic import Field
from torch import Tensor

from mergecl.merging.registry import register_rule
from mergecl.merging.tsv import MEAN_NAMES, is_matrix, mean_names_field, pass_names, polar, running_mean
from mergecl.options import Options


class IsoCOptions(Options):
    mean_names: str | None = mean_names_field()


@register_rule("iso_c", granularity="tensor", lam=1.0, options=IsoCOptions, prepare=pass_names)
def iso_c(taus: Iterator[Tensor], mean_names: str | None = MEAN_NAMES, name: str = "") -> Tensor:
    """Per matrix: the sum of the task matrices with its singular values all set to their mean (Iso-C).

    Other tensors: the mean of the task vectors. ``name`` is the tensor's (the engine passes it).
    """
    taus = iter(taus)
    total = next(taus)
    count = 1
    for tau in taus:
        total.add_(tau)
        count += 1
    if not is_matrix(total, name, mean_names):
        return total.div_(count)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return (u * s.mean()) @ vh


def iso_cts_split(rank: int, count: int, common_space_fraction: float) -> tuple[int, int]:
    """(common directions, directions per task) of a rank-``rank`` matrix merged from ``count`` tasks,
    as the release computes them: the task-specific total is rounded (Python's round, halves to
    even) to a multiple of T and the common subspace takes the rest of the rank. Where that rounding
    would leave the common subspace negative (small ranks, small fractions: the release fails
    there), each task gets rank // T directions and the common subspace the remainder."""
    common = int(rank * common_space_fraction)
    common = rank - round((rank - common) / count) * count
    if common < 0:
        common = rank - (rank // count) * count
    return common, (rank - common) // count


class IsoCTSOptions(Options):
    common_space_fraction: float = Field(
        0.8, ge=0, le=1, description="fraction of the rank given to the common subspace (before rounding)"
    )
    mean_names: str | None = mean_names_field()


@register_rule("iso_cts", granularity="tensor", lam=1.0, options=IsoCTSOptions, prepare=pass_names)
def iso_cts(
    taus: Iterator[Tensor],
    common_space_fraction: float = 0.8,
    mean_names: str | None = MEAN_NAMES,
    name: str = "",
) -> Tensor:
    """Per matrix: common subspace of the sum + each task's own directions, flat spectrum (Iso-CTS).

    Other tensors: the mean of the task vectors. ``name`` is the tensor's (the engine passes it).
    """
    taus = iter(taus)
    first = next(taus)
    if not is_matrix(first, name, mean_names):
        return running_mean(first, taus)
    tasks = [first, *taus]
    common, per_task = iso_cts_split(min(first.shape), len(tasks), common_space_fraction)
    total = torch.stack(tasks).sum(dim=0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    u_common, s_common, vh_common = u[:, :common], s[:common], vh[:common]
    del total, u, s, vh
    us, ss, vhs = [], [], []
    for tau in tasks:
        own = tau - u_common @ (u_common.T @ tau)  # tau without its common-subspace part
        u_t, s_t, vh_t = torch.linalg.svd(own, full_matrices=False)
        us.append(u_t[:, :per_task])
        ss.append(s_t[:per_task])
        vhs.append(vh_t[:per_task])
    del tasks
    u_all = torch.cat([*us, u_common], dim=1)  # [m, r]: T * per_task task directions, then the common ones
    s_all = torch.cat([*ss, s_common])
    vh_all = torch.cat([*vhs, vh_common], dim=0)
    return (polar(u_all) * s_all.mean()) @ polar(vh_all)
