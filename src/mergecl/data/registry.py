"""Sources by name: ``get_source("clinc150", root=None, seed=0)`` is what a run config calls.

Default data root: ``$MERGECL_DATA`` if set, else ``~/.cache/mergecl/data`` (where ``prepare``
downloads to by default). The data shipped in the package needs no root. A source's default folder is
``<data root>/<name>`` (``<data root>/mnist``, ...); an explicit ``root`` is that folder itself.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergecl.data import paper_sources, sources
from mergecl.data.download import REMOTES, prepare
from mergecl.data.types import Dataset
from mergecl.errors import MergeclError

LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": sources.load_digits_source,
    "mnist": sources.load_mnist,
    "clinc150": sources.load_clinc150,
    "banking77": sources.load_banking77,
    "clinc150_mini": sources.load_clinc150_mini,
    "banking77_mini": sources.load_banking77_mini,
    "image_folder": sources.load_image_folder,
    "cifar100": paper_sources.load_cifar100,
    "imagenet_r": paper_sources.load_imagenet_r,
    "cub200": paper_sources.load_cub200,
    "cars": paper_sources.load_cars,
    "domainnet": paper_sources.load_domainnet,
    "hf": sources.load_hf_dataset,
}
SOURCE_NAMES = tuple(LOADERS)
_NO_ROOT = ("digits", "clinc150_mini", "banking77_mini", "hf")  # embedded in a package / fetched from the hub


def data_root() -> Path:
    """Where data sets live by default (see the module docstring)."""
    if env := os.environ.get("MERGECL_DATA"):
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mergecl" / "data"


def default_root(name: str) -> Path:
    return data_root() / name


def get_source(
    name: str, root: str | Path | None = None, seed: int = 0, download: bool = False, **options: Any
) -> Dataset:
    """Load source ``name``; ``options`` go to its loader (e.g. ``hub_id=`` for hf, ``domains=``).

    ``download=True`` first fetches the official files into ``root`` (needs internet).
    """
    if name not in LOADERS:
        raise MergeclError(f"unknown data source {name!r}; valid: {', '.join(SOURCE_NAMES)}")
    loader = LOADERS[name]
    accepted = inspect.signature(loader).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        valid = ", ".join(p for p in accepted if p not in ("root", "seed"))
        raise MergeclError(f"data source {name!r} has no option {unknown[0]!r}; its options: {valid}")
    kwargs = dict(options)
    if "seed" in accepted:
        kwargs["seed"] = seed
    if name == "hf" and root is not None:
        kwargs.setdefault("cache_dir", str(Path(root).expanduser()))  # the hub cache is its "root"
    if name not in _NO_ROOT:
        if root is None and name == "image_folder":
            raise MergeclError("data source 'image_folder' needs a root folder (root/<class>/<image>)")
        root = Path(root).expanduser() if root is not None else default_root(name)
        if download:
            if name not in REMOTES:
                raise MergeclError(f"data source {name!r} has no download recipe; put the files in {root}")
            prepare(name, root)
        kwargs["root"] = root
    needed = [p for p, spec in accepted.items() if spec.default is inspect.Parameter.empty and p not in kwargs]
    if needed:
        raise MergeclError(f"data source {name!r} needs the option {needed[0]!r}")
    return loader(**kwargs)
