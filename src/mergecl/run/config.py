"""Run configs: YAML validated into typed objects; an unknown key or a wrong type names the key.

name: digits-cil
seeds: [0]
data: {source: digits, scenario: class, n_tasks: 5, order: seeded}
model: {name: mlp, in_dim: 64, hidden: [256, 256]}      # see mergecl.models.factory
train: {optimizer: adamw, lr: 0.001, epochs: 5, batch_size: 32}
methods: [seq_ft, magmax, average, ties, random_mix, ind_ft+magmax, lwf, ewc, joint]
method_options: {magmax: {lam: 0.5}, lwf: {lam: 0.3, temperature: 2}, ewc: {lam: 1.0e+6}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergecl.errors import MergeclError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "digits.yaml"


def packaged_configs() -> dict[str, Path]:
    """Configs shipped with mergecl, by name: the suites and the paper presets."""
    return {p.stem: p for p in sorted([*CONFIG_DIR.glob("*.yaml"), *CONFIG_DIR.glob("presets/*.yaml")])}


def resolve_config_path(name: str | Path) -> Path:
    """A file path, or the name of a packaged config (``mergecl run magmax-clip-cifar100-cil10``)."""
    path = Path(name)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    packaged = packaged_configs()
    if str(name) in packaged:
        return packaged[str(name)]
    raise MergeclError(f"{name}: no such config file or packaged config (packaged: {', '.join(packaged)})")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # lr: .inf names train.lr here


class DataConfig(_Strict):
    source: str = "digits"
    root: str | None = None
    scenario: Literal["class", "task", "domain", "permuted"] = "class"
    n_tasks: int | None = Field(5, ge=1)
    order: str | list[int] = "seeded"
    domain_order: str | list[str] | None = None  # domain-incremental: a list, or 'paper'
    val_fraction: float = Field(0.1, gt=0, lt=1)
    train_per_class: int | None = Field(None, ge=1)
    eval_per_class: int | None = Field(None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(_Strict):
    @field_validator("amp", mode="before")
    @classmethod
    def _amp_from_bool(cls, value: Any) -> Any:
        return {True: "auto", False: "off"}.get(value, value) if isinstance(value, bool) else value

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)  # 1 and above: the step grows without bound
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(32, ge=1)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant", "plateau"] = "cosine"
    grad_clip: float | None = Field(1.0, gt=0)
    # bf16 autocast: auto = on GPUs only; bf16 = on any device (CPUs with bf16 units, or to test the
    # GPU path on a CPU); off. true / false are read as auto / off.
    amp: Literal["auto", "bf16", "off"] = "auto"
    eval_batch_size: int = Field(256, ge=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    shard_optimizer: bool = False  # under torchrun: ZeRO-1 (each process holds 1/N of the optimiser state)
    # schedule: plateau (the GPM/BECAME releases): halve the lr after `plateau_patience` epochs without a
    # new best validation loss, stop below lr * plateau_min_factor; see training/loop.py
    plateau_patience: int = Field(6, ge=1)
    plateau_factor: float = Field(2.0, gt=1)
    plateau_min_factor: float = Field(1e-3, gt=0, le=1)


class RunConfig(_Strict):
    name: str = "run"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    device: str = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    model: dict[str, Any] = Field(default_factory=lambda: {"name": "mlp", "in_dim": 64})
    train: TrainConfig = Field(default_factory=TrainConfig)
    methods: list[str] = Field(default_factory=lambda: ["seq_ft", "magmax"], min_length=1)
    eval_val: bool = False  # also evaluate every step on the validation splits (for model selection)
    eval_future: bool = True  # full accuracy matrix; False: tasks seen so far only (about half the evaluation)
    keep_vectors: bool = True  # False: delete a seed's tensors once it has finished (its numbers stay)
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_method_options(self) -> RunConfig:
        """Each method option against its method's schema, before any work (a MergeclError)."""
        from mergecl.methods.registry import check_method_options  # imports torch: only when needed

        check_method_options(self.methods, self.method_options, lora=bool(self.model.get("lora")))
        return self


def _error_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{where}'"
    return f"{source}: {where}: {first['msg']}"


def parse_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    if not isinstance(data, dict):
        raise MergeclError(f"{source}: the top level must be a mapping of keys")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise MergeclError(_error_line(err, source)) from None
    except MergeclError as err:  # the method options' own check
        raise MergeclError(f"{source}: {err}") from None


def load_config(path: str | Path | None = None) -> RunConfig:
    """Read and validate a YAML config (a path or a packaged name); None = the embedded default."""
    path = resolve_config_path(path) if path is not None else DEFAULT_CONFIG
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise MergeclError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise MergeclError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_config(data or {}, str(path))


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
