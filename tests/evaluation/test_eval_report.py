"""Report layer: table contents, CSV round trip, the report folder, half-finished runs, atomicity."""

import csv
import re
import struct
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from mergecl import atomic as _io
from mergecl.errors import MergeclError
from mergecl.evaluation.metrics import summarize
from mergecl.evaluation.report import (
    acc_over_tasks_figure,
    figure_bytes,
    format_table,
    heatmap_figure,
    markdown_table,
    parse_formats,
    tradeoff_figure,
    write_csv,
    write_report,
)

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
    figures = ("heatmap_seq_ft", "heatmap_magmax", "acc_over_tasks", "final_acc_vs_bwt")
    assert set(names) == {"report.md", "results.csv"} | {f"{f}.{ext}" for f in figures for ext in ("png", "svg")}
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
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)  # the PNGs
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
    heatmaps = [p.name for p in paths if p.name.startswith("heatmap_") and p.suffix == ".png"]
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


# --- figures a paper can use -------------------------------------------------------------------------

SEED_MATRICES = {  # three seeds of two methods; "twin" equals "magmax" on every seed
    "seq_ft": [
        FULL,
        [[88.0, 97.0, 4.0], [93.0, 87.0, 22.0], [55.0, 72.0, 96.0]],
        [[92.0, 98.0, 6.0], [96.0, 84.0, 18.0], [65.0, 79.0, 94.0]],
    ],
    "magmax": [[[90.0, 0.0, 0.0], [92.0, 88.0, 0.0], [91.0, 86.0, 89.0]]] * 2
    + [[[86.0, 0.0, 0.0], [90.0, 84.0, 0.0], [89.0, 85.0, 83.0]]],
}
LONG_NAMES = ["task1 (classes 0-29)", "task2 (classes 30-59)", "task3 (classes 60-89)"]


def seeded_results():
    from mergecl.evaluation.results import MethodResult, RunMeta, RunResults, SeedSummary

    methods = {}
    for name in ("seq_ft", "magmax", "twin"):
        rows = SEED_MATRICES["magmax" if name == "twin" else name]
        per_seed = {str(seed): SeedSummary.of_rows(matrix) for seed, matrix in enumerate(rows)}
        methods[name] = MethodResult.mean_of(per_seed, {str(seed): 3 for seed in range(3)})
    methods["joint"] = MethodResult.mean_of({"0": SeedSummary.of_final_row([95.0, 94.0, 93.0])}, {"0": 3})
    return RunResults(methods, RunMeta(config="seeded", task_names=LONG_NAMES, num_tasks=3, seeds=[0, 1, 2]))


def _all_text(fig):
    fig.canvas.draw()  # lays out the ticks
    return [t.get_text() for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels()]


def test_every_figure_in_every_format_asked_for(tmp_path):
    paths = write_report(seeded_results(), tmp_path, "png,svg,pdf")
    stems = ["heatmap_seq_ft", "heatmap_magmax", "heatmap_twin", "acc_over_tasks", "final_acc_vs_bwt"]
    names = {p.name for p in paths}
    for stem in stems:
        assert {f"{stem}.png", f"{stem}.svg", f"{stem}.pdf"} <= names
        _assert_real_image(tmp_path / f"{stem}.png", max_px=5000)
        assert (tmp_path / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
    assert not (tmp_path / "heatmap_joint.png").exists()  # final only: no heatmap
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (tmp_path / "report.md").read_text())
    assert sorted(links) == sorted(f"{stem}.png" for stem in stems)  # report.md shows the PNGs


def test_png_is_at_print_resolution(tmp_path):
    from PIL import Image

    write_report(seeded_results(), tmp_path, "png")
    with Image.open(tmp_path / "acc_over_tasks.png") as image:
        dpi = image.info["dpi"]
        assert round(dpi[0]) == 300 and image.size[0] >= 1500  # about 7 inches wide at 300 dpi
    assert not list(tmp_path.glob("*.svg")) and not list(tmp_path.glob("*.pdf"))


def test_svg_is_xml_with_the_method_and_task_names_as_text(tmp_path):
    write_report(seeded_results(), tmp_path, ["svg"])  # PNG comes too: report.md shows it
    assert (tmp_path / "acc_over_tasks.png").is_file()
    for stem, words in [
        ("acc_over_tasks", ["seq_ft", "magmax", "twin"]),
        ("final_acc_vs_bwt", ["seq_ft", "magmax", "twin"]),
        ("heatmap_seq_ft", ["seq_ft", "mean over 3 seeds", *LONG_NAMES]),
    ]:
        root = ET.parse(tmp_path / f"{stem}.svg").getroot()
        assert root.tag.endswith("svg")
        texts = " ".join("".join(el.itertext()) for el in root.iter() if el.tag.endswith("text"))
        for word in words:
            assert word in texts, (stem, word)


