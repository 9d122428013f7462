"""One plain training loop, and evaluation, for any Learner.

A task is trained on the columns of its own classes (class-incremental: labels are remapped to
0..k-1 of the task's classes; domain-incremental: all classes). A fresh optimiser and a fresh
warm-up + cosine schedule per call, as in the MagMax release (or ``schedule="plateau"``: the GPM/BECAME
releases' per-epoch LR decay on a validation-loss plateau with early stop and best-epoch restore).
Methods plug in through small hooks:

- ``hook.loss(learner, prepared, outputs, labels)`` -> extra loss term or None (LwF): a term of
  this process's share of the batch, weighted like its cross-entropy; ``outputs`` are the logits
  over ALL classes
- ``hook.penalty(learner)`` -> a term of the weights alone, or None (EWC): counted once per step,
  whatever the share
- ``hook.after_backward(learner)``: edit gradients before clipping and the step (GPM projection)
- ``hook.after_step(learner, step)``: edit weights after the step (PAM alignment)

Settings: ``TrainSettings`` (``training/settings.py``), which is also a run config's ``train:`` section.

Under ``train.shard: full`` (several processes) the loop trains an FSDP2-sharded copy of the learner
(``distributed.sharded``) and the hooks get that copy: its weights and gradients may be DTensors
(``distributed.laid_out_like``, ``local`` and ``gathered`` handle them); the learner gets the trained
weights back at the end.

Determinism: the batch order comes from a generator seeded by ``seed``; the caller seeds torch.

A broken model is never trained on, nor evaluated: a non-finite training loss, a non-finite weight
after training, or non-finite outputs raise ``NonFiniteError`` naming what and when.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mergecl import distributed, loggers, progress
from mergecl.data.types import Split
from mergecl.errors import MergeclError
from mergecl.models.base import Learner
from mergecl.tensors import all_finite
from mergecl.training.settings import TrainSettings


class NonFiniteError(MergeclError):
    """A loss, a weight or a model's outputs became NaN or infinite: the model is broken (a run
    marks the method failed and goes on with the others)."""


def check_finite(tensors: dict[str, Tensor], what: str) -> None:
    """NonFiniteError naming the first tensor of ``tensors`` with a NaN or an infinity."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise NonFiniteError(f"{what}: tensor '{name}' is not finite")


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

    def penalty(self, learner: Learner) -> Tensor | None:
        return None

    def after_backward(self, learner: Learner) -> None:
        pass

    def after_step(self, learner: Learner, step: int) -> None:
        pass


def label_map(classes: Sequence[int], num_classes: int) -> Tensor:
    """Global class id -> column among ``classes`` (-1 for classes not in play)."""
    table = torch.full((num_classes,), -1, dtype=torch.long)
    table[torch.as_tensor(list(classes), dtype=torch.long)] = torch.arange(len(classes))
    return table


def batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


def _fused_adam_supported(params: list[nn.Parameter]) -> bool:
    """Fused AdamW runs on CPUs from torch 2.4 (on CUDA earlier), for floating-point parameters."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    devices = {p.device.type for p in params}
    return (major, minor) >= (2, 4) and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


def make_optimizer(params: list[nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw":
        kind, options = torch.optim.AdamW, {"weight_decay": settings.weight_decay}
        if _fused_adam_supported(params):
            options["fused"] = True  # one kernel for all parameters: 5x faster steps on a CPU than the default
    else:
        kind, options = torch.optim.SGD, {"momentum": settings.momentum, "weight_decay": settings.weight_decay}
    if settings.shard == "optimizer" and distributed.world_size() > 1:
        # ZeRO-1: each process keeps the optimiser state of 1/N of the parameters (Adam: 2/3 of the
        # training memory beyond the weights and gradients) and broadcasts its updated share
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=kind, lr=settings.lr, **options)
    return kind(params, lr=settings.lr, **options)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 over the rest (or constant;
    ``plateau`` decays per epoch on top of this factor, in ``Plateau``)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule in ("constant", "plateau"):
        return 1.0
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


class Plateau:
    """Per-epoch LR decay on a loss plateau, early stop, best-epoch weights (GPM/BECAME ``train_model``)."""

    def __init__(self, settings: TrainSettings) -> None:
        self.settings = settings
        self.scale = 1.0
        self.best = math.inf
        self.best_state: dict[str, Tensor] | None = None
        self.patience = settings.plateau_patience

    def end_epoch(self, learner: Learner, loss: float) -> bool:
        """Record one epoch's loss; True when training should stop."""
        s = self.settings
        if loss < self.best:
            self.best, self.patience = loss, s.plateau_patience
            self.best_state = {k: v.detach().clone() for k, v in learner.state_dict().items()}
            return False
        self.patience -= 1
        if self.patience > 0:
            return False
        self.scale /= s.plateau_factor
        self.patience = s.plateau_patience
        return self.scale < s.plateau_min_factor

    def restore_best(self, learner: Learner) -> None:
        if self.best_state is not None:
            learner.load_state_dict(self.best_state)


