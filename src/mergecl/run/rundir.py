"""The run directory: the unit of state of a run. Every write is atomic.

RUN_DIR/
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
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from mergecl import distributed
from mergecl.atomic import TEMP_SUFFIX, atomic_write_bytes, atomic_write_text
from mergecl.errors import MergeclError


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def remove_stale_temps(self) -> None:
        """Delete the temp files of writes a killed run left behind (``.NAME.<random>.tmp``: the
        atomic writer's names; a write is only ever visible under its final name once complete)."""
        if not distributed.is_main():
            return
        for path in self.path.rglob(f".*{TEMP_SUFFIX}"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

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
    def load_tensors(path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise MergeclError(f"{path}: cannot be read ({str(err).splitlines()[0]})") from None

    # --- json ----------------------------------------------------------------------------------

    def read_json(self, name: str, default: Any = None) -> Any:
        path = self.path / name
        if not path.exists():
            return default
        try:
            return json.loads(path.read_text())
        except ValueError as err:
            raise MergeclError(f"{path}: not valid JSON ({err})") from None

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
