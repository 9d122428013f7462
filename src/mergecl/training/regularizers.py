"""Loss hooks of the classic CL baselines (docs/methods.md#lwf, docs/methods.md#ewc): LwF and EWC."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mergecl import distributed
from mergecl.models.base import Learner
from mergecl.training.loop import Hook


class LwF(Hook):
    """Learning without Forgetting: distil the previous model's logits on the old classes.

    loss += lam * T^2 * KL(softmax(old / T) || softmax(new / T)) over the old classes' columns, on
    the current task's inputs. lam 0.3 and T 2 as the MagMax baselines.
    """

    def __init__(self, previous: Learner, old_classes: Sequence[int], lam: float = 0.3, temperature: float = 2.0):
        self.previous = copy.deepcopy(previous).eval()
        for p in self.previous.parameters():
            p.requires_grad_(False)
        self.columns = torch.as_tensor(list(old_classes), dtype=torch.long)
        self.lam = lam
        self.temperature = temperature

    def loss(self, learner: Learner, prepared: Any, outputs: Tensor, labels: Tensor) -> Tensor | None:
        if len(self.columns) == 0:
            return None
        columns = self.columns.to(learner.device)
        with torch.no_grad():
            old = self.previous(prepared)[:, columns].float()
        new = outputs[:, columns].float()
        t = self.temperature
        kd = F.kl_div(
            F.log_softmax(new / t, dim=1),
            F.log_softmax(old / t, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        return self.lam * t * t * kd


class EWC(Hook):
    """Elastic weight consolidation: loss += lam/2 * sum F (theta - theta*)^2.

    ``anchor`` holds theta* (the weights after the previous task) and ``fisher`` the running Fisher,
    updated by the caller as F <- 0.5 F + 0.5 F_t (the MagMax baseline's online rule).
    """

    def __init__(self, anchor: dict[str, Tensor], fisher: dict[str, Tensor], lam: float = 1e6):
        self.anchor = anchor
        self.fisher = fisher
        self.lam = lam

    def penalty(self, learner: Learner) -> Tensor | None:
        penalty = torch.zeros((), device=learner.device)
        for name, p in learner.named_parameters():
            if name in self.fisher and p.requires_grad:
                fisher, anchor = (distributed.laid_out_like(x[name], p) for x in (self.fisher, self.anchor))
                penalty = penalty + distributed.gathered((fisher * (p - anchor).square()).sum())
        return 0.5 * self.lam * penalty


def online_fisher(running: dict[str, Tensor] | None, new: dict[str, Tensor], decay: float = 0.5):
    """F <- decay * F + (1 - decay) * F_t; the first task's Fisher is taken as is."""
    if running is None:
        return {k: v.clone() for k, v in new.items()}
    return {k: decay * running[k] + (1.0 - decay) * new[k] for k in new}
