"""Experiment loggers: one interface, a small adapter per library (docs/loggers.md).

A run config's ``loggers:`` names them (``[tensorboard, csv, wandb, mlflow]``, or an item with options
such as ``{name: wandb, project: x}``); none by default, and then nothing here runs. ``open_loggers``
makes them for a run directory:

- ``csv``: ``RUN/logs/metrics.csv`` (columns: metric, step, value, time)
- ``tensorboard``: event files in ``RUN/logs/tensorboard/`` (torch's ``SummaryWriter``)
- ``wandb``: a W&B run in ``RUN/logs/wandb/`` (``mode: offline`` unless the item says otherwise)
- ``mlflow``: an MLflow run in the local file store ``file:RUN/mlruns`` (or ``tracking_uri``)

What is recorded: per training step (``train_step``) the loss, the learning rate and the gradient
norm, under ``seed<S>/<training>/...`` with the training's own step counter; per evaluation
(``evaluation``) the accuracy row, ACC and what the method chose on validation (``lam``), under
``seed<S>/<method>/...`` at step t + 1; per merge its time. The step counters live in
``RUN/logs/loggers.json`` (with the W&B and MLflow run ids), saved at each commit of the run, so a
resumed run appends to the same runs and its counters continue from the last committed step.

The training loop (layer 4) does not know the runner: the runner makes a recorder current
(``recording``) around a training step, and the loop asks ``current()`` for it (None: no logger,
and the loop does no extra work).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Protocol

from mergecl import progress
from mergecl.atomic import atomic_write_text
from mergecl.errors import MergeclError

LOGGERS = ("tensorboard", "csv", "wandb", "mlflow")
OPTIONS = {  # each logger's options (strings unless said)
    "tensorboard": {},
    "csv": {},
    "wandb": {"project": str, "entity": str, "name": str, "mode": str, "tags": list},
    "mlflow": {"tracking_uri": str, "experiment": str, "run_name": str},
}
_INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_logger(item: Any, where: str = "loggers") -> dict[str, Any]:
    """A config's logger item (a name, or a mapping with ``name`` and options) as a dict; MergeclError
    naming the key on an unknown logger or option."""
    spec = {"name": item} if isinstance(item, str) else dict(item) if isinstance(item, dict) else None
    if spec is None or not isinstance(spec.get("name"), str):
        raise MergeclError(f"{where}: a logger name ({', '.join(LOGGERS)}) or a mapping with 'name'")
    name = spec["name"]
    if name not in LOGGERS:
        raise MergeclError(f"{where}: unknown logger {name!r} (loggers: {', '.join(LOGGERS)})")
    for key, value in spec.items():
        if key == "name":
            continue
        kind = OPTIONS[name].get(key)
        if kind is None:
            known = ", ".join(OPTIONS[name]) or "none"
            raise MergeclError(f"{where}.{key}: not an option of the {name} logger (options: {known})")
        if not isinstance(value, kind):
            raise MergeclError(f"{where}.{key}: a {kind.__name__} is expected, got {value!r}")
    return spec


class Logger:
    """One experiment logger: metrics at a step of a series; ``flush`` at a run's commits."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError("each logger adapter writes its own records")  # the interface: adapters override it

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class CsvLogger(Logger):
    """``RUN/logs/metrics.csv``, appended to (a resumed run adds rows); one row per value."""

    FIELDS = ["metric", "step", "value", "time"]

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        self.handle = open(path, "a", newline="")
        self.writer = csv.writer(self.handle)
        if new:
            self.writer.writerow(self.FIELDS)

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = f"{time.time():.3f}"
        for key, value in metrics.items():
            self.writer.writerow([key, step, repr(float(value)), now])

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


class TensorBoardLogger(Logger):
    """Scalars in ``RUN/logs/tensorboard/`` (a resumed run writes a new event file there)."""

    def __init__(self, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(directory))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(Logger):
    """A W&B run under ``RUN/logs/wandb/``, offline unless ``mode`` says otherwise; its id is kept so
    that a resumed run appends to it. W&B's own step only grows, so each series' step is a metric of
    its own (``<series>/step``), declared as that series' x axis."""

    def __init__(self, directory: Path, options: dict[str, Any], run_id: str | None, config: dict, name: str):
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        if progress.is_quiet():  # --quiet, $MERGECL_QUIET, $CI: no W&B banner either
            os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.run = wandb.init(
            dir=str(directory),
            project=options.get("project", "mergecl"),
            entity=options.get("entity"),
            name=options.get("name", name),
            tags=options.get("tags"),
            mode=options.get("mode", "offline"),
            id=run_id,
            resume="allow" if run_id else None,
            config=config,
            reinit="create_new",
        )
        self.axes: set[str] = set()

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        series = {key.rsplit("/", 1)[0] for key in metrics}
        for prefix in series - self.axes:
            self.run.define_metric(f"{prefix}/step", hidden=True)
            self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
            self.axes.add(prefix)
        self.run.log({**{f"{prefix}/step": step for prefix in series}, **metrics})

    def close(self) -> None:
        self.run.finish()


