"""The training settings: the ``train:`` section of a run config and what ``train_task`` reads.

One typed model (no torch import: reading a config stays fast). A config's ``train:`` section is
validated by it (``RunConfig.train`` is this type: an unknown key or a bad value names the key,
``train.lr: Input should be greater than 0``), and the training loop takes it as it is. Built in
code, ``TrainSettings(lr=0.01, epochs=5)`` is checked the same way. Frozen: a method that trains
with other settings makes a copy (``settings.model_copy(update={"lr": ...})``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)  # lr: .inf names train.lr

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_from_bool(cls, value: Any) -> Any:
        return {True: "auto", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="before")
    @classmethod
    def _shard_optimizer_is_shard(cls, data: Any) -> Any:
        """``shard_optimizer: true / false``, the older spelling (and older runs' saved configs), reads
        as ``shard: optimizer / none``."""
        if not isinstance(data, dict) or "shard_optimizer" not in data:
            return data
        data = dict(data)
        old = data.pop("shard_optimizer")
        if not isinstance(old, bool) or "shard" in data:
            raise ValueError("shard_optimizer is now spelled shard: none, optimizer or full (give shard alone)")
        return {**data, "shard": "optimizer" if old else "none"}

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)  # 1 and above: the step grows without bound
    epochs: float = Field(1.0, gt=0)  # fractional epochs allowed (a quick smoke run)
    batch_size: int = Field(32, ge=1)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant", "plateau"] = "cosine"
    grad_clip: float | None = Field(1.0, gt=0)
    # bf16 autocast: auto = on GPUs only; bf16 = on any device (CPUs with bf16 units, or to test the
    # GPU path on a CPU); off. true / false are read as auto / off.
    amp: Literal["auto", "bf16", "off"] = "auto"
    eval_batch_size: int = Field(256, ge=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # under torchrun, what each of the N processes holds (docs/distributed.md): none = DDP, all of
    # the weights, gradients and optimiser state; optimizer = ZeRO-1, 1/N of the optimiser state;
    # full = FSDP2, 1/N of the weights, gradients and optimiser state while a task trains.
    # (shard_optimizer: true reads as optimizer)
    shard: Literal["none", "optimizer", "full"] = "none"
    # schedule "plateau", as the GPM/BECAME releases: after `plateau_patience` epochs without a new best
    # validation loss divide the LR by `plateau_factor`; stop once it falls below lr * plateau_min_factor
    # (0.05 -> 5e-5, the release's lr_min); the best-validation weights are restored at the end.
    plateau_patience: int = Field(6, ge=1)
    plateau_factor: float = Field(2.0, gt=1)
    plateau_min_factor: float = Field(1e-3, gt=0, le=1)
