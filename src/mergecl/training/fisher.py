"""Diagonal Fisher information, estimated as the BECAME and MagMax releases do.

Labels are the model's own argmax predictions by default (the "empirical Fisher with predicted
labels"; ``labels="true"`` uses the data's labels). Per mini-batch the mean loss is backpropagated
and grad^2 x batch size accumulated, then divided by N; the model stays in train() mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from mergecl import distributed
from mergecl.data.types import Split
from mergecl.models.base import Learner
from mergecl.training.loop import batches, label_map


def diagonal_fisher(
    learner: Learner,
    data: Split,
    classes: Sequence[int],
    num_classes: int,
    labels: Literal["predicted", "true"] = "predicted",
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """Fisher diagonal for every trainable parameter, keyed like ``learner.named_parameters()``."""
    params = {name: p for name, p in learner.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    columns = torch.as_tensor(list(classes), dtype=torch.long, device=learner.device)
    to_column = label_map(classes, num_classes)
    was_training = learner.training
    learner.train()
    loss_fn = nn.CrossEntropyLoss()
    world = distributed.world_size()
    for index in batches(len(data), batch_size, None):
        learner.zero_grad(set_to_none=True)
        local = distributed.shard(index)  # multi-process: each its share, gradients summed below
        if len(local):
            batch = data.subset(local)
            logits = learner(learner.prepare(batch.inputs, train=False))[:, columns].float()
            if labels == "predicted":
                target = logits.argmax(dim=1).detach()
            else:
                target = to_column[batch.labels].to(learner.device)
            loss = loss_fn(logits, target)
            (loss * (len(local) / len(index)) if world > 1 else loss).backward()
        for name, p in params.items():
            grad = p.grad
            if world > 1:  # the whole batch's gradient, then squared: as one process computes it
                grad = distributed.all_reduce_sum(grad.detach().clone() if grad is not None else torch.zeros_like(p))
            if grad is not None:
                fisher[name].add_(grad.detach().float().square(), alpha=len(index))
    learner.zero_grad(set_to_none=True)
    learner.train(was_training)
    n = max(1, len(data))
    return {name: f.div_(n) for name, f in fisher.items()}
