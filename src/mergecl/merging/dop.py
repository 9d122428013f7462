"""DOP, dual orthogonal projections for continual merging without data (Yang et al., NeurIPS 2025),
as in the authors' FusionBench release (``fusion_bench/method/dop/dop.py``, ``ContinualDOPForCLIP``).

The models arrive one at a time; the running merged task vector starts as M_1 = tau_1 and each
new task vector is merged with it, tensor by tensor:

- a weight matrix (a 2-D tensor not named by ``mean_names``): M_t minimises, from the start
  X = (M_{t-1} + tau_t) / 2, by ``steps`` Adam steps of learning rate ``lr``, a weighted sum
  w_1 L(X - M_{t-1}; M_{t-1}) + w_2 L(X - tau_t; tau_t), where L(D; Y) measures D in Y's principal
  subspaces: with Y's SVD U diag(s) V^T cut to the r leading directions whose cumulative share of
  sum(s) is below ``epsilon``, L = ||diag(s_r) U_r^T D||_F^2 + ||D V_r diag(s_r)||_F^2 (``subspace``:
  both terms, or the U or the V one). The weights are MGDA's per step (the min-norm convex
  combination of the two gradients, each divided by its loss), smoothed by an exponential moving
  average that starts at (alpha, 1 - alpha) (``ema_beta``); without ``mgda`` they are fixed
  (alpha, 1 - alpha). Both losses are data-free: they only read the two task vectors.
- every other tensor (biases, norms, embeddings, convolution kernels): M_t = (M_{t-1} + tau_t) / 2.

The rule folds over each tensor's task vectors in task order keeping M (and, during a step, the
two subspaces and Adam's two moments): memory O(1) in the number of tasks. Cost per weight matrix
(m x n) and task after the first: two thin SVDs and ``steps`` iterations of four (m x n x r)
matrix products.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from mergecl.merging.registry import Running, register_rule
from mergecl.merging.tsv import is_matrix, pass_names
from mergecl.options import Options

# the release optimises the weights of nn.Linear modules and averages everything else, embedding
# tables included; mergecl sees tensors, not modules: 2-D tensors are matrices unless named so
MEAN_NAMES = "embed"


class DopOptions(Options):
    lr: float = Field(1e-4, gt=0, description="Adam's learning rate for each weight matrix's optimisation")
    steps: int = Field(200, ge=0, description="Adam steps per weight matrix and task (num_steps)")
    mgda: bool = Field(True, description="weigh the two losses by MGDA's min-norm solution (else alpha, 1 - alpha)")
    alpha: float = Field(
        0.8, ge=0, le=1, description="weight of the merged model's loss: fixed without mgda, the EMA's start with it"
    )
    ema: bool = Field(True, description="smooth MGDA's weights by an exponential moving average (with mgda)")
    ema_beta: float = Field(0.999, ge=0, le=1, description="decay of that moving average")
    epsilon: float = Field(
        0.99999,
        ge=0,
        le=1,
        description="the subspace keeps the leading singular directions whose cumulative share of the "
        "singular value sum is below this (svd_epsilon)",
    )
    subspace: Literal["uv", "u", "v"] = Field(
        "uv", description="the loss projects on the left (u), the right (v) or both singular subspaces (svd_proj_space)"
    )
    mean_names: str | None = Field(
        MEAN_NAMES,
        description="regex on tensor names: 2-D tensors it matches are averaged, not optimised "
        "(the release averages embedding tables: only nn.Linear weights are optimised)",
    )


# --- the math of one weight matrix ------------------------------------------------------------


def dop_subspace(y: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """(U_r * s_r, V_r * s_r): ``y``'s leading singular directions scaled by their singular values,
    r the number of leading directions whose cumulative share of sum(s) is below ``epsilon``
    (0 for a zero matrix)."""
    u, s, vh = torch.linalg.svd(y, full_matrices=False)
    total = s.sum()
    rank = int((s.cumsum(dim=0) / total < epsilon).sum()) if total > 0 else 0
    return u[:, :rank] * s[:rank], vh[:rank].T * s[:rank]


def dop_loss_grad(delta: Tensor, us: Tensor, vs: Tensor, subspace: str = "uv") -> tuple[float, Tensor]:
    """L(D) = ||diag(s) U^T D||^2 + ||D V diag(s)||^2 (or one of the two terms) and its gradient in D;
    ``us``, ``vs`` as ``dop_subspace`` returns them."""
    loss = torch.zeros((), dtype=delta.dtype)
    grad = torch.zeros_like(delta)
    if subspace in ("uv", "u"):
        left = us.T @ delta  # diag(s) U^T D
        loss = loss + torch.linalg.matrix_norm(left) ** 2
        grad += 2 * (us @ left)
    if subspace in ("uv", "v"):
        right = delta @ vs  # D V diag(s)
        loss = loss + torch.linalg.matrix_norm(right) ** 2
        grad += 2 * (right @ vs.T)
    return float(loss), grad


def min_norm_weights(g1: Tensor, g2: Tensor) -> tuple[float, float]:
    """(c, 1 - c) minimising ||c g1 + (1 - c) g2||, c kept in [0.001, 0.999] at the ends (MGDA for
    two tasks, in the closed form of Sener and Koltun's solver)."""
    v11, v12, v22 = (g1 * g1).sum(), (g1 * g2).sum(), (g2 * g2).sum()
    if v12 >= v11:
        return 0.999, 1 - 0.999
    if v12 >= v22:
        return 0.001, 1 - 0.001
    c = (v22 - v12) / (v11 + v22 - 2 * v12)
    return float(c), float(1 - c)


def _normalised(grad: Tensor, loss: float) -> Tensor:
    return grad / loss if loss > 0 else torch.zeros_like(grad)


def dop_merge_matrix(
    merged: Tensor,
    tau: Tensor,
    lr: float = 1e-4,
    steps: int = 200,
    mgda: bool = True,
    alpha: float = 0.8,
    ema: bool = True,
    ema_beta: float = 0.999,
    epsilon: float = 0.99999,
    subspace: str = "uv",
) -> Tensor:
    """One DOP step on a weight matrix: the merge of the running ``merged`` and the new ``tau``."""
    anchors = (merged, tau)
    subspaces = [dop_subspace(y, epsilon) for y in anchors]
    x = ((merged + tau) / 2).requires_grad_(True)
    if steps == 0 or all(us.shape[1] == 0 for us, _ in subspaces):
        return x.detach()  # nothing to optimise: both losses are identically 0
    optimiser = torch.optim.Adam([x], lr=lr)
    weights = (alpha, 1 - alpha)
    with torch.no_grad():
        for _ in range(steps):
            (loss1, grad1), (loss2, grad2) = (
                dop_loss_grad(x - y, us, vs, subspace) for y, (us, vs) in zip(anchors, subspaces, strict=True)
            )
            if mgda:
                # each gradient divided by its loss (a loss of exactly 0: a zero direction)
                c1, c2 = min_norm_weights(_normalised(grad1, loss1), _normalised(grad2, loss2))
                if ema:
                    weights = (ema_beta * weights[0] + (1 - ema_beta) * c1, ema_beta * weights[1] + (1 - ema_beta) * c2)
                else:
                    weights = (c1, c2)
            x.grad = weights[0] * grad1 + weights[1] * grad2
            optimiser.step()
    return x.detach()


# --- the declared rule ------------------------------------------------------------------------


def dop_step(merged: Tensor, tau: Tensor, mean_names: str | None = MEAN_NAMES, name: str = "", **matrix) -> Tensor:
    """M_t from M_{t-1} and tau_t: a weight matrix optimised (``matrix``: ``dop_merge_matrix``'s
    options), any other tensor (M + tau) / 2."""
    if is_matrix(tau, name, mean_names):
        return dop_merge_matrix(merged, tau, **matrix)
    return (merged + tau) / 2


@register_rule(
    "dop",
    granularity="tensor",
    lam=1.0,
    options=DopOptions,
    prepare=pass_names,
    running=Running(lambda merged, tau, t, generator, **options: dop_step(merged, tau, **options), named=True),
    summary="in task order, each weight matrix optimised (Adam, MGDA-weighted) to stay close to the merged and "
    "the new task vector in their principal subspaces; other tensors halved (DOP)",
)
def dop(
    taus: Iterable[Tensor],
    lr: float = 1e-4,
    steps: int = 200,
    mgda: bool = True,
    alpha: float = 0.8,
    ema: bool = True,
    ema_beta: float = 0.999,
    epsilon: float = 0.99999,
    subspace: str = "uv",
    mean_names: str | None = MEAN_NAMES,
    name: str = "",
) -> Tensor:
    """Dual orthogonal projections (DOP): each weight matrix's merge with the new task vector
    optimised to stay close to both in their principal subspaces; other tensors (M + tau) / 2.

    ``name`` is the tensor's (the engine passes it, for ``mean_names``)."""
    matrix = dict(lr=lr, steps=steps, mgda=mgda, alpha=alpha, ema=ema, ema_beta=ema_beta, epsilon=epsilon)
    merged = None
    for tau in taus:
        merged = tau if merged is None else dop_step(merged, tau, mean_names, name, subspace=subspace, **matrix)
    return merged
