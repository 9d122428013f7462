"""TSV-Merge (Task Singular Vectors: Merge; Gargiulo et al., CVPR 2025), a ``tensor`` rule.

Per 2-D weight matrix, each task matrix tau_t = U_t S_t V_t^T keeps its top k singular components
(k = int(r * fraction), r = min(m, n), fraction 1/T by default); the kept left singular vectors of
all tasks, side by side, are replaced by their nearest matrix with orthonormal columns (the polar
factor P Q^T of their SVD P D Q^T), the right ones likewise, and the merged matrix is
U_orth diag(S_1..S_T) V_orth^T. Other tensors (biases, norms, convolutions, and the 2-D tensors
``mean_names`` matches) take the mean of the task vectors, as the authors' release does.

Memory: the T task matrices of one tensor (and their SVDs) at a time.

Also home of what the isotropic rules (iso.py) share with it: the matrix test, the polar factor,
the mean of the other tensors and the tensor name handed over by ``prepare``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from pydantic import Field
from torch import Tensor

from mergecl.merging.registry import MergeView, Prepared, register_rule
from mergecl.options import Options

# the authors' releases merge open_clip's 2-D ``text_projection`` parameter by the mean, not by SVD
MEAN_NAMES = "text_projection"


def mean_names_field():
    return Field(
        MEAN_NAMES,
        description="regex on tensor names: 2-D tensors it matches are averaged, not merged by SVD "
        "(the authors' releases: text_projection)",
    )


def is_matrix(tau: Tensor, name: str, mean_names: str | None) -> bool:
    """Merged by the SVD rule: 2-D, and not named by ``mean_names``."""
    return tau.dim() == 2 and not (mean_names and re.search(mean_names, name))


def running_mean(first: Tensor, rest: Iterable[Tensor]) -> Tensor:
    """m = tau_1; m += (tau_t - m) / t (the authors' mean of the non-matrix tensors)."""
    mean = first
    for t, tau in enumerate(rest, start=2):
        mean.add_(tau.sub_(mean).div_(t))
    return mean


def polar(x: Tensor) -> Tensor:
    """The polar factor P Q^T of x = P D Q^T: the nearest matrix with orthonormal columns (or rows)."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def pass_names(view: MergeView, options: Options) -> Prepared:
    """No pass over the model: each tensor's rule call gets the tensor's name (for ``mean_names``)."""
    return Prepared(kwargs=lambda tensor: {"name": tensor.key})


class TsvOptions(Options):
    sv_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="fraction of each task matrix's singular components kept (None: 1/T, the paper's)",
    )
    mean_names: str | None = mean_names_field()


@register_rule("tsv_m", granularity="tensor", lam=1.0, options=TsvOptions, prepare=pass_names)
def tsv_m(
    taus: Iterator[Tensor],
    sv_fraction: float | None = None,
    mean_names: str | None = MEAN_NAMES,
    name: str = "",
) -> Tensor:
    """Per matrix: top 1/T singular components of each task, singular vectors orthogonalised (TSV-M).

    Other tensors: the mean of the task vectors. ``name`` is the tensor's (the engine passes it).
    """
    taus = iter(taus)
    first = next(taus)
    if not is_matrix(first, name, mean_names):
        return running_mean(first, taus)
    svds = [torch.linalg.svd(tau, full_matrices=False) for tau in (first, *taus)]
    count = len(svds)
    rank = min(first.shape)
    # the release's k = int(r * (1 / T)), computed the same way (not r // T)
    keep = int(rank * (sv_fraction if sv_fraction is not None else 1 / count))
    if keep == 0:
        return torch.zeros_like(first)
    u = torch.cat([u[:, :keep] for u, _, _ in svds], dim=1)  # [m, T k]
    s = torch.cat([s[:keep] for _, s, _ in svds])
    vh = torch.cat([vh[:keep] for _, _, vh in svds], dim=0)  # [T k, n]
    del svds
    return (polar(u) * s) @ polar(vh)
