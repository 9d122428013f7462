"""The built-in data sources, one module per family; importing a module registers its sources
(``mergecl.data.registry.register_source``), in this order:

- ``digits``: digit images: ``digits`` (sklearn's 8x8, packaged), ``mnist`` (IDX files);
- ``intents``: text intents: ``clinc150``, ``clinc150_mini``, ``banking77``, ``banking77_mini``
  (the ``_mini`` subsets ship inside mergecl);
- ``images``: ``image_folder`` (any folder of images by class) and the paper image sets
  ``cifar100``, ``imagenet_r``, ``cub200``, ``cars``, ``domainnet``;
- ``hub``: ``hf`` (a text data set from the Hugging Face hub);
- ``vision``: ``vision_tasks`` (the 8/14/20-task image suites of model merging, one data set a task);
- ``files``: ``files`` (your own data: CSV, TSV, JSON lines, Parquet, a save_to_disk folder).

Each loader reads local files only (``hf``: the hub) and returns a ``Dataset`` with global class
ids 0..C-1 and readable class names; a file a user can get wrong ends in a one-line
``MergeclError`` naming it. A source from outside mergecl registers itself the same way, in its
own module (see docs/extending.md).
"""

from mergecl.data.sources import digits, intents, images, hub, vision, files  # noqa: I001  (the order of registration)
from mergecl.data.sources.digits import load_digits_source, load_mnist, read_idx
from mergecl.data.sources.hub import load_hf_dataset
from mergecl.data.sources.images import (
    load_cars,
    load_cifar100,
    load_cub200,
    load_domainnet,
    load_image_folder,
    load_imagenet_r,
    read_cifar_bin,
    scan_class_folders,
)
from mergecl.data.sources.vision import load_vision_tasks
from mergecl.data.sources.intents import (
    EMBEDDED,
    load_banking77,
    load_banking77_mini,
    load_clinc150,
    load_clinc150_mini,
)

__all__ = [
    "EMBEDDED",
    "digits",
    "files",
    "hub",
    "images",
    "intents",
    "load_banking77",
    "load_banking77_mini",
    "load_cars",
    "load_cifar100",
    "load_clinc150",
    "load_clinc150_mini",
    "load_cub200",
    "load_digits_source",
    "load_domainnet",
    "load_hf_dataset",
    "load_image_folder",
    "load_imagenet_r",
    "load_mnist",
    "load_vision_tasks",
    "read_cifar_bin",
    "read_idx",
    "scan_class_folders",
    "vision",
]
