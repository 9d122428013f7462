"""Images: any folder of images by class (``image_folder``), and the MagMax paper's image data sets
read from their official (prepared) local layouts.

- image folders: ``root/<class>/<image>`` or ``root/{train,val,test}/<class>/<image>``.
- CIFAR-100: the official *binary* release (``cifar-100-binary.tar.gz``: train.bin / test.bin, each
  record 1 coarse-label byte, 1 fine-label byte, 3072 pixel bytes). The python release is pickles,
  which mergecl never loads. Inputs: float [N, 3, 32, 32] in [0, 1].
- ImageNet-R: ``imagenet-r.tar`` (one folder per class wnid, README.txt maps wnids to names), split
  80/20 with a seed; the rendition in each file name (``art_12.jpg``) is the example's domain.
- CUB-200-2011: ``CUB_200_2011.tgz`` with its official train_test_split.txt.
- Stanford Cars: the official devkit .mat annotations (read with scipy.io.loadmat: a MATLAB parser,
  not pickle), or the common ``train/<class>/``, ``test/<class>/`` folder copy.
- DomainNet: the official ``<domain>_train.txt`` / ``<domain>_test.txt`` lists (cleaned version).

Large images stay on disk: inputs are file paths (``kind="image_path"``). Class ids match the
numbering of MagMax's loaders, so ``mergecl.data.orders.PAPER_CLASS_ORDERS`` picks the same classes.
Nothing here downloads; each source declares its official files for ``mergecl.data.download.prepare``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from mergecl.data._files import IMAGE_EXTENSIONS, list_images, locate, missing, path_split, read_lines, readable
from mergecl.data.download import Remote
from mergecl.data.orders import PAPER_DOMAIN_ORDERS
from mergecl.data.registry import register_source
from mergecl.data.splits import split_off, stratified_split
from mergecl.data.types import Dataset, Split
from mergecl.errors import MergeclError
from mergecl.options import Options

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")

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


class ImageFolderOptions(Options):
    test_fraction: float = Field(0.2, ge=0, lt=1)  # used when there is no test folder
    name: str = Field("image_folder", min_length=1)  # the data set's name in reports


register_source(
    "image_folder",
    load_image_folder,
    summary="any folder of images by class: root/<class>/<image> or root/{train,val,test}/<class>/<image>",
    options=ImageFolderOptions,
    files="folder",
    layout="root/<class>/<image>",
)


# -------------------------------------------------------------------------------------- CIFAR-100

_CIFAR_RECORD = 2 + 3 * 32 * 32


def read_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coarse labels, fine labels, uint8 images [N, 3, 32, 32]) of a CIFAR-100 binary file."""
    if not path.is_file():
        raise missing("cifar100", path, path.name)
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise MergeclError(f"{path} is not a CIFAR-100 binary file: {raw.size} bytes is not a multiple of 3074")
    records = raw.reshape(-1, _CIFAR_RECORD)
    return records[:, 0], records[:, 1], records[:, 2:].reshape(-1, 3, 32, 32)


def load_cifar100(root: str | Path) -> Dataset:
    """CIFAR-100 (binary version): 50k train / 10k test, 100 fine classes in 20 coarse groups.

    ``class_groups`` maps each coarse superclass name to its 5 fine class ids.
    """
    folder = locate(root, "train.bin", ("cifar-100-binary",), "cifar100")
    fine_names = read_lines(folder / "fine_label_names.txt", "cifar100")
    coarse_path = folder / "coarse_label_names.txt"
    coarse_names = read_lines(coarse_path, "cifar100") if coarse_path.is_file() else []

    def split(name: str) -> tuple[Split, np.ndarray, np.ndarray]:
        coarse, fine, images = read_cifar_bin(folder / name)
        if fine.max() >= len(fine_names):
            raise MergeclError(
                f"{folder / name} has fine label {fine.max()}, fine_label_names.txt has {len(fine_names)}"
            )
        x = torch.from_numpy(images.astype(np.float32) / 255.0)
        return Split(x, torch.from_numpy(fine.astype(np.int64))), coarse, fine

    train, coarse, fine = split("train.bin")
    test, _, _ = split("test.bin")
    groups: dict[str, list[int]] = {}
    for c, name in enumerate(coarse_names):
        groups[readable(name)] = sorted({int(f) for f in np.unique(fine[coarse == c])})
    return Dataset("cifar100", [readable(n) for n in fine_names], train, test, class_groups=groups)


