"""Hub: a text classification data set from the Hugging Face hub (``hf``; needs ``pip install
'mergecl[hub]'``). The hub is contacted only by this loader, never by the tests.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergecl.data._files import readable
from mergecl.data.registry import register_source
from mergecl.data.splits import split_off
from mergecl.data.types import Dataset, Split
from mergecl.errors import MergeclError
from mergecl.options import Options


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


class HubOptions(Options):
    hub_id: str = Field(min_length=1)  # e.g. PolyAI/banking77
    text_column: str = "text"
    label_column: str = "label"
    config: str | None = None
    val_fraction: float = Field(0.1, ge=0, lt=1)  # used when the data has no val_split
    train_split: str = "train"
    val_split: str | None = "validation"
    test_split: str = "test"
    cache_dir: str | None = None  # default: the datasets library's cache; a given root fills it


register_source(
    "hf",
    load_hf_dataset,
    summary="a text classification data set from the Hugging Face hub (hub_id=...)",
    options=HubOptions,
    files="hub",
)

__all__ = ["load_hf_dataset"]
