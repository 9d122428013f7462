"""Merge rules: a hand-computed case each, and the properties each rule promises."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergecl.merging import rules, ties

T = torch.tensor


def test_average_hand():
    assert torch.equal(rules.average([T([1.0, 2.0]), T([3.0, -4.0])]), T([2.0, -1.0]))


def test_task_arithmetic_hand():
    assert torch.equal(rules.task_arithmetic([T([1.0, 2.0]), T([3.0, -4.0])]), T([4.0, -2.0]))


def test_magmax_hand_ties_go_to_later_task():
    got = rules.magmax([T([1.0, -3.0, 2.0]), T([-2.0, 3.0, 1.0])])
    assert torch.equal(got, T([-2.0, 3.0, 2.0]))


def test_random_mix_hand():
    got = rules.random_mix(torch.stack([T([1.0, -3.0, 2.0]), T([-2.0, 3.0, 1.0])]), pick=torch.tensor([0, 1, 1]))
    assert torch.equal(got, T([1.0, 3.0, 1.0]))


def test_ties_hand():
    # keep 0.5 of 4 entries: k = 4 - 2 = 2, threshold = 2nd smallest |x| = 1 for both tasks
    t1, t2 = T([4.0, -1.0, 2.0, 0.5]), T([-3.0, 2.0, 1.0, -0.5])
    assert float(ties.ties_threshold(t1, 0.5)) == 1.0
    # trimmed [4,-1,2,0], [-3,2,1,0]; sums [1,1,3,0] -> signs [+,+,+,0 -> majority +]
    # disjoint means: 4/1, 2/1, (2+1)/2, 0/clamp(0)=0
    assert torch.equal(ties.ties([t1, t2], keep=0.5), T([4.0, 2.0, 1.5, 0.0]))


def test_ties_zero_sum_takes_majority_sign():
    t1, t2 = T([2.0, -1.0, -5.0]), T([-2.0, -1.0, -5.0])
    # keep all; sums [0, -2, -10]: majority sign of [0,-1,-1] is -1 -> entry 0 keeps the negative -2
    assert torch.equal(ties.ties([t1, t2], keep=1.0), T([-2.0, -1.0, -5.0]))


def test_ties_threshold_matches_released_code_convention():
    x = torch.arange(1.0, 11.0)  # D = 10, keep 0.2 -> k = 10 - 2 = 8 -> 8th smallest = 8
    assert float(ties.ties_threshold(x, 0.2)) == 8.0
    assert torch.count_nonzero(ties.ties_trim(x, ties.ties_threshold(x, 0.2))) == 3  # 8, 9, 10


def test_dare_hand():
    got = rules.dare(T([1.0, 2.0, 3.0, 4.0]), T([True, False, True, False]), p=0.5)
    assert torch.equal(got, T([0.0, 4.0, 0.0, 8.0]))


def test_fisher_weighted_hand_and_uninformed_fallback():
    got = rules.fisher_weighted([T([2.0, 4.0]), T([4.0, 0.0])], [T([1.0, 0.0]), T([3.0, 0.0])])
    assert torch.equal(got, T([3.5, 2.0]))  # (2*1 + 4*3)/4; no Fisher anywhere -> plain mean


def test_became_coefficient_hand():
    num, den = rules.became_sums(T([1.0, 2.0]), T([1.0, 1.0]), T([1.0, 3.0]))
    assert (num, den) == (5.0, 18.0)  # F d^2 = 1 + 4; (F + L) d^2 = 2 + 16
    assert rules.became_coefficient(num, den) == 5.0 / 18.0
    assert rules.became_coefficient(0.0, 0.0) == 1.0


def test_became_equal_fishers_give_half():
    d = torch.randn(50)
    f = torch.rand(50)
    assert abs(rules.became_coefficient(*rules.became_sums(d, f, f)) - 0.5) < 1e-12


def test_one_over_t_hand():
    assert torch.equal(rules.one_over_t([T([2.0]), T([4.0]), T([6.0])]), T([4.0]))
    assert torch.equal(rules.one_over_t([T([6.0])], start=3), T([2.0]))


# --- properties ------------------------------------------------------------------------------

small_ints = st.integers(-8, 8)


ONE_TO_FIVE = st.integers(1, 5)
SIZES = st.integers(1, 12)


def vectors(count=ONE_TO_FIVE, size=SIZES, values=small_ints):
    # integer-valued floats: sums are exact, so order-invariance can be checked bit for bit
    return (
        st.tuples(count, size)
        .flatmap(lambda cs: st.lists(st.lists(values, min_size=cs[1], max_size=cs[1]), min_size=cs[0], max_size=cs[0]))
        .map(lambda rows: [torch.tensor(r, dtype=torch.float32) for r in rows])
    )


@given(vectors(count=st.just(1)))
def test_magmax_of_one_vector_is_that_vector(taus):
    assert torch.equal(rules.magmax(taus), taus[0])


@given(vectors(), st.randoms())
def test_order_invariance(taus, rnd):
    shuffled = taus[:]
    rnd.shuffle(shuffled)
    for rule in (rules.average, rules.task_arithmetic, lambda x: ties.ties(x, keep=0.6)):
        assert torch.equal(rule(taus), rule(shuffled))


@given(vectors(count=st.integers(2, 5)))
def test_magmax_picks_largest_magnitude_and_later_on_ties(taus):
    got = rules.magmax(taus)
    stacked = torch.stack(taus)
    for j in range(stacked.shape[1]):
        column = stacked[:, j]
        best = column.abs().max()
        later = max(i for i in range(len(taus)) if column[i].abs() == best)
        assert got[j] == column[later]


@given(vectors(count=st.integers(2, 5), values=st.integers(1, 9)), st.booleans())
def test_ties_keep_all_with_agreeing_signs_is_the_average(taus, negative):
    taus = [-t for t in taus] if negative else taus
    assert torch.allclose(ties.ties(taus, keep=1.0), rules.average(taus), rtol=0, atol=1e-6)


@given(vectors(count=st.integers(2, 5)), st.integers(0, 2**31 - 1))
def test_random_mix_draws_each_entry_from_some_input(taus, seed):
    pick = torch.randint(len(taus), taus[0].shape, generator=torch.Generator().manual_seed(seed))
    stacked = torch.stack(taus)
    got = rules.random_mix(stacked, pick)
    assert got.shape == taus[0].shape and got.dtype == taus[0].dtype
    assert bool(((stacked == got).any(dim=0)).all())
    for entry, task in enumerate(pick.tolist()):
        assert got[entry] == stacked[task, entry]


@settings(max_examples=50)
@given(vectors(count=st.integers(1, 5)))
def test_one_over_t_is_a_running_mean(taus):
    assert torch.allclose(rules.one_over_t(taus), rules.average(taus), atol=1e-5)


def test_rules_do_not_modify_their_inputs():
    taus = [torch.randn(20) for _ in range(3)]
    copies = [t.clone() for t in taus]
    (
        rules.average(taus),
        rules.task_arithmetic(taus),
        rules.magmax(taus),
        ties.ties(taus),
        rules.one_over_t(taus),
    )
    assert all(torch.equal(a, b) for a, b in zip(taus, copies, strict=True))


def test_kth_smallest_is_kthvalue_exactly_on_any_data():
    n = 8 * ties.SAMPLE + 12_345  # large enough for the sampled bracket
    g = torch.Generator().manual_seed(0)
    cases = {
        "normal": torch.randn(n, generator=g).abs(),
        "few values, many ties": torch.randint(0, 5, (n,), generator=g).float(),
        "mostly zeros": torch.randn(n, generator=g).abs() * (torch.rand(n, generator=g) < 0.1),
        "float64": torch.randn(n, generator=g, dtype=torch.float64).abs(),
        # the strided sample sees only zeros: the bracket misses, the whole tensor is searched
        "unrepresentative sample": torch.ones(n).index_fill_(0, torch.arange(0, n, n // ties.SAMPLE), 0.0),
    }
    for name, values in cases.items():
        for k in (1, 2, n // 5, n - int(0.2 * n), n - 1, n):
            assert torch.equal(ties.kth_smallest(values, k), values.kthvalue(k).values), (name, k)