register_source(
    "cifar100",
    load_cifar100,
    summary="CIFAR-100 (binary release): 50k / 10k 32x32 images, 100 classes in 20 superclasses",
    layout="train.bin, test.bin, fine_label_names.txt (or cifar-100-binary/)",
    remotes=[
        Remote("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", "cifar-100-binary.tar.gz",
               "03b5dce01913d631647c71ecec9e9cb8", extract=True),
    ],
)  # fmt: skip


# ------------------------------------------------------------------------------------- ImageNet-R


def _wnid_names(folder: Path) -> dict[str, str]:
    """wnid -> class name from imagenet-r/README.txt lines such as 'n01443537 goldfish'."""
    readme = folder / "README.txt"
    if not readme.is_file():
        return {}
    pairs = (line.split(maxsplit=1) for line in read_lines(readme, "imagenet_r"))
    return {p[0]: p[1].strip() for p in pairs if len(p) == 2 and p[0].startswith("n") and p[0][1:].isdigit()}


def _pick(columns: tuple[list, ...], index: list[int]) -> tuple[list, ...]:
    return tuple([column[i] for i in index] for column in columns)


def _domain_names(found: set[str], paper_order: list[str]) -> list[str]:
    """Domains present in the data: the paper's order first, any others after, sorted."""
    return [d for d in paper_order if d in found] + sorted(found - set(paper_order))


