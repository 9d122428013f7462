"""KnOTS (Stoica et al., ICLR 2025) against the authors' release.

data/knots_reference.safetensors holds outputs of the authors' code: github.com/gstoica27/KnOTS at
commit baa35e85768b8841820d35edc3e41b25304248c5, RUN by data/make_knots_reference.py (which extracts
task_merger.py, masking_ops.py, merging_functions.py and ft_handlers.py at that commit and stubs
only utils.py's two function look-ups): ``SVDMerger.transform`` and ``SVDMerger.merge`` over
``LoRAHandler`` task updates B_t @ A_t, three tasks of rank-2 LoRA adapters on weights 8x6, 5x7 and
6x6 (f32). Keys: ``A.{t}.{layer}``, ``B.{t}.{layer}``, ``base.{layer}`` and, per case,
``{case}.{layer}``: the merged weight (the cases are listed with the release's options below).
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergecl.merging import merge
from mergecl.merging.knots import knots
from mergecl.merging.ties import ties
from mergecl.models.lora import LoraPair, dense_task_vector

REFERENCE = load_file(Path(__file__).parent / "data" / "knots_reference.safetensors")
TASKS = 3
# the release scales the coordinates by lam before its disjoint mean, mergecl the merged update
TOLERANCE = {"rtol": 0, "atol": 1e-6}
BOTH = ["l1.q_proj", "l2.v_proj"]
# case: (layers, mergecl options, lam); the release's options are in data/make_knots_reference.py
CASES = {
    "ties_k20": (["l1.q_proj"], {"merge": "ties", "keep": 0.2}, 0.6),  # configs/vitB_r16_knots_ties.py
    "ties_k20_in": (["l3.k_proj"], {"merge": "ties", "keep": 0.2, "basis": "input"}, 0.6),
    "ties_k100": (BOTH, {"merge": "ties", "keep": 1.0}, 0.5),  # topK 100 (the llama configs)
    "tv_sum": (BOTH, {"merge": "task_arithmetic"}, 0.3),  # merge_method tv, merging_type sum
    "tv_mean": (BOTH, {"merge": "average"}, 1.0),  # merge_method tv, merging_type mean
}


def task_states(layers):
    """theta_t = base + B_t A_t (the release's LoRA update; alpha = r)."""
    base = {f"{layer}.weight": REFERENCE[f"base.{layer}"] for layer in layers}
    tasks = [
        {
            f"{layer}.weight": REFERENCE[f"base.{layer}"] + REFERENCE[f"B.{t}.{layer}"] @ REFERENCE[f"A.{t}.{layer}"]
            for layer in layers
        }
        for t in range(TASKS)
    ]
    return base, tasks


@pytest.mark.parametrize("case", list(CASES))
def test_knots_matches_the_release(case):
    layers, options, lam = CASES[case]
    base, tasks = task_states(layers)
    merged = merge(base, tasks, "knots", lam=lam, **options)
    for layer in layers:
        torch.testing.assert_close(merged[f"{layer}.weight"], REFERENCE[f"{case}.{layer}"], **TOLERANCE)


def test_knots_over_lora_factors_in_the_dense_space():
    """The LoRA path of a run (``space: dense``): factor task vectors -> s (B_t A_t - B_0 A_0) by
    ``dense_task_vector`` -> the engine's knots over task vectors; B_0 = 0 as peft starts."""
    layer = "l1.q_proj"
    pair = LoraPair(f"{layer}.weight", f"{layer}.lora_A.weight", f"{layer}.lora_B.weight", 1.0)
    a0 = torch.randn(2, 6, generator=torch.Generator().manual_seed(5))
    base = {pair.weight: REFERENCE[f"base.{layer}"], pair.a: a0, pair.b: torch.zeros(8, 2)}
    factors = [{pair.a: REFERENCE[f"A.{t}.{layer}"] - a0, pair.b: REFERENCE[f"B.{t}.{layer}"]} for t in range(TASKS)]
    dense = [dense_task_vector(base, tau, [pair]) for tau in factors]
    merged = merge({pair.weight: base[pair.weight]}, dense, "knots", task_vectors=True, lam=0.6)
    torch.testing.assert_close(merged[pair.weight], REFERENCE[f"ties_k20.{layer}"], **TOLERANCE)


def test_knots_differs_from_ties_on_the_dense_updates():
    """Sanity: aligning first changes the result (else the test above would prove little)."""
    layer = "l1.q_proj"
    taus = [REFERENCE[f"B.{t}.{layer}"] @ REFERENCE[f"A.{t}.{layer}"] for t in range(TASKS)]
    assert not torch.allclose(knots(iter(taus)), ties([tau.clone() for tau in taus], keep=0.2), atol=1e-3)


def test_knots_task_arithmetic_keeps_the_sum_and_other_tensors_use_the_inner_rule():
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(7, 4, generator=g, dtype=torch.float64) for _ in range(TASKS)]
    # the shared basis spans every task's columns: summing the coordinates gives the plain sum
    torch.testing.assert_close(knots(iter(taus), merge="task_arithmetic"), sum(taus), rtol=0, atol=1e-12)
    assert knots(iter(taus), merge="task_arithmetic").dtype == torch.float64
    biases = [torch.randn(5, generator=g) for _ in range(TASKS)]
    torch.testing.assert_close(knots(iter([b.clone() for b in biases])), ties(biases, keep=0.2))
    zero = [torch.zeros(3, 2) for _ in range(TASKS)]  # no singular value above the cut
    assert torch.equal(knots(iter(zero)), torch.zeros(3, 2))


def test_knots_options_in_a_run_config():
    from mergecl.errors import MergeclError
    from mergecl.methods.registry import check_method_options

    options = {"ind_ft+knots": {"space": "dense", "merge": "task_arithmetic", "keep": 0.3}}
    check_method_options(["ind_ft+knots"], options, lora=True)
    with pytest.raises(MergeclError, match="ind_ft\\+knots.merge"):
        check_method_options(["ind_ft+knots"], {"ind_ft+knots": {"merge": "magmax"}}, lora=True)
