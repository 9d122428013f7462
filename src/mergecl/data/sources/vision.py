"""Vision task suites (``vision_tasks``): each task is one image data set with its own classes,
the 8-, 14- and 20-task suites of model merging (task arithmetic's 8, TALL's 14 and 20), as
FusionBench lists them.

A task is a folder ``<root>/<task>/{train,test}/<class>/<image>`` (a ``val/`` folder too, used
when every task has one), read lazily as file paths; its class folder names are its class names
(what a zero-shot head encodes). A task whose folder is not there is fetched from the Hugging Face
hub (``hub: true``, the default; needs ``pip install 'mergecl[hub]'``) from the data set FusionBench
reads (``SUITE_DATA``), and written into that layout once, so later runs read the folder. The
hub is contacted only by that fetch, never by the tests.

The tasks come in the order of the ``tasks`` option; each keeps its own classes (global ids
offset task by task: two tasks' "0" are different classes), and the data set says it gives its
tasks, so a ``task`` scenario makes one task per data set, evaluated with its own head.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from mergecl.data.registry import register_source
from mergecl.data.sources.images import load_image_folder
from mergecl.data.types import Dataset, Split
from mergecl.errors import MergeclError
from mergecl.options import Options


@dataclass(frozen=True)
class HubData:
    """Where a task's images are on the hub, and how its columns are named."""

    hub_id: str
    config: str | None = None
    test_split: str = "test"
    image: str = "image"
    label: str = "label"
    class_names: tuple[str, ...] = ()  # for a label column without ClassLabel names (ints, bools)


# The data sets of FusionBench's suites (its dataset configs), by its task names
SUITE_DATA: dict[str, HubData] = {
    "sun397": HubData("tanganke/sun397"),
    "stanford-cars": HubData("tanganke/stanford_cars"),
    "resisc45": HubData("tanganke/resisc45"),
    "eurosat": HubData("tanganke/eurosat"),
    "svhn": HubData("ufldl-stanford/svhn", "cropped_digits"),
    "gtsrb": HubData("tanganke/gtsrb"),
    "mnist": HubData("ylecun/mnist"),
    "dtd": HubData("tanganke/dtd"),
    "oxford_flowers102": HubData("dpdl-benchmark/oxford_flowers102"),
    "pcam": HubData("1aurent/PatchCamelyon", class_names=("healthy lymph node tissue", "metastatic tumor tissue")),
    "fer2013": HubData(
        "clip-benchmark/wds_fer2013",
        image="jpg",
        label="cls",
        class_names=("angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral"),
    ),
    "oxford-iiit-pet": HubData("timm/oxford-iiit-pet"),
    "stl10": HubData("tanganke/stl10"),
    "cifar100": HubData("tanganke/cifar100"),
    "cifar10": HubData("tanganke/cifar10"),
    "food101": HubData("ethz/food101", test_split="validation"),
    "fashion_mnist": HubData("zalando-datasets/fashion_mnist"),
    "emnist_letters": HubData("tanganke/emnist_letters"),
    "kmnist": HubData("tanganke/kmnist"),
    "rendered-sst2": HubData("nateraw/rendered-sst2"),
}
SUITES: dict[int, tuple[str, ...]] = {8: tuple(SUITE_DATA)[:8], 14: tuple(SUITE_DATA)[:14], 20: tuple(SUITE_DATA)}


def class_folder(name: str) -> str:
    """A class name as a folder name (no path separators, no leading dot)."""
    return " ".join(name.replace("/", " ").replace("\\", " ").split()).lstrip(".") or "_"


