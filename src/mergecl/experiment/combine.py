"""One run from runs of the same config made side by side with different seeds.

Seeds are independent, so a suite can run as one process per seed (one per machine, or
single-threaded processes on one machine: ``mergecl run CONFIG --out runs/s1`` with ``seeds: [1]``,
...). ``mergecl combine OUT RUN RUN...`` then gathers their seeds into a new run directory: the
config with every seed, the seeds' progress and tensors, results.json and the report. The inputs
are left as they are. An unfinished seed stays unfinished: ``mergecl run --resume OUT`` continues it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from mergecl.atomic import atomic_directory, atomic_write_text
from mergecl.errors import MergeclError
from mergecl.experiment.config import RunConfig, dump_config, run_seeds
from mergecl.experiment.rundir import RunDir

FREE = ("seeds", "keep_vectors")  # the config keys the runs may differ in: they change no number


def combine(runs: list[str | Path], out: str | Path) -> tuple[dict[str, Any], Path]:
    """Gather ``runs`` (same config but for ``seeds``, disjoint seeds) into the new run ``out``;
    returns its results.json's content and its path. Each run is checked as ``--resume`` checks it
    (its marker, an unedited config.yaml) and locked while its seeds are read."""
    if len(runs) < 2:
        raise MergeclError("combine needs at least two run directories")
    dirs = [RunDir(path) for path in runs]
    configs = [rundir.read_config() for rundir in dirs]
    for i, rundir in enumerate(dirs):
        if any(rundir.path.resolve() == other.path.resolve() for other in dirs[:i]):
            raise MergeclError(f"{rundir.path}: given twice; each run may come once")
    try:
        for rundir in dirs:  # a run still running is refused (its seeds are still being written)
            rundir.lock(shared=True)
        return _combine(dirs, configs, RunDir(out))
    finally:
        for rundir in dirs:
            rundir.unlock()


def _combine(dirs: list[RunDir], configs: list[RunConfig], target: RunDir) -> tuple[dict[str, Any], Path]:
    """``combine`` of the checked, locked runs."""
    from mergecl.evaluation.report import write_report
    from mergecl.evaluation.results import RunMeta
    from mergecl.experiment.runner import results_from_progress

    first = configs[0]
    seeds: list[int] = []
    for rundir, config in zip(dirs, configs, strict=True):
        if config.model_copy(update={key: getattr(first, key) for key in FREE}) != first:
            raise MergeclError(
                f"{rundir.path}: its config differs from {dirs[0].path}'s in more than {' and '.join(FREE)}"
            )
        shared = sorted(set(seeds) & set(config.seeds))
        if shared:
            raise MergeclError(f"{rundir.path}: seed {shared[0]} is also in an earlier run; each seed may come once")
        seeds += config.seeds
    if target.path.exists():
        raise MergeclError(f"{target.path}: already exists; combine writes a new run directory")

    combined = first.model_copy(update={"seeds": seeds})
    progress: dict[str, Any] = {"seeds": {}}
    for rundir, config in zip(dirs, configs, strict=True):
        own = rundir.read_progress()["seeds"]
        progress["seeds"].update({str(seed): own[str(seed)] for seed in run_seeds(config) if str(seed) in own})

    with atomic_directory(target.path) as staging:  # a failure leaves no half-combined run
        for rundir, config in zip(dirs, configs, strict=True):
            for seed in run_seeds(config):  # with data.orders, each seed's orders too
                if rundir.seed_dir(seed).is_dir():  # absent when the run kept no tensors
                    shutil.copytree(rundir.seed_dir(seed), staging / rundir.seed_dir(seed).name, copy_function=_link)
        RunDir(staging).record(combined)  # a run like any other: resumable, and locked when resumed
        atomic_write_text(staging / "config.yaml", dump_config(combined))
        RunDir(staging).write_json("progress.json", progress)
        # what the run was: the first run's metadata (its scenario and tasks), with every seed
        meta = RunMeta.from_json((dirs[0].read_json("results.json") or {}).get("run"))
        meta = dataclasses.replace(meta, seeds=run_seeds(combined), combined_from=[str(rundir.path) for rundir in dirs])
        results = results_from_progress(combined, progress, meta)
        RunDir(staging).write_json("results.json", results.to_json())
    write_report(results, target.path)
    return results.to_json(), target.path


def _link(source: str, destination: str) -> None:
    """Hard-link a tensor file (no copy of gigabytes; safetensors files are never rewritten in
    place, only replaced), or copy it across file systems."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
