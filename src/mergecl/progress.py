"""Progress bars and quiet mode: the one place that decides whether a bar is shown, and makes it.

A bar is shown (``shows_bar``) unless

- quiet mode is on: ``set_quiet(True)`` (the CLI's ``--quiet``), or ``$MERGECL_QUIET=1`` (read at
  each bar, so tests and child processes can set it);
- ``$CI`` is set (to anything but the empty string);
- its caller turns it off (``bar(..., enabled=False)``, e.g. ``merge(progress=False)``);
- the process is not rank 0 of a distributed run;
- stderr is not a terminal (logs, pipes) -- except in a Jupyter kernel (detected as ``tqdm.auto``
  does), whose streams are never terminals: there ``tqdm.auto`` draws widgets (with ipywidgets), or
  else text bars, which a notebook redraws in place on one line only: then only the outermost bar.

A run (``mergecl run``) has one bar over all of it (``whole_run``): its total is the planned training
steps of every training and seed, each optimiser step advances it (``run_step``), and tqdm estimates
the time left from the run's average pace (evaluations included). The bars of a task's training, of
an evaluation and of a merge are drawn below it.

Quiet mode also quietens the libraries mergecl drives (Hugging Face's download and weight-loading
bars, transformers' warnings) through their own environment variables, unless the user set them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

_quiet = False


class Bar(Protocol):
    def update(self, n: float = 1) -> Any: ...

    def set_postfix(self, **values: Any) -> Any: ...

    def close(self) -> None: ...


class NullBar:
    """A bar that shows nothing."""

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NullBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def set_quiet(quiet: bool = True) -> None:
    """Turn quiet mode on (or off again) for this process."""
    global _quiet
    _quiet = quiet
    if is_quiet():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def is_quiet() -> bool:
    """No bars: quiet mode (``set_quiet`` or ``$MERGECL_QUIET=1``) or ``$CI``."""
    return _quiet or os.environ.get("MERGECL_QUIET") == "1" or bool(os.environ.get("CI"))


def in_jupyter(modules: Collection[str]) -> bool:
    """Whether these loaded modules (``sys.modules``) are a Jupyter kernel's: notebook, JupyterLab,
    VS Code, Colab (ipykernel), or JupyterLite -- the test ``tqdm.autonotebook`` makes."""
    return "ipykernel.zmqshell" in modules or "IPython.utils._process_emscripten" in modules


def shows_bar(*, quiet: bool, main: bool, terminal: bool, jupyter: bool, widgets: bool, nested: bool) -> bool:
    """Whether a bar is drawn: never in quiet mode nor off rank 0; in a terminal; in a Jupyter kernel
    (its streams are not terminals) always with widgets, and as text only when it is not ``nested``
    under another bar (a notebook cannot move the cursor up to redraw a second line)."""
    if quiet or not main:
        return False
    if jupyter:
        return widgets or not nested
    return terminal


def bar(total: float, desc: str, *, enabled: bool = True, **options: Any) -> Bar:
    """A progress bar of ``total`` steps (``options`` go to tqdm, e.g. ``unit="B", unit_scale=True``),
    or a ``NullBar`` when no bar is to be shown (see the module docstring). Close it when done (it is
    also a context manager)."""
    if not enabled or is_quiet():
        return NullBar()
    import tqdm.auto

    from mergecl import distributed

    file = options.get("file") or sys.stderr
    shown = shows_bar(
        quiet=False,
        main=distributed.is_main(),
        terminal=bool(getattr(file, "isatty", lambda: False)()),
        jupyter=in_jupyter(sys.modules),
        widgets=tqdm.auto.notebook_tqdm is not tqdm.auto.std_tqdm,  # tqdm.auto chose its notebook widget
        nested=_run is not None and not isinstance(_run.bar, NullBar),
    )
    if not shown:
        return NullBar()
    settings = {"leave": False, "dynamic_ncols": True, **options, "disable": False}
    return tqdm.auto.tqdm(total=total, desc=desc, **settings)


def write(message: str) -> None:
    """A line on stderr, above the bars being drawn (they are redrawn below it, not broken)."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


# --- the whole run's bar --------------------------------------------------------------------------


class RunProgress:
    """The bar of a whole run, in planned training steps. The run is cut into parts (a seed, a
    training, a step: ``part``), each given its planned steps: the training loop's steps
    (``step``) advance the bar within the current part, never past its planned end (a recipe that
    trains more than planned), and the planned steps a part did not run (committed steps a resumed
    run skips, a failed training's rest, an early stop) leave the total when it ends, so the bar
    ends full and tqdm's time left counts only steps that run."""

    def __init__(self, total: int, desc: str, **options: Any) -> None:
        self.total, self.n = total, 0
        # smoothing 0: the time left from the run's mean pace, evaluations between the steps included
        self.bar = bar(total, desc, **{"unit": "step", "leave": True, "smoothing": 0, **options})
        self.ends: list[int] = []  # the planned end (in steps, as self.n) of each part entered

    def step(self, n: int = 1) -> None:
        self._advance(min(n, (self.ends[-1] if self.ends else self.total) - self.n))

    @contextmanager
    def part(self, steps: int) -> Iterator[None]:
        self.ends.append(self.n + steps)
        try:
            yield
        finally:
            unrun = self.ends.pop() - self.n  # (its end moved earlier when a part inside it did not run)
            self.ends = [end - unrun for end in self.ends]  # what did not run leaves the enclosing parts too
            self._drop(unrun)

    def _advance(self, n: int) -> None:
        if n > 0:
            self.n += n
            self.bar.update(n)

    def _drop(self, n: int) -> None:
        self.total -= n
        if n and not isinstance(self.bar, NullBar):
            self.bar.total = self.total
            widget = getattr(self.bar, "container", None)  # tqdm.notebook: its IntProgress keeps its first max
            if widget is not None:
                widget.children[1].max = self.total
            self.bar.refresh()


_run: RunProgress | None = None


@contextmanager
def whole_run(total: int, desc: str = "run", **options: Any) -> Iterator[RunProgress]:
    """The run's bar for the block (``total``: its planned training steps; ``options`` go to ``bar``),
    current for ``run_part`` and ``run_step``; the bars made inside are drawn below it."""
    global _run
    previous, _run = _run, None
    run = RunProgress(total, desc, **options)  # made while no run is current: it is the outermost bar
    _run = run
    try:
        yield run
    finally:
        _run = previous
        run.bar.close()


@contextmanager
def run_part(steps: int) -> Iterator[None]:
    """A part of the current run planned to take ``steps`` training steps (nothing outside a run)."""
    if _run is None:
        yield
    else:
        with _run.part(steps):
            yield


def run_step(n: int = 1) -> None:
    """``n`` training steps done: the current run's bar moves on (nothing outside a run)."""
    if _run is not None:
        _run.step(n)
