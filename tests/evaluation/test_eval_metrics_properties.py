"""Property tests of the metrics: facts that follow from the definitions for every matrix."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mergecl.evaluation.metrics import (
    avg_incremental_acc,
    bwt,
    final_acc,
    forgetting,
    incremental_accs,
    summarize,
)

TOL = 1e-9
ACCURACY = st.floats(0.0, 100.0, allow_nan=False, allow_infinity=False)
# Per-test settings (not a global profile: other test modules keep theirs). No deadline: CI is slow.
PROPERTY = settings(deadline=None, max_examples=100)


@st.composite
def matrices(draw, min_rows: int = 1, max_tasks: int = 7) -> np.ndarray:
    """An accuracy matrix of a run with ``s`` of ``T`` steps done: shape ``(s, T)``, values in [0, 100]."""
    tasks = draw(st.integers(min_rows, max_tasks))
    steps = draw(st.integers(min_rows, tasks))
    return draw(arrays(np.float64, (steps, tasks), elements=ACCURACY))


@PROPERTY
@given(st.integers(2, 7), ACCURACY, st.data())
def test_constant_matrix_has_no_transfer_and_no_forgetting(tasks, value, data):
    a = np.full((data.draw(st.integers(2, tasks)), tasks), value)
    assert bwt(a) == pytest.approx(0.0, abs=TOL)
    assert forgetting(a) == pytest.approx(0.0, abs=TOL)
    assert final_acc(a) == pytest.approx(value)
    assert avg_incremental_acc(a) == pytest.approx(value)


@PROPERTY
@given(matrices(min_rows=2))
def test_forgetting_exceeds_minus_bwt_exactly_when_an_old_task_peaked_after_its_own_step(a):
    # forgetting measures the drop from a task's best accuracy, BWT from its first: they differ only
    # when some task i < L did better at a later step t (i < t < L) than at its own step. A
    # definition taking A[i][i] as the reference (Avalanche's) would make them always equal.
    last = a.shape[0] - 1
    # how far each old task rose above its own step's accuracy before the end (0: it never did)
    rise = [max(a[i + 1 : last, i].max(initial=-np.inf) - a[i, i], 0.0) for i in range(last)]
    if max(rise) > 1e-6:  # the mean over the old tasks is at least the largest rise over their number
        assert forgetting(a) + bwt(a) >= max(rise) / last - 1e-9
    else:
        assert forgetting(a) == pytest.approx(-bwt(a), abs=1e-6)


@PROPERTY
@given(matrices(min_rows=2))
def test_forgetting_equals_minus_bwt_when_every_task_only_decays(a):
    steps = a.shape[0]
    for i in range(steps):  # make column i non-increasing from its own step on: the max is at t = i
        a[i:, i] = np.sort(a[i:, i])[::-1]
    assert forgetting(a) == pytest.approx(-bwt(a), abs=1e-7)
    assert forgetting(a) >= -TOL


@PROPERTY
@given(matrices())
def test_ranges(a):
    accs = incremental_accs(a)
    assert all(0.0 - TOL <= x <= 100.0 + TOL for x in accs)
    assert 0.0 - TOL <= avg_incremental_acc(a) <= 100.0 + TOL
    if a.shape[0] > 1:
        assert -100.0 - TOL <= bwt(a) <= 100.0 + TOL
        assert -100.0 - TOL <= forgetting(a) <= 100.0 + TOL
    else:
        assert bwt(a) is None and forgetting(a) is None


@st.composite
def row_plus_column(draw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, r, c) with A[t][i] = r[t] + c[i] for i <= t (a step effect plus a task difficulty) and any
    accuracy above the diagonal (a future task's zero-shot score, which no metric may use): every
    metric then has a closed form in r and c."""
    tasks = draw(st.integers(2, 7))
    steps = draw(st.integers(2, tasks))
    r = draw(arrays(np.float64, (steps,), elements=st.floats(0.0, 50.0)))
    c = draw(arrays(np.float64, (tasks,), elements=st.floats(0.0, 50.0)))
    future = draw(arrays(np.float64, (steps, tasks), elements=ACCURACY))
    a = np.where(np.tri(steps, tasks, dtype=bool), r[:, None] + c[None, :], future)
    return a, r, c


@PROPERTY
@given(row_plus_column(), st.sampled_from(["as drawn", "decaying", "improving"]))
def test_metrics_of_a_row_plus_column_matrix_have_closed_forms(drawn, order):
    a, r, c = drawn
    if order != "as drawn":  # the model gets worse (better) at every step on every old task
        r = np.sort(r)[::-1] if order == "decaying" else np.sort(r)
        a = np.where(np.tri(*a.shape, dtype=bool), r[:, None] + c[None, :], a)
    last = len(r) - 1
    expected_accs = [r[t] + c[: t + 1].mean() for t in range(len(r))]
    assert incremental_accs(a) == pytest.approx(expected_accs, abs=1e-9)
    assert final_acc(a) == pytest.approx(r[last] + c[: last + 1].mean(), abs=1e-9)
    assert avg_incremental_acc(a) == pytest.approx(np.mean(expected_accs), abs=1e-9)
    # the task difficulty c cancels out of every difference between steps
    assert bwt(a) == pytest.approx(r[last] - r[:last].mean(), abs=1e-9)
    if order == "decaying":  # each task's best is its own step: forgetting is exactly -BWT
        assert forgetting(a) == pytest.approx(r[:last].mean() - r[last], abs=1e-9)
    elif order == "improving":  # each task's best before the end is step L-1
        assert forgetting(a) == pytest.approx(r[last - 1] - r[last], abs=1e-9)
    else:
        assert forgetting(a) == pytest.approx(np.mean([r[i:last].max() - r[last] for i in range(last)]), abs=1e-9)


@PROPERTY
@given(matrices(), st.data())
def test_prefix_of_a_run_is_a_run(a, data):
    # A half-finished run reports exactly what the full run reported at that step.
    rows = data.draw(st.integers(1, a.shape[0]))
    assert incremental_accs(a[:rows]) == incremental_accs(a)[:rows]


@PROPERTY
@given(matrices(), st.floats(-50.0, 50.0, allow_nan=False))
def test_shifting_all_accuracies_shifts_acc_and_keeps_bwt_and_forgetting(a, c):
    shifted = a + c
    assert final_acc(shifted) == pytest.approx(final_acc(a) + c, abs=1e-7)
    assert avg_incremental_acc(shifted) == pytest.approx(avg_incremental_acc(a) + c, abs=1e-7)
    if a.shape[0] > 1:
        assert bwt(shifted) == pytest.approx(bwt(a), abs=1e-7)
        assert forgetting(shifted) == pytest.approx(forgetting(a), abs=1e-7)


@PROPERTY
@given(matrices(min_rows=2), st.floats(0.01, 10.0))
def test_metrics_scale_with_the_unit(a, k):
    # e.g. fractions instead of percent: every metric is linear in the matrix
    for metric in (final_acc, avg_incremental_acc, bwt, forgetting):
        assert metric(k * a) == pytest.approx(k * metric(a), abs=1e-7)


@PROPERTY
@given(matrices(), st.data())
def test_future_entries_are_ignored(a, data):
    other = a.copy()
    steps, tasks = a.shape
    upper = np.triu(np.ones((steps, tasks), dtype=bool), k=1)
    noise = data.draw(arrays(np.float64, (steps, tasks), elements=ACCURACY))
    other[upper] = noise[upper]
    nan_future = a.copy()
    nan_future[upper] = np.nan
    for variant in (other, nan_future):
        got, expected = summarize(variant), summarize(a)
        for key in ("final_acc", "avg_incremental_acc", "bwt", "forgetting"):
            assert got[key] == expected[key]


@PROPERTY
@given(matrices(min_rows=2), st.data())
def test_relabelling_old_tasks_keeps_final_acc_and_bwt(a, data):
    # Reorder tasks 0..L-1 (rows and columns alike) and the last row's columns the same way:
    # B[t][k] = A[p(t)][p(k)], B[L][k] = A[L][p(k)]. final ACC and BWT only see the pairs
    # (A[i][i], A[L][i]) and the last row as a multiset, so they cannot change.
    last = a.shape[0] - 1
    perm = data.draw(st.permutations(range(last)))
    rows = list(perm) + [last]
    cols = list(perm) + list(range(last, a.shape[1]))
    b = a[rows][:, cols]
    assert final_acc(b) == pytest.approx(final_acc(a))
    assert bwt(b) == pytest.approx(bwt(a))


@PROPERTY
@given(matrices(min_rows=2), st.data())
def test_a_better_last_model_never_looks_worse(a, data):
    steps = a.shape[0]
    gain = data.draw(arrays(np.float64, (steps,), elements=st.floats(0.0, 20.0)))
    better = a.copy()
    better[-1, :steps] += gain
    assert final_acc(better) >= final_acc(a) - TOL
    assert bwt(better) >= bwt(a) - TOL
    assert forgetting(better) <= forgetting(a) + TOL


@PROPERTY
@given(matrices(min_rows=2), st.data())
def test_no_forgetting_when_the_last_model_dominates(a, data):
    steps = a.shape[0]
    lift = data.draw(arrays(np.float64, (steps,), elements=st.floats(0.0, 10.0)))
    a[-1, :steps] = a[:, :steps].max(axis=0) + lift
    assert forgetting(a) <= TOL
    assert bwt(a) >= -TOL
