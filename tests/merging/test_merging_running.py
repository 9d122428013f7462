"""A rule's running form (``Rule.running``, read by ``mergecl learn``) continues the rule one task
vector at a time from a state of one tensor's shape: for every rule that declares one, folding the
task vectors through it gives the rule's own result (bit for bit), except random mix, whose
reservoir draws differ from its one-shot draw but give each task the same chance."""

from __future__ import annotations

import pytest
import torch

from mergecl.merging.registry import all_rules


def _fold(running, taus: list[torch.Tensor], seed: int = 0) -> torch.Tensor:
    state = taus[0].clone()
    for t, tau in enumerate(taus[1:], start=1):
        state = running.update(state, tau, t, torch.Generator().manual_seed(seed * 1000 + t))
    return running.finish(state, len(taus))


DETERMINISTIC = [name for name, rule in all_rules().items() if rule.running is not None and not rule.draws]


def test_the_folding_rules_declare_a_running_form():
    assert {"average", "task_arithmetic", "magmax"} <= set(DETERMINISTIC)
    assert all_rules()["random_mix"].running is not None
    assert all_rules()["ties"].running is None  # it needs every task vector at once


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("count", [1, 2, 5])
def test_a_running_form_gives_the_rules_own_result(name, count):
    generator = torch.Generator().manual_seed(count)
    taus = [torch.randn(257, generator=generator) for _ in range(count)]
    taus[-1][:10] = taus[0][:10]  # ties of magnitude
    if count > 1:
        taus[1][10:20] = -taus[0][10:20]  # equal magnitude, opposite sign: the later task wins
    rule = all_rules()[name]
    expected = rule.fn(iter([tau.clone() for tau in taus]))
    assert torch.equal(_fold(rule.running, [tau.clone() for tau in taus]), expected)


def test_random_mix_running_picks_every_task_with_the_same_chance():
    count, n = 4, 40_000
    taus = [torch.full((n,), float(t + 1)) for t in range(count)]
    mixed = _fold(all_rules()["random_mix"].running, taus, seed=3)
    shares = torch.stack([(mixed == t + 1).float().mean() for t in range(count)])
    assert torch.all((mixed >= 1) & (mixed <= count))
    assert torch.allclose(shares, torch.full((count,), 1 / count), atol=0.01), shares
    assert not torch.equal(mixed, _fold(all_rules()["random_mix"].running, taus, seed=4))  # seeded draws


def test_opcm_running_form_with_its_coefficient_gives_the_engines_opcm_merge():
    """OPCM's running form keeps S_t and one norm per task; its coefficient, recomputed at each step
    from them, gives the engine's OPCM model (its prepare's model-wide rescaling)."""
    from mergecl.merging.engine import merge

    generator = torch.Generator().manual_seed(0)
    shapes = {"w1": (6, 5), "w2": (4, 6), "b": (5,)}
    base = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    taus = [{key: 0.1 * torch.randn(shape, generator=generator) for key, shape in shapes.items()} for _ in range(4)]
    running = all_rules()["opcm"].running
    state = {key: tau.clone() for key, tau in taus[0].items()}
    norms = []
    for t, tau in enumerate(taus):
        norms.append(sum(float(v.double().square().sum()) for v in tau.values()) ** 0.5)
        if t:
            state = {key: running.update(state[key], tau[key], t, None, alpha=0.3) for key in state}
        merged_norm = sum(float(v.double().square().sum()) for v in state.values()) ** 0.5
        factor = running.coefficient(norms, merged_norm)
        expected = merge(base, taus[: t + 1], "opcm", task_vectors=True, alpha=0.3, lam=0.8)
        for key in base:
            assert torch.allclose(base[key] + 0.8 * factor * state[key], expected[key], atol=1e-6), (t, key)


NAMED = [name for name, rule in all_rules().items() if rule.running is not None and rule.running.named]


@pytest.mark.parametrize("name", NAMED)
@pytest.mark.parametrize("tensor", ["encoder.fc.weight", "embeddings.word_embeddings.weight"])
def test_a_named_running_form_gives_the_rules_own_result_on_weight_matrices(name, tensor):
    """Rules that treat a weight matrix apart from an embedding table (OPCM, DOP) get the tensor's
    name in their running form too: folding 3 matrices gives the rule's own result."""
    assert {"opcm", "dop"} <= set(NAMED)
    generator = torch.Generator().manual_seed(7)
    taus = [0.1 * torch.randn(12, 8, generator=generator) for _ in range(3)]
    rule = all_rules()[name]
    own = {"steps": 20} if name == "dop" else {}
    expected = rule.fn(iter([tau.clone() for tau in taus]), name=tensor, **own)
    state = taus[0].clone()
    for t, tau in enumerate(taus[1:], start=1):
        state = rule.running.update(state, tau.clone(), t, torch.Generator().manual_seed(t), name=tensor, **own)
    assert torch.equal(rule.running.finish(state, len(taus)), expected)
