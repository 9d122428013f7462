"""The paper data sets on tiny fake copies laid out exactly like the official releases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mergecl.data.orders import PAPER_CLASS_ORDERS, PAPER_DOMAIN_ORDERS
from mergecl.data.sources.images import load_cars, load_cifar100, load_cub200, load_domainnet, load_imagenet_r
from mergecl.errors import MergeclError


def image(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path)
    return str(path)


# -------------------------------------------------------------------------------------- CIFAR-100


def fake_cifar100(root: Path, per_class: int = 2) -> Path:
    """cifar-100-binary/{train,test}.bin + label name files; fine label f has coarse label f // 5."""
    folder = root / "cifar-100-binary"
    folder.mkdir(parents=True)
    (folder / "fine_label_names.txt").write_text("\n".join(f"fine_{i}" for i in range(100)) + "\n\n")
    (folder / "coarse_label_names.txt").write_text("\n".join(f"coarse_{i}" for i in range(20)) + "\n")
    for name, n in (("train.bin", per_class), ("test.bin", 1)):
        records = []
        for k in range(100 * n):
            fine = k % 100
            pixels = np.full(3072, k % 256, dtype=np.uint8)
            pixels[1024:2048] = 7  # green plane: checks the channel layout
            records.append(np.concatenate([[fine // 5, fine], pixels]).astype(np.uint8))
        np.stack(records).tofile(folder / name)
    return folder


def test_cifar100_binary_layout(tmp_path: Path) -> None:
    fake_cifar100(tmp_path)
    ds = load_cifar100(tmp_path)  # the parent of cifar-100-binary/, as the archive unpacks
    assert len(ds.train) == 200 and len(ds.test) == 100 and ds.class_names[3] == "fine 3"
    assert ds.train.inputs.shape == (200, 3, 32, 32) and ds.train.inputs.dtype == torch.float32
    assert ds.train.labels[:3].tolist() == [0, 1, 2]
    assert float(ds.train.inputs[5, 0, 0, 0]) == pytest.approx(5 / 255)
    assert float(ds.train.inputs[5, 1, 31, 31]) == pytest.approx(7 / 255)
    assert ds.class_groups["coarse 2"] == [10, 11, 12, 13, 14] and len(ds.class_groups) == 20
    assert load_cifar100(tmp_path / "cifar-100-binary").class_names == ds.class_names


def test_cifar100_errors(tmp_path: Path) -> None:
    with pytest.raises(MergeclError, match=r"cifar100: train.bin not found.*cifar-100-binary.tar.gz"):
        load_cifar100(tmp_path)
    folder = fake_cifar100(tmp_path)
    (folder / "test.bin").write_bytes(b"\x00" * 3075)
    with pytest.raises(MergeclError, match="test.bin is not a CIFAR-100 binary file"):
        load_cifar100(tmp_path)


# ------------------------------------------------------------------------------------- ImageNet-R

IMR_CLASSES = {"n01443537": "goldfish", "n01694178": "African_chameleon", "n07742313": "Granny_Smith"}
IMR_DOMAINS = ("art", "sketch", "tattoo", "cartoon", "deviantart")


def fake_imagenet_r(root: Path, per_domain: int = 5, readme: bool = True) -> Path:
    folder = root / "imagenet-r"
    for wnid in IMR_CLASSES:
        for domain in IMR_DOMAINS:
            for k in range(per_domain):
                image(folder / wnid / f"{domain}_{k}.jpg")
    if readme:
        lines = ["ImageNet-R classes (wnid, name):"] + [f"{w} {n}" for w, n in IMR_CLASSES.items()]
        (folder / "README.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_imagenet_r_classes_domains_and_seeded_split(tmp_path: Path) -> None:
    fake_imagenet_r(tmp_path)
    ds = load_imagenet_r(tmp_path, seed=0)
    # sorted readable names, case-sensitive (uppercase first), as MagMax's ImageFolder numbers them
    assert ds.class_names == ["African chameleon", "Granny Smith", "goldfish"]
    paper = PAPER_DOMAIN_ORDERS["imagenet_r"]
    assert ds.domain_names == [d for d in paper if d in IMR_DOMAINS]
    assert len(ds.train) == 60 and len(ds.test) == 15  # 80/20 of each (class, rendition) pair
    assert ds.train.kind == "image_path" and ds.val is None
    assert not set(ds.train.inputs) & set(ds.test.inputs)
    for split, domains in ((ds.train, ds.train_domains), (ds.test, ds.test_domains)):
        for path, label, d in zip(split.inputs, split.labels.tolist(), domains.tolist(), strict=True):
            assert Path(path).name.startswith(ds.domain_names[d] + "_")
            assert IMR_CLASSES[Path(path).parent.name].replace("_", " ") == ds.class_names[label]
    again, other = load_imagenet_r(tmp_path, seed=0), load_imagenet_r(tmp_path, seed=1)
    assert again.test.inputs == ds.test.inputs and other.test.inputs != ds.test.inputs


def test_imagenet_r_presplit_layout_and_missing_readme(tmp_path: Path) -> None:
    folder = tmp_path / "imagenet-r"
    image(folder / "train" / "goldfish" / "art_0.jpg")
    image(folder / "train" / "hen" / "toy_0.jpg")
    image(folder / "test" / "hen" / "toy_1.jpg")
    ds = load_imagenet_r(tmp_path)
    assert ds.class_names == ["goldfish", "hen"] and len(ds.train) == 2 and len(ds.test) == 1
    assert ds.domain_names == ["art", "toy"]
    fake_imagenet_r(tmp_path / "bare", readme=False)
    with pytest.warns(UserWarning, match="README.txt is missing"):
        bare = load_imagenet_r(tmp_path / "bare")
    assert bare.class_names == sorted(IMR_CLASSES)


def test_imagenet_r_missing(tmp_path: Path) -> None:
    with pytest.raises(MergeclError, match=r"imagenet_r: .*not found.*imagenet-r.tar"):
        load_imagenet_r(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------- CUB-200


def fake_cub(root: Path) -> Path:
    folder = root / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    (folder / "images").mkdir(parents=True)
    (folder / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    images, split, labels = [], [], []
    for k in range(12):
        c = k % 3
        rel = f"{classes[c]}/{classes[c].split('.')[1]}_{k:04d}_{k}.jpg"
        image(folder / "images" / rel)
        images.append(f"{k + 1} {rel}\n")
        split.append(f"{k + 1} {int(k < 6)}\n")
        labels.append(f"{k + 1} {c + 1}\n")
    (folder / "images.txt").write_text("".join(images))
    (folder / "train_test_split.txt").write_text("".join(split))
    (folder / "image_class_labels.txt").write_text("".join(labels))
    return folder


def test_cub200_official_split(tmp_path: Path) -> None:
    folder = fake_cub(tmp_path)
    ds = load_cub200(tmp_path)
    assert ds.class_names == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    assert len(ds.train) == 6 and len(ds.test) == 6
    assert ds.train.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert all(Path(p).is_file() for p in ds.train.inputs + ds.test.inputs)
    assert Path(ds.train.inputs[1]).parent.name == "002.Laysan_Albatross"
    (folder / "train_test_split.txt").write_text("1 1\n")
    with pytest.raises(MergeclError, match="image 2 has no class label or no train/test flag"):
        load_cub200(folder)


def test_cub200_missing(tmp_path: Path) -> None:
    with pytest.raises(MergeclError, match=r"cub200: images.txt not found.*CUB_200_2011.tgz"):
        load_cub200(tmp_path)


# ---------------------------------------------------------------------------------- Stanford Cars


def write_annotations(path: Path, rows: list[tuple[str, int]]) -> None:
    from scipy.io import savemat

    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    table = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, (fname, cls) in enumerate(rows):
        for f in fields[:4]:
            table[0, i][f] = np.array([[1]], dtype=np.uint16)
        table[0, i]["class"] = np.array([[cls]], dtype=np.uint8)
        table[0, i]["fname"] = np.array([fname])
    savemat(path, {"annotations": table})


def fake_cars(root: Path) -> Path:
    from scipy.io import savemat

    (root / "devkit").mkdir(parents=True)
    names = np.empty((1, 3), dtype=object)
    names[0, :] = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": names})
    train = [(f"{i:05d}.jpg", i % 3 + 1) for i in range(1, 7)]
    test = [(f"{i:05d}.jpg", 3 - i % 3) for i in range(1, 4)]
    write_annotations(root / "devkit" / "cars_train_annos.mat", train)
    write_annotations(root / "cars_test_annos_withlabels.mat", test)
    for fname, _ in train:
        image(root / "cars_train" / fname)
    for fname, _ in test:
        image(root / "cars_test" / fname)
    return root


def test_cars_devkit_layout(tmp_path: Path) -> None:
    fake_cars(tmp_path / "stanford_cars")
    ds = load_cars(tmp_path)
    assert ds.class_names[1] == "Acura RL Sedan 2012" and len(ds.class_names) == 3
    assert ds.train.labels.tolist() == [1, 2, 0, 1, 2, 0]  # .mat classes are 1-based
    assert ds.test.labels.tolist() == [1, 0, 2]
    assert ds.train.inputs[0].endswith("cars_train/00001.jpg") and Path(ds.test.inputs[2]).is_file()
    assert len(PAPER_CLASS_ORDERS["cars"]) == 196


def test_cars_folder_layout_and_errors(tmp_path: Path) -> None:
    for part, n in (("train", 2), ("test", 1)):
        for name in ("Acura RL Sedan 2012", "AM General Hummer SUV 2000"):
            for k in range(n):
                image(tmp_path / "folders" / part / name / f"{k}.jpg")
    ds = load_cars(tmp_path / "folders")
    assert ds.class_names == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    assert len(ds.train) == 4 and len(ds.test) == 2
    with pytest.raises(MergeclError, match=r"cars: devkit/cars_meta.mat not found.*car_devkit.tgz"):
        load_cars(tmp_path / "empty")
    broken = fake_cars(tmp_path / "broken")
    (broken / "devkit" / "cars_train_annos.mat").write_bytes(b"MATLAB nonsense")
    with pytest.raises(MergeclError, match="cars_train_annos.mat"):
        load_cars(broken)


# -------------------------------------------------------------------------------------- DomainNet

DN_CLASSES = {"aircraft_carrier": 0, "airplane": 1, "The_Eiffel_Tower": 310, "zigzag": 344}


def fake_domainnet(root: Path, domains: tuple[str, ...] = ("clipart", "sketch", "real")) -> Path:
    folder = root / "domainnet"
    for domain in domains:
        for part, n in (("train", 3), ("test", 1)):
            lines = []
            for name, label in DN_CLASSES.items():
                for k in range(n):
                    rel = f"{domain}/{name}/{domain}_{label:03d}_{part}{k:06d}.jpg"
                    image(folder / rel)
                    lines.append(f"{rel} {label}\n")
            (folder / f"{domain}_{part}.txt").write_text("".join(lines))
    return folder


def test_domainnet_lists_classes_and_domains(tmp_path: Path) -> None:
    fake_domainnet(tmp_path)
    ds = load_domainnet(tmp_path, domains=["clipart", "sketch", "real"])
    assert ds.class_names == ["The Eiffel Tower", "aircraft carrier", "airplane", "zigzag"]
    assert ds.domain_names == ["clipart", "sketch", "real"]
    assert len(ds.train) == 36 and len(ds.test) == 12
    for path, label, d in zip(ds.train.inputs, ds.train.labels.tolist(), ds.train_domains.tolist(), strict=True):
        parts = Path(path).parts
        assert parts[-3] == ds.domain_names[d] and parts[-2].replace("_", " ") == ds.class_names[label]
    two = load_domainnet(tmp_path / "domainnet", domains=["real", "clipart"])
    assert two.domain_names == ["real", "clipart"] and len(two.train) == 24
    assert two.train_domains[:12].tolist() == [0] * 12


def test_domainnet_errors(tmp_path: Path) -> None:
    folder = fake_domainnet(tmp_path, domains=("clipart",))
    with pytest.raises(MergeclError, match="unknown DomainNet domains"):
        load_domainnet(tmp_path, domains=["cartoon"])
    with pytest.raises(MergeclError, match=r"domainnet: sketch_train.txt not found.*csr.bu.edu"):
        load_domainnet(tmp_path)  # the default (paper) domains include sketch: not in this copy
    first = (folder / "clipart_train.txt").read_text().splitlines()[0].split()[0]
    (folder / first).unlink()
    with pytest.raises(MergeclError, match=r"clipart images \(unzip clipart.zip\)"):
        load_domainnet(tmp_path, domains=["clipart"])
    image(folder / first)
    image(folder / "clipart" / "airplane" / "x.jpg")
    (folder / "clipart_test.txt").write_text("clipart/airplane/x.jpg 5\n")
    with pytest.raises(MergeclError, match="'airplane' has two labels"):
        load_domainnet(tmp_path, domains=["clipart"])
