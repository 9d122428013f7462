"""A Learner is an encoder plus a head; the rest of mergecl only talks to this interface.

``prepare`` turns a batch of raw inputs (a float tensor, a list of strings, a list of image paths:
see ``mergecl.data.types.Split``) into what the encoder takes, on the learner's device.
``forward`` returns logits over ALL classes of the scenario; training and evaluation select the
columns of the classes in play (the current task's, the seen ones, or a task's own head), which makes
one head serve class-, domain- and task-incremental learning alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


class Learner(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        head: nn.Module,
        prepare_fn: Callable[[Any, bool], Any] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self._prepare_fn = prepare_fn

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    def prepare(self, inputs: torch.Tensor | Sequence[str], train: bool = False) -> Any:
        """Raw batch -> encoder input on this learner's device (tokenise, load images, augment)."""
        prepared = self._prepare_fn(inputs, train) if self._prepare_fn else inputs
        return _to_device(prepared, self.device)

    def features(self, prepared: Any) -> torch.Tensor:
        if isinstance(prepared, dict):
            return self.encoder(**prepared)
        return self.encoder(prepared)

    def forward(self, prepared: Any) -> torch.Tensor:
        return self.head(self.features(prepared))


def tuned_keys(learner: Learner) -> list[str]:
    """The state entries training can change: floating-point ones, minus parameters frozen when the
    model is built (LoRA's base weights). Task vectors, and so merges, cover exactly these."""
    frozen = {name for name, p in learner.named_parameters() if not p.requires_grad}
    return [k for k, v in learner.state_dict().items() if v.is_floating_point() and k not in frozen]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch
