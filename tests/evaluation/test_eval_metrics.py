"""Hand-computed values of the metrics, edge cases and input validation."""

import json
import math

import numpy as np
import pytest

from mergecl.errors import MergeclError
from mergecl.evaluation.metrics import (
    as_accuracy_matrix,
    avg_incremental_acc,
    bwt,
    final_acc,
    forgetting,
    incremental_accs,
    summarize,
)

# Task 0 improves after task 1 (95 > 90) and is then forgotten; task 1 has a high zero-shot score
# before it is trained (A[0][1] = 99), which must NOT count as forgettable knowledge.
A = [
    [90.0, 99.0, 5.0],
    [95.0, 85.0, 20.0],
    [60.0, 75.0, 95.0],
]


def test_incremental_accs_by_hand():
    assert incremental_accs(A) == pytest.approx([90.0, (95 + 85) / 2, (60 + 75 + 95) / 3])


def test_final_and_average_incremental_acc_by_hand():
    assert final_acc(A) == pytest.approx(230 / 3)
    assert avg_incremental_acc(A) == pytest.approx((90 + 90 + 230 / 3) / 3)


def test_bwt_by_hand():
    # ((60 - 90) + (75 - 85)) / 2
    assert bwt(A) == pytest.approx(-20.0)


def test_forgetting_by_hand_max_starts_at_the_task_itself():
    # task 0: max(90 - 60, 95 - 60) = 35; task 1: only t = 1 counts: 85 - 75 = 10 (not 99 - 75 = 24)
    assert forgetting(A) == pytest.approx((35 + 10) / 2)


def test_forgetting_can_be_negative_with_positive_backward_transfer():
    improving = [[50.0, 0.0], [70.0, 80.0]]
    assert bwt(improving) == pytest.approx(20.0)
    assert forgetting(improving) == pytest.approx(-20.0)


def test_single_row_bwt_and_forgetting_are_none():
    one = [[88.0, 1.0, 2.0]]
    assert final_acc(one) == 88.0
    assert avg_incremental_acc(one) == 88.0
    assert incremental_accs(one) == [88.0]
    assert bwt(one) is None
    assert forgetting(one) is None


def test_half_finished_run_uses_tasks_seen_so_far():
    half = A[:2]
    assert final_acc(half) == pytest.approx(90.0)  # mean(95, 85): task 2 is not seen yet
    assert bwt(half) == pytest.approx(95.0 - 90.0)
    assert forgetting(half) == pytest.approx(90.0 - 95.0)
    assert incremental_accs(half) == incremental_accs(A)[:2]


def test_lower_triangular_rows_none_nan_and_numpy_all_agree():
    ragged = [[90.0], [95.0, 85.0], [60.0, 75.0, 95.0]]
    with_none = [[90.0, None, None], [95.0, 85.0, None], [60.0, 75.0, 95.0]]
    with_nan = np.array(with_none, dtype=float)
    expected = summarize(A)
    as_objects = np.array(with_none, dtype=object)
    for variant in (ragged, with_none, with_nan, as_objects, np.array(A), [np.array(r) for r in ragged]):
        got = summarize(variant)
        for key in ("final_acc", "avg_incremental_acc", "bwt", "forgetting"):
            assert got[key] == pytest.approx(expected[key]), (key, variant)


def test_results_are_plain_python_floats():
    values = [final_acc(np.array(A)), avg_incremental_acc(A), bwt(A), forgetting(A), *incremental_accs(A)]
    assert all(type(v) is float for v in values)


def test_summarize_keys_and_json_ready():
    s = summarize([[80.0, None], [70.0, 90.0]], all_class_acc=np.float32(66.5))
    assert list(s) == [
        "accuracy_matrix",
        "final_acc",
        "avg_incremental_acc",
        "bwt",
        "forgetting",
        "all_class_acc",
    ]
    assert s["accuracy_matrix"] == [[80.0, None], [70.0, 90.0]]  # NaN/None become None, not NaN
    assert s["final_acc"] == 80.0
    assert s["avg_incremental_acc"] == 80.0
    assert s["bwt"] == -10.0
    assert s["forgetting"] == 10.0
    assert s["all_class_acc"] == 66.5
    json.loads(json.dumps(s, allow_nan=False))  # strict JSON: no NaN anywhere


def test_summarize_single_row_and_no_all_class_acc():
    s = summarize([[42.0]])
    assert s["bwt"] is None and s["forgetting"] is None and s["all_class_acc"] is None


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        ([], "empty"),
        (np.zeros((0, 3)), "empty"),
        (np.zeros(3), "2 dimensions"),
        ("abc", "list of rows"),
        ([[1.0], [2.0]], "A[1][1]"),  # row 1 lacks task 1
        ([[1.0, 2.0], [3.0, None]], "A[1][1]"),
        ([[math.nan]], "A[0][0]"),
        ([[1.0, 0.0], [math.inf, 2.0]], "A[1][0]"),
        ([[1.0], [2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], "A[3][3]"),  # more rows than tasks
        (np.zeros((3, 2)), "3 rows but only 2 tasks"),
        ([["x"]], "not a number"),
        (np.array([[1.0, None], [2.0, None]], dtype=object), "A[1][1]"),
        ([5.0], "row 0"),
    ],
)
def test_invalid_matrices_raise_one_clear_error(matrix, message):
    with pytest.raises(MergeclError, match=message.replace("[", r"\[").replace("]", r"\]")):
        as_accuracy_matrix(matrix)


def test_as_accuracy_matrix_pads_short_rows_with_nan():
    a = as_accuracy_matrix([[1.0], [2.0, 3.0]])
    assert a.shape == (2, 2) and a.dtype == np.float64
    assert math.isnan(a[0, 1]) and a[1, 1] == 3.0
