"""Report layer: table contents, CSV round trip, the report folder, half-finished runs, atomicity."""

import csv
import re
import struct

import numpy as np
import pytest

from mergecl import atomic as _io
from mergecl.errors import MergeclError
from mergecl.evaluation.metrics import summarize
from mergecl.evaluation.report import format_table, markdown_table, write_csv, write_report

FULL = [[90.0, 99.0, 5.0], [95.0, 85.0, 20.0], [60.0, 75.0, 95.0]]  # final 76.67, BWT -20, forgetting 22.5
HALF = [[90.0, 30.0, 25.0], [95.0, 85.0, 40.0]]  # 2 of 3 steps: final 90, BWT +5, forgetting -5
HEADERS = ["method", "tasks", "final ACC", "avg inc ACC", "BWT", "forgetting", "all-class ACC", "time"]


def results():
    return {
        "run": {"config": "toy-config", "scenario": "class-incremental", "task_names": ["a", "b", "c"]},
        "methods": {
            "seq_ft": {
                **summarize(FULL, all_class_acc=40.2),
                "wall_time_s": 125.3,
                "seeds": {"0": {}, "1": {}, "2": {}},
                "std": {"final_acc": 1.234, "bwt": 0.5},
            },
            # Only the matrix so far: metrics are derived from it.
            "magmax": {"accuracy_matrix": HALF, "wall_time_s": 4000.0},
            # Reference row without a matrix.
            "joint": {"final_acc": 95.0, "all_class_acc": 93.1},
        },
    }


def _table_cells(line):
    return re.split(r"\s{2,}", line.strip())


# --- plain-text table -------------------------------------------------------------------------------


def test_format_table_contents():
    lines = format_table(results()).rstrip("\n").split("\n")
    assert len(lines) == 2 + 3
    assert _table_cells(lines[0]) == HEADERS
    assert set(lines[1]) == {"-", " "}
    rows = {cells[0]: cells for cells in map(_table_cells, lines[2:])}
    assert rows["seq_ft"] == [
        "seq_ft",
        "3/3",
        "76.67 ± 1.23",
        "85.56",
        "-20.00 ± 0.50",
        "22.50",
        "40.20",
        "2m05s",
    ]
    assert rows["magmax"] == ["magmax", "2/3", "90.00", "90.00", "5.00", "-5.00", "-", "1h07m"]
    assert rows["joint"] == ["joint", "-", "95.00", "-", "-", "-", "93.10", "-"]


def test_format_table_is_fixed_width_and_right_aligned():
    lines = format_table(results()).rstrip("\n").split("\n")
    assert len({len(line) for line in lines}) == 1
    # Every column ends at the same offset on every line (right-aligned numbers).
    dash_ends = [m.end() for m in re.finditer(r"-+", lines[1])]
    for line in lines[2:]:
        for end in dash_ends[1:]:
            assert line[end - 1] != " "


def test_explicit_none_is_shown_as_missing_not_recomputed():
    res = {"methods": {"m": {"accuracy_matrix": FULL, "bwt": None}}}
    cells = _table_cells(format_table(res).split("\n")[2])
    assert cells[HEADERS.index("BWT")] == "-"
    assert cells[HEADERS.index("forgetting")] == "22.50"  # absent: derived from the matrix


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.04, "0.0s"),
        (59.94, "59.9s"),
        (59.97, "1m00s"),
        (61.0, "1m01s"),
        (3599.6, "1h00m"),
        (7384.0, "2h03m"),
    ],
)
def test_time_column_units(seconds, shown):
    res = {"methods": {"m": {"final_acc": 1.0, "wall_time_s": seconds}}}
    assert _table_cells(format_table(res).split("\n")[2])[-1] == shown


def test_std_of_time_uses_the_same_units():
    res = {"methods": {"m": {"wall_time_s": 130.0, "std": {"wall_time_s": 4.0}}}}
    assert _table_cells(format_table(res).split("\n")[2])[-1] == "2m10s ± 4.0s"


def test_empty_methods_gives_header_only():
    lines = format_table({"methods": {}}).rstrip("\n").split("\n")
    assert len(lines) == 2 and _table_cells(lines[0]) == HEADERS


# --- markdown and CSV --------------------------------------------------------------------------------


def test_markdown_table_contents():
    res = results()
    res["methods"]["a|b"] = {"final_acc": 1.0}
    lines = markdown_table(res).rstrip("\n").split("\n")
    assert len(lines) == 2 + 4
    assert lines[0] == "| " + " | ".join(HEADERS) + " |"
    assert lines[1] == "|:---|" + "---:|" * (len(HEADERS) - 1)
    assert lines[2] == "| seq_ft | 3/3 | 76.67 ± 1.23 | 85.56 | -20.00 ± 0.50 | 22.50 | 40.20 | 2m05s |"
    assert lines[4] == "| joint | - | 95.00 | - | - | - | 93.10 | - |"
    assert lines[5].startswith("| a\\|b | ")  # a pipe in a name must not open a new column
    for line in lines:
        assert len(re.split(r"(?<!\\)\|", line)) == len(HEADERS) + 2


