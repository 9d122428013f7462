"""Gradient projection memory (GPM, Saha et al. 2021), as BECAME's released code uses it (docs/methods.md#gpm).

For every ``nn.Linear`` and ``nn.Conv2d`` of the encoder the memory holds an orthonormal basis M
(d x k, d = the layer's input width: ``in_features``, or ``in_channels * kh * kw`` for a conv) of
the input representations of earlier tasks. While a later task trains, ``GradientProjection``
removes from each weight gradient its component in span(M): g <- g - g M M^T (weights reshaped to
out x d), so the outputs of the layer on old inputs stay (to first order) unchanged.

Memory update after a task (``GPMemory.update``), on ``samples`` (125) random training examples:
- representations: the inputs each layer sees, collected by forward hooks in eval mode (conv
  inputs unfolded into the patches the kernel sees, as ``get_representation_matrix_alexnet``;
  token sequences give one column per non-padding token);
- task 1 (empty memory): R = U S V^T, keep the smallest k with sum_{i<=k} s_i^2 / ||R||^2 >= eps;
- later tasks: R_hat = R - M M^T R, add the top singular vectors of R_hat until
  (||R||^2 - ||R_hat||^2 + sum s_hat_i^2) / ||R||^2 >= eps; the basis is capped at d columns.
  (With an empty memory this is the task-1 rule, so one function does both.)

Two deliberate differences from the released code, both documented in docs/results/became.md:
- R is kept only while it has at most d columns (then an SVD of R_hat, as the release); beyond
  that only the Gram matrix G = R R^T is kept and R_hat R_hat^T = P G P is eigendecomposed
  (float64): the same U and s^2, with memory O(d^2) whatever the number of patches or tokens;
- the task-1 rule keeps the smallest k with cumulative energy >= eps (docs/methods.md#gpm); the
  release's ``np.sum(np.cumsum(ratio) < eps)`` keeps one direction fewer (its own comment: "#+1").
Directions with (numerically) zero energy are never added, so eps >= 1 means "the whole range".

Projection is exact for SGD (with or without momentum); AdamW's per-coordinate scaling and weight
decay move weights out of the allowed subspace, so GPM's guarantee needs ``optimizer: sgd``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergecl import distributed
from mergecl.data.types import Split
from mergecl.models.base import Learner
from mergecl.training.loop import Hook

CARRIED_PREFIX = "gpm/"  # key prefix of the bases in a stream's carried state
ENERGY_TOL = 1e-10  # relative energy below which a direction is numerical noise
THRESHOLD_TOL = 1e-9  # slack in "energy >= eps" so that exact fractions are not lost to rounding


def eps_at(t: int, eps: float = 0.97, eps_step: float = 0.003) -> float:
    """The energy threshold after task t (0-based): eps + eps_step * t (paper, CIFAR), at most 1."""
    return min(1.0, eps + eps_step * t)


# --- which layers ------------------------------------------------------------------------------


def projectable_layers(learner: Learner, project_head: bool = False) -> dict[str, nn.Module]:
    """Full module name -> layer: the encoder's Linear/Conv2d layers with a trainable weight
    (grouped convs are skipped), plus the head when ``project_head`` and it is a Linear."""
    layers: dict[str, nn.Module] = {}
    for name, module in learner.named_modules():
        in_encoder = name.startswith("encoder.")
        is_head = name == "head" and project_head
        if not (in_encoder or is_head) or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            continue
        if module.weight.requires_grad:
            layers[name] = module
    return layers


def unprojected_params(learner: Learner, layers: dict[str, nn.Module], project_head: bool) -> list[nn.Parameter]:
    """What the projected stage freezes: every trainable encoder parameter (and the head's, when
    the head is projected) that is not a projected weight -- biases, norms, embeddings. GPM
    zeroes their gradients after task 1; freezing also keeps weight decay off them."""
    projected = {id(layer.weight) for layer in layers.values()}
    groups = [learner.encoder.parameters()]
    if project_head:
        groups.append(learner.head.parameters())
    return [p for group in groups for p in group if p.requires_grad and id(p) not in projected]


@contextmanager
def frozen(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """requires_grad off for ``params`` inside the block (train_task then leaves them out)."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# --- representations ---------------------------------------------------------------------------