def load_imagenet_r(root: str | Path, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """ImageNet-R: 30,000 renditions of 200 ImageNet classes in 15 domains (art, cartoon, ...).

    Class ids: the class names from README.txt sorted case-sensitively, which is how MagMax numbers
    them (it renames the wnid folders to names, then uses ImageFolder). The 80/20 train/test split
    is seeded and stratified by (class, rendition); MagMax's own split was an unseeded
    ``random_split``, so its exact examples cannot be reproduced. An already split copy
    (``imagenet-r/train/<class>``, ``imagenet-r/test/<class>``, MagMax's prepared layout) is used
    as it is. Domains: the file name prefix (``sketch_3.jpg`` -> sketch), ordered as in MagMax.
    """
    root = Path(root).expanduser()
    folder = root / "imagenet-r" if (root / "imagenet-r").is_dir() else root
    if not folder.is_dir():
        raise missing("imagenet_r", folder, "the imagenet-r folder", root)
    names = _wnid_names(folder)
    presplit = (folder / "train").is_dir() and (folder / "test").is_dir()
    class_roots = [folder / "train", folder / "test"] if presplit else [folder]
    dirs = sorted({d.name for r in class_roots for d in r.iterdir() if d.is_dir()})
    if not dirs:
        raise missing("imagenet_r", folder / "<wnid>", "class folders", root)
    if not names and any(d.startswith("n") and d[1:].isdigit() for d in dirs):
        warnings.warn(
            f"{folder}/README.txt is missing: classes are numbered by wnid, not by name, so the paper "
            "class order does not pick MagMax's classes and class names are wnids",
            stacklevel=2,
        )
    keys = sorted(names.get(d, d) for d in dirs)  # case-sensitive, like ImageFolder
    label_of = {d: keys.index(names.get(d, d)) for d in dirs}

    def scan(base: Path) -> tuple[list[str], list[int], list[str]]:
        paths, labels, domains = [], [], []
        for d in dirs:
            for p in list_images(base / d) if (base / d).is_dir() else []:
                paths.append(str(p))
                labels.append(label_of[d])
                domains.append(p.name.split("_")[0])
        return paths, labels, domains

    if presplit:
        train_part, test_part = scan(folder / "train"), scan(folder / "test")
    else:
        paths, labels, domains = scan(folder)
        if not paths:
            raise missing("imagenet_r", folder / dirs[0] / "<image>", "images", root)
        domain_set = sorted(set(domains))
        strata = torch.tensor(
            [lab * len(domain_set) + domain_set.index(d) for lab, d in zip(labels, domains, strict=True)]
        )
        keep, take = stratified_split(strata, test_fraction, seed)
        train_part, test_part = (_pick((paths, labels, domains), idx.tolist()) for idx in (keep, take))
    domain_names = _domain_names(set(train_part[2]) | set(test_part[2]), PAPER_DOMAIN_ORDERS["imagenet_r"])

    def domain_ids(domains: list[str]) -> torch.Tensor:
        return torch.tensor([domain_names.index(d) for d in domains], dtype=torch.long)

    return Dataset(
        "imagenet_r",
        [readable(k) for k in keys],
        path_split(train_part[0], train_part[1]),
        path_split(test_part[0], test_part[1]),
        domain_names=domain_names,
        train_domains=domain_ids(train_part[2]),
        test_domains=domain_ids(test_part[2]),
    )


class ImagenetROptions(Options):
    test_fraction: float = Field(0.2, ge=0, lt=1)  # used when the copy is not already split


register_source(
    "imagenet_r",
    load_imagenet_r,
    summary="ImageNet-R: 30,000 renditions of 200 ImageNet classes in 15 domains (art, cartoon, ...)",
    options=ImagenetROptions,
    layout="imagenet-r/<wnid>/<rendition>_<n>.jpg and imagenet-r/README.txt",
    remotes=[
        Remote("https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar", "imagenet-r.tar",
               "a61312130a589d0ca1a8fca1f2bd3337", extract=True),
    ],
)  # fmt: skip


# --------------------------------------------------------------------------------------- CUB-200


def _id_table(path: Path, dataset: str) -> dict[int, str]:
    """'<id> <value>' lines -> {id: value}."""
    table = {}
    for n, line in enumerate(read_lines(path, dataset), 1):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise MergeclError(f"{path} line {n}: expected '<id> <value>', got {line!r}")
        table[int(parts[0])] = parts[1]
    return table


def load_cub200(root: str | Path) -> Dataset:
    """CUB-200-2011 with its official train/test split (5,994 / 5,794 images, 200 birds).

    Class ids follow classes.txt (001.Black_footed_Albatross -> id 0, named 'Black footed Albatross').
    """
    folder = locate(root, "images.txt", ("CUB_200_2011",), "cub200")
    images = _id_table(folder / "images.txt", "cub200")
    is_train = _id_table(folder / "train_test_split.txt", "cub200")
    labels = _id_table(folder / "image_class_labels.txt", "cub200")
    classes = _id_table(folder / "classes.txt", "cub200")
    if not (folder / "images").is_dir():
        raise missing("cub200", folder / "images", "the images folder", folder.parent)
    class_ids = sorted(classes)
    if class_ids != list(range(1, len(class_ids) + 1)):
        raise MergeclError(f"{folder / 'classes.txt'}: class ids must be 1..{len(class_ids)}")
    parts: dict[str, tuple[list[str], list[int]]] = {"1": ([], []), "0": ([], [])}
    for image_id, rel in sorted(images.items()):
        if image_id not in labels or image_id not in is_train:
            raise MergeclError(f"{folder}: image {image_id} has no class label or no train/test flag")
        label = int(labels[image_id]) - 1
        if not 0 <= label < len(class_ids):
            raise MergeclError(f"{folder / 'image_class_labels.txt'}: image {image_id} has class {label + 1}")
        flag = is_train[image_id].strip()
        if flag not in parts:
            raise MergeclError(f"{folder / 'train_test_split.txt'}: image {image_id} has flag {flag!r}, not 1 or 0")
        paths, ys = parts[flag]
        paths.append(str(folder / "images" / rel))
        ys.append(label)
    names = [readable(classes[i].split(".", 1)[-1]) for i in class_ids]
    return Dataset("cub200", names, path_split(*parts["1"]), path_split(*parts["0"]))


register_source(
    "cub200",
    load_cub200,
    summary="CUB-200-2011: 200 bird species, its official 5,994 / 5,794 train/test split",
    layout="CUB_200_2011/ (images.txt, train_test_split.txt, images/)",
    remotes=[
        Remote("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
               "CUB_200_2011.tgz", "97eceeb196236b17998738112f37df78", extract=True),
    ],
)  # fmt: skip


# ---------------------------------------------------------------------------------- Stanford Cars


def _loadmat(path: Path, key: str) -> np.ndarray:
    try:
        from scipy.io import loadmat  # scipy comes with scikit-learn; a MATLAB parser, not pickle
        from scipy.io.matlab import MatReadError
    except ImportError as err:
        raise MergeclError(f"reading {path} needs scipy (pip install scipy)") from err
    if not path.is_file():
        raise missing("cars", path, path.name)
    try:
        return np.atleast_1d(loadmat(str(path), squeeze_me=True)[key])
    except (MatReadError, ValueError, OSError, KeyError, TypeError) as err:
        raise MergeclError(f"cannot read {key!r} from {path}: {err}") from err


def _cars_annotations(mat: Path, images: Path) -> Split:
    paths, labels = [], []
    for record in _loadmat(mat, "annotations"):
        paths.append(str(images / str(record["fname"])))
        labels.append(int(record["class"]) - 1)  # the .mat classes are 1-based
    return path_split(paths, labels)


def load_cars(root: str | Path) -> Dataset:
    """Stanford Cars: 196 classes, 8,144 train / 8,041 test images.

    Official layout (what ``prepare('cars')`` makes, and torchvision's): ``devkit/cars_meta.mat``,
    ``devkit/cars_train_annos.mat``, ``cars_test_annos_withlabels.mat``, ``cars_train/``,
    ``cars_test/``; class ids are the official ones. Alternative without .mat files:
    ``train/<class name>/`` and ``test/<class name>/`` folders; ids are then the sorted folder names.
    """
    root = Path(root).expanduser()
    for folder in (root, root / "stanford_cars"):
        if (folder / "devkit" / "cars_meta.mat").is_file():
            break
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            return load_image_folder(folder, name="cars")
    else:
        raise missing("cars", root / "devkit" / "cars_meta.mat", "devkit/cars_meta.mat", root)
    names = [str(n) for n in _loadmat(folder / "devkit" / "cars_meta.mat", "class_names")]
    test_mat = folder / "cars_test_annos_withlabels.mat"
    if not test_mat.is_file() and (folder / "devkit" / test_mat.name).is_file():
        test_mat = folder / "devkit" / test_mat.name
    train = _cars_annotations(folder / "devkit" / "cars_train_annos.mat", folder / "cars_train")
    test = _cars_annotations(test_mat, folder / "cars_test")
    for split, mat in ((train, "cars_train_annos.mat"), (test, test_mat.name)):
        if len(split) and not 0 <= int(split.labels.min()) <= int(split.labels.max()) < len(names):
            raise MergeclError(f"{mat}: class ids outside 1..{len(names)} of cars_meta.mat")
    return Dataset("cars", names, train, test)


_CARS = "https://ai.stanford.edu/~jkrause/car196/"

register_source(
    "cars",
    load_cars,
    summary="Stanford Cars: 196 car models, 8,144 / 8,041 train/test images",
    layout="devkit/*.mat, cars_train/, cars_test/ (or train/<class>/, test/<class>/)",
    # The Stanford host has been offline since 2023; if it fails, fetch the same four files from a
    # mirror (e.g. the Kaggle copy of "stanford-cars") into <root> and run prepare("cars") again.
    remotes=[
        Remote("https://ai.stanford.edu/~jkrause/cars/car_devkit.tgz", "car_devkit.tgz",
               "c3b158d763b6e2245038c8ad08e45376", extract=True),
        Remote(_CARS + "cars_train.tgz", "cars_train.tgz", "065e5b463ae28d29e77c1b4b166cfe61", extract=True),
        Remote(_CARS + "cars_test.tgz", "cars_test.tgz", "4ce7ebf6a94d07f1952d94dd34c4d501", extract=True),
        Remote(_CARS + "cars_test_annos_withlabels.mat", "cars_test_annos_withlabels.mat",
               "b0a2b23655a3edd16d84508592a98d10"),
    ],
)  # fmt: skip


# -------------------------------------------------------------------------------------- DomainNet


def _domainnet_list(path: Path) -> list[tuple[str, str, int]]:
    """(relative path, class folder, official label) per line of a <domain>_<part>.txt list."""
    rows = []
    for n, line in enumerate(read_lines(path, "domainnet"), 1):
        parts = line.split()
        pieces = parts[0].split("/") if parts else []
        if len(parts) != 2 or len(pieces) < 3 or not parts[1].isdigit():
            raise MergeclError(f"{path} line {n}: expected '<domain>/<class>/<file> <label>', got {line!r}")
        rows.append((parts[0], pieces[1], int(parts[1])))
    return rows


def load_domainnet(root: str | Path, domains: list[str] | tuple[str, ...] | None = None) -> Dataset:
    """DomainNet (cleaned): 345 classes in 6 domains, the official per-domain train/test lists.

    ``domains`` picks and orders the domains (default: MagMax's sequence clipart, sketch, real,
    infograph, quickdraw, painting); each example's domain id indexes ``domain_names``. Class ids:
    sorted class folder names, case-sensitive ('The_Eiffel_Tower' first), as MagMax's ImageFolder
    numbers them (the lists' own labels are checked for consistency, not used).
    """
    domains = list(domains) if domains is not None else list(PAPER_DOMAIN_ORDERS["domainnet"])
    unknown = [d for d in domains if d not in DOMAINNET_DOMAINS]
    if unknown or not domains:
        raise MergeclError(f"unknown DomainNet domains {unknown}; valid: {', '.join(DOMAINNET_DOMAINS)}")
    folder = locate(root, f"{domains[0]}_train.txt", ("domainnet",), "domainnet")
    lists = {(d, p): _domainnet_list(folder / f"{d}_{p}.txt") for d in domains for p in ("train", "test")}
    for (domain, _), rows in lists.items():
        if rows and not (folder / rows[0][0]).is_file():
            raise missing("domainnet", folder / rows[0][0], f"{domain} images (unzip {domain}.zip)", folder)
    official: dict[str, int] = {}
    for rows in lists.values():
        for _, name, label in rows:
            if official.setdefault(name, label) != label:
                raise MergeclError(f"domainnet: class {name!r} has two labels ({official[name]}, {label})")
    classes = sorted(official)
    label_of = {name: i for i, name in enumerate(classes)}

    def split(part: str) -> tuple[Split, torch.Tensor]:
        paths, labels, doms = [], [], []
        for d_id, domain in enumerate(domains):
            for rel, name, _ in lists[(domain, part)]:
                paths.append(str(folder / rel))
                labels.append(label_of[name])
                doms.append(d_id)
        return path_split(paths, labels), torch.tensor(doms, dtype=torch.long)

    (train, train_domains), (test, test_domains) = split("train"), split("test")
    return Dataset(
        "domainnet",
        [readable(c) for c in classes],
        train,
        test,
        domain_names=domains,
        train_domains=train_domains,
        test_domains=test_domains,
    )


class DomainNetOptions(Options):
    # which domains, in which order (default: MagMax's clipart, sketch, real, infograph, quickdraw, painting)
    domains: Sequence[Literal[DOMAINNET_DOMAINS]] | None = Field(None, min_length=1)


_DOMAINNET = "http://csr.bu.edu/ftp/visda/2019/multi-source/"


def _domainnet_files() -> list[Remote]:
    # clipart and painting images live under groundtruth/, the others at the top (official page).
    files = []
    for domain in DOMAINNET_DOMAINS:
        folder = "groundtruth/" if domain in ("clipart", "painting") else ""
        files.append(Remote(f"{_DOMAINNET}{folder}{domain}.zip", f"{domain}.zip", extract=True))
        for part in ("train", "test"):
            name = f"{domain}_{part}.txt"
            files.append(Remote(f"{_DOMAINNET}domainnet/txt/{name}", name))
    return files


register_source(
    "domainnet",
    load_domainnet,
    summary="DomainNet (cleaned): 345 classes in 6 domains, the official per-domain train/test lists",
    options=DomainNetOptions,
    layout="<domain>_train.txt, <domain>_test.txt and <domain>/<class>/<image>",
    remotes=_domainnet_files(),
)

__all__ = [
    "DOMAINNET_DOMAINS",
    "load_cars",
    "load_cifar100",
    "load_cub200",
    "load_domainnet",
    "load_image_folder",
    "load_imagenet_r",
    "read_cifar_bin",
    "scan_class_folders",
]
