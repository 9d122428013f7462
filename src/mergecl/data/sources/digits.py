"""Digit images: sklearn's 8x8 digits (``digits``, packaged with scikit-learn) and MNIST from its IDX
files (``mnist``).

Each loader reads local files only and returns a ``Dataset`` with global class ids 0..9. Any file
a user can get wrong (absent, truncated, wrong format) ends in a ``MergeclError`` naming the file.
Splits the files do not provide are carved with a seeded, stratified split
(``mergecl.data.splits``), so a seed always gives the same examples.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, model_validator

from mergecl.data._files import missing
from mergecl.data.download import Remote
from mergecl.data.registry import register_source
from mergecl.data.splits import split_off
from mergecl.data.types import Dataset, Split
from mergecl.errors import MergeclError
from mergecl.options import Options

# ----------------------------------------------------------------------------------------- digits


def load_digits_source(seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> Dataset:
    """sklearn's 8x8 digits (1797 images, embedded in sklearn): inputs [N, 64] in [0, 1].

    Seeded stratified split, by default 60/20/20 train/val/test.
    """
    from sklearn.datasets import load_digits  # lazy: only this source needs sklearn

    bunch = load_digits()
    full = Split(
        torch.tensor(bunch.data, dtype=torch.float32) / 16.0,  # pixel values are 0..16
        torch.tensor(bunch.target, dtype=torch.long),
    )
    rest, test = split_off(full, test_fraction, seed)
    train, val = split_off(rest, val_fraction / (1.0 - test_fraction), seed + 1)
    return Dataset("digits", [str(i) for i in range(10)], train, test, val)


class DigitsOptions(Options):
    val_fraction: float = Field(0.2, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)

    @model_validator(mode="after")
    def _room_for_training(self) -> DigitsOptions:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1 (the rest is the training split)")
        return self


register_source(
    "digits",
    load_digits_source,
    summary="sklearn's 8x8 handwritten digits: 1,797 images as [N, 64] vectors in [0, 1], 10 classes",
    options=DigitsOptions,
    files="packaged",  # inside scikit-learn
)


# ------------------------------------------------------------------------------------------ MNIST

_IDX_MAGIC = {3: 2051, 1: 2049}  # ndim -> magic number of the MNIST image / label files


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array (gzip or plain), its magic number and size checked."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise MergeclError(f"cannot read IDX file {path}: {err}") from err
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MergeclError(f"{path} is not an IDX file: only {len(raw)} bytes")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != _IDX_MAGIC[ndim]:
        raise MergeclError(f"{path} is not an MNIST IDX file: magic number {magic}, expected {_IDX_MAGIC[ndim]}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise MergeclError(f"{path} is truncated or padded: {len(raw)} bytes, header promises {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_file(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _mnist_part(root: Path, prefix: str) -> Split | None:
    images_path = _idx_file(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _idx_file(root, f"{prefix}-labels-idx1-ubyte")
    if images_path is None and labels_path is None:
        return None
    if images_path is None or labels_path is None:
        absent = f"{prefix}-images-idx3-ubyte" if images_path is None else f"{prefix}-labels-idx1-ubyte"
        raise missing("mnist", root / (absent + ".gz"), absent + "[.gz]", root)
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise MergeclError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if labels.max(initial=0) > 9:
        raise MergeclError(f"{labels_path} has label {labels.max()}, MNIST labels are 0..9")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)  # [N, 1, 28, 28]
    return Split(x, torch.from_numpy(labels.astype(np.int64)))


def load_mnist(root: str | Path, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> Dataset:
    """MNIST from its IDX files (``train-*`` and/or ``t10k-*``, gzip or plain): inputs [N, 1, 28, 28].

    With both parts: the official 60k/10k train/test. With only the 10k test files (as in the shared
    data folder): a seeded stratified ``1 - test_fraction`` / ``test_fraction`` train/test split.
    Either way ``val_fraction`` of train becomes a seeded stratified validation split.
    """
    root = Path(root).expanduser()
    train, test = _mnist_part(root, "train"), _mnist_part(root, "t10k")
    if train is None and test is None:
        raise missing("mnist", root / "t10k-images-idx3-ubyte.gz", "MNIST IDX files", root)
    if train is None or test is None:
        train, test = split_off(train if train is not None else test, test_fraction, seed)
    val = None
    if val_fraction > 0:
        train, val = split_off(train, val_fraction, seed + 1)
    return Dataset("mnist", [str(i) for i in range(10)], train, test, val)


class MnistOptions(Options):
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)  # used only when one of the two official parts is there


_MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # yann.lecun.com often refuses

register_source(
    "mnist",
    load_mnist,
    summary="MNIST from its IDX files: [N, 1, 28, 28] images in [0, 1], 10 classes",
    options=MnistOptions,
    layout="train-*-idx?-ubyte[.gz] and/or t10k-*-idx?-ubyte[.gz]",
    remotes=[
        Remote(_MNIST_MIRROR + "train-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz",
               "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        Remote(_MNIST_MIRROR + "train-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "d53e105ee54ea40749a09fcbcd1e9432"),
        Remote(_MNIST_MIRROR + "t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "9fb629c4189551a2d022fa330f9573f3"),
        Remote(_MNIST_MIRROR + "t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
               "ec29112dd5afa0611ce80d1b7f02629c"),
    ],
)  # fmt: skip

__all__ = ["load_digits_source", "load_mnist", "read_idx"]
