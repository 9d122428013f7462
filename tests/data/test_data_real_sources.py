"""The small sources on real files: the shared data folder (MNIST, CLINC150, Banking77) and sklearn
digits; plus MNIST's IDX reader on tiny IDX files written here, and its error messages."""

from __future__ import annotations

import gzip
import os
import runpy
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mergecl.data.registry import get_source
from mergecl.data.sources.digits import load_digits_source, load_mnist, read_idx
from mergecl.data.sources.intents import EMBEDDED, load_banking77, load_clinc150
from mergecl.errors import MergeclError

SHARED = Path(os.environ.get("MERGECL_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"real data folder {path} is not here")
    return path


def counts(labels: torch.Tensor) -> Counter:
    return Counter(labels.tolist())


# ------------------------------------------------------------------------------------- real files


def test_mnist_t10k_only_is_split_80_20_stratified_with_val() -> None:
    ds = load_mnist(shared("mnist"), seed=0)
    raw = Counter(read_idx(shared("mnist") / "t10k-labels-idx1-ubyte.gz", 1).tolist())
    assert sum(raw.values()) == 10000
    assert len(ds.train) + len(ds.val) + len(ds.test) == 10000
    assert ds.train.inputs.shape[1:] == (1, 28, 28) and ds.train.inputs.dtype == torch.float32
    assert 0.0 <= float(ds.train.inputs.min()) and float(ds.train.inputs.max()) <= 1.0
    assert ds.class_names == [str(i) for i in range(10)]
    for c, n in raw.items():  # every class keeps its examples, 20% to test, 10% of the rest to val
        assert counts(ds.train.labels)[c] + counts(ds.val.labels)[c] + counts(ds.test.labels)[c] == n
        assert counts(ds.test.labels)[c] == round(0.2 * n)
        assert counts(ds.val.labels)[c] == round(0.1 * (n - round(0.2 * n)))


def test_mnist_split_depends_on_seed_only() -> None:
    a, b, c = (load_mnist(shared("mnist"), seed=s) for s in (3, 3, 4))
    assert torch.equal(a.test.inputs, b.test.inputs) and torch.equal(a.train.labels, b.train.labels)
    assert not torch.equal(a.test.inputs, c.test.inputs)


def test_clinc150_counts_domains_and_names() -> None:
    ds = load_clinc150(shared("clinc150"))
    assert len(ds.class_names) == 150 and ds.train.kind == "text"
    assert "oos" not in ds.class_names and "change accent" in ds.class_names
    assert all("_" not in name for name in ds.class_names)
    assert len(ds.class_groups) == 10 and all(len(g) == 15 for g in ds.class_groups.values())
    assert sorted(c for g in ds.class_groups.values() for c in g) == list(range(150))
    for split, n in ((ds.train, 100), (ds.val, 20), (ds.test, 30)):
        assert counts(split.labels) == {c: n for c in range(150)}
        assert all(isinstance(t, str) and t for t in split.inputs)


def test_banking77_counts_and_seeded_stratified_val() -> None:
    ds = load_banking77(shared("banking77"), seed=0)
    assert len(ds.class_names) == 77 and ds.train.kind == "text"
    assert len(ds.train) + len(ds.val) == 10003 and len(ds.test) == 3080
    assert set(ds.val.labels.tolist()) == set(range(77)) == set(ds.test.labels.tolist())
    assert abs(len(ds.val) - 1000) <= 40  # ~10%, rounded per class
    assert "card arrival" in ds.class_names
    again = load_banking77(shared("banking77"), seed=0)
    assert again.val.inputs == ds.val.inputs
    assert load_banking77(shared("banking77"), seed=1).val.inputs != ds.val.inputs


def test_banking77_multiline_csv_rows_survive(tmp_path: Path) -> None:
    (tmp_path / "categories.json").write_text('["a_b", "c"]')
    body = 'text,category\n"line one\nline two",a_b\nplain,c\nx,c\ny,a_b\n'
    (tmp_path / "train.csv").write_text(body)
    (tmp_path / "test.csv").write_text("text,category\nz,c\n")
    ds = load_banking77(tmp_path, val_fraction=0.0)
    assert ds.train.inputs[0] == "line one\nline two" and ds.class_names == ["a b", "c"]
    (tmp_path / "test.csv").write_text("text,category\nz,unknown_intent\n")
    with pytest.raises(MergeclError, match="test.csv line 2.*unknown_intent"):
        load_banking77(tmp_path)


def test_digits_is_embedded_and_split_60_20_20() -> None:
    ds = load_digits_source(seed=0)
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797
    assert ds.train.inputs.shape[1] == 64 and float(ds.train.inputs.max()) <= 1.0
    assert abs(len(ds.test) - 359) <= 10 and abs(len(ds.val) - 359) <= 10
    assert torch.equal(load_digits_source(seed=0).val.inputs, ds.val.inputs)


# --------------------------------------------------------------------------- IDX files made here


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, compress: bool = True) -> Path:
    magic = magic if magic is not None else (2051 if array.ndim == 3 else 2049)
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def fake_mnist(root: Path, prefix: str, n: int, compress: bool = True) -> np.ndarray:
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, size=(n, 28, 28))
    labels = np.arange(n) % 10
    suffix = ".gz" if compress else ""
    write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, compress=compress)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress=compress)
    return images


