"""docs/extending.md '## A data source': the snippet registers a source and runs on it, as a user would."""

from __future__ import annotations

from pathlib import Path

from docs_snippets import run_section

CHECK = r"""
import math
from mergecl.data import SOURCES, get_source, source_names
from mergecl.errors import MergeclError

assert "digit_vectors" in source_names() and SOURCES["digit_vectors"].options is VectorOptions
on_disk = json.loads((out / "results.json").read_text())["methods"]
assert set(on_disk) == {"seq_ft", "magmax"}
for name, entry in on_disk.items():
    final_row = entry["accuracy_matrix"][-1]
    assert len(final_row) == 2 and all(math.isfinite(a) and 0 <= a <= 100 for a in final_row), (name, final_row)
    assert math.isfinite(entry["final_acc"]) and entry["final_acc"] > 10, (name, entry["final_acc"])  # 10: chance
assert on_disk["seq_ft"]["accuracy_matrix"][-1][-1] > 50  # the task just learned is learned

# the same data through get_source: the option reaches the loader, the schema's types and ranges hold
doubled, plain = get_source("digit_vectors", folder, scale=8.0), get_source("digit_vectors", folder)
assert torch.equal(doubled.train.inputs, 2 * plain.train.inputs)
bad = [({"scale": -1.0}, "data.options.scale: Input should be greater than 0, got -1.0"),
       ({"scale": "16"}, "data.options.scale: Input should be a valid number, got '16'"),
       ({"scal": 16.0}, "data.options: unknown option 'scal' (options of digit_vectors: scale)")]
for options, message in bad:
    try:
        parse_config({"data": {"source": "digit_vectors", "root": str(folder), "options": options}}, "run.yaml")
    except MergeclError as err:
        assert str(err) == "run.yaml: " + message, str(err)
    else:
        raise AssertionError(f"{options} was accepted")
try:
    get_source("digit_vectors")
except MergeclError as err:
    assert str(err) == "data source 'digit_vectors' needs a root folder (train.jsonl and test.jsonl)", str(err)
else:
    raise AssertionError("no root was accepted")
print("checked")
"""


def test_a_new_data_source_runs_and_its_options_are_typed(tmp_path: Path) -> None:
    out = run_section("extending.md", "A data source", CHECK, tmp_path, timeout=240)
    assert out.rstrip().endswith("checked")
    assert (tmp_path / "digit-vectors-run" / "results.json").is_file()
