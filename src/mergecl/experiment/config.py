"""Run configs: YAML validated into typed objects; an unknown key or a wrong type names the key.

name: digits-cil
seeds: [0]
data: {source: digits, scenario: class, n_tasks: 5, order: seeded}
model: {name: mlp, in_dim: 64, hidden: [256, 256]}      # see mergecl.models.factory
train: {optimizer: adamw, lr: 0.001, epochs: 5, batch_size: 32}
methods: [seq_ft, magmax, average, ties, random_mix, ind_ft+magmax, lwf, ewc, joint]
method_options: {magmax: {lam: 0.5}, lwf: {lam: 0.3, temperature: 2}, ewc: {lam: 1.0e+6}}
export: [magmax]          # optional: write RUN/export/magmax/ at the end (first seed, last step)
loggers: [csv, tensorboard, {name: wandb, project: x}]   # optional: docs/loggers.md
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from mergecl.errors import MergeclError
from mergecl.plugins import load_plugins
from mergecl.training.settings import TrainSettings

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "clinc150-mini-cil.yaml"  # the embedded default run


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


ORDER_STRIDE = 1_000_000  # order k of seed s runs as seed s + k * ORDER_STRIDE
MAX_ORDERS = 1000  # so that every such seed stays below 2**32 (numpy's seeds)


def run_seeds(config: RunConfig) -> list[int]:
    """The seeds a run runs: each config seed, and with ``data.orders: K`` its orders 1..K-1 as the
    seeds ``seed + k * ORDER_STRIDE`` (seed-major: 0, 1000000, 1, 1000001, ...)."""
    return [seed + k * ORDER_STRIDE for seed in config.seeds for k in range(config.data.orders)]


def seed_and_order(config: RunConfig, run_seed: int) -> tuple[int, int]:
    """(the config seed, the order k) of one of ``run_seeds(config)``."""
    if config.data.orders == 1:
        return run_seed, 0
    return run_seed % ORDER_STRIDE, run_seed // ORDER_STRIDE


class DataConfig(_Strict):
    source: str = "digits"
    root: str | None = None
    scenario: Literal["class", "task", "domain", "permuted"] = "class"
    n_tasks: int | None = Field(None, ge=1)  # None: the source's own tasks, else 5 (scenarios.py)
    order: str | list[int] = "seeded"
    domain_order: str | list[str] | None = None  # domain-incremental: a list, or 'paper'
    val_fraction: float = Field(0.1, gt=0, lt=1)
    train_per_class: int | None = Field(None, ge=1)
    eval_per_class: int | None = Field(None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)  # checked against the source's declared schema
    # random task orders per seed, results over every (seed, order): order 0 is the scenario's own, order k
    # the same tasks in a seeded random order, run as seed + k * 1,000,000 (docs/sources.md, Task orders)
    orders: int = Field(1, ge=1, le=MAX_ORDERS)

    @model_serializer(mode="wrap")
    def _without_one_order(self, handler: Any) -> dict[str, Any]:
        # a run of one order records its config as runs made before the key did
        data = handler(self)
        if data.get("orders", 0) == 1:
            del data["orders"]
        return data

    @model_validator(mode="after")
    def _check_source(self) -> DataConfig:
        """``source`` is a registered source and ``options`` fit its schema (a MergeclError naming the key)."""
        from mergecl.data.registry import find_source, read_source_options  # imports torch: only when needed

        find_source(self.source, where="data.source")
        read_source_options(self.source, self.options, where="data.options")
        return self


class ExportConfig(_Strict):
    """``export:``: the models a run writes at its end, each into ``RUN/export/<method>/`` as
    ``mergecl export`` does (before ``keep_vectors: false`` deletes the tensors). ``export: [magmax]``
    (or ``export: magmax``) is short for ``export: {methods: [magmax]}``."""

    methods: list[str] = Field(min_length=1)  # methods of the run
    seed: int | None = None  # the seed whose models are exported; None: the run's first seed

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"methods": [data]}
        return {"methods": data} if isinstance(data, list) else data


class RunConfig(_Strict):
    name: str = "run"
    # a seed seeds numpy too, whose seeds are 0 .. 2**32 - 1
    seeds: list[Annotated[int, Field(ge=0, lt=2**32)]] = Field(default_factory=lambda: [0], min_length=1)
    device: str = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    model: dict[str, Any] = Field(default_factory=lambda: {"name": "mlp", "in_dim": 64})
    train: TrainSettings = Field(default_factory=TrainSettings)  # the training layer's own settings
    methods: list[str] = Field(default_factory=lambda: ["seq_ft", "magmax"], min_length=1)
    eval_val: bool = False  # also evaluate every step on the validation splits (for model selection)
    eval_future: bool = True  # full accuracy matrix; False: tasks seen so far only (about half the evaluation)
    keep_vectors: bool = True  # False: delete a seed's tensors once it has finished (its numbers stay)
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    export: ExportConfig | None = None  # models to export at the end of the run; None: none
    # experiment loggers (mergecl/loggers.py): a name or {name: ..., options}; none by default
    loggers: list[str | dict[str, Any]] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _without_absent_export(self, handler: Any) -> dict[str, Any]:
        # a run without ``export:`` (or ``loggers:``) records its config as runs made before the key did
        data = handler(self)
        if data.get("export", 0) is None:
            del data["export"]
        if data.get("loggers", 0) == []:
            del data["loggers"]
        return data

    @model_validator(mode="after")
    def _check_loggers(self) -> RunConfig:
        from mergecl.loggers import check_logger

        for i, item in enumerate(self.loggers):
            check_logger(item, f"loggers.{i}")
        return self

    @model_validator(mode="after")
    def _check_orders(self) -> RunConfig:
        if self.data.orders > 1 and any(seed >= ORDER_STRIDE for seed in self.seeds):
            raise MergeclError(
                f"seeds: with data.orders > 1 every seed is below {ORDER_STRIDE:,} (order k of seed s runs as "
                f"seed s + k x {ORDER_STRIDE:,})"
            )
        return self

    @model_validator(mode="after")
    def _check_export(self) -> RunConfig:
        if self.export is None:
            return self
        for name in self.export.methods:
            if name not in self.methods:
                raise MergeclError(f"export.methods: {name!r} is not a method of this run ({', '.join(self.methods)})")
        if self.export.seed is not None and self.export.seed not in self.seeds:
            raise MergeclError(f"export.seed: {self.export.seed} is not a seed of this run ({self.seeds})")
        return self

    @model_validator(mode="after")
    def _check_model(self) -> RunConfig:
        """The model block against its backbone's declared options, before any model is built."""
        from mergecl.models.registry import check_model_spec  # imports torch: only when needed

        check_model_spec(self.model)
        return self

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
    load_plugins()  # a config may name what an installed plugin registers (entry points, $MERGECL_PLUGINS)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise MergeclError(_error_line(err, source)) from None
    except MergeclError as err:  # the method options' own check
        raise MergeclError(f"{source}: {err}") from None