def test_svg_and_png_are_the_same_bytes_when_written_again(tmp_path):
    write_report(seeded_results(), tmp_path / "a", "png,svg,pdf")
    write_report(seeded_results(), tmp_path / "b", "png,svg,pdf")
    for name in ("acc_over_tasks.svg", "acc_over_tasks.png", "acc_over_tasks.pdf"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_acc_over_tasks_draws_a_band_per_method_with_several_seeds():
    from matplotlib.collections import PolyCollection

    from mergecl.evaluation.report import _band, _style

    results = seeded_results()
    curves = {"seq_ft": [90.0, 90.0, 76.67], "solo": [80.0, 70.0]}
    band, n = _band(results.methods["seq_ft"], 3)
    assert n == 3 and band.shape == (3,) and band[-1] == pytest.approx(results.methods["seq_ft"].std["final_acc"])
    fig = acc_over_tasks_figure(curves, 3, {"seq_ft": band}, "mean over 3 seeds")
    (ax,) = [a for a in fig.axes if a.get_lines()]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1  # "solo" has one seed: no band
    assert "mean over 3 seeds" in ax.get_title()
    legend = ax.get_legend()
    assert "std" in legend.get_title().get_text()
    assert any("seq_ft (76.7 ± " in t.get_text() for t in legend.get_texts())
    # the band spans mean ± std
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert ys.max() == pytest.approx(max(m + s for m, s in zip(curves["seq_ft"], band, strict=True)))
    # one seed only: no band at all
    fig1 = acc_over_tasks_figure(curves, 3)
    assert not [c for ax in fig1.axes for c in ax.collections if isinstance(c, PolyCollection)]
    assert _style(0) != _style(1)


def test_equal_methods_differ_in_colour_line_style_and_marker():
    results = seeded_results()
    from mergecl.evaluation import metrics

    curves = {n: metrics.incremental_accs(np.array(results.methods[n].matrix)) for n in ("seq_ft", "magmax", "twin")}
    assert curves["magmax"] == curves["twin"]
    fig = acc_over_tasks_figure(curves, 3)
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    magmax = next(v for k, v in lines.items() if k.startswith("magmax"))
    twin = next(v for k, v in lines.items() if k.startswith("twin"))
    assert magmax.get_color() != twin.get_color()
    assert magmax.get_linestyle() != twin.get_linestyle()
    assert magmax.get_marker() != twin.get_marker()
    assert magmax.get_markerfacecolor() == "none"  # hollow: a marker under another still shows


def test_heatmap_says_what_it_averages_and_never_cuts_a_task_name():
    results = seeded_results()
    matrix = np.array(results.methods["seq_ft"].matrix)
    fig = heatmap_figure("seq_ft", matrix, 3, LONG_NAMES, "mean over 3 seeds")
    (ax,) = [a for a in fig.axes if a.get_images()]
    assert "mean over 3 seeds" in ax.get_title()
    labels = _all_text(fig)
    assert not any("…" in label for label in labels)
    for name in LONG_NAMES:  # whole, maybe wrapped over lines
        assert name in [label.replace("\n", " ") for label in labels]


def test_report_heatmap_titles_say_seed_count(tmp_path):
    write_report(seeded_results(), tmp_path, "svg")
    assert "mean over 3 seeds" in (tmp_path / "heatmap_magmax.svg").read_text()
    single = {"methods": {"m": {"accuracy_matrix": FULL, "seeds": None, "coverage": {"7": 3}}}}
    write_report(single, tmp_path / "one", "svg")
    assert "seed 7" in (tmp_path / "one" / "heatmap_m.svg").read_text()


def test_a_run_with_task_orders_says_streams_not_seeds(tmp_path):
    """With data.orders: K the run's seeds are (seed, order) streams: every figure and the report say so."""
    import dataclasses

    results = seeded_results()
    results = dataclasses.replace(results, run=dataclasses.replace(results.run, orders=3))
    assert results.run.unit == "streams" and seeded_results().run.unit == "seeds"
    write_report(results, tmp_path, "svg")
    for figure in ("heatmap_magmax", "acc_over_tasks", "final_acc_vs_bwt"):
        text = (tmp_path / f"{figure}.svg").read_text()
        assert "over 3 streams" in text and "seeds" not in text, figure
    report = (tmp_path / "report.md").read_text()
    assert "std over streams" in report and "std over seeds" not in report


def test_tradeoff_scatter_one_labelled_point_per_method_with_error_bars():
    from matplotlib.container import ErrorbarContainer

    results = seeded_results()
    fig = tradeoff_figure(results)
    (ax,) = fig.axes
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert [c.get_label() for c in bars] == ["seq_ft", "magmax", "twin"]  # joint: final only, no BWT
    for container in bars:
        point, _caps, bar_lines = container.lines
        assert len(point.get_xdata()) == 1 and len(bar_lines) == 2  # one point, bars in x and y
        assert container.has_xerr and container.has_yerr
    seq = results.methods["seq_ft"]
    x, y = bars[0].lines[0].get_xydata()[0]
    assert (x, y) == pytest.approx((seq.bwt, seq.final_acc))
    labels = [t.get_text() for t in ax.texts]
    assert sorted(labels) == ["magmax", "seq_ft", "twin"]
    # equal points: the labels are not on top of each other
    offsets = {t.get_text(): t.xyann for t in ax.texts}
    assert offsets["magmax"] != offsets["twin"]
    assert "std over seeds" in ax.get_title()
    assert not any("…" in label for label in _all_text(fig))


# CLINC150's continual-merging suite (docs/results/continual-merging.md): 15 methods, 12 of them
# within 7 points of each other, where the labels used to pile up
CLUSTER = {
    "zero_shot": (67.44, -3.83), "seq_ft": (71.11, -11.23), "ind_ft": (67.28, -17.96), "magmax": (79.11, 0.56),
    "ind_ft+magmax": (74.89, -5.37), "average": (78.11, 0.86), "ind_ft+average": (72.67, -6.48),
    "task_arithmetic": (28.11, -40.62), "ind_ft+task_arithmetic": (74.78, -4.44), "ties": (77.06, 0.12),
    "ind_ft+ties": (75.22, -4.88), "iso_c": (63.06, -16.36), "ind_ft+iso_c": (78.11, -1.85),
    "opcm": (78.78, -5.31), "ind_ft+opcm": (77.17, -4.07),
}  # fmt: skip


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_tradeoff_labels_never_overlap_and_stay_inside_even_for_a_cluster(fmt):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from mergecl.evaluation.results import MethodResult, RunMeta, RunResults

    methods = {
        name: MethodResult(final_acc=acc, bwt=bwt, std={"final_acc": 1.5, "bwt": 2.5})
        for name, (acc, bwt) in CLUSTER.items()
    }
    fig = tradeoff_figure(RunResults(methods, RunMeta(seeds=[0, 1, 2])))
    figure_bytes(fig, fmt)  # saving draws it again: the layout, and so the labels, must hold
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # at the figure's dpi: the labels' white boxes, measured below, are where they show
    renderer = canvas.get_renderer()
    (ax,) = fig.axes
    frame = ax.get_window_extent(renderer)
    boxes = {t.get_text(): t.get_bbox_patch().get_window_extent(renderer) for t in ax.texts}
    assert sorted(boxes) == sorted(CLUSTER)
    for name, box in boxes.items():
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, name
        for other, box2 in boxes.items():
            if other < name:
                shared = max(0, min(box.x1, box2.x1) - max(box.x0, box2.x0)) * max(
                    0, min(box.y1, box2.y1) - max(box.y0, box2.y0)
                )
                assert shared == 0, (name, other)
    for label in ax.texts:  # a label that stands off its point is joined to it
        if np.hypot(*label.xyann) > 8:
            assert label.arrow_patch is not None, label.get_text()


def test_tradeoff_with_one_seed_has_no_error_bars():
    fig = tradeoff_figure({"methods": {"m": {"accuracy_matrix": FULL}}})
    (ax,) = fig.axes
    (container,) = ax.containers
    assert not container.has_xerr and not container.has_yerr
    assert "no error bars" in ax.get_title()


@pytest.mark.parametrize(
    ("text", "formats"),
    [("png", ("png",)), ("svg", ("png", "svg")), ("PDF, svg", ("png", "svg", "pdf")), (["pdf"], ("png", "pdf"))],
)
def test_parse_formats(text, formats):
    assert parse_formats(text) == formats


@pytest.mark.parametrize("text", ["eps", "", "png,jpg"])
def test_a_bad_format_writes_nothing(tmp_path, text):
    with pytest.raises(MergeclError, match="choose among png, svg, pdf"):
        write_report(results(), tmp_path / "out", text)
    assert not (tmp_path / "out").exists()


def test_cli_report_format(tmp_path, capsys):
    import json

    from mergecl.cli import main

    (tmp_path / "results.json").write_text(json.dumps(seeded_results().to_json()))
    assert main(["report", str(tmp_path), "--format", "png,pdf"]) == 0
    assert (tmp_path / "final_acc_vs_bwt.pdf").is_file() and not (tmp_path / "final_acc_vs_bwt.svg").exists()
    assert "final_acc_vs_bwt.pdf" in capsys.readouterr().out