def fetch_task(task: str, folder: Path, cache_dir: str | None = None) -> None:
    """Task ``task``'s train and test images from the hub, written as ``folder/{train,test}/<class>/``
    (through a temporary folder: a broken fetch leaves no half task behind)."""
    data = SUITE_DATA.get(task)
    if data is None:
        known = ", ".join(SUITE_DATA)
        raise MergeclError(f"vision_tasks: no folder {folder} and no hub data set for task '{task}' (known: {known})")
    try:
        import datasets as hf  # lazy: an optional extra
    except ImportError as err:
        raise MergeclError(
            f"vision_tasks: task '{task}' is not at {folder}; fetching it needs: pip install 'mergecl[hub]'"
        ) from err
    try:
        loaded = hf.load_dataset(data.hub_id, data.config, cache_dir=cache_dir)
    except Exception as err:  # the hub raises many types; the user needs one line
        raise MergeclError(f"vision_tasks: cannot load {data.hub_id!r} for task '{task}' from the hub: {err}") from err
    part = folder.with_name(f".{folder.name}.part")
    shutil.rmtree(part, ignore_errors=True)
    for split, hub_split in (("train", "train"), ("test", data.test_split)):
        if hub_split not in loaded:
            raise MergeclError(f"vision_tasks: {data.hub_id!r} has no split {hub_split!r}; it has {', '.join(loaded)}")
        rows = loaded[hub_split]
        if data.image not in rows.features or data.label not in rows.features:
            columns = ", ".join(rows.features)
            wanted = f"{data.image!r} or {data.label!r}"
            raise MergeclError(f"vision_tasks: {data.hub_id!r} has no column {wanted} (it has {columns})")
        names = list(data.class_names) or list(getattr(rows.features[data.label], "names", None) or [])
        folders = [class_folder(n) for n in names]
        if len(set(folders)) < len(folders):  # two classes would share a folder, and so become one
            same = next(f for f in folders if folders.count(f) > 1)
            raise MergeclError(f"vision_tasks: {data.hub_id!r} has two classes named {same!r} as folders")
        for i, row in enumerate(rows):
            label = int(row[data.label])
            name = names[label] if label < len(names) else str(label)
            target = part / split / class_folder(name)
            target.mkdir(parents=True, exist_ok=True)
            row[data.image].convert("RGB").save(target / f"{i:07d}.png")
    os.replace(part, folder)


def load_vision_tasks(
    root: str | Path, tasks: list[str], hub: bool = True, cache_dir: str | None = None, seed: int = 0
) -> Dataset:
    """The tasks' image folders as one data set whose tasks are the folders (``given_tasks``)."""
    root = Path(root).expanduser()
    if len(set(tasks)) != len(tasks):
        raise MergeclError(f"vision_tasks: options.tasks lists a task twice: {tasks}")
    names: list[str] = []
    groups: dict[str, list[int]] = {}
    parts: dict[str, list[Split]] = {"train": [], "val": [], "test": []}
    for task in tasks:
        folder = root / task
        if not folder.is_dir():
            if not hub:
                layout = f"{task}/{{train,test}}/<class>/<image>"
                raise MergeclError(f"vision_tasks: task '{task}' has no folder {folder} ({layout}; or hub: true)")
            folder.parent.mkdir(parents=True, exist_ok=True)
            fetch_task(task, folder, cache_dir)
        ds = load_image_folder(folder, seed, name=task)
        offset = len(names)
        names.extend(ds.class_names)
        groups[task] = list(range(offset, len(names)))
        for split, part in (("train", ds.train), ("val", ds.val), ("test", ds.test)):
            if part is not None:
                parts[split].append(Split(part.inputs, part.labels + offset, part.kind))
    val = Split.concat(parts["val"]) if len(parts["val"]) == len(tasks) else None  # else: carved per run
    train, test = Split.concat(parts["train"]), Split.concat(parts["test"])
    name = f"vision{len(tasks)}" if tuple(tasks) in SUITES.values() else "vision_tasks"
    return Dataset(name, names, train, test, val, class_groups=groups, given_tasks="one image data set per task")


class VisionTasksOptions(Options):
    tasks: list[str] = Field(min_length=1)  # task names, in order: folders under root, or hub data sets
    hub: bool = True  # fetch a task that has no folder from the hub, into the folder
    cache_dir: str | None = None  # the datasets library's cache for that fetch; default: its own


register_source(
    "vision_tasks",
    load_vision_tasks,
    summary="image tasks, one data set each (the 8/14/20-task merging suites), a missing task fetched from the hub",
    options=VisionTasksOptions,
    layout="root/<task>/{train,test}/<class>/<image>",
)

__all__ = ["SUITES", "SUITE_DATA", "load_vision_tasks"]