# A config is a page of settings (the packaged ones are under 20 KB): anything far larger is a
# mistake or an attack, and PyYAML parses about 1 MB a second. Aliases are allowed (a user may
# reuse a block) but their expansion is bounded: a "billion laughs" of nested aliases would
# otherwise become billions of values once the config is validated or written back.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 200_000  # values after expanding every alias
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when installed: 5x faster


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values ``node`` becomes once every alias in it is copied out; a shared node is
    counted once per use but visited once (so a billion laughs costs microseconds to measure)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise MergeclError("an alias refers to a value that contains it (a recursive structure)")
    open_nodes.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    for child in children:
        size += _expanded_size(child, sizes, open_nodes)
        if size > MAX_CONFIG_VALUES:
            raise MergeclError(f"more than {MAX_CONFIG_VALUES} values once its aliases are expanded")
    open_nodes.discard(key)
    sizes[key] = size
    return size


def safe_load_bounded(text: str) -> Any:
    """``yaml.safe_load`` with the expansion of aliases bounded (MergeclError beyond the bound)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read_bounded(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)  # never more: /dev/zero or a 10 GB file cost nothing
    except FileNotFoundError:
        raise MergeclError(f"{path}: no such config file") from None
    except OSError as err:
        raise MergeclError(f"{path}: cannot be read ({err.strerror or err})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise MergeclError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MB; a config is a page of settings")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MergeclError(f"{path}: not UTF-8 text (byte {err.start})") from None


def load_config(path: str | Path | None = None) -> RunConfig:
    """Read and validate a YAML config (a path or a packaged name); None = the embedded default.
    Bounded: at most MAX_CONFIG_BYTES, and MAX_CONFIG_VALUES once aliases are expanded."""
    path = resolve_config_path(path) if path is not None else DEFAULT_CONFIG
    return parse_config(read_yaml(path) or {}, str(path))


def read_yaml(path: Path) -> Any:
    """A YAML file's content, read safely and bounded (see ``load_config``); one-line errors."""
    text = _read_bounded(path)
    try:
        data = safe_load_bounded(text)
    except MergeclError as err:
        raise MergeclError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise MergeclError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except RecursionError:
        raise MergeclError(f"{path}: nested too deeply to be a config") from None
    return data


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
