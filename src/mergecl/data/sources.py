"""The small real sources: sklearn digits, MNIST (IDX), CLINC150, Banking77, image folders, HF hub,
and the subsets of CLINC150 and Banking77 that ship inside mergecl (``clinc150_mini``,
``banking77_mini``: ``embedded/README.md`` says what they hold and how they were drawn).

Each loader reads local files only and returns a ``Dataset`` with global class ids 0..C-1 and
readable class names. Any file a user can get wrong (absent, truncated, wrong format) ends in a
``MergeclError`` naming the file. Splits the files do not provide are carved with a seeded,
stratified split (``mergecl.data.splits``), so a seed always gives the same examples.
The paper-scale image sources are in ``mergecl.data.paper_sources``.
"""

from __future__ import annotations

import csv
import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from mergecl.data._files import IMAGE_EXTENSIONS, list_images, missing, open_text, path_split, read_json, readable
from mergecl.data.splits import split_off
from mergecl.data.types import Dataset, Split
from mergecl.errors import MergeclError

EMBEDDED = Path(__file__).resolve().parent / "embedded"  # the real-data subsets shipped in the package

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


# --------------------------------------------------------------------------------------- CLINC150


def load_clinc150(root: str | Path, variant: str = "full", domains: list[str] | None = None) -> Dataset:
    """CLINC150 (``data_<variant>.json`` + ``domains.json``), out-of-scope examples dropped.

    Class ids follow domains.json (domain by domain, 15 intents each), so ``class_groups`` maps each
    of the 10 domains to 15 consecutive ids. Names are readable ('change_accent' -> 'change accent').
    ``domains``: keep only these domains, in this order (ids renumbered; ``order: groups`` then makes
    one task per listed domain).
    """
    root = Path(root).expanduser()
    data_path, domains_path = root / f"data_{variant}.json", root / "domains.json"
    data = read_json(data_path, "clinc150")
    chosen = domains
    all_domains = domain_map = read_json(domains_path, "clinc150")
    if not isinstance(domain_map, dict) or not all(isinstance(v, list) for v in domain_map.values()):
        raise MergeclError(f"{domains_path} must map each domain to a list of intents")
    if chosen is not None:
        if not (isinstance(chosen, list) and all(isinstance(d, str) for d in chosen)):
            raise MergeclError(f"clinc150: domains must be a list of domain names, got {chosen!r}")
        unknown = [d for d in chosen if d not in domain_map]
        if unknown or len(set(chosen)) != len(chosen) or not chosen:
            problem = f"unknown domain {unknown[0]!r}" if unknown else "a non-empty list without repeats is needed"
            raise MergeclError(f"clinc150: domains: {problem}; domains: {', '.join(domain_map)}")
        domain_map = {d: domain_map[d] for d in chosen}
    intents = [intent for members in domain_map.values() for intent in members]
    class_of = {intent: i for i, intent in enumerate(intents)}
    every_intent = {intent for members in all_domains.values() for intent in members}
    groups = {domain: [class_of[i] for i in members] for domain, members in domain_map.items()}

    def split(key: str) -> Split:
        rows = data.get(key) if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise MergeclError(f"{data_path} has no '{key}' list of [text, intent] rows")
        texts, labels = [], []
        for row in rows:
            if not (isinstance(row, list) and len(row) == 2):
                raise MergeclError(f"{data_path}: '{key}' row {row!r} is not [text, intent]")
            text, intent = row
            if intent not in every_intent and intent != "oos":
                raise MergeclError(f"{data_path}: intent {intent!r} is not listed in {domains_path}")
            if intent not in class_of:  # out of scope, or a domain left out
                continue
            texts.append(str(text))
            labels.append(class_of[intent])
        return Split(texts, torch.tensor(labels, dtype=torch.long), "text")

    return Dataset(
        "clinc150",
        [readable(i) for i in intents],
        split("train"),
        split("test"),
        split("val"),
        class_groups=groups,
    )


def load_clinc150_mini(domains: list[str] | None = None) -> Dataset:
    """The CLINC150 subset shipped with mergecl: all 150 intents, 20 train / 5 val / 10 test
    utterances each, drawn from the official splits (embedded/README.md)."""
    return load_clinc150(EMBEDDED / "clinc150", variant="mini", domains=domains)


# -------------------------------------------------------------------------------------- Banking77


def _read_banking_csv(path: Path, class_of: dict[str, int]) -> Split:
    texts, labels = [], []
    with open_text(path, "banking77") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"text", "category"} <= set(reader.fieldnames):
            raise MergeclError(f"{path} must have a header with columns text,category")
        for row in reader:
            if row["category"] not in class_of:
                raise MergeclError(
                    f"{path} line {reader.line_num}: category {row['category']!r} is not in categories.json"
                )
            texts.append(row["text"])
            labels.append(class_of[row["category"]])
    return Split(texts, torch.tensor(labels, dtype=torch.long), "text")


