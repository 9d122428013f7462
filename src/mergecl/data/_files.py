"""Small file helpers shared by the loaders: finding a data folder, listing images, clear errors."""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from mergecl.data.download import how_to_get
from mergecl.data.types import Split
from mergecl.errors import MergeclError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def readable(name: str) -> str:
    """'change_accent' -> 'change accent': the class name a zero-shot head encodes."""
    return " ".join(name.replace("_", " ").split())


def missing(dataset: str, path: Path, what: str, root: Path | None = None) -> MergeclError:
    """The one-line error for absent data: which file, and how to obtain it."""
    where = root if root is not None else path.parent
    return MergeclError(f"{dataset}: {what} not found at {path}; {how_to_get(dataset, where)}")


def locate(root: str | Path, marker: str, subdirs: tuple[str, ...], dataset: str) -> Path:
    """The folder holding ``marker``: ``root`` itself or one of ``root/<subdir>`` (archive layouts)."""
    root = Path(root).expanduser()
    for folder in (root, *(root / s for s in subdirs)):
        if (folder / marker).exists():
            return folder
    raise missing(dataset, root / marker, marker, root)


def open_text(path: Path, dataset: str) -> io.TextIOBase:
    """``path`` opened for reading text, or ``path.gz`` when only the gzipped file is there (the
    embedded subsets ship gzipped in the official formats)."""
    zipped = path.with_name(path.name + ".gz")
    if not path.is_file() and zipped.is_file():
        return io.TextIOWrapper(gzip.open(zipped), encoding="utf-8", newline="")
    if not path.is_file():
        raise missing(dataset, path, path.name)
    return open(path, encoding="utf-8", newline="")  # newline="": csv texts may span lines


def read_json(path: Path, dataset: str) -> Any:
    try:
        with open_text(path, dataset) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as err:
        raise MergeclError(f"{dataset}: {path} is not valid JSON ({err})") from err


def read_lines(path: Path, dataset: str) -> list[str]:
    """Non-empty, stripped lines of a text file."""
    if not path.is_file():
        raise missing(dataset, path, path.name)
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted: a stable example order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found.extend(Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    return found


def path_split(paths: list[str], labels: list[int]) -> Split:
    return Split(paths, torch.tensor(labels, dtype=torch.long), "image_path")