class MlflowLogger(Logger):
    """An MLflow run in ``file:RUN/mlruns`` (or ``tracking_uri``), through ``MlflowClient``; metrics are
    buffered and written in batches (at each commit of the run, or every 1000 values)."""

    def __init__(self, uri: str, options: dict[str, Any], run_id: str | None, config: dict, name: str):
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        if uri.startswith("file:"):  # MLflow 3 keeps its file store (maintenance mode) behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.Metric = Metric
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            experiment = options.get("experiment", name)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run = self.client.create_run(experiment_id, run_name=options.get("run_name", name))
            run_id = run.info.run_id
            params = [Param(key, json.dumps(value)[:500]) for key, value in config.items()]
            self.client.log_batch(run_id, params=params)
        self.run_id = run_id
        self.buffer: list[Any] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.buffer.extend(self.Metric(key, float(value), now, step) for key, value in metrics.items())
        if len(self.buffer) >= 1000:
            self.flush()

    def flush(self) -> None:
        while self.buffer:
            self.client.log_batch(self.run_id, metrics=self.buffer[:1000])
            del self.buffer[:1000]

    def close(self) -> None:
        self.flush()
        self.client.set_terminated(self.run_id)


class StepRecorder(Protocol):
    def train_step(self, loss: float, lr: float, grad_norm: float) -> None: ...


_current: ContextVar[StepRecorder | None] = ContextVar("mergecl_step_recorder", default=None)


def current() -> StepRecorder | None:
    """The recorder of training steps the runner made current, or None (no logger: no extra work)."""
    return _current.get()


@contextlib.contextmanager
def recording(recorder: StepRecorder | None) -> Iterator[None]:
    """Make ``recorder`` the current one for the training steps run inside."""
    token = _current.set(recorder)
    try:
        yield
    finally:
        _current.reset(token)


class _Series:
    """A training's series: ``train_step`` logs under its prefix and advances its counter."""

    def __init__(self, loggers: Loggers, prefix: str) -> None:
        self.loggers, self.prefix = loggers, prefix

    def train_step(self, loss: float, lr: float, grad_norm: float) -> None:
        step = self.loggers.steps.get(self.prefix, 0) + 1
        self.loggers.steps[self.prefix] = step
        p = self.prefix
        self.loggers.log({f"{p}/loss": loss, f"{p}/lr": lr, f"{p}/grad_norm": grad_norm}, step)


class Loggers:
    """The run's loggers together, with the step counters and run ids kept in ``RUN/logs/loggers.json``."""

    def __init__(self, logs: Path, loggers: list[Logger], state: dict[str, Any]) -> None:
        self.logs, self.loggers, self.state = logs, loggers, state
        self.committed = dict(state.get("steps", {}))
        self.steps = dict(self.committed)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def training(self, seed: int, training: str) -> StepRecorder:
        """The recorder of a training's steps; its counter restarts from the last committed step."""
        prefix = f"seed{seed}/{training}"
        self.steps[prefix] = self.committed.get(prefix, 0)
        return _Series(self, prefix)

    def evaluation(self, seed: int, method: str, t: int, row: list[float], info: dict[str, Any]) -> None:
        """Row t of a method's accuracy matrix, its ACC and what it chose on validation (``lam``)."""
        prefix = f"seed{seed}/{method}"
        metrics = {f"{prefix}/acc_task{i + 1}": value for i, value in enumerate(row)}
        metrics[f"{prefix}/ACC"] = sum(row[: t + 1]) / (t + 1)
        metrics.update({f"{prefix}/{k}": v for k, v in info.items() if isinstance(v, (int, float))})
        self.log(metrics, t + 1)

    def merge_time(self, seed: int, method: str, t: int, seconds: float) -> None:
        self.log({f"seed{seed}/{method}/merge_time_s": seconds}, t + 1)

    def commit(self) -> None:
        """The run committed a step: flush, and keep the counters so that a resume continues them."""
        self.committed = dict(self.steps)
        for logger in self.loggers:
            logger.flush()
        atomic_write_text(self.logs / "loggers.json", json.dumps({**self.state, "steps": self.committed}, indent=1))

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def open_loggers(specs: list[dict[str, Any]], run: Path, config: dict[str, Any], name: str) -> Loggers | None:
    """The loggers a config names, writing into the run directory ``run``; None when it names none."""
    if not specs:
        return None
    logs = run / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    state_path = logs / "loggers.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    made: list[Logger] = []
    try:
        for spec in specs:
            kind, options = spec["name"], {k: v for k, v in spec.items() if k != "name"}
            try:
                if kind == "csv":
                    made.append(CsvLogger(logs / "metrics.csv"))
                elif kind == "tensorboard":
                    made.append(TensorBoardLogger(logs / "tensorboard"))
                elif kind == "wandb":
                    wandb_logger = WandbLogger(logs, options, state.get("wandb_run_id"), config, name)
                    state["wandb_run_id"] = wandb_logger.run_id
                    made.append(wandb_logger)
                else:
                    uri = options.get("tracking_uri", (run / "mlruns").resolve().as_uri())
                    mlflow_logger = MlflowLogger(uri, options, state.get("mlflow_run_id"), config, name)
                    state["mlflow_run_id"] = mlflow_logger.run_id
                    made.append(mlflow_logger)
            except ImportError as err:
                extra = _INSTALL[kind]
                raise MergeclError(
                    f"loggers: {kind} needs its library ({err.name}): pip install 'mergecl[{extra}]'"
                ) from None
    except BaseException:
        for logger in made:
            logger.close()
        raise
    loggers = Loggers(logs, made, state)
    loggers.commit()
    return loggers
