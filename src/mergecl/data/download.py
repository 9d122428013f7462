"""Explicit downloads of the data sets, for users on a machine with internet.

Nothing here runs unless asked: ``prepare(name, root)`` (or ``get_source(..., download=True)``)
fetches the official files with urllib, checks their md5 where it is published, and unpacks them
so that the loaders find the layout they read. Loaders never download by themselves.

Downloads go to ``<file>.part`` and are renamed only once complete and verified, so an interrupted
download never looks like a good file. Archives are unpacked with path checks (no absolute paths,
no ``..``, no links): a tar or zip from the internet cannot write outside its folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mergecl.errors import MergeclError


@dataclass(frozen=True)
class Remote:
    url: str
    filename: str
    md5: str | None = None  # None: no published checksum
    extract: bool = False


_MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # yann.lecun.com often refuses
_DOMAINNET = "http://csr.bu.edu/ftp/visda/2019/multi-source/"
_CARS = "https://ai.stanford.edu/~jkrause/car196/"
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


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


REMOTES: dict[str, list[Remote]] = {
    "mnist": [
        Remote(_MNIST_MIRROR + "train-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz",
               "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        Remote(_MNIST_MIRROR + "train-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "d53e105ee54ea40749a09fcbcd1e9432"),
        Remote(_MNIST_MIRROR + "t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "9fb629c4189551a2d022fa330f9573f3"),
        Remote(_MNIST_MIRROR + "t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
               "ec29112dd5afa0611ce80d1b7f02629c"),
    ],
    "clinc150": [
        Remote("https://raw.githubusercontent.com/clinc/oos-eval/master/data/data_full.json",
               "data_full.json"),
        Remote("https://raw.githubusercontent.com/clinc/oos-eval/master/data/domains.json",
               "domains.json"),
    ],
    "banking77": [
        Remote("https://raw.githubusercontent.com/PolyAI-LDN/task-specific-datasets/master/"
               f"banking_data/{name}", name)
        for name in ("train.csv", "test.csv", "categories.json")
    ],
    "cifar100": [
        Remote("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", "cifar-100-binary.tar.gz",
               "03b5dce01913d631647c71ecec9e9cb8", extract=True),
    ],
    "imagenet_r": [
        Remote("https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar", "imagenet-r.tar",
               "a61312130a589d0ca1a8fca1f2bd3337", extract=True),
    ],
    "cub200": [
        Remote("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
               "CUB_200_2011.tgz", "97eceeb196236b17998738112f37df78", extract=True),
    ],
    # The Stanford host has been offline since 2023; if it fails, fetch the same four files from a
    # mirror (e.g. the Kaggle copy of "stanford-cars") into <root> and run prepare("cars") again.
    "cars": [
        Remote("https://ai.stanford.edu/~jkrause/cars/car_devkit.tgz", "car_devkit.tgz",
               "c3b158d763b6e2245038c8ad08e45376", extract=True),
        Remote(_CARS + "cars_train.tgz", "cars_train.tgz", "065e5b463ae28d29e77c1b4b166cfe61", extract=True),
        Remote(_CARS + "cars_test.tgz", "cars_test.tgz", "4ce7ebf6a94d07f1952d94dd34c4d501", extract=True),
        Remote(_CARS + "cars_test_annos_withlabels.mat", "cars_test_annos_withlabels.mat",
               "b0a2b23655a3edd16d84508592a98d10"),
    ],
    "domainnet": _domainnet_files(),
}  # fmt: skip


def how_to_get(name: str, root: str | Path) -> str:
    """One sentence telling a user how to obtain ``name`` into ``root`` (for error messages)."""
    remotes = REMOTES.get(name)
    if not remotes:
        return "see docs for how to obtain it"
    first = remotes[0].url + (f" (+{len(remotes) - 1} more files)" if len(remotes) > 1 else "")
    return (
        f"run `python -c \"from mergecl.data.download import prepare; prepare('{name}', '{root}')\"` "
        f"on a machine with internet, or fetch {first} into {root}"
    )


def md5sum(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download_url(url: str, dest: str | Path, md5: str | None = None, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` (skipped when ``dest`` exists with the right md5)."""
    dest = Path(dest)
    if dest.exists() and (md5 is None or md5sum(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except OSError as err:  # URLError, HTTPError and socket errors are all OSErrors
        part.unlink(missing_ok=True)
        raise MergeclError(f"download of {url} failed: {err}") from err
    if md5 is not None and (got := md5sum(part)) != md5:
        part.unlink(missing_ok=True)
        raise MergeclError(f"download of {url} is corrupt: md5 {got}, expected {md5}")
    os.replace(part, dest)
    return dest


def _safe_target(dest: Path, member: str, archive: Path) -> Path:
    target = (dest / member).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise MergeclError(f"{archive}: refusing to extract {member!r}, it points outside {dest}")
    return target


def extract_archive(archive: str | Path, dest: str | Path) -> Path:
    """Unpack a .tar/.tar.gz/.tgz/.zip into ``dest`` with path checks; returns ``dest``."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():
                    _safe_target(dest, member, archive)
                zf.extractall(dest)
        else:
            with tarfile.open(archive) as tf:
                for member in tf.getmembers():
                    _safe_target(dest, member.name, archive)
                    if not (member.isfile() or member.isdir()):
                        raise MergeclError(f"{archive}: refusing to extract {member.name!r}, not a plain file")
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.10.12: the safe filter
                    tf.extractall(dest, filter="data")
                else:
                    tf.extractall(dest)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise MergeclError(f"cannot unpack {archive}: {err}") from err
    return dest


def prepare(name: str, root: str | Path, remotes: list[Remote] | None = None) -> Path:
    """Download (and unpack) data set ``name`` into ``root``, the folder its loader reads.

    ``remotes`` overrides the official file list (a mirror, or ``file://`` URLs).
    """
    files = REMOTES.get(name) if remotes is None else remotes
    if files is None:
        raise MergeclError(f"no download recipe for {name!r}; known: {', '.join(sorted(REMOTES))}")
    root = Path(root)
    for remote in files:
        path = download_url(remote.url, root / remote.filename, remote.md5)
        if remote.extract:
            extract_archive(path, root)
    return root
