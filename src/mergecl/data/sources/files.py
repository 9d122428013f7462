"""Your own data: ``files`` reads a labelled table from CSV, TSV, JSON lines (or a JSON array),
Parquet, or a Hugging Face ``save_to_disk`` folder (docs/sources.md).

The data (``data.root``) is one of:

- one file with a split column (``split_column``, default ``split``; values train, validation
  (or val, valid, dev) and test, case-insensitive, other values through ``split_values``); with
  ``test_fraction``, a file without that column is split too: that share of each label's rows,
  seeded (the same every time), is the test split;
- a folder and the options ``train:``, ``test:`` and optionally ``validation:``: files relative to it;
- a folder holding ``train.<ext>``, ``test.<ext>`` and optionally ``validation.<ext>`` (or
  ``val``/``valid``/``dev``), ext one of .csv .tsv .jsonl .json .parquet (text formats also gzipped);
- a folder written by ``datasets``' ``save_to_disk`` (``format: hf_disk``, found by its
  ``dataset_dict.json``; needs ``pip install 'mergecl[hub]'``).

Readers: CSV, TSV and JSON with the standard library (every cell stays the text it is: no type
guessing turns the text '007' into 7; errors name the line); Parquet with pyarrow (``pip install
'mergecl[files]'``). A missing validation split stays ``None``: the scenario carves the config's
``val_fraction`` out of train, seeded and stratified (by task and class with a task column).

Columns: ``text_column`` (the inputs, kind ``text``) or ``image_column`` (image file paths,
relative to the file that names them; kind ``image_path``, read lazily by the backbone as
``image_folder``'s are), ``label_column`` (text or integers: class names are the sorted distinct
labels, or ``label_names``: the names in their order, integers indexing them), and optionally
``task_column``: each distinct value is one task, in ``task_order`` or in order of first appearance
in train. The tasks are then given (``Dataset.given_tasks``): a class- or task-incremental scenario
trains task t on the classes of its rows (they must be disjoint), a domain-incremental one on its
rows over all classes. Every problem is one ``MergeclError`` line naming the file and the row or
the column.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from mergecl.data._files import path_split
from mergecl.data.registry import register_source
from mergecl.data.splits import stratified_split
from mergecl.data.types import Dataset, Split
from mergecl.errors import MergeclError
from mergecl.options import Options

FORMATS = ("csv", "tsv", "jsonl", "json", "parquet", "hf_disk")
SUFFIXES = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}
TEXT_FORMATS = ("csv", "tsv", "jsonl", "json")  # read with the standard library, also gzipped
SPLITS = ("train", "validation", "test")
SPLIT_VALUES = {"train": ["train"], "validation": ["validation", "val", "valid", "dev"], "test": ["test"]}
_INT = re.compile(r"[+-]?\d+")
_SHOWN = 8  # labels listed in a message


# ----------------------------------------------------------------------------------------- tables


@dataclass
class Table:
    """The columns a loader needs from one file (or one split of a save_to_disk folder)."""

    path: Path
    columns: list[str]  # every column of the file, in order (for messages)
    values: dict[str, list[Any]]  # the needed columns
    lines: list[int] | None = None  # the line each row starts on (text formats)
    typed: bool = True  # cells carry types (JSON, Parquet); False: CSV/TSV, every cell is text
    label_names: list[str] | None = None  # from the data itself (a ClassLabel of save_to_disk)

    def __len__(self) -> int:
        return len(next(iter(self.values.values()))) if self.values else 0

    def where(self, i: int) -> str:
        line = f" (line {self.lines[i]})" if self.lines is not None else ""
        return f"{self.path}, row {i + 1}{line}"


def _format_of(path: Path, given: str) -> str:
    if given != "auto":
        return given
    name = path.name.lower()
    suffix = Path(name[:-3]).suffix if name.endswith(".gz") else path.suffix.lower()
    if suffix not in SUFFIXES:
        known = ", ".join(SUFFIXES)
        raise MergeclError(
            f"{path}: unknown format {suffix or '(no suffix)'!r} (known: {known}); set format: {', '.join(FORMATS)}"
        )
    return SUFFIXES[suffix]


def _open_text(path: Path, encoding: str) -> Any:
    encoding = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding  # a BOM is not a column
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")  # newline="": a quoted csv cell may span lines


def _missing_column(path: Path, column: str, option: str, columns: Sequence[str]) -> MergeclError:
    listed = ", ".join(columns) if columns else "none"
    return MergeclError(f"{path}: no column {column!r} ({option}; columns: {listed})")


def _check_columns(path: Path, needed: dict[str, str], columns: Sequence[str]) -> None:
    for column, option in needed.items():
        if column not in columns:
            raise _missing_column(path, column, option, columns)


def read_table(path: Path, fmt: str, needed: dict[str, str], delimiter: str | None, encoding: str) -> Table:
    """``needed`` (column -> the option naming it) read from ``path`` in format ``fmt``; every
    error is one line naming the file (and the line)."""
    if not path.exists():
        raise MergeclError(f"{path}: no such file")
    if not path.is_file():
        raise MergeclError(f"{path}: not a file")
    try:
        if fmt in ("csv", "tsv"):
            return _read_delimited(path, needed, delimiter or ("\t" if fmt == "tsv" else ","), encoding)
        if fmt in ("jsonl", "json"):
            return _read_json(path, needed, encoding)
        if fmt == "parquet":
            return _read_parquet(path, needed)
    except UnicodeDecodeError as err:
        raise MergeclError(f"{path}: not {encoding} text (byte {err.start}); set encoding") from None
    except (gzip.BadGzipFile, EOFError) as err:
        raise MergeclError(f"{path}: not a readable gzip file ({err})") from None
    except OSError as err:
        raise MergeclError(f"{path}: cannot be read ({err.strerror or err})") from None
    raise MergeclError(f"{path}: format {fmt!r} is for a folder, not a file")


def _read_delimited(path: Path, needed: dict[str, str], delimiter: str, encoding: str) -> Table:
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long documents are texts too
    with _open_text(path, encoding) as handle:
        reader = csv.reader(handle, delimiter=delimiter, strict=True)
        start = 1  # the line the record being read starts on
        try:
            header = next(reader, None)
            if header is None:
                raise MergeclError(f"{path}: empty file (no header row)")
            columns = [c.strip() for c in header]
            for c in columns:
                if columns.count(c) > 1:
                    raise MergeclError(f"{path}: column {c!r} appears twice in the header")
            _check_columns(path, needed, columns)
            index = {c: columns.index(c) for c in needed}
            values: dict[str, list[Any]] = {c: [] for c in needed}
            lines: list[int] = []
            start = reader.line_num + 1
            for record in reader:
                if not record or record == [""]:  # a blank line
                    start = reader.line_num + 1
                    continue
                if len(record) != len(columns):
                    row = len(lines) + 1
                    raise MergeclError(
                        f"{path}, row {row} (line {start}): {len(record)} fields, the header has {len(columns)}"
                        + (" (is a text with a delimiter not quoted?)" if len(record) > len(columns) else "")
                    )
                for c, i in index.items():
                    values[c].append(record[i])
                lines.append(start)
                start = reader.line_num + 1
        except csv.Error as err:
            raise MergeclError(
                f"{path}, line {start}: not valid {'TSV' if delimiter == chr(9) else 'CSV'} ({err})"
            ) from None
    return Table(path, columns, values, lines, typed=False)


def _read_json(path: Path, needed: dict[str, str], encoding: str) -> Table:
    """JSON lines (one object a line), or a JSON array of objects."""
    with _open_text(path, encoding) as handle:
        text = handle.read()
    rows: list[Any]
    lines: list[int] | None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise MergeclError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
        lines = None
    else:
        rows, lines = [], []
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines: a JSON text may hold U+2028
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise MergeclError(f"{path}, line {n}: not valid JSON ({err.msg})") from None
            lines.append(n)
    columns: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            at = f"line {lines[i]}" if lines is not None else f"row {i + 1}"
            raise MergeclError(f"{path}, {at}: expected a JSON object of columns, got {type(row).__name__}")
        columns.update(dict.fromkeys(row))
    _check_columns(path, needed, list(columns))
    values = {c: [row.get(c) for row in rows] for c in needed}
    return Table(path, list(columns), values, lines)


def _read_parquet(path: Path, needed: dict[str, str]) -> Table:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MergeclError(f"{path}: reading Parquet needs pyarrow: pip install 'mergecl[files]'") from None
    try:
        columns = list(pq.read_schema(path).names)
        _check_columns(path, needed, columns)
        table = pq.read_table(path, columns=list(needed))
    except pa.ArrowException as err:
        raise MergeclError(f"{path}: not a readable Parquet file ({' '.join(str(err).split())[:200]})") from None
    return Table(path, columns, {c: table.column(c).to_pylist() for c in needed})


def read_hf_disk(root: Path, needed: dict[str, str], split_column: str) -> dict[str, Table] | Table:
    """A ``save_to_disk`` folder: a DatasetDict -> {split name: Table}; a Dataset -> one Table with
    its ``split_column`` too."""
    try:
        import datasets
    except ImportError:
        raise MergeclError(f"{root}: format hf_disk needs the 'datasets' package: pip install 'mergecl[hub]'") from None
    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as err:  # datasets raises many types; the user needs one line
        reason = " ".join(str(err).split())[:200]
        raise MergeclError(f"{root}: not a readable save_to_disk folder ({reason})") from None

    def table(part: Any, where: Path, wanted: dict[str, str]) -> Table:
        columns = list(part.column_names)
        _check_columns(where, wanted, columns)
        label = next(c for c, option in wanted.items() if option == "label_column")
        names = getattr(part.features[label], "names", None)  # a ClassLabel's names
        values = part.select_columns(list(wanted)).to_dict()
        return Table(where, columns, values, label_names=[str(n) for n in names] if names else None)

    if isinstance(loaded, datasets.DatasetDict):
        return {str(split): table(part, root / str(split), needed) for split, part in loaded.items()}
    return table(loaded, root, {**needed, split_column: "split_column"})


# ------------------------------------------------------------------------------------------ layout


@dataclass
class Part:
    """The rows of one split: rows ``rows`` of ``table``."""

    table: Table
    rows: list[int] = field(default_factory=list)


def _split_of(values: dict[str, list[str]]) -> dict[str, str]:
    return {v.strip().lower(): split for split, names in values.items() for v in names}


def _find_split_files(root: Path, fmt: str, values: dict[str, list[str]]) -> dict[str, Path]:
    """train.<ext>, test.<ext>, validation.<ext> (stems from ``values``) in folder ``root``."""
    split_of = _split_of(values)
    found: dict[str, list[Path]] = {split: [] for split in SPLITS}
    for path in sorted(root.iterdir()):
        name = path.name.lower()
        inner = name[:-3] if name.endswith(".gz") else name
        suffix = Path(inner).suffix
        if not path.is_file() or suffix not in SUFFIXES:
            continue
        if fmt != "auto" and SUFFIXES[suffix] != fmt:
            continue
        if name.endswith(".gz") and SUFFIXES[suffix] not in TEXT_FORMATS:
            continue
        split = split_of.get(inner[: -len(suffix)])
        if split is not None:
            found[split].append(path)
    for split, paths in found.items():
        if len(paths) > 1:
            raise MergeclError(
                f"{root}: {len(paths)} {split} files ({', '.join(p.name for p in paths)}); name one with {split}:"
            )
    for split in ("train", "test"):
        if not found[split]:
            exts = "/".join(s for s, f in SUFFIXES.items() if fmt in ("auto", f))
            raise MergeclError(
                f"{root}: no {split} file ({'|'.join(values[split])}.{{{exts}}}); give train: and test: files, "
                "or make root one file with a split column"
            )
    return {split: paths[0] for split, paths in found.items() if paths}


def _by_split_column(table: Table, column: str, values: dict[str, list[str]]) -> dict[str, Part]:
    split_of = _split_of(values)
    parts = {split: Part(table) for split in SPLITS}
    for i, value in enumerate(table.values[column]):
        key = str(value).strip().lower() if value is not None else ""
        if not key:
            raise MergeclError(f"{table.where(i)}: empty value in column {column!r}")
        if key not in split_of:
            known = ", ".join(v for names in values.values() for v in names)
            raise MergeclError(
                f"{table.where(i)}: split {value!r} is not one of {known} (column {column!r}; split_values maps others)"
            )
        parts[split_of[key]].rows.append(i)
    for split in ("train", "test"):
        if not parts[split].rows:
            raise MergeclError(
                f"{table.path}: no {split} rows (column {column!r} has no value {'|'.join(values[split])})"
            )
    return {split: part for split, part in parts.items() if part.rows}


def _carved(table: Table, label_column: str, fraction: float) -> dict[str, Part]:
    """One file without a split column: ``fraction`` of each label's rows (seeded, the same every
    time) are the test split, the rest train."""
    whole = _whole(table)
    keys = [str(_label(table, i, label_column)) for i in whole.rows]
    strata = {key: k for k, key in enumerate(sorted(set(keys)))}
    keep, take = stratified_split(torch.tensor([strata[key] for key in keys]), fraction, seed=0)
    if len(take) == 0:
        raise MergeclError(f"{table.path}: too few rows to carve a test split of {fraction:g} from them")
    return {"train": Part(table, keep.tolist()), "test": Part(table, take.tolist())}


def _saved_to_disk(root: Path) -> bool:
    """A folder written by ``save_to_disk``: a DatasetDict's or a Dataset's marker files."""
    return (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()


def _whole(table: Table) -> Part:
    if len(table) == 0:
        raise MergeclError(f"{table.path}: no rows")
    return Part(table, list(range(len(table))))


# ------------------------------------------------------------------------------------------ values


def _empty(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, str) and not value.strip())
        or (isinstance(value, float) and math.isnan(value))
    )


def _label(table: Table, i: int, column: str) -> str | int:
    value = table.values[column][i]
    if _empty(value):
        raise MergeclError(f"{table.where(i)}: empty value in column {column!r}")
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise MergeclError(f"{table.where(i)}: label {value!r} in column {column!r} is neither text nor an integer")


def _labels(parts: dict[str, Part], column: str) -> dict[str, list[str | int]]:
    """The labels of every split, all text or all integers (CSV/TSV: integers when every label of
    a file is written as one)."""
    raw = {split: [_label(part.table, i, column) for i in part.rows] for split, part in parts.items()}
    kinds: dict[str, tuple[str, str]] = {}  # kind -> (where, example) of its first label
    for split, part in parts.items():
        if not part.table.typed and all(_INT.fullmatch(str(v)) for v in raw[split]):
            raw[split] = [int(str(v)) for v in raw[split]]
        for i, value in zip(part.rows, raw[split], strict=True):
            kind = "integers" if isinstance(value, int) else "text"
            if kind not in kinds:
                kinds[kind] = (part.table.where(i), repr(value))
    if len(kinds) > 1:
        (w1, v1), (w2, v2) = kinds["text"], kinds["integers"]
        raise MergeclError(f"column {column!r} mixes text and integer labels: {v1} at {w1}, {v2} at {w2}")
    return raw


def _classes(
    train: list[str | int], label_names: list[str] | None, strict: bool, part: Part, column: str
) -> tuple[list[str], dict[str | int, int]]:
    """(class names, label -> class id) from the training labels."""
    if label_names is None:
        values = sorted(set(train))  # one kind: all text or all integers
        return [str(v) for v in values], {v: i for i, v in enumerate(values)}
    named = {name: k for k, name in reversed(list(enumerate(label_names)))}
    if len(named) < len(label_names):
        twice = next(name for k, name in enumerate(label_names) if named[name] != k)
        raise MergeclError(f"label_names: {twice!r} appears twice")
    position: dict[str | int, int] = {}
    for i, value in zip(part.rows, train, strict=True):
        if isinstance(value, int):
            if not 0 <= value < len(label_names):
                raise MergeclError(
                    f"{part.table.where(i)}: label {value} is outside label_names (0..{len(label_names) - 1})"
                )
            position[value] = value
        elif value in named:
            position[value] = named[value]
        else:
            raise MergeclError(f"{part.table.where(i)}: label {value!r} is not in label_names ({_listed(label_names)})")
    used = sorted(set(position.values()))
    if strict and len(used) < len(label_names):
        unused = next(name for k, name in enumerate(label_names) if k not in used)
        raise MergeclError(f"label_names: {unused!r} has no training rows in {part.table.path} (column {column!r})")
    renumber = {k: c for c, k in enumerate(used)}
    return [label_names[k] for k in used], {v: renumber[k] for v, k in position.items()}


def _listed(values: Iterable[Any]) -> str:
    values = [str(v) for v in values]
    return ", ".join(values[:_SHOWN]) + (f", ... ({len(values)} in all)" if len(values) > _SHOWN else "")


def _texts(part: Part, column: str) -> list[str]:
    out = []
    for i in part.rows:
        value = part.table.values[column][i]
        if _empty(value):
            raise MergeclError(f"{part.table.where(i)}: empty value in column {column!r}")
        if not isinstance(value, str):
            raise MergeclError(f"{part.table.where(i)}: column {column!r} holds {value!r}, not text")
        out.append(value)
    return out


def _image_paths(part: Part, column: str) -> list[str]:
    out = []
    for text, i in zip(_texts(part, column), part.rows, strict=True):
        path = Path(text.strip()).expanduser()
        path = path if path.is_absolute() else part.table.path.parent / path
        if not path.is_file():
            raise MergeclError(f"{part.table.where(i)}: image {text!r} not found (at {path})")
        out.append(str(path))
    return out


def _tasks(parts: dict[str, Part], column: str, order: list[str] | None) -> tuple[list[str], dict[str, list[int]]]:
    """(task names, each split's task ids) from ``column``; tasks in ``order`` or as they first
    appear in train."""
    raw: dict[str, list[str]] = {}
    for split, part in parts.items():
        raw[split] = []
        for i in part.rows:
            value = part.table.values[column][i]
            if _empty(value):
                raise MergeclError(f"{part.table.where(i)}: empty value in column {column!r}")
            raw[split].append(str(value).strip())
    seen = list(dict.fromkeys(raw["train"]))
    if order is None:
        names = seen
    else:
        for name in order:
            if order.count(name) > 1:
                raise MergeclError(f"task_order: {name!r} appears twice")
            if name not in seen:
                raise MergeclError(f"task_order: {name!r} has no training rows (column {column!r}: {_listed(seen)})")
        names = [str(n) for n in order]
    index = {name: t for t, name in enumerate(names)}
    ids: dict[str, list[int]] = {}
    for split, part in parts.items():
        ids[split] = []
        for i, value in zip(part.rows, raw[split], strict=True):
            if value not in index:
                problem = "is not in task_order" if value in seen else "has no training rows"
                raise MergeclError(f"{part.table.where(i)}: task {value!r} {problem} (tasks: {_listed(names)})")
            ids[split].append(index[value])
    return names, ids


# ------------------------------------------------------------------------------------------ loader


def load_files(
    root: str | Path,
    format: str = "auto",
    train: str | None = None,
    validation: str | None = None,
    test: str | None = None,
    split_column: str = "split",
    split_values: dict[str, list[str]] | None = None,
    text_column: str = "text",
    label_column: str = "label",
    label_names: list[str] | None = None,
    task_column: str | None = None,
    task_order: list[str] | None = None,
    image_column: str | None = None,
    delimiter: str | None = None,
    encoding: str = "utf-8",
    name: str | None = None,
    test_fraction: float | None = None,
) -> Dataset:
    """A labelled data set from your files (see the module docstring and docs/sources.md)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise MergeclError(f"{root}: no such file or folder")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise MergeclError(f"files: unknown encoding {encoding!r}") from None
    if task_order is not None and task_column is None:
        raise MergeclError("files: task_order needs a task_column")
    values = {split: list((split_values or {}).get(split, SPLIT_VALUES[split])) for split in SPLITS}
    input_column = image_column if image_column is not None else text_column
    needed = {input_column: "image_column" if image_column is not None else "text_column"}
    needed.setdefault(label_column, "label_column")
    if task_column is not None:
        needed.setdefault(task_column, "task_column")
    given = {s: p for s, p in (("train", train), ("validation", validation), ("test", test)) if p is not None}

    def read(path: Path, with_split_column: bool) -> Table:
        wanted = {**needed, split_column: "split_column"} if with_split_column else needed
        return read_table(path, _format_of(path, format), wanted, delimiter, encoding)

    parts: dict[str, Part]
    if root.is_file():
        if given:
            raise MergeclError(f"{root} is a file: {', '.join(given)}: name files in a folder (root: the folder)")
        if test_fraction is None:
            parts = _by_split_column(read(root, True), split_column, values)
        else:  # the file's split column if it has one, else a seeded stratified carve
            table = read(root, False)
            if split_column in table.columns:
                parts = _by_split_column(read(root, True), split_column, values)
            else:
                parts = _carved(table, label_column, test_fraction)
    elif format == "hf_disk" or (format == "auto" and not given and _saved_to_disk(root)):
        if given:
            raise MergeclError(f"{root}: {', '.join(given)}: do not apply to a save_to_disk folder (its splits)")
        if image_column is not None:
            raise MergeclError(f"{root}: image_column does not apply to format hf_disk (images inside a data set)")
        loaded = read_hf_disk(root, needed, split_column)
        if isinstance(loaded, Table):
            parts = _by_split_column(loaded, split_column, values)
        else:
            split_of = _split_of(values)
            parts = {split_of[s.lower()]: _whole(t) for s, t in loaded.items() if s.lower() in split_of}
            for split in ("train", "test"):
                if split not in parts:
                    raise MergeclError(f"{root}: no {split} split (splits: {', '.join(loaded)})")
    else:
        if given and not {"train", "test"} <= set(given):
            raise MergeclError(f"files: {'test' if 'train' in given else 'train'}: is needed with {', '.join(given)}:")
        paths = {s: root / p for s, p in given.items()} if given else _find_split_files(root, format, values)
        parts = {split: _whole(read(path, False)) for split, path in paths.items()}

    labels = _labels(parts, label_column)
    file_names = next((p.table.label_names for p in parts.values() if p.table.label_names), None)
    class_names, class_of = _classes(
        labels["train"], label_names if label_names is not None else file_names, label_names is not None,
        parts["train"], label_column,
    )  # fmt: skip
    ids: dict[str, torch.Tensor] = {}
    for split, part in parts.items():
        out = []
        for i, value in zip(part.rows, labels[split], strict=True):
            if value not in class_of:
                raise MergeclError(
                    f"{part.table.where(i)}: label {value!r} is not a label of the training rows "
                    f"({_listed(class_names)})"
                )
            out.append(class_of[value])
        ids[split] = torch.tensor(out, dtype=torch.long)

    splits: dict[str, Split] = {}
    for split, part in parts.items():
        if image_column is not None:
            splits[split] = path_split(_image_paths(part, image_column), ids[split].tolist())
        else:
            splits[split] = Split(_texts(part, text_column), ids[split], "text")

    title = name or (Path(root.name.removesuffix(".gz")).stem if root.is_file() else root.resolve().name) or "files"
    dataset = Dataset(title, class_names, splits["train"], splits["test"], splits.get("validation"))
    if task_column is None:
        return dataset
    names, task_ids = _tasks(parts, task_column, task_order)
    dataset.domain_names = names
    dataset.train_domains = torch.tensor(task_ids["train"], dtype=torch.long)
    dataset.test_domains = torch.tensor(task_ids["test"], dtype=torch.long)
    if "validation" in task_ids:
        dataset.val_domains = torch.tensor(task_ids["validation"], dtype=torch.long)
    groups = {n: sorted(set(ids["train"][dataset.train_domains == t].tolist())) for t, n in enumerate(names)}
    if sum(len(g) for g in groups.values()) == len(class_names):  # disjoint: a class-incremental sequence
        dataset.class_groups = groups
    dataset.given_tasks = f"task column {task_column!r}"
    return dataset


Format = Literal["auto", "csv", "tsv", "jsonl", "json", "parquet", "hf_disk"]
SplitName = Literal["train", "validation", "test"]


class FilesOptions(Options):
    format: Format = Field("auto", description="auto: from each file's suffix (.csv .tsv .jsonl .json .parquet)")
    train: str | None = Field(None, min_length=1, description="the train file, relative to root (a folder)")
    validation: str | None = Field(None, min_length=1, description="the validation file (optional)")
    test: str | None = Field(None, min_length=1, description="the test file, relative to root (a folder)")
    split_column: str = Field("split", min_length=1, description="one file: the column naming each row's split")
    split_values: dict[SplitName, list[str]] | None = Field(
        None,
        description="the values (and file names) of each split; default train / validation, val, valid, dev / test",
    )
    text_column: str = Field("text", min_length=1, description="the inputs: texts")
    label_column: str = Field("label", min_length=1, description="the labels: text or integers")
    label_names: list[str] | None = Field(
        None, min_length=1, description="class names in class order (integer labels index them)"
    )
    task_column: str | None = Field(None, min_length=1, description="each distinct value is one task")
    task_order: list[str] | None = Field(
        None, min_length=1, description="the tasks' order (default: first appearance in train)"
    )
    image_column: str | None = Field(
        None, min_length=1, description="the inputs: image paths relative to the file (instead of text_column)"
    )
    delimiter: str | None = Field(None, min_length=1, max_length=1, description="CSV/TSV: default ',' / tab")
    encoding: str = Field("utf-8", min_length=1, description="text files' encoding")
    name: str | None = Field(None, min_length=1, description="the data set's name in reports (default: root's)")
    test_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="one file without a split column: this share of each label's rows (seeded) is the test split",
    )


register_source(
    "files",
    load_files,
    summary="your own data: CSV, TSV, JSON lines, Parquet or a save_to_disk folder (docs/sources.md)",
    options=FilesOptions,
    files="folder",
    layout="root: one file with a split column, or a folder with train.csv and test.csv (.tsv .jsonl .parquet)",
)

__all__ = ["FilesOptions", "load_files", "read_table"]
