"""Seeded, stratified index splits shared by the sources and the scenarios.

Every random choice here goes through ``numpy.random.RandomState(seed)``: its stream is frozen by
numpy's compatibility policy, so a seed gives the same split on every numpy version and machine.
Returned index tensors are sorted, so a split keeps the source's example order.
"""

from __future__ import annotations

import numpy as np
import torch

from mergecl.data.types import Split


def stratified_split(strata: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split 0..N-1 into (keep, take) with ``round(fraction * n)`` of each stratum in ``take``.

    A stratum of n >= 2 examples always keeps at least one and (for fraction > 0) gives at least one,
    so both sides see every class that has two examples or more.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
    values = strata.cpu().numpy()
    rng = np.random.RandomState(seed)
    take: list[np.ndarray] = []
    for value in np.unique(values):  # sorted: the stream is consumed in a fixed order
        members = np.flatnonzero(values == value)
        n = len(members)
        n_take = int(round(fraction * n))
        if fraction > 0 and n >= 2:
            n_take = min(max(n_take, 1), n - 1)
        take.append(members[rng.permutation(n)[:n_take]])
    taken = np.sort(np.concatenate(take)) if take else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(values), dtype=bool)
    mask[taken] = False
    return torch.from_numpy(np.flatnonzero(mask)).long(), torch.from_numpy(taken).long()


def split_off(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(rest, part): a seeded stratified ``fraction`` of ``split`` per class, and what remains."""
    keep, take = stratified_split(split.labels, fraction, seed)
    return split.subset(keep), split.subset(take)


def subsample_per_class(split: Split, n: int, seed: int) -> Split:
    """At most ``n`` examples of each class (seeded choice, source order kept)."""
    if n < 1:
        raise ValueError(f"examples per class must be >= 1, got {n}")
    labels = split.labels.cpu().numpy()
    rng = np.random.RandomState(seed)
    chosen = [
        members[np.sort(rng.permutation(len(members))[:n])]
        for members in (np.flatnonzero(labels == c) for c in np.unique(labels))
    ]
    index = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    return split.subset(torch.from_numpy(index).long())


def seeded_permutation(n: int, seed: int) -> list[int]:
    """``np.random.seed(seed); np.random.permutation(n)``: the PyCIL-style class order convention."""
    return [int(i) for i in np.random.RandomState(seed).permutation(n)]
