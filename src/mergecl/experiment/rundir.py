"""The run directory: the unit of state of a run. Every write is atomic.

RUN_DIR/
  mergecl-run.json                    the marker of a mergecl run: the config it was started with
  .mergecl.lock                       the OS lock held by the process running it (empty; never deleted)
  config.yaml                         the resolved config
  progress.json                       accuracy rows, all-class accuracies and times so far
  results.json                        {"methods": {NAME: metrics}, "run": {...}}, after every step
  seed<S>/base.safetensors            theta_0
  seed<S>/<stream>/task<t>.safetensors   task vector tau_t = theta_t - theta_0 (float tensors)
  seed<S>/<stream>/state<t>.safetensors  a stream's carried state after step t (EWC's Fisher)
  logs/run.log                        one line per step
  report.md, results.csv, *.png       the report (mergecl report)

In a multi-process run only rank 0 writes; tensors are followed by a barrier, so the other
processes read them back once written (multi-node: the run directory must be on a shared disk).

A run directory is owned: ``create`` and ``open_existing`` take an OS file lock (flock; the kernel
drops it when the process dies) that the run holds until ``unlock``, so a second process on the
same directory stops at once. Only a directory with the marker (or, made before the marker, with
config.yaml and progress.json or results.json) is resumed, only a config equal to the recorded one
(but for added seeds) is accepted, and clean-up deletes nothing but temp files of the run's own
files. Everything is checked before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from mergecl import distributed
from mergecl.atomic import TEMP_SUFFIX, atomic_link, atomic_write_bytes, atomic_write_text, remove_if_abandoned
from mergecl.errors import MergeclError
from mergecl.experiment.config import RunConfig, dump_config, load_config, parse_config
from mergecl.merging.checkpoints import read_safetensors

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked
    fcntl = None

MARKER = "mergecl-run.json"
LOCK = ".mergecl.lock"
LOCK_GRACE_S = 2.0  # how long a second process waits for a lock before refusing

# The temp files of the run's own files, per level (the atomic writer's ``.NAME.<random>.tmp``).
_TEMP = r"\.[A-Za-z0-9_]+" + re.escape(TEMP_SUFFIX)
_OWN_TOP = re.compile(
    r"\.(config\.yaml|progress\.json|results\.json|mergecl-run\.json|report\.md|results\.csv"
    r"|acc_over_tasks\.png|heatmap_[A-Za-z0-9._-]+\.png)" + _TEMP
)
_SEED_DIR = re.compile(r"seed\d+")
_OWN_SEED = re.compile(r"\.base\.safetensors" + _TEMP)
_OWN_STREAM = re.compile(r"\.(task|state)\d+\.safetensors" + _TEMP)


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    # --- ownership ------------------------------------------------------------------------------

    def is_run(self) -> bool:
        """A mergecl run: its marker, or (a run made before the marker) config.yaml with progress.json
        or results.json."""
        if (self.path / MARKER).is_file():
            return True
        return self.config_path.is_file() and any((self.path / n).is_file() for n in ("progress.json", "results.json"))

    def create(self, config: RunConfig) -> None:
        """Make a new run here (every process calls it; rank 0 does it): refused unless the directory
        is absent or empty. Leaves the lock held; on any failure, nothing it made is left."""
        _on_main(lambda: self._create(config))

    def open_existing(self, seeds: list[int] | None = None) -> RunConfig:
        """Open a run to resume it (every process calls it; rank 0 checks, locks and cleans): the
        config it was started with, plus ``seeds`` (which must keep the run's own seeds)."""
        data = _on_main(lambda: self._open(seeds).model_dump(mode="json"))
        return parse_config(data, str(self.config_path))

    def read_config(self) -> RunConfig:
        """The config this run was started with (with seeds added since), read without writing
        anything: refused in one line if this is not a mergecl run or its config.yaml was edited."""
        if not self.path.is_dir():
            raise MergeclError(f"{self.path}: no such run directory")
        if not self.is_run():
            raise MergeclError(f"{self.path}: not a mergecl run (no {MARKER}, nor config.yaml with progress.json)")
        return self._checked_config(self._recorded_config(), None)

    def lock(self, shared: bool = False) -> None:
        """Take the run's lock, or refuse at once if another process holds it; held until ``unlock``
        or the death of the process. ``shared``: a reader's lock (``combine``), which other readers
        may hold too; taken without writing (a run with no lock file, or in a folder this user
        cannot write, is read unlocked)."""
        if fcntl is None or self._lock_fd is not None:
            return
        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            if shared:
                return
            raise MergeclError(f"{self.path}: cannot lock the run directory ({err.strerror or err})") from None
        # A process killed a moment ago releases its lock only once the kernel has torn it down
        # (its memory first, then its files): a short grace period, then refuse.
        deadline = time.monotonic() + LOCK_GRACE_S
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                os.close(fd)
                raise MergeclError(
                    f"{self.path}: in use by another mergecl process (it holds {LOCK}); wait for it to end"
                ) from None
            except OSError:  # a file system without locks (NFS without lockd): run unlocked, as on Windows
                os.close(fd)
                return
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the last descriptor releases the flock
            self._lock_fd = None

    def _create(self, config: RunConfig) -> None:
        try:
            self._create_unguarded(config)
        except OSError as err:  # read-only file system, permission denied, a file in the way...
            raise MergeclError(f"{self.path}: cannot create the run directory ({_os_reason(err)})") from None

    def _create_unguarded(self, config: RunConfig) -> None:
        if self.is_run():
            raise MergeclError(f"{self.path}: already holds a run; continue it with --resume {self.path}")
        if self.path.exists() and not self.path.is_dir():
            raise MergeclError(f"{self.path}: exists and is not a directory")
        if self.path.exists() and not self._empty():
            raise MergeclError(f"{self.path}: exists and is not empty; a new run needs a new or empty directory")
        made, ours = not self.path.exists(), False
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock()
            if not self._empty():  # another process started a run here between the check and the lock
                raise MergeclError(f"{self.path}: already holds a run; continue it with --resume {self.path}")
            ours = True  # empty under our lock: whatever appears here now is this run's
            self.record(config)  # the marker first: a kill before config.yaml leaves a resumable run
            atomic_write_text(self.config_path, dump_config(config))
        except BaseException:  # Ctrl-C too: a half-created run directory is worse than none
            complete = (self.path / MARKER).exists() and self.config_path.exists()  # each written atomically
            if ours and not complete:
                (self.path / MARKER).unlink(missing_ok=True)
                self.config_path.unlink(missing_ok=True)
                if made:
                    (self.path / LOCK).unlink(missing_ok=True)
                    with contextlib.suppress(OSError):
                        self.path.rmdir()
            self.unlock()
            raise

    def _empty(self) -> bool:
        return all(entry.name == LOCK for entry in self.path.iterdir())

    def _open(self, seeds: list[int] | None) -> RunConfig:
        try:
            return self._open_unguarded(seeds)
        except OSError as err:
            self.unlock()
            raise MergeclError(f"{self.path}: cannot resume the run ({_os_reason(err)})") from None

    def _open_unguarded(self, seeds: list[int] | None) -> RunConfig:
        if not self.path.is_dir():
            raise MergeclError(f"{self.path}: no such run directory")
        if not self.is_run():
            raise MergeclError(
                f"{self.path}: not a mergecl run (no {MARKER}, nor config.yaml with progress.json); nothing was changed"
            )
        self.lock()
        try:
            recorded = self._recorded_config()
            config = self._checked_config(recorded, seeds)
            self.read_progress()  # a malformed progress file stops the resume here, in one line
            # checked: now write, under the lock (no other process can be writing any of these)
            same = recorded is not None and config.model_dump(mode="json") == recorded.model_dump(mode="json")
            if not same or not self.config_path.exists():
                self.record(config)  # seeds added, or a run made before the marker
                atomic_write_text(self.config_path, dump_config(config))
            self.remove_stale_temps()
            return config
        except BaseException:
            self.unlock()
            raise

    def _checked_config(self, recorded: RunConfig | None, seeds: list[int] | None) -> RunConfig:
        """config.yaml, which must equal the recorded config but for added seeds; plus ``seeds``."""
        if self.config_path.exists() or recorded is None:
            config = load_config(self.config_path)
        else:
            config = recorded  # killed between the marker and config.yaml
        if recorded is not None:
            changed = config_changes(recorded, config)
            if changed:
                shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
                raise MergeclError(
                    f"{self.config_path}: differs from the config the run was started with in {shown}; "
                    f"restore it (as in {MARKER}), or start a new run"
                )
        if seeds is not None:
            dropped = [seed for seed in config.seeds if seed not in seeds]
            if dropped:
                raise MergeclError(f"--seeds must keep the run's seeds {config.seeds}; missing {dropped}")
            config = parse_config({**config.model_dump(mode="json"), "seeds": list(dict.fromkeys(seeds))}, "--seeds")
        return config

    def _recorded_config(self) -> RunConfig | None:
        path = self.path / MARKER
        if not path.exists():
            return None
        marker = self.read_json(MARKER)
        if not isinstance(marker, dict) or not isinstance(marker.get("config"), dict):
            raise MergeclError(f"{path}: not a mergecl run marker (no 'config' object)")
        return parse_config(marker["config"], str(path))

    def record(self, config: RunConfig) -> None:
        """Write the marker: this directory is a mergecl run, started with ``config``."""
        from mergecl import __version__

        marker = {"mergecl_run": 1, "mergecl": __version__, "config": config.model_dump(mode="json")}
        atomic_write_text(self.path / MARKER, json.dumps(marker, indent=1) + "\n")

    def remove_stale_temps(self) -> None:
        """Delete the temp files of writes a killed run left behind: only ``.NAME.<random>.tmp`` where
        NAME is one of the run's own files, at its place in the layout (a write is only ever visible
        under its final name once complete). Nothing else in the directory is touched."""
        if not distributed.is_main():
            return
        for level, pattern in ((self.path, _OWN_TOP), *self._seed_levels()):
            for path in level.iterdir():
                if pattern.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                    remove_if_abandoned(path, min_age_s=0)  # under the run's lock: no writer of ours is starting

    def _seed_levels(self):
        for seed_dir in self.path.iterdir():
            if _SEED_DIR.fullmatch(seed_dir.name) and _real_dir(seed_dir):
                yield seed_dir, _OWN_SEED
                yield from ((stream, _OWN_STREAM) for stream in seed_dir.iterdir() if _real_dir(stream))

    def remove_seed_tensors(self, seed: int) -> None:
        """Delete a finished seed's checkpoints (task vectors, carried states, theta_0): its rows
        are committed, so a resumed run skips it; a suite then needs disk for one seed, not all."""
        distributed.barrier()  # no process still reads them
        if distributed.is_main():
            shutil.rmtree(self.seed_dir(seed), ignore_errors=True)

    # --- files ---------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def seed_dir(self, seed: int) -> Path:
        return self.path / f"seed{seed}"

    def base_path(self, seed: int) -> Path:
        return self.seed_dir(seed) / "base.safetensors"

    def vector_path(self, seed: int, stream: str, t: int) -> Path:
        return self.seed_dir(seed) / stream / f"task{t}.safetensors"

    def state_path(self, seed: int, stream: str, t: int) -> Path:
        return self.seed_dir(seed) / stream / f"state{t}.safetensors"

    # --- tensors -------------------------------------------------------------------------------

    @staticmethod
    def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        if distributed.is_main():  # one writer; the others wait, then read it back like a resumed run
            data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            atomic_write_bytes(path, save(data, metadata=metadata))
        distributed.barrier()

    @staticmethod
    def share_tensors(source: Path, path: Path) -> None:
        """``path`` holds the tensors of ``source`` (a file of this run): a hard link where the disk
        allows, else a copy; either way written atomically, by one writer."""
        if distributed.is_main() and not atomic_link(source, path):
            atomic_write_bytes(path, source.read_bytes())
        distributed.barrier()

    @staticmethod
    def load_tensors(path: Path) -> dict[str, torch.Tensor]:
        """The tensors of a file written by ``save_tensors``, read by mergecl's one safetensors reader
        (a damaged file: a MergeclError naming it)."""
        return read_safetensors(path)

    # --- json ----------------------------------------------------------------------------------

    def read_progress(self) -> dict[str, Any]:
        """progress.json, its shape checked (a malformed one is one line naming the file)."""
        progress = self.read_json("progress.json", {"seeds": {}})
        problem = _progress_problem(progress)
        if problem:
            raise MergeclError(f"{self.path / 'progress.json'}: not a mergecl progress file ({problem})")
        return progress

    def read_json(self, name: str, default: Any = None) -> Any:
        path = self.path / name
        if not path.exists():
            return default
        try:
            return json.loads(path.read_text())
        except ValueError as err:
            raise MergeclError(f"{path}: not valid JSON ({err})") from None
        except OSError as err:
            raise MergeclError(f"{path}: cannot be read ({err.strerror or err})") from None

    def write_json(self, name: str, data: Any) -> None:
        if distributed.is_main():
            atomic_write_text(self.path / name, json.dumps(data, indent=1, allow_nan=False) + "\n")

    def log(self, message: str) -> None:
        if not distributed.is_main():
            return
        log = self.path / "logs" / "run.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as handle:  # append-only log: a torn last line is harmless
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def _on_main(action: Callable[[], Any]) -> Any:
    """``action()`` on rank 0 only; every process returns its result or raises its MergeclError."""
    result, error = None, None
    if distributed.is_main():
        try:
            result = action()
        except MergeclError as err:
            error = str(err)
    result, error = distributed.broadcast_object((result, error))
    if error is not None:
        raise MergeclError(error)
    return result


def _os_reason(err: OSError) -> str:
    where = f": {err.filename}" if err.filename else ""
    return f"{err.strerror or err}{where}"


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()  # a link may lead out of the run directory


def config_changes(recorded: RunConfig, current: RunConfig) -> list[str]:
    """The dotted keys where ``current`` differs from ``recorded`` (``train.lr``); seeds may grow."""
    old, new = recorded.model_dump(mode="json"), current.model_dump(mode="json")
    if set(old["seeds"]) <= set(new["seeds"]):
        old["seeds"] = new["seeds"]  # seeds added: the run's own seeds are all still there
    return _differences(old, new, "")


def _differences(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(dict.fromkeys([*old, *new]))
        return [d for k in keys for d in _differences(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


_ABSENT = object()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _progress_problem(progress: Any) -> str | None:
    """What is wrong with the shape of a progress file, or None."""
    if not isinstance(progress, dict) or not isinstance(progress.get("seeds"), dict):
        return "expected an object with a 'seeds' object"
    for seed, entry in progress["seeds"].items():
        where = f"seeds.{seed}"
        if not re.fullmatch(r"-?\d+", seed) or not isinstance(entry, dict):
            return f"{where}: expected a seed number mapped to an object"
        for key in ("rows", "all_class_acc", "train_time", "method_time"):
            if not isinstance(entry.get(key), dict):
                return f"{where}.{key}: expected an object"
        if not isinstance(entry.get("val_rows", {}), dict):
            return f"{where}.val_rows: expected an object"
        for key in ("rows", "val_rows"):
            for method, rows in entry.get(key, {}).items():
                if not isinstance(rows, list) or not all(_is_row(row) for row in rows):
                    return f"{where}.{key}.{method}: expected a list of accuracy rows"
        for key in ("all_class_acc", "train_time", "method_time"):
            for name, value in entry[key].items():
                if value is not None and not _is_number(value):
                    return f"{where}.{key}.{name}: expected a number, got {value!r}"
    return None


def _is_row(row: Any) -> bool:
    return row is None or (isinstance(row, list) and all(v is None or _is_number(v) for v in row))
