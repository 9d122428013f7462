"""docs/extending.md '## A training method': the example registers a method and runs it, as a user would."""

from docs_snippets import run_section

CHECK = """
import math

from mergecl import MergeclError

methods = results["methods"]
assert set(methods) == {"seq_ft", "l2", "l2@strong"}, methods
for name in ("l2", "l2@strong"):
    matrix = methods[name]["accuracy_matrix"]
    assert len(matrix) == 3 and all(math.isfinite(v) for row in matrix for v in row), (name, matrix)
    assert math.isfinite(methods[name]["final_acc"]) and math.isfinite(methods[name]["bwt"]), name
    assert (out / "seed0" / name / "task2.safetensors").exists(), name  # trained under its own name
# the option reaches the step: a strong pull forgets less than Seq-FT, and differs from the default
assert methods["l2@strong"]["accuracy_matrix"] != methods["l2"]["accuracy_matrix"]
assert methods["l2@strong"]["bwt"] > methods["seq_ft"]["bwt"]
for options in ({"lam": "strong"}, {"lamda": 1.0}):
    try:
        parse_config({**CONFIG, "method_options": {"l2": options}})
    except MergeclError as err:
        print("ERROR:", err)
    else:
        raise AssertionError(f"method_options.l2 {options} was accepted")
"""


def test_the_training_method_example_runs_and_checks_its_options(tmp_path):
    out = run_section("extending.md", "A training method", CHECK, tmp_path)
    errors = [line for line in out.splitlines() if line.startswith("ERROR:")]
    assert errors == [
        "ERROR: config: method_options.l2.lam: Input should be a valid number, got 'strong'",
        "ERROR: config: method_options.l2: unknown option 'lamda' (options: lam)",
    ], out
    assert out.count("final ACC") == 3, out  # the example's table: seq_ft, l2, l2@strong
