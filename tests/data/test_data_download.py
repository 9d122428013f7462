"""Downloads and archive unpacking, on local ``file://`` URLs (tests never touch the network)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mergecl.data.download import Remote, download_url, extract_archive, how_to_get, prepare
from mergecl.data.registry import SOURCES
from mergecl.data.sources.images import load_cifar100
from mergecl.errors import MergeclError


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_url_checks_md5_and_leaves_nothing_behind(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload" * 100)
    dest = download_url(src.as_uri(), tmp_path / "out" / "file.bin", md5(src))
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(MergeclError, match="is corrupt: md5"):
        download_url(src.as_uri(), tmp_path / "out" / "other.bin", "0" * 32)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["file.bin"]  # no .part, no other.bin
    with pytest.raises(MergeclError, match="download of .*missing.bin failed"):
        download_url((tmp_path / "missing.bin").as_uri(), tmp_path / "out" / "x.bin")


def test_download_url_skips_a_verified_file(tmp_path: Path) -> None:
    dest = tmp_path / "kept.bin"
    dest.write_bytes(b"already here")
    assert download_url("file:///nonexistent/never-read", dest, md5(dest)) == dest


def tar_with(path: Path, name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.SYMTYPE:
            info.linkname = "/etc/passwd"
            tf.addfile(info)
        else:
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_extract_refuses_paths_outside_and_links(tmp_path: Path) -> None:
    with pytest.raises(MergeclError, match="points outside"):
        extract_archive(tar_with(tmp_path / "a.tar.gz", "../evil.txt"), tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()
    with pytest.raises(MergeclError, match="not a plain file"):
        extract_archive(tar_with(tmp_path / "b.tar.gz", "link", kind=tarfile.SYMTYPE), tmp_path / "out")
    with zipfile.ZipFile(tmp_path / "c.zip", "w") as zf:
        zf.writestr("../../evil.txt", "x")
    with pytest.raises(MergeclError, match="points outside"):
        extract_archive(tmp_path / "c.zip", tmp_path / "out")
    (tmp_path / "d.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(MergeclError, match="cannot unpack"):
        extract_archive(tmp_path / "d.tar.gz", tmp_path / "out")


def test_extract_zip_and_tar(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as zf:
        zf.writestr("clipart/cat/1.jpg", "img")
    extract_archive(tmp_path / "z.zip", tmp_path / "out")
    extract_archive(tar_with(tmp_path / "t.tgz", "dir/file.txt", b"hello"), tmp_path / "out")
    assert (tmp_path / "out" / "clipart" / "cat" / "1.jpg").read_text() == "img"
    assert (tmp_path / "out" / "dir" / "file.txt").read_text() == "hello"


def test_prepare_cifar100_from_a_local_mirror_then_load(tmp_path: Path) -> None:
    """prepare() with the official archive layout (served from file://), then the loader reads it."""
    staging = tmp_path / "staging" / "cifar-100-binary"
    staging.mkdir(parents=True)
    records = np.zeros((100, 3074), dtype=np.uint8)
    records[:, 1] = np.arange(100)
    records.tofile(staging / "train.bin")
    records[:10].tofile(staging / "test.bin")
    (staging / "fine_label_names.txt").write_text("\n".join(f"c{i}" for i in range(100)))
    archive = tmp_path / "cifar-100-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(staging, arcname="cifar-100-binary")
    root = tmp_path / "data" / "cifar100"
    remote = Remote(archive.as_uri(), "cifar-100-binary.tar.gz", md5(archive), extract=True)
    assert prepare("cifar100", root, remotes=[remote]) == root
    ds = load_cifar100(root)
    assert len(ds.train) == 100 and len(ds.test) == 10 and ds.class_names[99] == "c99"


def test_recipes_cover_the_file_based_sources() -> None:
    builtin = {name: source for name, source in SOURCES.items() if source.loader.__module__.startswith("mergecl.")}
    REMOTES = {name: source.remotes for name, source in builtin.items() if source.remotes}
    shipped = {"digits", "clinc150_mini", "banking77_mini"}  # inside sklearn / mergecl: nothing to download
    fetched = {"vision_tasks"}  # its loader fetches a missing task from the hub into the data root
    assert set(REMOTES) == set(builtin) - shipped - fetched - {"image_folder", "hf", "files"}  # the user's own files
    assert {name for name, source in builtin.items() if source.files == "data_root"} == set(REMOTES) | fetched
    for name, remotes in REMOTES.items():
        assert remotes and all(r.url.startswith(("http://", "https://")) for r in remotes), name
        assert all(r.md5 is None or len(r.md5) == 32 for r in remotes)
    assert len(REMOTES["domainnet"]) == 18  # 6 image zips + 12 lists
    assert "imagenet-r.tar" in how_to_get("imagenet_r", "/data/imagenet_r")
    with pytest.raises(MergeclError, match="no download recipe for 'digits'"):
        prepare("digits", "/tmp/unused")
