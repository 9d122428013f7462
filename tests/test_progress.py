"""mergecl.progress: the one place that decides whether a progress bar is shown, and makes it."""

import io
import os

import pytest
import torch
from torch import nn
from tqdm.auto import tqdm

from mergecl import progress
from mergecl.cli import _quiet
from mergecl.data.types import Split
from mergecl.models.base import Learner
from mergecl.models.heads import LinearHead
from mergecl.training.loop import TrainSettings, train_task


@pytest.fixture(autouse=True)
def loud(monkeypatch):
    """Start from a terminal's defaults: no CI, no quiet mode (restored after each test)."""
    for name in ("CI", "MERGECL_QUIET", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(progress, "_quiet", False)


def test_a_bar_is_shown_unless_something_says_no(monkeypatch):
    shown = progress.bar(10, "work", unit="B", unit_scale=True, file=io.StringIO(), disable=False)
    assert isinstance(shown, tqdm) and shown.total == 10 and shown.unit == "B"  # tqdm.auto: widgets in notebooks
    shown.update(4)
    shown.close()
    assert "work:" in shown.fp.getvalue() and "B/s" in shown.fp.getvalue()
    off_terminal = progress.bar(10, "work")  # by default no bar when stderr is not a terminal (pytest's)
    assert isinstance(off_terminal, tqdm) and off_terminal.disable
    off_terminal.close()
    assert isinstance(progress.bar(10, "work", enabled=False), progress.NullBar)

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