@torch.no_grad()
def mean_loss(learner: Learner, data: Split, classes: Sequence[int], num_classes: int, batch_size: int) -> float:
    """Mean cross-entropy over ``classes``' columns, in eval mode (the plateau signal)."""
    was_training = learner.training
    learner.eval()
    columns = torch.as_tensor(list(classes), dtype=torch.long, device=learner.device)
    to_column = label_map(classes, num_classes)
    total = 0.0
    for index in batches(len(data), batch_size, None):
        batch = data.subset(index)
        logits = learner(learner.prepare(batch.inputs, train=False))[:, columns].float()
        target = to_column[batch.labels].to(learner.device)
        total += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
    learner.train(was_training)
    return total / max(1, len(data))


def autocast(learner: Learner, amp: str):
    """The forward pass's bf16 autocast; weights, gradients and optimiser state stay fp32."""
    device = learner.device
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
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
    val: Split | None = None,
) -> TrainStats:
    """Train ``learner`` on ``data`` over the logit columns of ``classes``.

    ``val`` is the plateau schedule's signal (without it: the epoch's mean training loss)."""
    with distributed.sharded(learner, settings.shard) as trained:  # shard: full: an FSDP2 copy
        training = _TaskTraining(trained, data, classes, num_classes, settings, seed, hooks)
        with progress.bar(training.total, desc) as bar:
            while training.step < training.total:
                losses = training.epoch(bar)
                if training.plateau_stops(losses, val):
                    break
        training.restore_best()
    weights = {name: p.detach() for name, p in learner.named_parameters() if p.requires_grad}
    check_finite(weights, f"the weights after {training.step} training steps (lr {settings.lr:g})")
    learner.eval()
    return training.stats


