"""One plain training loop, and evaluation, for any Learner.

A task is trained on the columns of its own classes (class-incremental: labels are remapped to
0..k-1 of the task's classes; domain-incremental: all classes). A fresh optimiser and a fresh
warm-up + cosine schedule per call, as in the MagMax release. Methods plug in through small hooks:

- ``hook.loss(learner, prepared, outputs, labels)`` -> extra loss term or None (LwF, EWC);
  ``outputs`` are the logits over ALL classes
- ``hook.after_backward(learner)``: edit gradients before clipping and the step (GPM projection)
- ``hook.after_step(learner, step)``: edit weights after the step (PAM alignment)

Determinism: the batch order comes from a generator seeded by ``seed``; the caller seeds torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mergecl.data.types import Split
from mergecl.models.base import Learner


@dataclass
class TrainSettings:
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    epochs: float = 1.0  # fractional epochs allowed (a quick smoke run)
    batch_size: int = 32
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = 1.0
    amp: bool = True  # bf16 autocast, only on a GPU
    eval_batch_size: int = 256
    label_smoothing: float = 0.0


@dataclass
class TrainStats:
    steps: int = 0
    examples: int = 0
    losses: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else float("nan")


class Hook:
    """A no-op strategy hook; methods override what they need."""

    def loss(self, learner: Learner, prepared: Any, outputs: Tensor, labels: Tensor) -> Tensor | None:
        return None

    def after_backward(self, learner: Learner) -> None:
        pass

    def after_step(self, learner: Learner, step: int) -> None:
        pass


def quiet() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("MERGECL_QUIET") == "1"


def label_map(classes: Sequence[int], num_classes: int) -> Tensor:
    """Global class id -> column among ``classes`` (-1 for classes not in play)."""
    table = torch.full((num_classes,), -1, dtype=torch.long)
    table[torch.as_tensor(list(classes), dtype=torch.long)] = torch.arange(len(classes))
    return table


def batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


def make_optimizer(params: list[nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 over the rest (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def autocast(learner: Learner, enabled: bool):
    device = learner.device
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def train_task(
    learner: Learner,
    data: Split,
    classes: Sequence[int],
    num_classes: int,
    settings: TrainSettings,
    seed: int,
    hooks: Sequence[Hook] = (),
    desc: str = "training",
) -> TrainStats:
    """Train ``learner`` on ``data`` over the logit columns of ``classes``."""
    params = [p for p in learner.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the learner has no trainable parameters")
    optimizer = make_optimizer(params, settings)
    generator = torch.Generator().manual_seed(seed)
    columns = torch.as_tensor(list(classes), dtype=torch.long, device=learner.device)
    to_column = label_map(classes, num_classes)
    steps_per_epoch = math.ceil(len(data) / settings.batch_size)
    total = max(1, math.ceil(settings.epochs * steps_per_epoch))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    stats = TrainStats()
    learner.train()
    bar = _progress(total, desc)
    step = 0
    while step < total:
        for index in batches(len(data), settings.batch_size, generator):
            if step >= total:
                break
            batch = data.subset(index)
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * lr_factor(step, total, settings.warmup_steps, settings.schedule)
            prepared = learner.prepare(batch.inputs, train=True)
            labels = to_column[batch.labels].to(learner.device)
            with autocast(learner, settings.amp):
                outputs = learner(prepared)
                loss = loss_fn(outputs[:, columns].float(), labels)
                for hook in hooks:
                    extra = hook.loss(learner, prepared, outputs, labels)
                    if extra is not None:
                        loss = loss + extra
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for hook in hooks:
                hook.after_backward(learner)
            if settings.grad_clip:
                nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            step += 1
            for hook in hooks:
                hook.after_step(learner, step)
            stats.steps = step
            stats.examples += len(index)
            stats.losses.append(float(loss.detach()))
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{stats.final_loss:.3f}")
    bar.close()
    learner.eval()
    return stats


@torch.no_grad()
def predict(learner: Learner, data: Split, classes: Sequence[int], batch_size: int = 256) -> Tensor:
    """Predicted global class ids, choosing among ``classes`` only."""
    learner.eval()
    columns = torch.as_tensor(list(classes), dtype=torch.long, device=learner.device)
    out = []
    for index in batches(len(data), batch_size, None):
        batch = data.subset(index)
        logits = learner(learner.prepare(batch.inputs, train=False))[:, columns]
        out.append(columns[logits.argmax(dim=1)].cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(learner: Learner, data: Split, classes: Sequence[int], batch_size: int = 256) -> float:
    """Top-1 accuracy in percent over ``classes``' logit columns."""
    if len(data) == 0:
        return float("nan")
    return 100.0 * float((predict(learner, data, classes, batch_size) == data.labels).float().mean())


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str):
    if quiet():
        return _NullBar()
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, pipes)
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)
