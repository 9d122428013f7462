"""`mergecl learn`: one model kept up to date as tasks arrive, one command per task.

``init`` makes a model directory (the base model, the method, the training settings, the promotion
policy); each ``add`` trains the new task from the current state, updates the merge, evaluates the
new model on the held-out data of every task learned so far, writes a report, and promotes the
model unless the gate refuses it (an earlier task dropped more than ``policy.max_drop`` points): it
is then a candidate, until ``promote`` or ``reject``. An add is the same computation as a step of
``mergecl run`` (the runner's step seeds, trainings, merges and accuracy rows), so ``init`` + N adds
give the accuracy matrix of a run over the same N tasks.

DIR/
  mergecl-learn.json      the marker: the learn config (model, method, training, data columns, policy)
  .mergecl.lock           the OS lock of the process working on DIR (empty; never deleted)
  learn.json              the ledger: tasks, accuracy matrix, history, promoted and candidate versions.
                          Rewritten atomically: its write is the commit of an add, promote or reject
  base.safetensors        theta_0 without the head (the zero-shot head is built from the class names)
  tasks/NAME.jsonl        each task's examples as added (input, label, split): the held-out data of
                          every task stays here, and the training data (joint training reads it)
  state/K/                the method's state after K tasks: its training's last task vector
                          (tau.safetensors, when the training continues from it), its carried state
                          (carried.safetensors: EWC's Fisher, PAM's LoRA, BECAME's precision and GPM
                          bases), the merge's running state (merge.safetensors), info.json (lam chosen)
  vectors/taskK.safetensors   every task vector, for a merge without a running form (TIES)
  models/vK/              the model after K tasks, as ``mergecl export`` writes it (loadable directory)
  model -> models/vK      the promoted model: a symbolic link, switched atomically
  candidate -> models/vK  the model an add's gate refused, until promote or reject
  reports/K-NAME/         report.md and accuracy.png/.svg of the add of task K

State is O(1) in the number of tasks wherever the method allows it: a training's carried state and
last task vector, and a merge rule's running form (``merging.registry.Running``: MagMax's running
max-magnitude, averaging's running sum, task arithmetic's sum, random mix's reservoir). A rule
without one (TIES, OPCM, TSV-M, ...) or a merge option that needs every vector (``dare``,
``space: dense``, ``include``/``exclude``) keeps all task vectors; ``status`` shows the size.
A killed command leaves the last committed state: what it wrote before the ledger is tidied away
(or replaced) by the next command, and re-running an add gives the same numbers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, ValidationError, model_validator

from mergecl.atomic import atomic_directory, atomic_write_bytes, atomic_write_text, remove_stale_temps
from mergecl.data.scenarios import DEFAULT_VAL_FRACTION, with_val
from mergecl.data.sources.files import FilesOptions, load_files
from mergecl.data.types import Scenario, Split, Task
from mergecl.errors import MergeclError
from mergecl.evaluation import metrics
from mergecl.experiment.config import load_config, read_yaml
from mergecl.experiment.export import EXPORT_VERSION, write_model
from mergecl.experiment.rundir import RunDir
from mergecl.experiment.runner import Runner, pick_device, step_seed
from mergecl.methods.merged import RunningMerge, TaskVectors, merged_model, running_form
from mergecl.methods.registry import MethodSpec, method_schema, resolve_method
from mergecl.methods.trainings import Step, eval_classes, registered_training
from mergecl.models.base import tuned_keys
from mergecl.models.factory import build_learner
from mergecl.models.lora import lora_pairs
from mergecl.models.registry import check_model_spec
from mergecl.options import Options, read_options
from mergecl.plugins import load_plugins
from mergecl.training.loop import accuracy_from_logits, check_finite, predict_logits, predict_splits
from mergecl.training.settings import TrainSettings

__all__ = ["AddResult", "LearnConfig", "LearnStatus", "add", "init", "promote", "reject", "status"]

MARKER = "mergecl-learn.json"
LEDGER = "learn.json"
FORMAT = 1
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_NOT_PER_TASK = ("train", "validation", "test", "task_column", "task_order", "name")  # the files options learn sets


def _default_model() -> dict[str, Any]:
    return dict(load_config(None).model)  # the embedded default's: the packaged MiniLM, zero-shot head


def _default_train() -> TrainSettings:
    return load_config(None).train  # the settings the embedded default trains that model with


class LearnPolicy(Options):
    max_drop: float = Field(
        5.0,
        ge=0,
        description="an add whose model is more than this many points below the promoted model on any earlier "
        "task is kept as a candidate, not promoted",
    )
    keep_versions: int = Field(3, ge=1, description="promoted model versions kept in DIR/models (the current one too)")


class LearnConfig(Options):
    """LEARN.yaml: what ``mergecl learn init`` records (every key optional)."""

    name: str = Field("learn", min_length=1, description="the model's name in reports")
    seed: int = Field(0, ge=0, lt=2**32, description="seeds theta_0 (a random backbone), the steps and the carves")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    model: dict[str, Any] = Field(default_factory=_default_model, description="the model block of a run config")
    method: str = Field("magmax", description="any method of mergecl run: seq_ft, magmax, ind_ft+ties, pam, ...")
    method_options: dict[str, Any] = Field(default_factory=dict, description="the method's options")
    train: TrainSettings = Field(
        default_factory=_default_train,
        description="the train block of a run config; default: the embedded default run's "
        "(src/mergecl/configs/clinc150-mini-cil.yaml)",
    )
    data: dict[str, Any] = Field(
        default_factory=dict,
        description="how --data files are read: options of the files source (text_column, label_column, "
        "split_column, test_fraction (default 0.2, when a file has no split column), format, ...)",
    )
    val_fraction: float = Field(
        DEFAULT_VAL_FRACTION, gt=0, lt=1, description="of train, per class, when a file has no validation rows"
    )
    policy: LearnPolicy = Field(default_factory=LearnPolicy, description="the promotion gate and versions kept")

    @model_validator(mode="after")
    def _check(self) -> LearnConfig:
        load_plugins()
        model = check_model_spec(self.model)
        if model.head != "zero_shot":
            raise ValueError(
                "model.head: learn needs a zero_shot head (built from the class names, so it grows with each "
                f"task), got {model.head}"
            )
        spec = resolve_method(self.method)
        if registered_training(spec.training).step is None:
            raise ValueError(f"method: {self.method} trains nothing; learn needs a training method")
        options = read_options(method_schema(spec), self.method_options, "method_options")
        if getattr(options, "space", None) == "dense" and model.lora is None:
            raise ValueError("method_options.space: dense needs a LoRA model (model.lora)")
        for key in _NOT_PER_TASK:
            if key in self.data:
                raise ValueError(f"data.{key}: learn reads one file per task (--data FILE); remove it")
        read_options(FilesOptions, self.data, "data")
        return self

    @property
    def spec(self) -> MethodSpec:
        return resolve_method(self.method)

    def files_options(self) -> dict[str, Any]:
        return {"test_fraction": 0.2, **self.data}


def read_learn_config(path: str | os.PathLike | None) -> LearnConfig:
    """LEARN.yaml (bounded, safe YAML), or the defaults (None); one-line errors naming the key."""
    data = {} if path is None else read_yaml(Path(path)) or {}
    where = "learn config" if path is None else str(path)
    if not isinstance(data, dict):
        raise MergeclError(f"{where}: the top level must be a mapping of keys")
    try:
        return LearnConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise MergeclError(f"{where}: unknown key '{key}' (keys: {', '.join(LearnConfig.model_fields)})") from None
        message = first["msg"].removeprefix("Value error, ")
        raise MergeclError(f"{where}: {key + ': ' if key else ''}{message}") from None
    except MergeclError as err:
        raise MergeclError(f"{where}: {err}") from None


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddResult:
    """What one ``add`` did."""

    task: str
    version: int  # the model after this many tasks
    promoted: bool
    row: list[float]  # the new model's accuracy on every task so far (percent)
    before: list[float | None]  # the promoted model's, before the add (the new task: before training on it)
    acc: float  # mean of ``row``
    bwt: float | None  # of the accuracy matrix with this row
    drops: dict[str, float]  # earlier task -> points lost
    report: Path
    model: Path  # the exported model directory of this version
    seconds: float

    def __str__(self) -> str:
        state = "promoted" if self.promoted else "NOT promoted (a candidate: mergecl learn promote / reject)"
        bwt = f", BWT {self.bwt:+.2f}" if self.bwt is not None else ""
        return f"task {self.version} '{self.task}': ACC {self.acc:.2f}{bwt}; {state}; report {self.report}"


@dataclass(frozen=True)
class LearnStatus:
    """A model directory as ``mergecl learn status`` shows it: the promoted tasks, the accuracy
    matrix of the promoted models, the history of adds and decisions, the models, and the size of
    the method's state on disk."""

    path: Path
    config: LearnConfig
    tasks: list[str]  # promoted tasks, in order
    matrix: list[list[float]]  # row k: the promoted lineage's model after task k+1
    history: list[dict[str, Any]]
    promoted: Path | None  # DIR/model's target
    candidate: dict[str, Any] | None
    state_bytes: int  # the method's state on disk (base, task data and models apart)
    state_files: dict[str, int] = field(default_factory=dict)  # relative path -> bytes

    @property
    def acc(self) -> float | None:
        return metrics.final_acc(self.matrix) if self.matrix else None

    @property
    def bwt(self) -> float | None:
        return metrics.bwt(self.matrix) if len(self.matrix) > 1 else None

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.config.name}, method {self.config.method}, {len(self.tasks)} task(s) learned"]
        if self.matrix:
            bwt = f", BWT {self.bwt:+.2f}" if self.bwt is not None else ""
            lines.append(f"  ACC {self.acc:.2f}{bwt}; tasks: {', '.join(self.tasks)}")
        lines.append(f"  model: {self.promoted if self.promoted else 'none yet (learn add)'}")
        if self.candidate:
            drops = ", ".join(f"{k} -{v:.2f}" for k, v in self.candidate["drops"].items() if v > 0)
            lines.append(f"  candidate: task '{self.candidate['task']['name']}' (refused: {drops}); promote or reject")
        lines.append(f"  state: {_size(self.state_bytes)} ({_state_words(self.config)})")
        for entry in self.history[-10:]:
            lines.append(
                f"  {entry['date']} {entry['event']} '{entry['task']}'"
                + (f": {entry['note']}" if entry.get("note") else "")
            )
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _state_words(config: LearnConfig) -> str:
    return (
        "O(1) in the number of tasks"
        if _running(config) or config.spec.rule is None
        else "grows with each task: every task vector is kept"
    )


