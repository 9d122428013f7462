"""The Python API: ``from mergecl import run, merge, export, evaluate``.

Your data in, your model out, in Python::

    import mergecl

    done = mergecl.run("my-run.yaml", out="runs/mine")           # train, merge, evaluate
    print(done.final_acc("magmax"), done.accuracy_matrix("magmax"))
    model = mergecl.export(done.path, "magmax", "magmax-model")  # a directory transformers loads
    check = mergecl.evaluate(model.path, "my-run.yaml")          # its accuracy on each task

One model kept up to date as tasks arrive (``mergecl learn`` on the command line)::

    mergecl.learn.init("intent-model")                                  # the defaults: MiniLM, Seq-FT + MagMax
    done = mergecl.learn.add("intent-model", "banking", "banking.csv")  # train, merge, evaluate, gate
    print(done.row, done.promoted, mergecl.learn.status("intent-model").matrix)

``merge`` is the merge engine's (``mergecl.merging.engine.merge``): checkpoints in, a merged
checkpoint out; ``merge_continual`` (``mergecl.merging.continual``) the merged model after every
step of an ordered stream of checkpoints. Every function raises ``mergecl.MergeclError`` (one line)
for a mistake of the caller.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergecl.errors import MergeclError
from mergecl.evaluation.results import MethodResult, RunResults
from mergecl.experiment import learn
from mergecl.experiment.config import RunConfig
from mergecl.experiment.evaluate import Evaluation, as_config, evaluate
from mergecl.experiment.export import Exported, export
from mergecl.merging.continual import merge_continual
from mergecl.merging.engine import merge

__all__ = ["Evaluation", "Exported", "RunOutput", "evaluate", "export", "learn", "merge", "merge_continual", "run"]


@dataclass(frozen=True)
class RunOutput:
    """A run's typed results (``results.json``) and its directory."""

    results: RunResults
    path: Path

    @property
    def methods(self) -> list[str]:
        return list(self.results.methods)

    def method(self, name: str) -> MethodResult:
        """The results of one method (mean over the seeds; ``.seeds`` per seed when several)."""
        if name not in self.results.methods:
            raise MergeclError(f"{self.path}: no method {name!r} in this run (its methods: {', '.join(self.methods)})")
        result = self.results.methods[name]
        if result.failed is not None:
            raise MergeclError(f"{name} failed: {result.failed}")
        return result

    def final_acc(self, name: str) -> float | None:
        """The method's final accuracy in percent (mean over seeds)."""
        return self.method(name).final_acc

    def accuracy_matrix(self, name: str) -> list[list[float | None]]:
        """Row t: the accuracy on each task of the model after step t (percent, mean over seeds); a
        method evaluated only at the end has one row."""
        return [list(row) for row in self.method(name).matrix or []]

    def table(self) -> str:
        """The run's table, as ``mergecl run`` prints it."""
        from mergecl.evaluation.report import format_table

        return format_table(self.results)


def run(
    config: RunConfig | str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    out: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    seeds: list[int] | None = None,
    quiet: bool = False,
    report: bool = True,
) -> RunOutput:
    """Run a continual-learning config and return its typed results and run directory.

    ``config``: a YAML path, a packaged config's name (``"digits"``), a dict of the YAML's keys, a
    ``RunConfig``, or None (the embedded default). ``out``: the run directory (default
    ``runs/NAME-TIME``); ``resume``: continue the run in that directory instead (``seeds``: add
    seeds to it). ``quiet``: no per-step lines and no progress bars (for this process). ``report``:
    write report.md, results.csv and plots.

    >>> done = run({"name": "digits", "data": {"source": "digits", "n_tasks": 2},
    ...             "methods": ["seq_ft", "magmax"]}, out="runs/digits")  # doctest: +SKIP
    >>> done.final_acc("magmax"), done.accuracy_matrix("seq_ft")  # doctest: +SKIP
    """
    from mergecl import progress
    from mergecl.experiment.runner import run as run_experiment

    if quiet:
        progress.set_quiet(True)
    echo = (lambda message: None) if quiet else progress.write
    if resume is not None and config is not None:
        raise MergeclError("give either a config or resume=RUN_DIR, not both")
    config = None if resume is not None else as_config(config)
    results, path = run_experiment(config, out=out, resume=resume, echo=echo, report=report, seeds=seeds)
    return RunOutput(RunResults.from_json(results), Path(path))
