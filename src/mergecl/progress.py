"""Progress bars and quiet mode: the one place that decides whether a bar is shown, and makes it.

A bar is shown unless

- quiet mode is on: ``set_quiet(True)`` (the CLI's ``--quiet``), or ``$MERGECL_QUIET=1`` (read at
  each bar, so tests and child processes can set it);
- ``$CI`` is set (to anything but the empty string);
- its caller turns it off (``bar(..., enabled=False)``, e.g. ``merge(progress=False)``);
- stderr is not a terminal (logs, pipes). In a notebook ``tqdm.auto`` draws a widget instead.

Quiet mode also quietens the libraries mergecl drives (Hugging Face's download and weight-loading
bars, transformers' warnings) through their own environment variables, unless the user set them.
"""

from __future__ import annotations

import os
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


def bar(total: float, desc: str, *, enabled: bool = True, **options: Any) -> Bar:
    """A progress bar of ``total`` steps (``options`` go to tqdm, e.g. ``unit="B", unit_scale=True``),
    or a ``NullBar`` when no bar is to be shown (see the module docstring). Close it when done (it is
    also a context manager)."""
    if not enabled or is_quiet():
        return NullBar()
    from tqdm.auto import tqdm

    settings = {"leave": False, "dynamic_ncols": True, "disable": None, **options}  # disable=None: off if no tty
    return tqdm(total=total, desc=desc, **settings)