def load_banking77(root: str | Path, seed: int = 0, val_fraction: float = 0.1) -> Dataset:
    """Banking77 (train.csv, test.csv with header text,category; categories.json lists the intents).

    Class ids follow categories.json. The files have no validation split: ``val_fraction`` of train
    becomes one (seeded, stratified).
    """
    root = Path(root).expanduser()
    categories_path = root / "categories.json"
    categories = read_json(categories_path, "banking77")
    if not (isinstance(categories, list) and all(isinstance(c, str) for c in categories)):
        raise MergeclError(f"{categories_path} must be a JSON list of category names")
    class_of = {c: i for i, c in enumerate(categories)}
    train = _read_banking_csv(root / "train.csv", class_of)
    test = _read_banking_csv(root / "test.csv", class_of)
    train, val = split_off(train, val_fraction, seed)
    return Dataset("banking77", [readable(c) for c in categories], train, test, val if len(val) else None)


def load_banking77_mini(seed: int = 0, val_fraction: float = 0.1) -> Dataset:
    """The Banking77 subset shipped with mergecl: all 77 intents, 20 train / 10 test utterances
    each, drawn from the official splits (embedded/README.md); validation carved as in the full set."""
    return load_banking77(EMBEDDED / "banking77", seed, val_fraction)


# ----------------------------------------------------------------------------------- image folder


def scan_class_folders(folder: Path, classes: list[str]) -> Split:
    """Every image under ``folder/<class>/`` for the given class names (ids = list positions)."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in list_images(folder / name) if (folder / name).is_dir() else []:
            paths.append(str(path))
            labels.append(label)
    return path_split(paths, labels)


def _class_dirs(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}


def load_image_folder(
    root: str | Path, seed: int = 0, test_fraction: float = 0.2, name: str = "image_folder"
) -> Dataset:
    """Images laid out ``root/<class>/<image>``, or ``root/{train,val,test}/<class>/<image>``.

    Classes are the sorted folder names (as torchvision's ImageFolder numbers them). Without a
    ``test`` folder, ``test_fraction`` of the images become the test split (seeded, stratified);
    without a ``val`` folder, ``val`` is None and the scenario carves one. Inputs are file paths.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MergeclError(f"image folder {root} does not exist")
    has_splits = (root / "train").is_dir()
    parts = {p: root / p for p in ("train", "val", "test") if (root / p).is_dir()} if has_splits else {}
    folders = list(parts.values()) if has_splits else [root]
    classes = sorted(set().union(*(_class_dirs(f) for f in folders)))
    if not classes:
        raise MergeclError(f"image folder {root} has no class sub-folders (expected root/<class>/<image>)")
    train = scan_class_folders(parts.get("train", root), classes)
    if len(train) == 0:
        raise MergeclError(f"image folder {root} has no images ({' '.join(IMAGE_EXTENSIONS)})")
    val = scan_class_folders(parts["val"], classes) if "val" in parts else None
    if "test" in parts:
        test = scan_class_folders(parts["test"], classes)
    else:
        train, test = split_off(train, test_fraction, seed)
    return Dataset(name, [readable(c) for c in classes], train, test, val)


# ----------------------------------------------------------------------------- Hugging Face hub


def load_hf_dataset(
    hub_id: str,
    text_column: str = "text",
    label_column: str = "label",
    config: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    train_split: str = "train",
    val_split: str | None = "validation",
    test_split: str = "test",
    cache_dir: str | None = None,
) -> Dataset:
    """A text classification data set from the Hugging Face hub (needs ``pip install datasets``).

    Class names come from the label column's ``ClassLabel`` names when it has them, else from the
    sorted distinct label values. Without ``val_split`` in the data, ``val_fraction`` of train is
    carved (seeded, stratified). The hub is contacted only by this function, never by tests.
    """
    try:
        import datasets as hf  # lazy: an optional extra
    except ImportError as err:
        raise MergeclError(
            f"loading {hub_id!r} from the Hugging Face hub needs the 'datasets' package: pip install 'mergecl[hub]'"
        ) from err
    try:
        loaded = hf.load_dataset(hub_id, config, cache_dir=cache_dir)
    except Exception as err:  # the hub raises many types; the user needs one line
        raise MergeclError(f"cannot load {hub_id!r} (config {config!r}) from the hub: {err}") from err
    for split_name in (train_split, test_split):
        if split_name not in loaded:
            raise MergeclError(f"{hub_id!r} has no split {split_name!r}; it has {', '.join(loaded)}")
    feature = loaded[train_split].features.get(label_column)
    if feature is None or text_column not in loaded[train_split].features:
        raise MergeclError(f"{hub_id!r} has no column {label_column!r} or {text_column!r}")
    names = getattr(feature, "names", None)
    if names is None:  # plain string / int labels: number them in sorted order
        values = sorted({v for part in loaded.values() for v in part[label_column]}, key=str)
        names, class_of = [str(v) for v in values], {v: i for i, v in enumerate(values)}
    else:
        class_of = None

    def split(part: str) -> Split:
        rows = loaded[part]
        labels = [class_of[v] if class_of else int(v) for v in rows[label_column]]
        return Split([str(t) for t in rows[text_column]], torch.tensor(labels, dtype=torch.long), "text")

    train, test = split(train_split), split(test_split)
    if val_split is not None and val_split in loaded:
        val = split(val_split)
    else:
        train, val = split_off(train, val_fraction, seed)
    name = hub_id.split("/")[-1] + (f"-{config}" if config else "")
    return Dataset(name, [readable(str(n)) for n in names], train, test, val)


__all__ = [
    "load_banking77",
    "load_clinc150",
    "load_digits_source",
    "load_hf_dataset",
    "load_image_folder",
    "load_mnist",
    "read_idx",
    "scan_class_folders",
]