def trainable_parameters(learner: Learner) -> list[nn.Parameter]:
    params = [p for p in learner.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the learner has no trainable parameters")
    return params


class _TaskTraining:
    """One ``train_task`` call: its set-up (a fresh optimiser, the seeded batch order, the schedule's
    length), one epoch, one step, the plateau bookkeeping and the final checks."""

    def __init__(
        self,
        learner: Learner,
        data: Split,
        classes: Sequence[int],
        num_classes: int,
        settings: TrainSettings,
        seed: int,
        hooks: Sequence[Hook],
    ) -> None:
        self.learner, self.data, self.settings, self.hooks = learner, data, settings, hooks
        self.classes, self.num_classes = classes, num_classes
        self.params = trainable_parameters(learner)
        self.optimizer = make_optimizer(self.params, settings)
        self.generator = torch.Generator().manual_seed(seed)
        self.columns = torch.as_tensor(list(classes), dtype=torch.long, device=learner.device)
        self.to_column = label_map(classes, num_classes)
        self.steps_per_epoch = math.ceil(len(data) / settings.batch_size)
        self.total = max(1, math.ceil(settings.epochs * self.steps_per_epoch))
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
        self.plateau = Plateau(settings) if settings.schedule == "plateau" else None
        self.stats = TrainStats()
        self.step = 0
        learner.train()
        self.model = distributed.wrap(learner)  # DDP under torchrun: gradients averaged over processes
        self.world = distributed.world_size()
        self.recorder = loggers.current()  # None unless the run has loggers (rank 0 only)
        # every process computes the norm a logger wants: for sharded gradients it is a collective
        self.wants_norm = distributed.broadcast_object(self.recorder is not None)

    def epoch(self, bar: progress.Bar) -> list[float]:
        """One pass over the data in the next seeded order, or up to the last step; its losses."""
        first = len(self.stats.losses)
        for index in batches(len(self.data), self.settings.batch_size, self.generator):
            if self.step >= self.total:
                break
            self.train_step(index)
            bar.update(1)
            progress.run_step()  # the whole run's bar, when a run is going
            if self.step % 10 == 0:
                bar.set_postfix(loss=f"{self.stats.final_loss:.3f}")
        return self.stats.losses[first:]

    def train_step(self, index: Tensor) -> None:
        """One optimiser step on the global batch ``index`` (this process's share of it)."""
        batch, weight = self.local_share(index)
        self.set_lr()
        loss = self.batch_loss(batch) * weight + self.penalty()  # weight 1 in one process
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for hook in self.hooks:
            hook.after_backward(self.learner)
        norm = self.clip_gradients()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.step += 1
        for hook in self.hooks:
            hook.after_step(self.learner, self.step)
        self.record(loss, len(index))
        if self.recorder is not None:
            self.recorder.train_step(loss=self.stats.losses[-1], lr=lr, grad_norm=norm)

    def clip_gradients(self) -> float:
        """Clip the gradients (``grad_clip``); their global norm before clipping, when clipping or a
        logger needs it (else NaN). Sharded gradients (DTensors) give the norm of all their shards."""
        if self.settings.grad_clip:
            norm = nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip)
        elif self.wants_norm:
            grads = [distributed.gathered(p.grad.detach().float().norm()) for p in self.params if p.grad is not None]
            norm = torch.stack(grads).norm() if grads else torch.zeros(())
        else:
            return math.nan
        return float(distributed.gathered(norm)) if self.wants_norm else math.nan

    def local_share(self, index: Tensor) -> tuple[Split, float]:
        """This process's share of a global batch and its loss weight: every process walks the same
        global batches and takes its share; weighting each share's mean loss by its size makes DDP's
        (and FSDP's) average the global batch's mean (exact for uneven shares)."""
        local = distributed.shard(index)
        weight = len(local) * self.world / len(index)
        if len(local) == 0:  # a last batch smaller than the world: join the all-reduce with nothing
            local, weight = index[:1], 0.0
        return self.data.subset(local), weight

    def set_lr(self) -> None:
        """The step's learning rate: warm-up and cosine (``lr_factor``), times the plateau's decay."""
        s = self.settings
        scale = self.plateau.scale if self.plateau else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = s.lr * scale * lr_factor(self.step, self.total, s.warmup_steps, s.schedule)

    def batch_loss(self, batch: Split) -> Tensor:
        """Cross-entropy over the task's columns plus the hooks' loss terms, under autocast."""
        prepared = self.learner.prepare(batch.inputs, train=True)
        labels = self.to_column[batch.labels].to(self.learner.device)
        with autocast(self.learner, self.settings.amp):
            outputs = self.model(prepared)
            loss = self.loss_fn(outputs[:, self.columns].float(), labels)
            for hook in self.hooks:
                extra = hook.loss(self.learner, prepared, outputs, labels)
                if extra is not None:
                    loss = loss + extra
        return loss

    def penalty(self) -> Tensor | float:
        """The hooks' terms of the weights alone (EWC): the same on every process, so not weighted by
        the share; on sharded weights their gradient goes straight to each process's shard."""
        terms = [term for hook in self.hooks if (term := hook.penalty(self.learner)) is not None]
        return sum(terms) if terms else 0.0

    def record(self, loss: Tensor, examples: int) -> None:
        """Count the step and keep the global batch's loss (``loss``: this process's weighted term of
        it); a non-finite loss stops training."""
        self.stats.steps = self.step
        self.stats.examples += examples
        # the global batch's loss, the same on every process (the plateau signal)
        loss = distributed.all_reduce_sum(loss.detach().clone()) / self.world
        self.stats.losses.append(float(loss))
        if not math.isfinite(self.stats.losses[-1]):  # the same value on every process: all stop here
            hint = f"lr {self.settings.lr:g}; is the lr or a method option too large?"
            raise NonFiniteError(f"training loss became {self.stats.losses[-1]} at step {self.step} ({hint})")

    def plateau_stops(self, losses: list[float], val: Split | None) -> bool:
        """After a whole epoch of the plateau schedule: record its loss (on ``val``, else the epoch's
        mean training loss); True when training should stop."""
        if self.plateau is None or self.step % self.steps_per_epoch != 0:
            return False
        if val is not None and len(val):
            loss = mean_loss(self.learner, val, self.classes, self.num_classes, self.settings.eval_batch_size)
        else:
            loss = sum(losses) / max(1, len(losses))
        return self.plateau.end_epoch(self.learner, loss)

    def restore_best(self) -> None:
        """The best epoch's weights back (plateau)."""
        if self.plateau is not None:
            self.plateau.restore_best(self.learner)


