"""get_source: names, default roots, options and the errors a user meets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mergecl.data import registry
from mergecl.data.registry import SOURCE_NAMES, data_root, get_source
from mergecl.data.sources.hub import load_hf_dataset
from mergecl.errors import MergeclError

EXPECTED = {
    "digits", "mnist", "clinc150", "banking77", "image_folder", "cifar100",
    "imagenet_r", "cub200", "cars", "domainnet", "hf", "clinc150_mini", "banking77_mini", "files",
    "vision_tasks",
}  # fmt: skip


def test_names() -> None:
    assert set(SOURCE_NAMES) == EXPECTED


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(MergeclError, match=r"unknown data source 'mnits'; valid: digits, mnist, .*hf"):
        get_source("mnits")


def test_unknown_option_is_named() -> None:
    with pytest.raises(
        MergeclError, match=r"digits: unknown option 'colour' \(options of digits: val_fraction, test_fraction\)"
    ):
        get_source("digits", colour="red")


def test_data_root_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGECL_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert registry.default_root("mnist") == tmp_path / "env" / "mnist"
    monkeypatch.delenv("MERGECL_DATA")
    (tmp_path / "shared" / "data").mkdir(parents=True)  # a folder beside the working directory is not a data root
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / ".cache" / "mergecl" / "data"


def test_missing_files_name_the_path_and_how_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGECL_DATA", str(tmp_path))
    with pytest.raises(MergeclError) as err:
        get_source("clinc150")
    message = str(err.value)
    assert str(tmp_path / "clinc150" / "data_full.json") in message and "oos-eval" in message
    assert "\n" not in message
    for name in ("banking77", "mnist", "cifar100", "imagenet_r", "cub200", "cars", "domainnet"):
        with pytest.raises(MergeclError, match=rf"{name}: .*not found at {tmp_path / name}.*prepare\('{name}'"):
            get_source(name)


def test_image_folder_needs_a_root_and_reads_one(tmp_path: Path) -> None:
    with pytest.raises(MergeclError, match="needs a root"):
        get_source("image_folder")
    with pytest.raises(MergeclError, match="has no download recipe"):
        get_source("image_folder", tmp_path, download=True)
    for c in ("cat", "dog"):
        for k in range(5):
            (tmp_path / c).mkdir(exist_ok=True)
            (tmp_path / c / f"{k}.png").write_bytes(b"png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = get_source("image_folder", tmp_path, seed=0)
    assert ds.class_names == ["cat", "dog"] and len(ds.train) == 8 and len(ds.test) == 2 and ds.val is None
    assert ds.train.kind == "image_path" and not set(ds.train.inputs) & set(ds.test.inputs)


def test_image_folder_with_split_folders(tmp_path: Path) -> None:
    for part, n in (("train", 3), ("val", 1), ("test", 2)):
        for c in ("b_class", "a_class"):
            (tmp_path / part / c).mkdir(parents=True)
            for k in range(n):
                (tmp_path / part / c / f"{k}.JPG").write_bytes(b"jpg")
    ds = get_source("image_folder", tmp_path)
    assert ds.class_names == ["a class", "b class"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 2, 4)
    assert ds.test.labels.tolist() == [0, 0, 1, 1]


def test_digits_through_the_registry_is_seeded() -> None:
    a, b = get_source("digits", seed=5), get_source("digits", seed=5)
    assert torch.equal(a.train.inputs, b.train.inputs)
    assert not torch.equal(a.train.inputs, get_source("digits", seed=6).train.inputs)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hf_without_datasets_says_what_to_install() -> None:
    with pytest.raises(MergeclError, match=r"needs the 'datasets' package: pip install 'mergecl\[hub\]'"):
        get_source("hf", hub_id="clinc_oos", config="plus")
    with pytest.raises(MergeclError, match="datasets"):
        load_hf_dataset("PolyAI/banking77")
    with pytest.raises(MergeclError, match="data source 'hf' needs the option 'hub_id'"):
        get_source("hf")