def _running(config: LearnConfig) -> bool:
    """The merge goes on from a running state: its rule declares one (with its coefficient, for a
    rule whose ``prepare`` computes one), and no option needs every vector."""
    rule = config.spec.rule
    return rule is not None and running_form(rule, config.method_options) is not None


# --- the directory ------------------------------------------------------------------------------


class LearnDir:
    """An open model directory, locked until ``close``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.files = RunDir(self.path)  # the run directory's lock, tensor and JSON helpers
        self.config: LearnConfig
        self.ledger: dict[str, Any]

    # paths
    def state_dir(self, k: int) -> Path:
        return self.path / "state" / str(k)

    def model_dir(self, k: int) -> Path:
        return self.path / "models" / f"v{k}"

    def vector_path(self, k: int) -> Path:
        return self.path / "vectors" / f"task{k}.safetensors"

    @property
    def base_path(self) -> Path:
        return self.path / "base.safetensors"

    # opening
    def open(self) -> LearnDir:
        if not (self.path / MARKER).is_file():
            what = "no such directory" if not self.path.exists() else f"not a mergecl learn directory (no {MARKER})"
            raise MergeclError(f"{self.path}: {what}; make one with mergecl learn init {self.path}")
        self.files.lock()
        try:
            recorded = self.files.read_json(MARKER)
            self.config = LearnConfig.model_validate(recorded["config"])
            self.ledger = self.files.read_json(LEDGER)
            if not isinstance(self.ledger, dict) or self.ledger.get("format") != FORMAT:
                raise MergeclError(f"{self.path / LEDGER}: not a mergecl learn ledger (format {FORMAT})")
            self.tidy()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        self.files.unlock()

    def commit(self) -> None:
        """The ledger, atomically: the one write that makes an add, promote or reject happen."""
        self.files.write_json(LEDGER, self.ledger)

    def tidy(self) -> None:
        """Make DIR match the ledger: links to the promoted and candidate models, and nothing left of
        a command killed before its commit (only mergecl's own names are touched)."""
        promoted, candidate = self.ledger["promoted"], self.ledger["candidate"]
        live = {promoted} | ({candidate["version"]} if candidate else set())
        for folder, pattern in (("state", r"(\d+)"), ("models", r"v(\d+)")):
            for entry in (self.path / folder).glob("*") if (self.path / folder).is_dir() else []:
                match = re.fullmatch(pattern, entry.name)
                if match and entry.is_dir() and not entry.is_symlink():
                    k = int(match.group(1))
                    if (folder == "state" and k not in live) or (folder == "models" and k not in self.versions()):
                        shutil.rmtree(entry)
            if (self.path / folder).is_dir():
                remove_stale_temps(self.path / folder)
        newest = max(live)
        for entry in (self.path / "vectors").glob("task*.safetensors") if (self.path / "vectors").is_dir() else []:
            match = re.fullmatch(r"task(\d+)\.safetensors", entry.name)
            if match and int(match.group(1)) > newest:
                entry.unlink()
        self.files.remove_stale_temps()
        self.link("model", promoted if promoted else None)
        self.link("candidate", candidate["version"] if candidate else None)

    def versions(self) -> list[int]:
        """Model versions the ledger keeps: the promoted ones it lists and the candidate."""
        kept = list(self.ledger["versions"])
        if self.ledger["candidate"]:
            kept.append(self.ledger["candidate"]["version"])
        return kept

    def link(self, name: str, version: int | None) -> None:
        """DIR/name -> models/vK, switched atomically (a new link renamed over the old); None: no link."""
        where = self.path / name
        if where.exists() and not where.is_symlink():
            raise MergeclError(f"{where}: a file or folder that mergecl did not make is in the way; move it")
        if version is None:
            if where.is_symlink():
                where.unlink()
            return
        target = os.path.join("models", f"v{version}")
        if where.is_symlink() and os.readlink(where) == target:
            return
        temp = self.path / f".{name}.link.tmp"
        if temp.is_symlink():
            temp.unlink()
        os.symlink(target, temp)
        os.replace(temp, where)

    # the state
    def tasks(self) -> list[dict[str, Any]]:
        return list(self.ledger["tasks"])

    def scenario(self, tasks: list[dict[str, Any]]) -> Scenario:
        """The tasks as an incremental scenario over the classes in order of arrival, a class known
        by its name: a task of new classes is a class-incremental step, a task of learned ones (a
        new domain) a domain-incremental one, and a task may mix them. Each task trains on its own
        classes and is evaluated among every class seen so far (the runner's class-incremental
        rows; with every task over the same classes, its domain-incremental ones)."""
        ids: dict[str, int] = {}
        built = []
        for t, task in enumerate(tasks):
            for name in task["classes"]:
                ids.setdefault(name, len(ids))
            global_ids = [ids[name] for name in task["classes"]]  # by the task's own label index
            splits = _read_task_file(self.path / task["data"], global_ids)
            classes = sorted(global_ids)  # the runner's order of a task's classes
            built.append(Task(t, task["name"], classes, splits["train"], splits["validation"], splits["test"]))
        return Scenario("class", built, list(ids), f"{self.config.name} ({len(tasks)} tasks)")

    def learner(self, class_names: list[str], device: torch.device):
        """The model with a head over ``class_names``, its other weights theta_0 (as a run builds it)."""
        torch.manual_seed(self.config.seed)
        learner = build_learner(self.config.model, class_names, device)
        base = self.files.load_tensors(self.base_path)
        missing, unexpected = learner.load_state_dict(base, strict=False)
        if unexpected or any(not key.startswith("head.") for key in missing):
            raise MergeclError(f"{self.base_path}: does not fit the model of {MARKER} (was it edited?)")
        return learner

    def state_bytes(self) -> dict[str, int]:
        """The method's state on disk: the promoted state (and the kept task vectors), relative path -> bytes."""
        files = {}
        folders = [self.state_dir(self.ledger["promoted"]), self.path / "vectors"]
        for folder in folders:
            for entry in sorted(folder.rglob("*")) if folder.is_dir() else []:
                if entry.is_file() and not entry.name.startswith("."):
                    if (
                        entry.parent.name == "vectors"
                        and int(entry.stem.removeprefix("task")) > self.ledger["promoted"]
                    ):
                        continue
                    files[str(entry.relative_to(self.path))] = entry.stat().st_size
        return files


# --- the task data ------------------------------------------------------------------------------


def _read_task_file(path: Path, global_ids: list[int]) -> dict[str, Split]:
    """A task's examples as stored in DIR/tasks (JSON lines: input, label = class index within the
    task, split), labelled with the global class ids: ``global_ids[label]``."""
    rows: dict[str, tuple[list[str], list[int]]] = {s: ([], []) for s in ("train", "validation", "test")}
    kind = "text"
    try:
        with open(path, encoding="utf-8") as handle:
            header = json.loads(handle.readline())
            kind = header["kind"]
            for line in handle:
                row = json.loads(line)
                rows[row["split"]][0].append(row["input"])
                rows[row["split"]][1].append(global_ids[int(row["label"])])
    except (OSError, ValueError, KeyError, IndexError) as err:
        raise MergeclError(f"{path}: the task's data cannot be read ({err})") from None
    return {s: Split(inputs, torch.tensor(labels, dtype=torch.long), kind) for s, (inputs, labels) in rows.items()}


def _task_file(splits: dict[str, Split], class_names: list[str], source: str) -> str:
    lines = [json.dumps({"kind": splits["train"].kind, "classes": class_names, "source": source})]
    for name, split in splits.items():
        for item, label in zip(split.inputs, split.labels.tolist(), strict=True):
            lines.append(json.dumps({"split": name, "input": item, "label": label}, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def read_task(config: LearnConfig, data: str | os.PathLike, name: str) -> tuple[list[str], dict[str, Split]]:
    """A new task's class names and splits (train, validation, test; labels index the class names),
    from the user's file read by the files source: its split column, else a seeded stratified carve
    of ``test_fraction``; validation: the file's, else ``val_fraction`` of train."""
    options = config.files_options()
    dataset = load_files(data, name=name, **options)
    dataset = with_val(dataset, config.val_fraction, config.seed)
    assert dataset.val is not None
    return list(dataset.class_names), {"train": dataset.train, "validation": dataset.val, "test": dataset.test}


# --- the commands -------------------------------------------------------------------------------


def init(directory: str | os.PathLike, config: LearnConfig | str | os.PathLike | None = None) -> LearnStatus:
    """Make a model directory (see the module docstring) with ``config`` (a LearnConfig, a LEARN.yaml
    path, or None: the defaults). Refused if ``directory`` exists and is not empty."""
    config = config if isinstance(config, LearnConfig) else read_learn_config(config)
    path = Path(directory)
    if (path / MARKER).exists():
        raise MergeclError(f"{path}: already a mergecl learn directory; add tasks with mergecl learn add {path}")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise MergeclError(f"{path}: exists and is not an empty directory; learn init needs a new one")
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    learner = build_learner(config.model, ["(no class yet)"], device)  # the head is rebuilt at every add
    base = {k: v for k, v in learner.state_dict().items() if not k.startswith("head.")}
    made = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    files = RunDir(path)
    files.lock()
    try:
        files.save_tensors(path / "base.safetensors", base, {"mergecl_learn": "theta_0"})
        ledger = {
            "format": FORMAT,
            "tasks": [],
            "matrix": [],
            "history": [],
            "promoted": 0,
            "versions": [],
            "candidate": None,
        }
        atomic_write_text(path / LEDGER, json.dumps(ledger, indent=1) + "\n")
        recorded = {"format": FORMAT, "config": config.model_dump(mode="json")}
        atomic_write_text(path / MARKER, json.dumps(recorded, indent=1) + "\n")  # last: the marker says it is whole
    except BaseException:
        for name in ("base.safetensors", LEDGER):
            (path / name).unlink(missing_ok=True)
        if made:
            (path / ".mergecl.lock").unlink(missing_ok=True)
            path.rmdir()
        raise
    finally:
        files.unlock()
    return status(path)


def status(directory: str | os.PathLike) -> LearnStatus:
    """What the model directory holds: tasks, accuracy matrix, history, models, state size."""
    learn = LearnDir(directory).open()
    try:
        return _status(learn)
    finally:
        learn.close()


def _status(learn: LearnDir) -> LearnStatus:
    ledger = learn.ledger
    files = learn.state_bytes()
    promoted = learn.path / "model" if ledger["promoted"] else None
    return LearnStatus(
        learn.path,
        learn.config,
        [task["name"] for task in ledger["tasks"]],
        ledger["matrix"],
        ledger["history"],
        promoted,
        ledger["candidate"],
        sum(files.values()),
        files,
    )


def add(
    directory: str | os.PathLike,
    task: str,
    data: str | os.PathLike,
    *,
    max_drop: float | None = None,
    echo: Callable[[str], None] = print,
) -> AddResult:
    """Learn task ``task`` from the file ``data`` (see the module docstring). Returns what was done;
    ``promoted`` is False when the gate kept the model as a candidate."""
    learn = LearnDir(directory).open()
    try:
        return _add(learn, task, Path(data), max_drop, echo)
    finally:
        learn.close()


def _add(learn: LearnDir, name: str, data: Path, max_drop: float | None, echo) -> AddResult:
    started = time.perf_counter()
    config, ledger = learn.config, learn.ledger
    if ledger["candidate"]:
        waiting = ledger["candidate"]["task"]["name"]
        raise MergeclError(
            f"{learn.path}: the candidate of task '{waiting}' waits for a decision: mergecl learn promote "
            f"{learn.path} (or reject) first"
        )
    if not _TASK_NAME.fullmatch(name):
        raise MergeclError(
            f"task name {name!r}: use letters, digits, '_', '.', '-' (at most 64, not starting with . _ -)"
        )
    tasks = learn.tasks()
    if any(task["name"] == name for task in tasks):
        raise MergeclError(f"task '{name}' is learned already in {learn.path}; give the new task another name")
    if max_drop is not None and not (max_drop >= 0 and np.isfinite(max_drop)):
        raise MergeclError(f"max_drop: expected a number of points >= 0, got {max_drop}")
    class_names, splits = read_task(config, data, name)
    learned = {c for task in tasks for c in task["classes"]}
    known = sum(c in learned for c in class_names)  # a new domain of learned classes, or a mix
    k, t = len(tasks) + 1, len(tasks)
    entry = {"name": name, "classes": class_names, "data": f"tasks/{name}.jsonl", "source": str(data.resolve()),
             "examples": {s: len(split) for s, split in splits.items()}}  # fmt: skip
    atomic_write_text(learn.path / entry["data"], _task_file(splits, class_names, entry["source"]))

    device = pick_device(config.device)
    scenario = learn.scenario([*tasks, entry])
    learner = learn.learner(scenario.class_names, device)
    base = {key: value.detach().cpu().clone() for key, value in learner.state_dict().items()}
    tuned = [key for key in tuned_keys(learner) if not key.startswith("head.")]
    batch_size = config.train.eval_batch_size
    previous_model = _weights_of(learn, ledger["promoted"], base, tuned, learner)
    before = [
        *(ledger["matrix"][-1] if ledger["matrix"] else []),
        _zero_shot_on_new(learner, previous_model, scenario, batch_size),
    ]
    del previous_model

    spec = config.spec
    training = registered_training(spec.training)
    previous = learn.state_dir(k - 1)
    start = base
    if t > 0 and training.continues:
        start = Runner.rebuild(base, learn.files.load_tensors(previous / "tau.safetensors"))
    carried_path = previous / "carried.safetensors"
    carried = learn.files.load_tensors(carried_path) if t > 0 and carried_path.is_file() else None
    learner.load_state_dict(start)
    seed_t = step_seed(config.seed, training.name, t)
    torch.manual_seed(seed_t)
    options = read_options(training.options, {} if spec.rule else config.method_options, "method_options")
    of_them = f", {known} of them learned already" if known else ""
    echo(f"training task {k} '{name}' ({len(splits['train'])} examples, {len(class_names)} classes{of_them})")
    result = training.step(Step(learner, scenario, t, config.train, seed_t, options, carried))
    trained = learner.state_dict()
    tau = {key: trained[key].detach().cpu().float() - base[key].float() for key in tuned}
    check_finite(tau, f"the model after training task '{name}'")

    def validate(state: dict) -> list[float]:  # lam: auto
        return _evaluate(learner, state, scenario, t, batch_size, "val")

    weights, info, merge_state = _merged(learn, k, tau, base, tuned, learner, validate)
    keep_tau = training.continues or spec.rule is None  # the next start, or the model itself
    state = {"tau": tau if keep_tau else None, "carried": result.carried, "merge": merge_state}
    row = _evaluate(learner, weights, scenario, t, batch_size)
    matrix = [*ledger["matrix"], row]
    limit = config.policy.max_drop if max_drop is None else max_drop
    drops = {scenario.tasks[i].name: round(before[i] - row[i], 4) for i in range(t)}
    promoted = all(drop <= limit for drop in drops.values())

    with atomic_directory(learn.state_dir(k)) as folder:
        for key, tensors in state.items():
            if tensors is not None:
                RunDir.save_tensors(folder / f"{key}.safetensors", tensors)
        atomic_write_text(folder / "info.json", json.dumps({"task": name, **info, **result.info}) + "\n")
    learner.load_state_dict(weights)
    model_dir = learn.model_dir(k)
    _export(learn, learner, scenario, k, row, model_dir)
    seconds = time.perf_counter() - started
    report = _report(learn, scenario, k, before, row, matrix, drops, limit, promoted, seconds)

    now = time.strftime("%Y-%m-%d %H:%M:%S")
    acc, bwt = metrics.final_acc(matrix), metrics.bwt(matrix)
    if promoted:
        _promote(learn, entry, row, k)
        ledger["history"].append(
            {"date": now, "event": "promoted", "task": name, "version": k, "acc": acc, "bwt": bwt, "seconds": seconds}
        )
    else:
        worst = max(drops, key=lambda n: drops[n])
        note = f"'{worst}' dropped {drops[worst]:.2f} points (> {limit:g})"
        ledger["candidate"] = {
            "version": k,
            "task": entry,
            "row": row,
            "drops": drops,
            "note": note,
            "seconds": seconds,
        }
        ledger["history"].append(
            {
                "date": now,
                "event": "refused",
                "task": name,
                "version": k,
                "acc": acc,
                "bwt": bwt,
                "seconds": seconds,
                "note": note,
            }
        )
    learn.commit()
    learn.tidy()
    return AddResult(name, k, promoted, row, before, acc, bwt, drops, report, model_dir, seconds)


def promote(directory: str | os.PathLike) -> LearnStatus:
    """Accept the candidate an add's gate refused: it becomes the model."""

    def accept(learn: LearnDir, candidate: dict[str, Any]) -> None:
        _promote(learn, candidate["task"], candidate["row"], candidate["version"])
        learn.ledger["history"].append(_event("promoted by hand", candidate))

    return _decide(directory, "promote", accept)


def reject(directory: str | os.PathLike) -> LearnStatus:
    """Drop the candidate: the model and the state stay as they were before its add."""

    def drop(learn: LearnDir, candidate: dict[str, Any]) -> None:
        learn.ledger["history"].append(_event("rejected", candidate))

    return _decide(directory, "reject", drop)


def _decide(directory: str | os.PathLike, verb: str, decide: Callable[[LearnDir, dict[str, Any]], None]) -> LearnStatus:
    """Promote or reject the waiting candidate: ``decide`` edits the ledger, which is then committed;
    the next ``tidy`` removes what the ledger no longer names (a rejected candidate's state, model
    and data)."""
    learn = LearnDir(directory).open()
    try:
        candidate = learn.ledger["candidate"]
        if not candidate:
            raise MergeclError(f"{learn.path}: no candidate model to {verb}")
        learn.ledger["candidate"] = None
        decide(learn, candidate)
        learn.commit()
        learn.tidy()
        if verb == "reject":
            (learn.path / candidate["task"]["data"]).unlink(missing_ok=True)
        return _status(learn)
    finally:
        learn.close()


def _promote(learn: LearnDir, entry: dict[str, Any], row: list[float], version: int) -> None:
    """The ledger with task ``entry`` learned: its row, the promoted version, the versions kept."""
    ledger = learn.ledger
    ledger["tasks"].append(entry)
    ledger["matrix"].append(row)
    ledger["promoted"] = version
    ledger["versions"] = [*ledger["versions"], version][-learn.config.policy.keep_versions :]


def _event(event: str, candidate: dict[str, Any]) -> dict[str, Any]:
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "event": event, "task": candidate["task"]["name"],
            "version": candidate["version"]}  # fmt: skip


# --- one add's parts ----------------------------------------------------------------------------


def _evaluate(learner, weights, scenario: Scenario, t: int, batch_size: int, split: str = "test") -> list[float]:
    """Row t of the accuracy matrix: the model ``weights`` on tasks 0..t (the runner's row)."""
    check_finite(weights, "the model to evaluate")
    learner.load_state_dict(weights)
    splits = [getattr(task, split) for task in scenario.tasks[: t + 1]]
    logits = predict_splits(learner, splits, batch_size, f"evaluating ({split})")
    return Runner.row(scenario, t, split, logits)


def _zero_shot_on_new(learner, weights, scenario: Scenario, batch_size: int) -> float:
    """The accuracy of the model ``weights`` (before the add) on the new task, among every class seen
    (zero-shot where the task brings new classes)."""
    check_finite(weights, "the model before this task")
    learner.load_state_dict(weights)
    t = len(scenario.tasks) - 1
    task = scenario.tasks[t]
    logits = predict_logits(learner, task.test, batch_size)
    return accuracy_from_logits(logits, task.test.labels, eval_classes(scenario, t, t))


def _weights_of(learn: LearnDir, k: int, base, tuned, learner) -> dict[str, torch.Tensor]:
    """The full state of the model after k tasks (k = 0: theta_0), rebuilt from state/k as it was
    (an auto lam: the one it chose)."""
    if k == 0:
        return base
    info = json.loads((learn.state_dir(k) / "info.json").read_text())
    return _merged(learn, k, None, base, tuned, learner, lambda state: [0.0], info.get("lam"))[0]


def _merged(learn: LearnDir, k: int, tau, base, tuned, learner, validate, recorded_lam: float | None = None):
    """(the model after k tasks, what was chosen (lam), the merge's running state) from the training's
    task vector ``tau`` of task k and the state after k - 1 tasks (``validate``: the run's, for an
    auto lam); ``tau`` None: the model of state k as it was (``recorded_lam``: the lam it chose)."""
    config, spec = learn.config, learn.config.spec
    folder = learn.state_dir(k if tau is None else k - 1)
    if spec.rule is None:
        tau = tau if tau is not None else learn.files.load_tensors(folder / "tau.safetensors")
        return Runner.rebuild(base, tau), {}, None
    options = dict(config.method_options)
    if recorded_lam is not None:
        options.update(lam="auto", lam_grid=[recorded_lam])
    if _running(config):
        running = RunningMerge(spec.rule, options, config.seed)
        if tau is None or k > 1:  # the state after k (tau None) or k - 1 tasks, as stored
            running.state = learn.files.load_tensors(folder / "merge.safetensors")
            running.count = k if tau is None else k - 1
            if running.running.coefficient is not None:  # e.g. OPCM: one norm per task, kept in info
                running.task_norms = json.loads((folder / "info.json").read_text())["task_norms"]
        if tau is not None:
            running.add(tau)
        vectors = TaskVectors([], base, tuned, learn.files.load_tensors, lora_pairs(learner))
        merged = running.model(vectors, validate, "method_options")
        norms = {"task_norms": running.task_norms} if running.task_norms else {}  # kept for the next add
        return merged.state, {**merged.info, **norms}, running.state
    if tau is not None:
        learn.files.save_tensors(learn.vector_path(k), tau)
    paths = [learn.vector_path(i) for i in range(1, k + 1)]
    vectors = TaskVectors(paths, base, tuned, learn.files.load_tensors, lora_pairs(learner))
    merged = merged_model(spec.rule, vectors, options, config.seed, validate, "method_options")
    return merged.state, merged.info, None


def _export(learn: LearnDir, learner, scenario: Scenario, k: int, row: list[float], out: Path) -> None:
    info = {
        "mergecl_export": EXPORT_VERSION,
        "learn": str(learn.path),
        "method": learn.config.method,
        "version": k,
        "class_names": list(scenario.class_names),
        "scenario": "class",
        "tasks": [{"name": task.name, "classes": list(task.classes)} for task in scenario.tasks],
        "classes_seen": list(range(scenario.num_classes)),
    }

    def card(info: dict[str, Any], what: str) -> str:
        lines = [
            "---",
            "tags: [mergecl, continual-learning]",
            "---",
            f"# {learn.config.name}, version {k} (mergecl learn)",
            "",
            f"The model of `{learn.path}` after {k} task(s), learned one at a time with `{learn.config.method}`.",
            "",
            f"- backbone: `{info['backbone']}`; what is here: {what}",
            f"- load: {info['loads_with']}",
            f"- head: {info['head']['type']}, logits = {info['head']['logits']}",
            "",
            "| task | classes | accuracy (%) |",
            "|:---|---:|---:|",
        ]
        lines += [f"| {task.name} | {len(task.classes)} | {row[i]:.2f} |" for i, task in enumerate(scenario.tasks)]
        return "\n".join([*lines, ""])

    from mergecl.merging.checkpoints import check_output

    check_output(out, [], force=True)  # ours: a killed add's leftover of the same version
    write_model(out, learner, learn.config.model, info, card)


def _report(learn: LearnDir, scenario, k, before, row, matrix, drops, limit, promoted, seconds) -> Path:
    from mergecl.evaluation.report import figure_bytes, heatmap_figure, matrix_markdown

    names = [task.name for task in scenario.tasks]
    previous = "theta_0" if learn.ledger["promoted"] == 0 else f"version {learn.ledger['promoted']}"
    grid = np.array([r + [np.nan] * (len(names) - len(r)) for r in matrix], dtype=float)
    folder = learn.path / "reports" / f"{k}-{names[-1]}"
    acc, bwt = metrics.final_acc(matrix), metrics.bwt(matrix)
    decision = (
        "promoted: it is now DIR/model"
        if promoted
        else (
            f"NOT promoted (an earlier task dropped more than {limit:g} points): it is DIR/candidate until "
            "`mergecl learn promote DIR` or `mergecl learn reject DIR`"
        )
    )
    lines = [
        f"# {learn.config.name}: task {k}, '{names[-1]}'",
        "",
        f"Method `{learn.config.method}`; {seconds:.1f} s. Decision: {decision}.",
        "",
        f"ACC {acc:.2f}" + (f", BWT {bwt:+.2f}" if bwt is not None else "") + " (percent).",
        "",
        "| task | before this task | after | change |",
        "|:---|---:|---:|---:|",
    ]
    for i, name in enumerate(names):
        was = before[i]
        lines.append(f"| {name} | {was:.2f} | {row[i]:.2f} | {row[i] - was:+.2f} |")
    lines += [
        "",
        f"'before' is the model before this add ({previous}); for the new task, its accuracy there before "
        "training on it (zero-shot for new classes; for learned ones, how it did on the new domain).",
        "",
        "## Accuracy matrix (row: the model after task t; column: the task evaluated on)",
        "",
        matrix_markdown(grid, names),
        "![accuracy matrix](accuracy.png)",
        "",
    ]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "report.md", "\n".join(lines))
    figure = heatmap_figure(learn.config.method, grid, len(names), names)
    for fmt in ("png", "svg"):
        atomic_write_bytes(folder / f"accuracy.{fmt}", figure_bytes(figure, fmt))
    return folder / "report.md"