def test_csv_round_trip_at_full_precision(tmp_path):
    res = results()
    path = write_csv(res, tmp_path / "out" / "results.csv")
    with open(path, newline="") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["seq_ft", "magmax", "joint"]
    seq = rows["seq_ft"]
    assert float(seq["final_acc"]) == res["methods"]["seq_ft"]["final_acc"]  # exact, not rounded
    assert float(seq["final_acc_std"]) == 1.234
    assert float(seq["forgetting"]) == 22.5 and seq["forgetting_std"] == ""
    assert (seq["steps_done"], seq["num_tasks"], seq["n_seeds"]) == ("3", "3", "3")
    assert rows["magmax"]["steps_done"] == "2" and rows["magmax"]["all_class_acc"] == ""
    assert float(rows["magmax"]["bwt"]) == 5.0
    assert rows["joint"]["steps_done"] == "" and float(rows["joint"]["all_class_acc"]) == 93.1


# --- the report folder -------------------------------------------------------------------------------


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _assert_real_image(path, min_px=300, max_px=4000):
    from matplotlib.image import imread

    width, height = _png_size(path)
    assert min_px <= width <= max_px and min_px <= height <= max_px, (path.name, width, height)
    pixels = imread(path)  # full decode: catches a truncated or corrupt file
    assert pixels.shape[:2] == (height, width)
    assert float(np.std(pixels)) > 0.05  # not a blank canvas


def test_write_report_files(tmp_path):
    out = tmp_path / "runs" / "r1" / "report"
    paths = write_report(results(), out)
    names = [p.name for p in paths]
    assert names[0] == "report.md"
    assert set(names) == {
        "report.md",
        "results.csv",
        "heatmap_seq_ft.png",
        "heatmap_magmax.png",
        "acc_over_tasks.png",
    }
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # nothing else: no temp files
    for path in paths:
        assert path.is_file() and path.stat().st_size > 0
        if path.suffix == ".png":
            _assert_real_image(path)

    report = (out / "report.md").read_text()
    assert report.startswith("# mergecl report: toy-config\n")
    assert "- **scenario**: class-incremental" in report
    assert "| seq_ft | 3/3 | 76.67 ± 1.23 |" in report
    assert "| joint | - | 95.00 |" in report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert sorted(links) == sorted(n for n in names if n.endswith(".png"))
    assert all((out / link).is_file() for link in links)
    assert "| c | 60.00 | 75.00 | 95.00 |" in report  # the matrix as text, rows labelled by task name


def test_heatmap_size_grows_with_the_number_of_tasks(tmp_path):
    small = {"methods": {"m": {"accuracy_matrix": [[50.0]]}}}
    big = {"methods": {"m": {"accuracy_matrix": np.full((12, 12), 50.0).tolist()}}}
    write_report(small, tmp_path / "small")
    write_report(big, tmp_path / "big")
    small_w, _ = _png_size(tmp_path / "small" / "heatmap_m.png")
    big_w, _ = _png_size(tmp_path / "big" / "heatmap_m.png")
    assert big_w > small_w


def test_half_finished_run_with_a_single_step(tmp_path):
    res = {"run": {"num_tasks": 5}, "methods": {"magmax": {"accuracy_matrix": [[88.0, 10.0, 5.0, 1.0, 0.0]]}}}
    cells = _table_cells(format_table(res).split("\n")[2])
    assert cells == ["magmax", "1/5", "88.00", "88.00", "-", "-", "-", "-"]
    paths = write_report(res, tmp_path)
    for path in paths:
        if path.suffix == ".png":
            _assert_real_image(path)
    assert "| magmax | 1/5 | 88.00 |" in (tmp_path / "report.md").read_text()


def test_odd_method_names_get_distinct_safe_file_names(tmp_path):
    matrix = [[50.0]]
    res = {"methods": {name: {"accuracy_matrix": matrix} for name in ["a/b", "a b", "Seq", "seq", "../x", "λ"]}}
    paths = write_report(res, tmp_path)
    heatmaps = [p.name for p in paths if p.name.startswith("heatmap_")]
    assert len(heatmaps) == 6 and len({h.lower() for h in heatmaps}) == 6
    assert all(re.fullmatch(r"heatmap_[A-Za-z0-9._-]+\.png", h) for h in heatmaps)
    assert all(p.parent == tmp_path for p in paths)


def test_rewriting_a_report_replaces_it_cleanly(tmp_path):
    write_report(results(), tmp_path)
    res = results()
    res["methods"]["seq_ft"]["final_acc"] = 12.5
    write_report(res, tmp_path)
    assert "| seq_ft | 3/3 | 12.50 ± 1.23 |" in (tmp_path / "report.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_a_failure_midway_leaves_no_temp_file_and_no_report_md(tmp_path, monkeypatch):
    real_replace = _io.os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(_io.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk full"):
        write_report(results(), tmp_path)
    names = [p.name for p in tmp_path.iterdir()]
    assert names == ["heatmap_seq_ft.png"]  # the first file only; report.md is written last


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("res", "message"),
    [
        ([], "expected a dict"),
        ({}, "'methods' must be a dict"),
        ({"methods": {"m": 3}}, "method 'm' must map to a dict"),
        ({"methods": {"m": {"final_acc": "high"}}}, "methods.m.final_acc must be a number"),
        ({"methods": {"m": {"std": {"bwt": "x"}}}}, "methods.m.std.bwt must be a number"),
        (
            {"methods": {"m": {"accuracy_matrix": [[1.0], [2.0]]}}},
            r"method 'm': accuracy matrix: entry A\[1\]\[1\]",
        ),
        ({"run": [1], "methods": {}}, "'run' must be a dict"),
    ],
)
def test_bad_results_raise_one_clear_error_and_write_nothing(tmp_path, res, message):
    with pytest.raises(MergeclError, match=message):
        write_report(res, tmp_path / "out")
    assert not (tmp_path / "out").exists()