def test_mnist_with_train_and_t10k_uses_the_official_split(tmp_path: Path) -> None:
    train_images = fake_mnist(tmp_path, "train", 60, compress=False)  # plain files are read too
    fake_mnist(tmp_path, "t10k", 20)
    ds = load_mnist(tmp_path, seed=0, val_fraction=0.1)
    assert len(ds.test) == 20 and len(ds.train) + len(ds.val) == 60 and len(ds.val) == 10
    first = ds.train.inputs[0, 0]  # some image of the train file, scaled to [0, 1]
    assert any(np.allclose(train_images[i] / 255.0, first.numpy()) for i in range(60))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: write_idx(p, np.zeros((3, 28, 28)), magic=2049), "magic number 2049"),
        (lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-5])), "truncated"),
        (lambda p: p.write_bytes(b"\x1f\x8b not really gzip"), "cannot read IDX"),
        (lambda p: p.write_bytes(b"\x00"), "not an IDX file"),
    ],
)
def test_mnist_bad_files_name_the_file(tmp_path: Path, damage, message: str) -> None:
    fake_mnist(tmp_path, "t10k", 20)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    damage(bad)
    with pytest.raises(MergeclError, match=message) as err:
        load_mnist(tmp_path)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_mnist_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(MergeclError, match=r"mnist.*not found.*prepare\('mnist'"):
        load_mnist(tmp_path)
    fake_mnist(tmp_path, "t10k", 20)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MergeclError, match="t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path)


def test_mnist_label_count_mismatch(tmp_path: Path) -> None:
    fake_mnist(tmp_path, "t10k", 20)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(19))
    with pytest.raises(MergeclError, match="20 images but .* 19 labels"):
        load_mnist(tmp_path)


def test_clinc150_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "domains.json").write_text('{"d": ["a_b"]}')
    with pytest.raises(MergeclError, match="data_full.json"):
        load_clinc150(tmp_path)
    (tmp_path / "data_full.json").write_text('{"train": [["hi", "zzz"]], "val": [], "test": []}')
    with pytest.raises(MergeclError, match="'zzz' is not listed in .*domains.json"):
        load_clinc150(tmp_path)
    (tmp_path / "data_full.json").write_text("{not json")
    with pytest.raises(MergeclError, match="data_full.json is not valid JSON"):
        load_clinc150(tmp_path)


# ------------------------------------------------------------------- the subsets shipped in mergecl


def test_embedded_clinc150_subset_counts_domains_and_licence() -> None:
    ds = get_source("clinc150_mini")
    assert len(ds.class_names) == 150 and list(ds.class_groups)[0] == "banking"
    assert all(len(g) == 15 for g in ds.class_groups.values())
    for split, n in ((ds.train, 20), (ds.val, 5), (ds.test, 10)):
        assert counts(split.labels) == {c: n for c in range(150)}
    assert "Attribution 3.0" in (EMBEDDED / "clinc150" / "LICENSE").read_text()


def test_embedded_banking77_subset_counts_and_licence() -> None:
    ds = get_source("banking77_mini", seed=0)
    assert len(ds.class_names) == 77
    assert counts(ds.test.labels) == {c: 10 for c in range(77)}
    assert counts(ds.train.labels) + counts(ds.val.labels) == {c: 20 for c in range(77)}
    assert "Attribution 4.0" in (EMBEDDED / "banking77" / "LICENSE").read_text()


def test_clinc150_domains_option_keeps_those_domains_in_that_order() -> None:
    full = get_source("clinc150_mini")
    two = get_source("clinc150_mini", domains=["travel", "banking"])
    assert list(two.class_groups) == ["travel", "banking"] and len(two.class_names) == 30
    assert two.class_names[:15] == [full.class_names[c] for c in full.class_groups["travel"]]
    assert counts(two.test.labels) == {c: 10 for c in range(30)}
    travel = set(full.class_groups["travel"])
    assert sorted(t for t, y in zip(two.test.inputs, two.test.labels.tolist(), strict=True) if y < 15) == sorted(
        t for t, y in zip(full.test.inputs, full.test.labels.tolist(), strict=True) if y in travel
    )
    for bad in (["travel", "nope"], ["home", "home"]):  # the loader's check (the names are in the data)
        with pytest.raises(MergeclError, match="clinc150: domains"):
            get_source("clinc150_mini", domains=bad)
    for bad, message in (([], "at least 1 item"), ("travel", "a valid list")):  # the schema's check
        with pytest.raises(MergeclError, match=f"clinc150_mini.domains: .*{message}"):
            get_source("clinc150_mini", domains=bad)


def test_embedded_subsets_are_the_documented_draw_of_the_official_files(tmp_path: Path) -> None:
    """Every shipped utterance is in the same official split, and the script redraws the same bytes."""
    clinc, banking = shared("clinc150"), shared("banking77")
    script = runpy.run_path(str(Path(__file__).resolve().parents[2] / "scripts" / "embedded_data.py"))
    script["main"]([str(clinc), str(banking), str(tmp_path)])
    shipped = sorted(p.relative_to(EMBEDDED) for p in EMBEDDED.rglob("*") if p.is_file() and p.name != "README.md")
    assert shipped == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for path in shipped:
        assert (EMBEDDED / path).read_bytes() == (tmp_path / path).read_bytes(), path
    official, mini = load_clinc150(clinc), get_source("clinc150_mini")
    for part in ("train", "val", "test"):
        pairs = set(zip(getattr(official, part).inputs, getattr(official, part).labels.tolist(), strict=True))
        assert set(zip(getattr(mini, part).inputs, getattr(mini, part).labels.tolist(), strict=True)) <= pairs
