"""OPCM, orthogonal projection-based continual merging (Tang et al., 2025), as in the authors'
FusionBench release (``fusion_bench/method/opcm/opcm.py``, ``OPCMForCLIP``).

The models arrive one at a time and are folded into a running merged task vector. Unscaled, that
running vector is S_1 = tau_1 and, for t > 1,

- a 2-D tensor (a weight matrix): S_t = S_{t-1} + P(tau_t), where P removes from tau_t its
  components on the singular directions of S_{t-1}: with S_{t-1} = U diag(s) V^T and
  C = U^T tau_t V, the entries C_ii (every i) and C_ij with i, j < k are zeroed, k being the first
  index at which the cumulative share of the singular values, cumsum(s) / sum(s), exceeds
  ``alpha`` (the k leading directions hold at most alpha of the sum); P(tau_t) = tau_t - U C_zeroed V^T;
- every other tensor (biases, norms, convolution kernels, and 2-D tensors named by
  ``plain_names``: embedding tables, which the release, working on modules, never projects, since
  only ``nn.Linear`` weights are): S_t = S_{t-1} + tau_t.

The merged model is theta_0 + lam_T S_T with one model-wide coefficient lam_T = mean_t ||tau_t|| /
||S_T||, the norms taken over the whole model: the merged task vector is rescaled to the average
norm of the task vectors. (The release rescales after every step, M_t = S_t / lambda_t; the
projection only sees S_{t-1}'s singular vectors and the cumulative share, which a scaling leaves
alone, so the last rescaling is the only one that counts.)

mergecl's engine hands the rule each tensor's task vectors in task order; the fold keeps S only,
so memory is O(1) in the number of tasks. Its running form (``mergecl learn``, ``mergecl merge
--continual``) keeps S and one norm per task: the coefficient is recomputed from them at each
step. The model-wide norms need a pass of their own (``prepare``), which runs the same fold once
more. The thin SVD stands in for the release's full
one: every zeroed entry lies in the leading min(m, n) block, so the result is the same.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pydantic import Field
from torch import Tensor

from mergecl.merging.registry import MergeView, Prepared, Running, register_rule
from mergecl.merging.tsv import is_matrix
from mergecl.options import Options
from mergecl.tensors import squared_norm

# the release projects the weights of nn.Linear modules only; mergecl sees tensors, not modules:
# 2-D tensors are weight matrices unless named so (embedding tables: word, position, token type)
PLAIN_NAMES = "embed"


class OpcmOptions(Options):
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="the leading singular directions of the merged task vector that hold at most this share "
        "of its singular value sum are protected as a block (the diagonal always is)",
    )
    plain_names: str | None = Field(
        PLAIN_NAMES,
        description="regex on tensor names: 2-D tensors it matches are added, not projected (the release "
        "projects nn.Linear weights only, not embedding tables); '': project every 2-D tensor",
    )


def opcm_split(s: Tensor, alpha: float) -> int:
    """The first index at which cumsum(s) / sum(s) exceeds ``alpha`` (0 if none does)."""
    return int((s.cumsum(dim=0) / s.sum() > alpha).float().argmax())


def opcm_project(merged: Tensor, tau: Tensor, alpha: float = 0.5) -> Tensor:
    """``tau`` without its components on ``merged``'s singular directions (a 2-D tensor): the
    pairs (u_i, v_i) of every i, and (u_i, v_j) of every i, j below the alpha split."""
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    coefficients = u.T @ tau @ vh.T
    removed = torch.diag_embed(coefficients.diagonal())
    k = opcm_split(s, alpha)
    removed[:k, :k] = coefficients[:k, :k]
    return tau - u @ removed @ vh


def opcm_step(
    merged: Tensor, tau: Tensor, alpha: float = 0.5, plain_names: str | None = PLAIN_NAMES, name: str = ""
) -> Tensor:
    """S_t from S_{t-1} (edited in place) and tau_t: a weight matrix's tau_t projected first
    (``name``: the tensor's, for ``plain_names``)."""
    if is_matrix(tau, name, plain_names):
        merged += opcm_project(merged, tau, alpha)
    else:
        merged += tau
    return merged


def opcm_fold(
    taus: Iterable[Tensor],
    alpha: float = 0.5,
    norms: list[float] | None = None,
    plain_names: str | None = PLAIN_NAMES,
    name: str = "",
) -> Tensor:
    """S_T of one tensor, folded over its task vectors in task order; ``norms`` (if given) gets each
    task vector's squared norm."""
    merged = None
    for tau in taus:
        if norms is not None:
            norms.append(squared_norm(tau))
        merged = tau.clone() if merged is None else opcm_step(merged, tau, alpha, plain_names, name)
    return merged


def opcm_coefficient(task_norms: list[float], merged_norm: float) -> float:
    """lambda_T = mean_t ||tau_t|| / ||S_T||, the norms over the whole model (1 if S_T is zero)."""
    return sum(task_norms) / len(task_norms) / merged_norm if merged_norm > 0 else 1.0


def _coefficient(view: MergeView, options: Options) -> Prepared:
    """lam_T = mean_t ||tau_t|| / ||S_T|| over the whole model (one pass), times the given lam."""
    task_sq = [0.0] * view.num_tasks
    merged_sq = 0.0
    for chunk in view.chunks(view.tensors()):
        norms: list[float] = []
        merged = opcm_fold(chunk.taus, options.alpha, norms, options.plain_names, chunk.tensor.key)
        merged_sq += squared_norm(merged)
        task_sq = [total + n for total, n in zip(task_sq, norms, strict=True)]
    scale = opcm_coefficient([n**0.5 for n in task_sq], merged_sq**0.5)
    lam = getattr(options, "lam", None)
    lam = 1.0 if lam is None else lam
    return Prepared(kwargs=lambda tensor: {"name": tensor.key}, lam=lam * scale, info={"lambda": scale})


@register_rule(
    "opcm",
    granularity="tensor",
    lam=1.0,
    options=OpcmOptions,
    prepare=_coefficient,
    passes=lambda options: 1,
    running=Running(
        lambda merged, tau, t, generator, **options: opcm_step(merged, tau, **options),
        coefficient=opcm_coefficient,
        named=True,
    ),
    summary="in task order, each weight matrix's new task vector projected off the merged one's singular "
    "directions; rescaled to the mean task vector norm (OPCM)",
)
def opcm(taus: Iterable[Tensor], alpha: float = 0.5, plain_names: str | None = PLAIN_NAMES, name: str = "") -> Tensor:
    """Orthogonal projection continual merge (OPCM): each weight matrix's new task vector minus its
    parts on the merged one's singular directions, rescaled to the mean task vector norm.

    Returns S_T; the engine multiplies it by lam times the model-wide coefficient of ``prepare``
    (which also gives ``name``, the tensor's)."""
    return opcm_fold(taus, alpha, None, plain_names, name)
