"""Explicit downloads of the data sets, for users on a machine with internet.

Nothing here runs unless asked: ``prepare(name, root)`` (or ``get_source(..., download=True)``)
fetches the official files a source declares (``register_source(..., remotes=...)``: a list of
``Remote``) with urllib, checks their md5 where it is published, and unpacks them so that the
loader finds the layout it reads. Loaders never download by themselves.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mergecl.data.registry import SOURCES
from mergecl.errors import MergeclError


@dataclass(frozen=True)
class Remote:
    url: str
    filename: str
    md5: str | None = None  # None: no published checksum
    extract: bool = False


def how_to_get(name: str, root: str | Path) -> str:
    """One sentence telling a user how to obtain ``name`` into ``root`` (for error messages)."""
    remotes = SOURCES[name].remotes if name in SOURCES else ()
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


def prepare(name: str, root: str | Path, remotes: Sequence[Remote] | None = None) -> Path:
    """Download (and unpack) data set ``name`` into ``root``, the folder its loader reads.

    ``remotes`` overrides the files its declaration lists (a mirror, or ``file://`` URLs).
    """
    if remotes is None:
        remotes = SOURCES[name].remotes if name in SOURCES else ()
        if not remotes:
            known = sorted(n for n, source in SOURCES.items() if source.remotes)
            raise MergeclError(f"no download recipe for {name!r}; known: {', '.join(known)}")
    root = Path(root)
    for remote in remotes:
        path = download_url(remote.url, root / remote.filename, remote.md5)
        if remote.extract:
            extract_archive(path, root)
    return root
