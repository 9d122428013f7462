"""mergecl.progress: the one place that decides whether a progress bar is shown, and makes it."""

import io
import os
import sys
import types

import pytest
import torch
import tqdm.auto as tqdm_auto
import yaml
from torch import nn
from tqdm.auto import tqdm

from mergecl import distributed, progress
from mergecl.cli import _quiet
from mergecl.data.types import Split
from mergecl.experiment.config import load_config
from mergecl.experiment.plan import dry_run
from mergecl.experiment.runner import run
from mergecl.models.base import Learner
from mergecl.models.heads import LinearHead
from mergecl.training.loop import TrainSettings, train_task


@pytest.fixture(autouse=True)
def loud(monkeypatch):
    """Start from a terminal's defaults: no CI, no quiet mode (restored after each test)."""
    for name in ("CI", "MERGECL_QUIET", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(progress, "_quiet", False)


class Terminal(io.StringIO):
    """A terminal's stderr, as far as a bar can tell."""

    def isatty(self) -> bool:
        return True


def test_a_bar_is_shown_unless_something_says_no(monkeypatch):
    shown = progress.bar(10, "work", unit="B", unit_scale=True, file=Terminal())
    assert isinstance(shown, tqdm) and shown.total == 10 and shown.unit == "B"  # tqdm.auto: widgets in notebooks
    shown.update(4)
    shown.close()
    assert "work:" in shown.fp.getvalue() and "B/s" in shown.fp.getvalue()
    assert isinstance(progress.bar(10, "work"), progress.NullBar)  # stderr is not a terminal (pytest's)
    assert isinstance(progress.bar(10, "work", file=io.StringIO()), progress.NullBar)
    assert isinstance(progress.bar(10, "work", enabled=False, file=Terminal()), progress.NullBar)
    monkeypatch.setattr(distributed, "is_main", lambda: False)  # a distributed run: rank 0 only
    assert isinstance(progress.bar(10, "work", file=Terminal()), progress.NullBar)

    monkeypatch.setenv("CI", "true")
    assert progress.is_quiet() and isinstance(progress.bar(10, "work"), progress.NullBar)
    monkeypatch.setenv("CI", "")  # an empty CI is no CI
    assert not progress.is_quiet()
    monkeypatch.setenv("MERGECL_QUIET", "1")  # what tests and child processes set
    assert progress.is_quiet()
    monkeypatch.setenv("MERGECL_QUIET", "0")
    assert not progress.is_quiet()


def test_the_cli_quiet_flag_is_a_call_not_an_environment_variable(monkeypatch):
    loud_echo = _quiet(False)
    assert not progress.is_quiet() and loud_echo is not None
    echo = _quiet(True)
    assert progress.is_quiet() and echo("nothing printed") is None
    assert "MERGECL_QUIET" not in os.environ
    # the libraries mergecl drives are quietened through their own settings, unless the user chose
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    progress.set_quiet(False)
    assert not progress.is_quiet()


def test_a_null_bar_takes_every_call():
    with progress.NullBar() as bar:
        bar.update(3)
        bar.set_postfix(loss="0.1")
    bar.close()


def test_the_training_loop_asks_progress_for_its_bar(monkeypatch):
    made = []

    def spy(total, desc, **options):
        made.append((total, desc))
        return progress.NullBar()

    monkeypatch.setattr(progress, "bar", spy)
    data = Split(torch.randn(40, 4), torch.arange(40) % 2)
    torch.manual_seed(0)
    learner = Learner(nn.Linear(4, 4), LinearHead(4, 2))
    train_task(learner, data, [0, 1], 2, TrainSettings(epochs=1, batch_size=10), seed=0, desc="task 1")
    assert made == [(4, "task 1")]


def test_whether_a_bar_shows_is_decided_by_one_pure_function():
    kw = dict(quiet=False, main=True, terminal=True, jupyter=False, widgets=False, nested=False)
    assert progress.shows_bar(**kw)
    assert not progress.shows_bar(**{**kw, "quiet": True})  # --quiet, $MERGECL_QUIET=1, $CI
    assert not progress.shows_bar(**{**kw, "main": False})  # a distributed run's other ranks
    assert not progress.shows_bar(**{**kw, "terminal": False})  # a log file, a pipe
    assert progress.shows_bar(**{**kw, "nested": True})  # a terminal redraws nested bars
    # a Jupyter kernel: its stdout and stderr are never terminals, yet it shows bars: widgets (ipywidgets)
    # always, text bars only when not nested (a notebook cannot move the cursor up to a second bar)
    kernel = {**kw, "terminal": False, "jupyter": True}
    assert progress.shows_bar(**{**kernel, "widgets": True}) and progress.shows_bar(
        **{**kernel, "widgets": True, "nested": True}
    )
    assert progress.shows_bar(**kernel) and not progress.shows_bar(**{**kernel, "nested": True})
    assert not progress.shows_bar(**{**kernel, "widgets": True, "quiet": True})


def test_a_jupyter_kernel_is_told_from_its_modules_as_tqdm_auto_does(monkeypatch):
    assert progress.in_jupyter({"ipykernel.zmqshell", "IPython"})  # notebook, JupyterLab, VS Code, Colab
    assert progress.in_jupyter({"IPython.utils._process_emscripten"})  # JupyterLite
    assert not progress.in_jupyter({"IPython", "ipykernel"}) and not progress.in_jupyter(sys.modules)
    # in a kernel, bar() draws on a stream that is not a terminal; without widgets only the outer bar
    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", types.ModuleType("ipykernel.zmqshell"))
    shown = progress.bar(3, "in a notebook", file=io.StringIO())
    assert isinstance(shown, tqdm) and not shown.disable
    shown.close()
    with progress.whole_run(5, "run", file=io.StringIO()) as run:
        assert isinstance(run.bar, tqdm)
        nested = progress.bar(3, "task", file=io.StringIO())
        assert isinstance(nested, progress.NullBar) == (tqdm_auto.notebook_tqdm is tqdm_auto.std_tqdm)


def test_the_run_bar_counts_planned_steps_and_ends_full():
    with progress.whole_run(20, "run", file=Terminal()) as run:
        with progress.run_part(12):  # a seed of two trainings, 4 + 8 planned steps
            with progress.run_part(4):
                progress.run_step(3)  # stopped early: its 4th step leaves the total
            assert (run.n, run.total, run.bar.total) == (3, 19, 19)
            with progress.run_part(8):
                for _ in range(10):  # a recipe that trains more than planned: the bar waits at its end
                    progress.run_step()
                assert run.n == 3 + 8
        with progress.run_part(8):  # a seed a resumed run finds done: it leaves the total
            pass
        assert (run.n, run.total, run.bar.n, run.bar.total) == (11, 11, 11, 11)
        progress.run_step()  # outside every part: never past the total
        assert run.n == 11
    progress.run_step()  # no run: nothing to advance
    with progress.run_part(3):
        pass


def test_a_notebook_widget_follows_the_run_bar_s_total(monkeypatch):
    """tqdm.notebook draws an IntProgress made with the first total: it must follow the total down."""

    class Widget:  # the parts of a tqdm.notebook bar the run's bar touches
        def __init__(self, total, desc, **options):
            self.total, self.n, self.refreshed = total, 0, 0
            self.container = types.SimpleNamespace(children=[None, types.SimpleNamespace(max=total), None])

        def update(self, n=1):
            self.n += n

        def refresh(self):
            self.refreshed += 1

        def close(self):
            pass

    monkeypatch.setattr(progress, "bar", Widget)
    with progress.whole_run(10) as run:
        with progress.run_part(6):
            progress.run_step(2)
        with progress.run_part(4):  # done already (a resume)
            pass
    assert (run.bar.n, run.bar.total, run.bar.container.children[1].max) == (2, 2, 2) and run.bar.refreshed == 2


def test_a_run_shows_one_bar_over_its_planned_steps_that_ends_full(tmp_path, monkeypatch):
    """A tiny real run: the whole-run bar's total is the plan's training steps (--dry-run's), it ends
    full, the task bars are drawn below it, and evaluations have bars of batches."""
    made = []

    def terminal_bar(total, desc, **options):
        made.append(real_bar(total, desc, **{**options, "file": Terminal()}))
        return made[-1]

    real_bar = progress.bar
    monkeypatch.setattr(progress, "bar", terminal_bar)
    config = {
        "name": "tiny",
        "seeds": [0, 1],
        "data": {"source": "digits", "scenario": "class", "n_tasks": 2},
        "model": {"name": "mlp", "in_dim": 64, "hidden": [16]},
        "train": {"epochs": 1, "batch_size": 64},
        "methods": ["zero_shot", "seq_ft", "magmax", "joint"],
        "method_options": {"joint": {"final_only": True}},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    plan = dry_run(tmp_path / "tiny.yaml")
    run(load_config(tmp_path / "tiny.yaml"), out=tmp_path / "run", echo=lambda message: None, report=False)
    shown = [b for b in made if isinstance(b, tqdm)]  # not the NullBars of evaluations with nothing to compute
    whole = [b for b in shown if b.desc == "run tiny"]
    assert len(whole) == 1 and whole[0].pos == 0
    planned = plan["training_steps_per_seed"] * len(plan["seeds"])
    assert planned > 0 and whole[0].total == whole[0].n == planned
    tasks = [b for b in shown if b.desc.startswith("task ")]
    assert tasks and all(abs(b.pos) == 1 for b in tasks)  # below the run's bar
    evaluations = [b for b in shown if b.desc.startswith("evaluating on test")]
    assert evaluations and all(b.unit == "batch" and b.n == b.total > 0 for b in evaluations)
    # a resumed run that finds everything done trains nothing: its bar's total drops to what ran
    made.clear()
    run(resume=tmp_path / "run", echo=lambda message: None, report=False)
    (whole,) = [b for b in made if isinstance(b, tqdm) and b.desc == "run tiny"]
    assert whole.total == whole.n == 0
