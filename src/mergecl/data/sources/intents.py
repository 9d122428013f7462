"""Text intents: CLINC150 and Banking77 from their official files, and the subsets of both that
ship inside mergecl (``clinc150_mini``, ``banking77_mini``: ``embedded/README.md`` says what they
hold and how they were drawn; the embedded default run uses them), read by the same loaders.

Inputs are the utterances (``kind="text"``); class names are readable ('change_accent' ->
'change accent'). Any file a user can get wrong ends in a ``MergeclError`` naming the file.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from pydantic import Field

from mergecl.data._files import open_text, read_json, readable
from mergecl.data.download import Remote
from mergecl.data.registry import register_source
from mergecl.data.splits import split_off
from mergecl.data.types import Dataset, Split
from mergecl.errors import MergeclError
from mergecl.options import Options

EMBEDDED = Path(__file__).resolve().parent.parent / "embedded"  # the real-data subsets shipped in the package

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


class Clinc150MiniOptions(Options):
    domains: list[str] | None = Field(None, min_length=1)  # keep these domains, in this order


class Clinc150Options(Clinc150MiniOptions):
    variant: str = Field("full", pattern=r"^[A-Za-z0-9_]+$")  # reads data_<variant>.json: full, small, ...


_CLINC = "https://raw.githubusercontent.com/clinc/oos-eval/master/data/"

register_source(
    "clinc150",
    load_clinc150,
    summary="CLINC150 intents: 150 classes in 10 domains (out-of-scope examples dropped)",
    options=Clinc150Options,
    layout="data_<variant>.json and domains.json",
    remotes=[Remote(_CLINC + "data_full.json", "data_full.json"), Remote(_CLINC + "domains.json", "domains.json")],
)
register_source(
    "clinc150_mini",
    load_clinc150_mini,
    summary="the CLINC150 subset shipped with mergecl: 150 intents, 20 train / 5 val / 10 test each",
    options=Clinc150MiniOptions,
    files="packaged",
)


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


class Banking77Options(Options):
    val_fraction: float = Field(0.1, ge=0, lt=1)


_BANKING = "https://raw.githubusercontent.com/PolyAI-LDN/task-specific-datasets/master/banking_data/"

register_source(
    "banking77",
    load_banking77,
    summary="Banking77 intents: 77 classes of online-banking queries",
    options=Banking77Options,
    layout="train.csv, test.csv (text,category) and categories.json",
    remotes=[Remote(_BANKING + name, name) for name in ("train.csv", "test.csv", "categories.json")],
)
register_source(
    "banking77_mini",
    load_banking77_mini,
    summary="the Banking77 subset shipped with mergecl: 77 intents, 20 train / 10 test each",
    options=Banking77Options,
    files="packaged",
)

__all__ = [
    "EMBEDDED",
    "load_banking77",
    "load_banking77_mini",
    "load_clinc150",
    "load_clinc150_mini",
]