@torch.no_grad()
def predict_logits(learner: Learner, data: Split, batch_size: int = 256, bar: progress.Bar | None = None) -> Tensor:
    """Logits over ALL classes, [N, num_classes] (fp32, on the CPU): computed once, they give the
    accuracy over any set of columns (``accuracy_from_logits``) without another forward pass.
    ``bar`` advances by one per batch (``eval_batches`` of them)."""
    learner.eval()
    if len(data) == 0:
        return torch.zeros(0, 0)
    order = torch.arange(len(data))
    if data.kind == "text":  # batch texts of similar length: less padding, ~1.5x faster
        order = torch.tensor(sorted(range(len(data)), key=lambda i: len(data.inputs[i])), dtype=torch.long)
    out: Tensor | None = None
    for index in distributed.shard(order).split(batch_size):  # each process predicts its share
        logits = learner(learner.prepare(data.subset(index).inputs, train=False)).float().cpu()
        if out is None:
            out = torch.zeros(len(data), logits.shape[1])
        out[index] = logits
        if bar is not None:
            bar.update(1)
    width = distributed.broadcast_object(None if out is None else out.shape[1])  # a process may have no share
    out = distributed.all_reduce_sum(out if out is not None else torch.zeros(len(data), width))
    broken = int((~torch.isfinite(out)).any(dim=1).sum())
    if broken:
        raise NonFiniteError(f"the model's outputs are not finite on {broken} of {len(data)} examples")
    return out


def eval_batches(n: int, batch_size: int) -> int:
    """The batches ``predict_logits`` runs on this process for ``n`` examples (its share of them)."""
    return len(distributed.shard(torch.arange(n)).split(batch_size)) if n else 0


def predict_splits(learner: Learner, splits: Sequence[Split], batch_size: int, desc: str) -> list[Tensor]:
    """``predict_logits`` of each split, under one progress bar of all their batches."""
    total = sum(eval_batches(len(split), batch_size) for split in splits)
    with progress.bar(total, desc, unit="batch", enabled=total > 0) as bar:
        return [predict_logits(learner, split, batch_size, bar) for split in splits]


def accuracy_from_logits(logits: Tensor, labels: Tensor, classes: Sequence[int]) -> float:
    """Top-1 accuracy in percent, choosing among ``classes``' logit columns only."""
    if len(labels) == 0:
        return float("nan")
    columns = torch.as_tensor(list(classes), dtype=torch.long)
    predicted = columns[logits[:, columns].argmax(dim=1)]
    return 100.0 * float((predicted == labels.cpu()).float().mean())


def predict(learner: Learner, data: Split, classes: Sequence[int], batch_size: int = 256) -> Tensor:
    """Predicted global class ids, choosing among ``classes`` only."""
    columns = torch.as_tensor(list(classes), dtype=torch.long)
    return columns[predict_logits(learner, data, batch_size)[:, columns].argmax(dim=1)]


def accuracy(learner: Learner, data: Split, classes: Sequence[int], batch_size: int = 256) -> float:
    """Top-1 accuracy in percent over ``classes``' logit columns (NaN on no data)."""
    return accuracy_from_logits(predict_logits(learner, data, batch_size), data.labels, classes)
