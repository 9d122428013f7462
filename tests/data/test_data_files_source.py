"""The ``files`` source: your own data from CSV, TSV, JSON lines, Parquet (or a save_to_disk
folder) through YAML alone. Every format and layout, the validation carve, the task column, every
one-line error, the backbone/data-kind check, docs/sources.md, and real data end to end (the
Banking77 subset shipped with mergecl, written to a CSV and read back, then a short run on it)."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from mergecl.data import SOURCES, build_scenario, get_source, source_names
from mergecl.data.scenarios import with_val
from mergecl.errors import MergeclError
from mergecl.experiment.config import parse_config
from mergecl.models.registry import BACKBONES, check_inputs

ROWS = [  # (text, label, split, task)
    ("good morning", "greet", "train", "social"),
    ("hi there", "greet", "train", "social"),
    ("hello, friend", "greet", "train", "social"),
    ("bye now", "leave", "train", "social"),
    ("see you later", "leave", "train", "social"),
    ("farewell", "leave", "train", "social"),
    ("2 + 2", "math", "train", "school"),
    ("what is 3 * 4", "math", "train", "school"),
    ("solve for x", "math", "train", "school"),
    ('the "quoted" word', "spell", "train", "school"),
    ("spell cat", "spell", "train", "school"),
    ("how to spell\nnewline", "spell", "train", "school"),
    ("hey", "greet", "val", "social"),
    ("ciao", "leave", "val", "social"),
    ("1 + 1", "math", "val", "school"),
    ("spell dog", "spell", "val", "school"),
    ("hello again", "greet", "test", "social"),
    ("goodbye", "leave", "test", "social"),
    ("7 - 5", "math", "test", "school"),
    ("spell bird", "spell", "test", "school"),
]
COLUMNS = ("text", "label", "split", "task")


def write_csv(path: Path, rows, columns=COLUMNS, delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows, columns=COLUMNS) -> Path:
    path.write_text("".join(json.dumps(dict(zip(columns, row, strict=True))) + "\n" for row in rows))
    return path


def write_parquet(path: Path, rows, columns=COLUMNS) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({c: [row[i] for row in rows] for i, c in enumerate(columns)}), path)
    return path


def of(split: str) -> list[tuple]:
    return [row for row in ROWS if row[2] == split]


def examples(split) -> list[tuple[str, int]]:
    return list(zip(split.inputs, split.labels.tolist(), strict=True))


def expected(split: str, names=("greet", "leave", "math", "spell")) -> list[tuple[str, int]]:
    return [(text, names.index(label)) for text, label, _, _ in of(split)]


def fails(message: str, *args, **options) -> None:
    """get_source('files', ...) raises exactly this one-line message (a regex)."""
    with pytest.raises(MergeclError) as caught:
        get_source("files", *args, **options)
    text = str(caught.value)
    assert "\n" not in text, text
    assert re.search(message, text), text


# ------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet", ".csv.gz", ".jsonl.gz"])
def test_every_format_reads_the_same_data(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"all{suffix}"
    if suffix.startswith(".csv"):
        write_csv(tmp_path / "plain.csv", ROWS)
    if suffix == ".csv":
        write_csv(path, ROWS)
    elif suffix == ".tsv":
        write_csv(path, ROWS, delimiter="\t")
    elif suffix == ".jsonl":
        write_jsonl(path, ROWS)
    elif suffix == ".json":  # a JSON array of objects
        path.write_text(json.dumps([dict(zip(COLUMNS, row, strict=True)) for row in ROWS], indent=1))
    elif suffix == ".parquet":
        write_parquet(path, ROWS)
    elif suffix == ".csv.gz":
        path.write_bytes(gzip.compress((tmp_path / "plain.csv").read_bytes()))
    else:
        write_jsonl(tmp_path / "plain.jsonl", ROWS)
        path.write_bytes(gzip.compress((tmp_path / "plain.jsonl").read_bytes()))
    ds = get_source("files", path)
    assert ds.class_names == ["greet", "leave", "math", "spell"]
    assert ds.name == "all" and ds.train.kind == "text" and ds.given_tasks == ""
    assert examples(ds.train) == expected("train")  # quotes, commas and newlines inside texts kept
    assert examples(ds.val) == expected("val") and examples(ds.test) == expected("test")


def test_an_explicit_format_overrides_the_suffix_and_a_delimiter_can_be_set(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "data.txt", ROWS, delimiter=";")
    fails(r"data\.txt: unknown format '\.txt' \(known: \.csv, .*\); set format: csv, tsv", path)
    ds = get_source("files", path, format="csv", delimiter=";")
    assert examples(ds.train) == expected("train")


def test_csv_keeps_every_cell_as_text_and_integer_labels_use_label_names(tmp_path: Path) -> None:
    rows = [("007", "0", "train"), ("1e5", "1", "train"), ("true", "2", "train"), ("0.50", "1", "test")]
    path = write_csv(tmp_path / "d.csv", rows, ("text", "label", "split"))
    ds = get_source("files", path)
    assert ds.train.inputs == ["007", "1e5", "true"]  # no type guessing on texts
    assert ds.class_names == ["0", "1", "2"] and ds.train.labels.tolist() == [0, 1, 2]
    named = get_source("files", path, label_names=["zero", "one", "two"])
    assert named.class_names == ["zero", "one", "two"] and named.test.labels.tolist() == [1]
    sparse = write_csv(tmp_path / "s.csv", [("a", "10", "train"), ("b", "9", "train"), ("c", "10", "test")],
                       ("text", "label", "split"))  # fmt: skip
    assert get_source("files", sparse).class_names == ["9", "10"]  # integers sort as numbers


def test_label_names_fix_the_class_order_of_text_labels(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ROWS)
    order = ["spell", "math", "leave", "greet"]
    ds = get_source("files", path, label_names=order)
    assert ds.class_names == order and examples(ds.test) == expected("test", order)
    fails(
        r"label_names: 'extra' has no training rows in .*d\.csv \(column 'label'\)", path, label_names=[*order, "extra"]
    )
    fails(r"d\.csv, row 1 \(line 2\): label 'greet' is not in label_names \(math\)", path, label_names=["math"])


# ------------------------------------------------------------------------------------ layouts


def test_one_file_with_a_split_column_takes_any_case_and_custom_values(tmp_path: Path) -> None:
    rows = [(t, lab, {"train": "TRAIN", "val": "Dev", "test": "test"}[s], k) for t, lab, s, k in ROWS]
    ds = get_source("files", write_csv(tmp_path / "a.csv", rows))
    assert examples(ds.val) == expected("val")
    renamed = [(t, lab, {"train": "fit", "val": "tune", "test": "eval"}[s], k) for t, lab, s, k in ROWS]
    path = write_csv(tmp_path / "b.csv", renamed, ("text", "label", "part", "task"))
    values = {"train": ["fit"], "validation": ["tune"], "test": ["eval"]}
    ds = get_source("files", path, split_column="part", split_values=values)
    assert examples(ds.train) == expected("train") and examples(ds.val) == expected("val")
    fails(r"b\.csv, row 1 \(line 2\): split 'fit' is not one of train, validation, val, valid, dev, test "
          r"\(column 'part'; split_values maps others\)", path, split_column="part")  # fmt: skip


def test_one_file_per_split_named_in_the_options(tmp_path: Path) -> None:
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "fit.jsonl", of("train"))
    write_csv(tmp_path / "parts" / "held out.csv", of("test"))
    ds = get_source("files", tmp_path, train="parts/fit.jsonl", test="parts/held out.csv")
    assert examples(ds.train) == expected("train") and examples(ds.test) == expected("test") and ds.val is None
    write_csv(tmp_path / "v.csv", of("val"))
    ds = get_source("files", tmp_path, train="parts/fit.jsonl", validation="v.csv", test="parts/held out.csv")
    assert examples(ds.val) == expected("val")
    fails(r"files: test: is needed with train:", tmp_path, train="parts/fit.jsonl")
    fails(r"a\.csv is a file: train: name files in a folder", write_csv(tmp_path / "a.csv", ROWS), train="x.csv")


def test_a_folder_with_train_and_test_files(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", of("train"))
    write_csv(tmp_path / "test.csv", of("test"))
    (tmp_path / "notes.txt").write_text("not data")
    ds = get_source("files", tmp_path)
    assert ds.name == tmp_path.name and ds.val is None and examples(ds.test) == expected("test")
    write_jsonl(tmp_path / "val.jsonl", of("val"))  # val, validation, valid or dev; any format
    assert examples(get_source("files", tmp_path).val) == expected("val")
    write_parquet(tmp_path / "train.parquet", of("train"))
    fails(r"2 train files \(train\.csv, train\.parquet\); name one with train:", tmp_path)
    named = get_source("files", tmp_path, train="train.parquet", test="test.csv")  # each file's format: its suffix
    assert examples(named.train) == expected("train")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(r"empty: no train file \(train\.\{\.csv/.*\}\); give train: and test: files, or make root one file", empty)


def test_a_save_to_disk_folder_without_datasets_says_what_to_install(tmp_path: Path) -> None:
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed")
    (tmp_path / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    fails(r"format hf_disk needs the 'datasets' package: pip install 'mergecl\[hub\]'", tmp_path)


def test_a_save_to_disk_folder(tmp_path: Path) -> None:
    hf = pytest.importorskip("datasets")
    features = hf.Features({"text": hf.Value("string"), "label": hf.ClassLabel(names=["neg", "pos", "unused"])})
    parts = {"train": (["a", "b", "c", "d"], [0, 1, 0, 1]), "test": (["e", "f"], [1, 0])}
    data = hf.DatasetDict(
        {k: hf.Dataset.from_dict({"text": t, "label": y}, features=features) for k, (t, y) in parts.items()}
    )
    data.save_to_disk(str(tmp_path / "saved"))
    ds = get_source("files", tmp_path / "saved")
    assert ds.class_names == ["neg", "pos"]  # the ClassLabel's names, those with training rows
    assert examples(ds.train) == [("a", 0), ("b", 1), ("c", 0), ("d", 1)] and examples(ds.test) == [("e", 1), ("f", 0)]


# ------------------------------------------------------------------- validation and task column


def test_a_missing_validation_split_is_carved_stratified_and_seeded(tmp_path: Path) -> None:
    rows = [(f"text {i}", f"c{i % 4}", "train", "t") for i in range(80)] + [("x", "c0", "test", "t")]
    for c in range(1, 4):
        rows.append((f"y{c}", f"c{c}", "test", "t"))
    ds = get_source("files", write_csv(tmp_path / "d.csv", rows))
    assert ds.val is None  # the scenario carves it, with the config's val_fraction

    def carve(seed: int):
        return build_scenario("class", ds, n_tasks=2, seed=seed, val_fraction=0.25)

    first, again, other = carve(0), carve(0), carve(1)
    val = [x for task in first.tasks for x in task.val.inputs]
    assert Counter(label for task in first.tasks for label in task.val.labels.tolist()) == {c: 5 for c in range(4)}
    assert val == [x for task in again.tasks for x in task.val.inputs]  # seeded
    assert set(val) != {x for task in other.tasks for x in task.val.inputs}
    train = {x for task in first.tasks for x in task.train.inputs}
    assert not train & set(val) and len(train) + len(val) == 80
    # the same carve as the project's own (with_val), so every source is carved alike
    assert with_val(ds, 0.25, 0).val.inputs == sorted(val, key=lambda t: int(t.split()[1]))


def test_the_task_column_defines_the_tasks(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ROWS)
    ds = get_source("files", path, task_column="task")
    assert ds.given_tasks == "task column 'task'" and ds.domain_names == ["social", "school"]
    assert ds.class_groups == {"social": [0, 1], "school": [2, 3]}
    for kind in ("class", "task"):
        scenario = build_scenario(kind, ds, n_tasks=None)  # not cut by class: the column's tasks
        assert [t.name for t in scenario.tasks] == ["social", "school"]
        assert [t.classes for t in scenario.tasks] == [[0, 1], [2, 3]]
        assert [sorted(t.test.inputs) for t in scenario.tasks] == [["goodbye", "hello again"], ["7 - 5", "spell bird"]]
        assert [len(t.val) for t in scenario.tasks] == [2, 2]  # the file's own validation rows
    assert [t.name for t in build_scenario("class", ds, n_tasks=2, order="seeded").tasks] == ["social", "school"]
    ordered = get_source("files", path, task_column="task", task_order=["school", "social"])
    assert [t.classes for t in build_scenario("class", ordered, n_tasks=None).tasks] == [[2, 3], [0, 1]]
    with pytest.raises(MergeclError, match=r"the task column 'task' of 'd' makes 2 tasks, but n_tasks is 5 \(leave"):
        build_scenario("class", ds, n_tasks=5)
    # a run config that leaves n_tasks out takes the column's tasks (it once had to say null)
    from mergecl.experiment.runner import run_scenario

    config = parse_config({"data": {"source": "files", "root": str(path), "options": {"task_column": "task"}}})
    assert [t.name for t in run_scenario(config, 0).tasks] == ["social", "school"]
    with pytest.raises(MergeclError, match=r"gives its tasks \(task column 'task'\): order \[0, 1, 2, 3\] does not"):
        build_scenario("class", ds, n_tasks=None, order=[0, 1, 2, 3])
    # a domain-incremental scenario takes the same tasks, over all classes
    domain = build_scenario("domain", ds)
    assert [t.name for t in domain.tasks] == ["social", "school"] and domain.tasks[0].classes == [0, 1, 2, 3]


def test_tasks_that_share_classes_are_domains(tmp_path: Path) -> None:
    rows = [(f"{year} text {i}", f"c{i % 2}", s, str(year)) for year in (2021, 2020) for i in range(8)
            for s in ("train", "test")]  # fmt: skip
    ds = get_source("files", write_jsonl(tmp_path / "years.jsonl", rows), task_column="task")
    assert ds.class_groups == {} and ds.domain_names == ["2021", "2020"]
    with pytest.raises(MergeclError, match=r"class 'c0' is in tasks '2021' and '2020' \(task column 'task'\); "
                       r"class-incremental tasks have disjoint classes \(scenario: domain takes"):  # fmt: skip
        build_scenario("class", ds, n_tasks=None)
    scenario = build_scenario("domain", ds, seed=3)
    assert [t.name for t in scenario.tasks] == ["2021", "2020"]
    for task in scenario.tasks:  # the carve is stratified by (task, class): every task keeps every class
        assert all(x.startswith(task.name) for x in [*task.train.inputs, *task.val.inputs, *task.test.inputs])
        assert sorted(set(task.val.labels.tolist())) == [0, 1]


def test_image_paths_relative_to_the_file(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    (tmp_path / "pics" / "cats").mkdir(parents=True)
    rows = []
    for i in range(6):
        name = f"pics/cats/{i}.png"
        image.new("RGB", (12, 10), (40 * i, 0, 0)).save(tmp_path / name)
        rows.append((name, "dark" if i < 3 else "red", "test" if i in (2, 5) else "train"))
    path = write_csv(tmp_path / "images.csv", rows, ("file", "label", "split"))
    ds = get_source("files", path, image_column="file")
    assert ds.train.kind == "image_path" and ds.class_names == ["dark", "red"]
    assert ds.train.inputs == [str(tmp_path / f"pics/cats/{i}.png") for i in (0, 1, 3, 4)]
    from mergecl.models.images import IMAGENET_MEAN, IMAGENET_STD, ImagePreparer  # what image backbones do

    batch = ImagePreparer(8, IMAGENET_MEAN, IMAGENET_STD)(ds.test.inputs, False)
    assert batch.shape == (2, 3, 8, 8)
    (tmp_path / "pics" / "cats" / "4.png").unlink()
    fails(r"images\.csv, row 5 \(line 6\): image 'pics/cats/4\.png' not found \(at .*4\.png\)", path,
          image_column="file")  # fmt: skip


# ------------------------------------------------------------------------------------- errors


def test_a_missing_column(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", [r[:2] for r in of("train")], ("text", "label"))
    write_csv(tmp_path / "test.csv", [r[:2] for r in of("test")], ("text", "label"))
    with pytest.raises(MergeclError) as caught:
        get_source("files", tmp_path, text_column="txt")
    assert str(caught.value) == f"{tmp_path / 'train.csv'}: no column 'txt' (text_column; columns: text, label)"
    fails(r"train\.csv: no column 'task' \(task_column; columns: text, label\)", tmp_path, task_column="task")
    fails(r"all\.jsonl: no column 'y' \(label_column; columns: text, label, split, task\)",
          write_jsonl(tmp_path / "all.jsonl", ROWS), label_column="y")  # fmt: skip
    fails(r"one\.csv: no column 'split' \(split_column; columns: text, label\)",
          write_csv(tmp_path / "one.csv", [r[:2] for r in ROWS], ("text", "label")))  # fmt: skip


def test_an_empty_label_names_its_row(tmp_path: Path) -> None:
    rows = [(f"text {i}", "a" if i % 2 else "b", "train", "t") for i in range(20)] + [("t", "a", "test", "t")]
    rows[16] = ("text 16", "  ", "train", "t")
    fails(r"^.*d\.csv, row 17 \(line 18\): empty value in column 'label'$", write_csv(tmp_path / "d.csv", rows))
    rows[16] = ("text 16", None, "train", "t")
    fails(r"d\.jsonl, row 17 \(line 17\): empty value in column 'label'", write_jsonl(tmp_path / "d.jsonl", rows))
    rows[16] = ("", "a", "train", "t")
    fails(r"d\.csv, row 17 \(line 18\): empty value in column 'text'", write_csv(tmp_path / "d.csv", rows))


def test_a_test_label_never_seen_in_train(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", of("train"))
    write_csv(tmp_path / "test.csv", [*of("test"), ("huh", "unknown", "test", "social")])
    fails(r"test\.csv, row 5 \(line 6\): label 'unknown' is not a label of the training rows "
          r"\(greet, leave, math, spell\)", tmp_path)  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe\x00bad", r"bad\.csv: not utf-8 text \(byte 0\); set encoding"),
        (b'text,label,split\n"open quote,a,train\n', r"bad\.csv, line 2: not valid CSV \(unexpected end of data\)"),
        (b"text,label,split\na,b,train,extra\n", r"bad\.csv, row 1 \(line 2\): 4 fields, the header has 3 \(is a text"),
        (b"", r"bad\.csv: empty file \(no header row\)"),
        (b"text,text,label\n", r"bad\.csv: column 'text' appears twice in the header"),
    ],
)
def test_an_unreadable_csv(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    fails(message, path)


def test_unreadable_json_and_parquet_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "x", "split": "train"}\n{"text": \n')
    fails(r"bad\.jsonl, line 2: not valid JSON \(Expecting value\)", tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text('{"text": "a"}\n["a", "x"]\n')
    fails(r"list\.jsonl, line 2: expected a JSON object of columns, got list", tmp_path / "list.jsonl")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    pytest.importorskip("pyarrow")
    fails(r"bad\.parquet: not a readable Parquet file \(", tmp_path / "bad.parquet")
    fails(r"nowhere\.csv: no such file or folder", tmp_path / "nowhere.csv")
    fails(r"gone\.csv: no such file", tmp_path, train="gone.csv", test="gone.csv")
    (tmp_path / "labels.jsonl").write_text(
        "".join(json.dumps({"text": "t", "label": v, "split": s}) + "\n" for v, s in (("a", "train"), (1, "test")))
    )
    fails(r"column 'label' mixes text and integer labels: 'a' at .*row 1 .*, 1 at .*row 2", tmp_path / "labels.jsonl")


def test_unknown_options_and_formats_fail_when_the_config_is_read(tmp_path: Path) -> None:
    def config(**options):
        return parse_config({"data": {"source": "files", "root": str(tmp_path), "options": options}}, "run.yaml")

    with pytest.raises(MergeclError, match=r"^run\.yaml: data\.options\.format: Input should be 'auto', 'csv', "):
        config(format="xlsx")
    with pytest.raises(MergeclError, match=r"^run\.yaml: data\.options: unknown option 'text_col' \(options of files"):
        config(text_col="x")
    with pytest.raises(MergeclError, match=r"data source 'files' needs a root folder \(root: one file with a split"):
        get_source("files")
    fails(r"files: unknown encoding 'utf-9'", write_csv(tmp_path / "d.csv", ROWS), encoding="utf-9")


# ---------------------------------------------------------------------------- backbones and data kinds


def test_every_backbone_takes_the_data_kind_or_says_it_cannot() -> None:
    builtin = {n: b for n, b in BACKBONES.items() if b.build.__module__.startswith("mergecl.")}
    assert all(b.kinds for b in builtin.values()), [n for n, b in builtin.items() if not b.kinds]
    check_inputs({"name": "hf_text"}, "text", "files")
    check_inputs({"name": "hf_clip", "pretrained": "x"}, "image_path", "files")
    check_inputs({"name": "cnn"}, "tensor", "digits")
    cases = [
        ({"name": "cnn"}, "text", "model.name: cnn takes tensors, but data source 'files' gives text; "
         "backbones for text: hf_text"),
        ({"name": "mlp", "in_dim": 64}, "image_path", "model.name: mlp takes tensors, but data source 'files' gives "
         "image files; backbones for image files: "),
        ({"name": "hf_text"}, "image_path", "model.name: hf_text takes text, but data source 'files' gives image "
         "files; backbones for image files: "),
        ({"name": "resnet_cifar"}, "text", "model.name: resnet_cifar takes tensors or image files, but data source "
         "'files' gives text; backbones for text: hf_text"),
    ]  # fmt: skip
    for spec, kind, message in cases:
        with pytest.raises(MergeclError) as caught:
            check_inputs(spec, kind, "files")
        assert str(caught.value).startswith(message), str(caught.value)
    assert "resnet_cifar" in str(pytest.raises(MergeclError, check_inputs, {"name": "cnn"}, "image_path", "x").value)


def test_a_run_with_a_backbone_that_cannot_take_the_data_stops_before_any_model(tmp_path: Path) -> None:
    from mergecl.experiment.runner import run

    config = parse_config(
        {
            "data": {"source": "files", "root": str(write_csv(tmp_path / "d.csv", ROWS)), "n_tasks": 2},
            "model": {"name": "cnn"},
        }
    )
    with pytest.raises(MergeclError, match=r"^model\.name: cnn takes tensors, but data source 'files' gives text"):
        run(config, out=tmp_path / "run", report=False, echo=lambda m: None)
    assert not list((tmp_path / "run").glob("seed*/**/*.safetensors"))


# ------------------------------------------------------------------------------- docs/sources.md

DOCS = Path(__file__).resolve().parents[2] / "docs" / "sources.md"


def test_docs_list_every_source_with_its_options_and_a_valid_example() -> None:
    text = DOCS.read_text()
    sections = dict(re.findall(r"^### `?([\w.-]+)`?\n(.*?)(?=^### |\Z)", text, flags=re.M | re.S))
    builtin = [n for n in source_names() if SOURCES[n].loader.__module__.startswith("mergecl.data.sources")]
    assert builtin and set(builtin) <= set(sections), set(builtin) - set(sections)
    for name in builtin:
        for option in SOURCES[name].options.model_fields:
            assert f"`{option}`" in sections[name], (name, option)
        blocks = re.findall(r"```yaml\n(.*?)```", sections[name], flags=re.S)
        assert blocks, f"no example for {name}"
        for block in blocks:
            data = yaml.safe_load(block)
            parse_config(data if "data" in data else {"data": data}, f"docs/sources.md ({name})")


def test_the_docs_examples_are_complete_configs_that_read_their_files(tmp_path: Path, monkeypatch) -> None:
    text = DOCS.read_text()
    section = text[text.index("### `files`") :]
    configs = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, flags=re.S)]
    full = [c for c in configs if {"name", "data", "model", "methods"} <= set(c)]
    assert {Path(c["data"]["root"]).suffix for c in full} >= {".csv", ".jsonl"}
    monkeypatch.chdir(tmp_path)
    for config in full:
        root = Path(config["data"]["root"])
        options = config["data"].get("options", {})
        columns = ("text", "label", options.get("split_column", "split"), options.get("task_column", "task"))
        (write_jsonl if root.suffix == ".jsonl" else write_csv)(root, ROWS, columns)
        parsed = parse_config(config, "docs")
        ds = get_source("files", parsed.data.root, **parsed.data.options)
        scenario = build_scenario(parsed.data.scenario, ds, parsed.data.n_tasks, parsed.data.order)
        assert len(scenario.tasks) == 2


# ----------------------------------------------------------------------------- real data, end to end


def banking_csv(path: Path, classes: int | None = None, integer_labels: bool = False) -> tuple[Path, object]:
    """The Banking77 subset shipped with mergecl (through get_source) written as one CSV."""
    real = get_source("banking77_mini", seed=0)
    keep = range(classes if classes is not None else len(real.class_names))
    rows = []
    for split, part in (("train", real.train), ("validation", real.val), ("test", real.test)):
        for text, label in zip(part.inputs, part.labels.tolist(), strict=True):
            if label in keep:
                rows.append((text, label if integer_labels else real.class_names[label], split))
    return write_csv(path, rows, ("text", "label", "split")), real


def test_real_banking77_through_a_csv_gives_the_same_texts_and_labels(tmp_path: Path) -> None:
    path, real = banking_csv(tmp_path / "banking.csv")
    ds = get_source("files", path)
    assert len(ds.class_names) == 77 and sorted(real.class_names) == ds.class_names
    for mine, theirs in ((ds.train, real.train), (ds.val, real.val), (ds.test, real.test)):
        assert mine.inputs == theirs.inputs
        assert [ds.class_names[y] for y in mine.labels.tolist()] == [
            real.class_names[y] for y in theirs.labels.tolist()
        ]
    path, _ = banking_csv(tmp_path / "ids.csv", integer_labels=True)
    same = get_source("files", path, label_names=real.class_names)  # integer labels: identical class ids
    assert same.class_names == real.class_names
    assert torch.equal(same.test.labels, real.test.labels) and same.test.inputs == real.test.inputs


def test_a_class_incremental_run_on_real_data_from_a_csv(tmp_path: Path) -> None:
    from mergecl.experiment.runner import run

    path, _ = banking_csv(tmp_path / "banking12.csv", classes=12)
    config = parse_config(
        {
            "name": "files-banking",
            "seeds": [0],
            "data": {
                "source": "files",
                "root": str(path),
                "scenario": "class",
                "n_tasks": 2,
                "train_per_class": 2,
                "eval_per_class": 5,
            },
            "model": {"name": "hf_text"},
            "train": {"epochs": 1, "lr": 3.0e-4, "batch_size": 8, "eval_batch_size": 64},
            "methods": ["seq_ft", "magmax"],
            "method_options": {"magmax": {"lam": 0.5}},
        }
    )
    results, out = run(config, out=tmp_path / "run", report=False, echo=lambda m: None)
    assert results["run"]["task_names"][0].startswith("task1 (classes ")
    for name in ("seq_ft", "magmax"):
        entry = results["methods"][name]
        row = entry["accuracy_matrix"][-1]
        assert len(row) == 2 and all(math.isfinite(a) for a in row), (name, row)
        assert math.isfinite(entry["final_acc"]) and entry["final_acc"] > 100 / 12 * 2, (name, entry["final_acc"])


def test_test_fraction_carves_a_seeded_stratified_test_split_from_a_file_without_a_split_column(tmp_path):
    rows = [{"text": f"example {i}", "label": "abc"[i % 3]} for i in range(30)]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(MergeclError, match="no column 'split'"):
        get_source("files", root=plain)  # without test_fraction the split column is required
    first = get_source("files", root=plain, test_fraction=0.2)
    again = get_source("files", root=plain, test_fraction=0.2)
    assert Counter(first.test.labels.tolist()) == {0: 2, 1: 2, 2: 2}  # a fifth of each label
    assert len(first.train) == 24 and list(first.test.inputs) == list(again.test.inputs)
    assert not set(first.test.inputs) & set(first.train.inputs)
    split = tmp_path / "split.jsonl"  # a file with the column keeps its own split
    split.write_text(
        "".join(json.dumps({**row, "split": "test" if i < 3 else "train"}) + "\n" for i, row in enumerate(rows))
    )
    own = get_source("files", root=split, test_fraction=0.2)
    assert list(own.test.inputs) == ["example 0", "example 1", "example 2"]
    with pytest.raises(MergeclError, match="test_fraction"):
        parse_config({"data": {"source": "files", "root": str(plain), "options": {"test_fraction": 1.5}}})