def layer_inputs(layer: nn.Module, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """[n, d] input vectors the layer's weight multiplies: conv patches, or one row per position
    (only where ``mask`` is set, when the input is a [B, L, d] token sequence matching it)."""
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
            padding: Any = 0
        else:
            padding = layer.padding
        if isinstance(padding, str):  # 'same' / 'valid'
            padding = _string_padding(layer, padding)
        patches = F.unfold(x, layer.kernel_size, layer.dilation, padding, layer.stride)  # [B, C*kh*kw, L]
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def _string_padding(layer: nn.Conv2d, padding: str) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    # 'same' (stride 1): total padding d*(k-1); unfold pads symmetrically, torch does too when even
    return tuple(d * (k - 1) // 2 for d, k in zip(layer.dilation, layer.kernel_size, strict=True))  # type: ignore[return-value]


class Representation:
    """The input vectors one layer saw: the rows themselves while there are at most d of them
    (an SVD of n x d is then cheapest), else only G = R R^T (d x d; memory O(d^2) whatever the
    number of patches or tokens). Both in float64."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.rows: Tensor | None = torch.zeros(0, width, dtype=torch.float64)
        self.gram: Tensor | None = None

    def add(self, rows: Tensor) -> None:
        rows = rows.detach().double().cpu()
        if self.rows is not None and len(self.rows) + len(rows) <= self.width:
            self.rows = torch.cat([self.rows, rows])
            return
        if self.gram is None:
            assert self.rows is not None
            self.gram, self.rows = self.rows.T @ self.rows, None
        self.gram += rows.T @ rows

    def as_gram(self) -> Tensor:
        if self.gram is not None:
            return self.gram
        assert self.rows is not None
        return self.rows.T @ self.rows

    def total(self) -> float:
        """||R||^2."""
        if self.gram is not None:
            return float(torch.trace(self.gram))
        assert self.rows is not None
        return float(self.rows.square().sum())

    def residual_directions(self, basis: Tensor) -> tuple[Tensor, Tensor]:
        """Squared singular values (descending) and left singular vectors (d x m) of
        R_hat = R - M M^T R."""
        if self.gram is None:
            assert self.rows is not None
            rows = self.rows - (self.rows @ basis) @ basis.T
            _, values, vh = torch.linalg.svd(rows, full_matrices=False)
            return values.square(), vh.T
        # P G P with P = I - M M^T, in O(d^2 k): G - M A^T - A M^T + M (M^T A) M^T, A = G M
        a = self.gram @ basis
        residual = self.gram - basis @ a.T - a @ basis.T + basis @ (basis.T @ a) @ basis.T
        values, vectors = torch.linalg.eigh((residual + residual.T) / 2)
        return values.flip(0).clamp(min=0.0), vectors.flip(1)


def from_matrix(matrix: Tensor) -> Representation:
    """A representation from R (d x n; columns are examples, the GPM papers' convention)."""
    rep = Representation(matrix.shape[0])
    rep.add(matrix.T)
    return rep


@torch.no_grad()
def collect_representations(
    learner: Learner, data: Split, layers: dict[str, nn.Module], samples: int = 125, seed: int = 0
) -> dict[str, Representation]:
    """Each layer's inputs on ``samples`` random examples of ``data``, in one eval-mode forward
    pass (BN without running statistics then normalises over those examples, as in the release)."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data), generator=generator)[:samples]
    reps: dict[str, Representation] = {}
    mask: list[Tensor | None] = [None]

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            rows = layer_inputs(module, args[0], mask[0])
            reps.setdefault(name, Representation(rows.shape[1])).add(rows)

        return hook

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()]
    was_training = learner.training
    learner.eval()
    try:
        prepared = learner.prepare(data.subset(index).inputs, train=False)
        mask[0] = prepared.get("attention_mask") if isinstance(prepared, dict) else None
        learner(prepared)
    finally:
        for handle in handles:
            handle.remove()
        learner.train(was_training)
    return reps


# --- the basis ---------------------------------------------------------------------------------


def update_basis(basis: Tensor | None, rep: Representation, eps: float) -> Tensor:
    """GPM memory update of one layer (docs/methods.md#gpm) from the new task's representations.

    ``basis`` is M (d x k, orthonormal columns) or None; returns [M, new directions] (d x k'),
    k' <= d. With M empty this is the task-1 rule: the smallest k with energy fraction >= eps.
    """
    d = rep.width
    old = torch.zeros(d, 0, dtype=torch.float64) if basis is None else basis.double().reshape(d, -1)
    total = rep.total()
    if total <= 0.0 or old.shape[1] >= d:
        return old.float()
    values, vectors = rep.residual_directions(old)
    take = min(directions_needed(values, total, eps), d - old.shape[1])  # capped at the layer width
    return torch.cat([old, vectors[:, :take]], dim=1).float()


def directions_needed(values: Tensor, total: float, eps: float) -> int:
    """How many residual directions (energies ``values``, descending) to add so that
    (||R||^2 - ||R_hat||^2 + sum of the added) / ||R||^2 >= eps; never a zero-energy one."""
    already = (total - float(values.sum())) / total
    if already >= eps - THRESHOLD_TOL:
        return 0
    useful = int((values > ENERGY_TOL * total).sum())
    cumulative = already + torch.cumsum(values[:useful], 0) / total
    reached = (cumulative >= eps - THRESHOLD_TOL).nonzero()
    return int(reached[0]) + 1 if len(reached) else useful


def energy_kept(basis: Tensor, rep: Representation) -> float:
    """Fraction of the representations' energy inside span(M): ||M^T R||^2 / ||R||^2."""
    total = rep.total()
    if total <= 0:
        return 1.0
    m = basis.double()
    return float(torch.trace(m.T @ rep.as_gram() @ m)) / total


# --- memory and projection ---------------------------------------------------------------------


class GPMemory:
    """The bases of every projected layer, keyed by module name; saved as a carried state."""

    def __init__(self, bases: dict[str, Tensor] | None = None) -> None:
        self.bases: dict[str, Tensor] = dict(bases or {})

    @classmethod
    def from_carried(cls, carried: dict[str, Tensor] | None) -> GPMemory:
        carried = carried or {}
        n = len(CARRIED_PREFIX)
        return cls({k[n:]: v for k, v in carried.items() if k.startswith(CARRIED_PREFIX)})

    def carried(self) -> dict[str, Tensor]:
        return {CARRIED_PREFIX + k: v.detach().cpu().float().contiguous() for k, v in self.bases.items()}

    def update(
        self,
        learner: Learner,
        data: Split,
        layers: dict[str, nn.Module],
        eps: float,
        samples: int = 125,
        seed: int = 0,
    ) -> None:
        """Add the directions of this task's representations (under ``learner``'s weights)."""
        reps = collect_representations(learner, data, layers, samples, seed)
        for name, rep in reps.items():
            self.bases[name] = update_basis(self.bases.get(name), rep, eps)

    def fill(self) -> float:
        """Mean over layers of k / d: how much of each layer's input space is protected."""
        fractions = [basis.shape[1] / basis.shape[0] for basis in self.bases.values()]
        return sum(fractions) / len(fractions) if fractions else 0.0


class GradientProjection(Hook):
    """after_backward: g <- g - (g M) M^T for each projected weight (reshaped to out x d).

    The layers are found by name in the learner being trained (under ``train.shard: full`` a sharded
    copy: each process projects the rows of its shard of the gradient, which FSDP cuts by output unit)."""

    def __init__(self, learner: Learner, layers: dict[str, nn.Module], bases: dict[str, Tensor]) -> None:
        self.targets: list[tuple[str, Tensor]] = []
        for name, layer in layers.items():
            basis = bases.get(name)
            if basis is None or basis.shape[1] == 0:
                continue  # nothing protected yet: the layer trains freely
            weight = layer.weight
            self.targets.append((name, basis.to(weight.device, weight.dtype)))

    def after_backward(self, learner: Learner) -> None:
        for name, basis in self.targets:
            grad = learner.get_submodule(name).weight.grad
            if grad is None:
                continue
            rows = distributed.local(grad)
            g = rows.reshape(-1, basis.shape[0])
            rows.copy_((g - (g @ basis) @ basis.T).view_as(rows))
