"""FusionBench's continual merging methods and DOP (Yang et al., NeurIPS 2025) against the authors'
release.

data/continual_reference.safetensors holds outputs of the authors' code: github.com/tanganke/fusion_bench
at commit 54c9e8c9d9621620c720452cd8533332a32d3689, RUN by data/make_continual_reference.py (which
extracts the release's files at that commit and stubs only the logging, config and evaluation
plumbing): ``ContinualTiesMergingForCLIP.run`` (fusion_bench/method/opcm/ties_merging.py, with
fusion_bench/method/ties_merging/ties_merging_utils.py), ``ContinualTaskArithmeticForCLIP.run``
(fusion_bench/method/opcm/task_arithmetic.py), ``ContinualWeightAverageForCLIP.run``
(fusion_bench/method/opcm/weight_average.py) and ``ContinualDOPForCLIP.run``
(fusion_bench/method/dop/dop.py, with dop/min_norm_solvers.py, dop/utils.py and
fusion_bench/method/simple_average.py), models in task order. The model: fc1 (8x6 + bias), a
LayerNorm(8), fc2 (4x8 + bias); base = torch.manual_seed(0) and the default init, task t (0..3) =
every parameter + 0.01 (t + 1) randn; f32 and f64. Keys: ``{f32,f64}.base.*``,
``{f32,f64}.task{t}.*`` and, for the merge of tasks 0..n-1: ``ties_{merge_func}_k{threshold}_s{scaling_factor}_T{n}``,
``dop_{variant}_T{n}`` (the variants below), ``cta_s0.3_T4``, ``cwa_T4``.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergecl.cli import main
from mergecl.experiment.config import parse_config
from mergecl.merging import merge
from mergecl.merging.continual_ties import continual_ties_fold, disjoint_merge
from mergecl.merging.dop import dop, dop_merge_matrix, dop_subspace, min_norm_weights

REFERENCE = load_file(Path(__file__).parent / "data" / "continual_reference.safetensors")
# the release works on weights (theta_0 + M, rounded at every step), mergecl on task vectors
TOLERANCE = {"f32": {"rtol": 0, "atol": 1e-6}, "f64": {"rtol": 0, "atol": 1e-12}}
# the release's option names and values -> mergecl's (config/method/dop/dop.yaml is the default)
DOP_VARIANTS = {
    "default": {},
    "nomgda": {"mgda": False},
    "noema": {"ema": False},
    "u": {"subspace": "u"},
    "v_eps0.9": {"subspace": "v", "epsilon": 0.9},
    "lr1e-3_steps50": {"lr": 1e-3, "steps": 50},
}


def state(prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in REFERENCE.items() if k.startswith(prefix)}


def models(dtype: str, n: int = 4):
    return state(f"{dtype}.base."), [state(f"{dtype}.task{t}.") for t in range(n)]


def assert_matches(merged, expected, dtype):
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        assert merged[key].dtype == value.dtype
        torch.testing.assert_close(merged[key], value, **TOLERANCE[dtype], msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize(
    "merge_func, threshold, scale", [("sum", 20, 0.5), ("mean", 20, 0.5), ("max", 20, 0.5), ("sum", 50, 0.3)]
)
def test_continual_ties_matches_the_authors_release(dtype, n, merge_func, threshold, scale):
    base, finetuned = models(dtype, n)
    # ("sum", 20, 0.5): config/method/opcm/ties_merging.yaml, mergecl's defaults
    release_default = (merge_func, threshold, scale) == ("sum", 20, 0.5)
    options = {} if release_default else {"disjoint": merge_func, "keep": threshold / 100, "scale": scale}
    assert_matches(
        merge(base, finetuned, "continual_ties", **options),
        state(f"{dtype}.ties_{merge_func}_k{threshold}_s{scale}_T{n}."),
        dtype,
    )


def test_the_continual_ties_references_differ_by_option():
    # the references tell the aggregations apart (else the test above would not check them)
    outputs = [state(f"f64.ties_{func}_k20_s0.5_T4.")["fc1.weight"] for func in ("sum", "mean", "max")]
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_fusionbench_continual_task_arithmetic_and_weight_average_are_ours(dtype):
    """The release's continual task arithmetic (merged += 0.3 tau_t) is ``task_arithmetic`` (lam 0.3,
    its default); its continual weight average (merged = (t merged + theta_t) / (t + 1)) is ``average``."""
    base, finetuned = models(dtype)
    assert_matches(merge(base, finetuned, "task_arithmetic"), state(f"{dtype}.cta_s0.3_T4."), dtype)
    assert_matches(merge(base, finetuned, "average"), state(f"{dtype}.cwa_T4."), dtype)


def test_continual_ties_fold_by_hand():
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(10, generator=g, dtype=torch.float64) for _ in range(3)]
    assert torch.equal(continual_ties_fold(taus[:1], scale=0.5), 0.5 * taus[0])  # one model: scale tau_1
    # keep 1.0: no trimming; two rows: where they agree, the sum; where they disagree, the larger in |.|
    merged = continual_ties_fold(taus[:2], keep=1.0, scale=0.5)
    m, t = 0.5 * taus[0], taus[1]
    agree = torch.sign(m) == torch.sign(t)
    bigger = torch.where(m.abs() >= t.abs(), m, t)  # the elected sign is that of the larger magnitude
    torch.testing.assert_close(merged, m + 0.5 * torch.where(agree, m + t, bigger))
    # an elected sign of 0 takes the negative entries, as the release (and 'max' gives 0 there)
    trimmed, sign = torch.tensor([[1.0, 2.0], [-1.0, -3.0]]), torch.tensor([0.0, -1.0])
    assert disjoint_merge(trimmed, sign, "sum").tolist() == [-1.0, -3.0]
    assert disjoint_merge(trimmed, sign, "max").tolist() == [0.0, -3.0]


def test_continual_ties_scope_tensor_uses_each_tensors_own_thresholds():
    base, finetuned = models("f64")
    merged = merge(base, finetuned, "continual_ties", scope="tensor")
    for key, value in base.items():
        taus = [ft[key] - value for ft in finetuned]
        torch.testing.assert_close(merged[key], value + continual_ties_fold(taus), rtol=0, atol=1e-15)
    # one tensor's top 20 % differs from the model's: the scopes give different merges
    assert not torch.allclose(merged["fc1.weight"], state("f64.ties_sum_k20_s0.5_T4.")["fc1.weight"])


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_dop_matches_the_authors_release(dtype, n):
    base, finetuned = models(dtype, n)
    assert_matches(merge(base, finetuned, "dop"), state(f"{dtype}.dop_default_T{n}."), dtype)


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("variant", [v for v in DOP_VARIANTS if v != "default"])
def test_dop_options_match_the_authors_release(dtype, variant):
    base, finetuned = models(dtype, 3)
    expected = state(f"{dtype}.dop_{variant}_T3.")
    assert_matches(merge(base, finetuned, "dop", **DOP_VARIANTS[variant]), expected, dtype)
    # each option changes the weight matrices, and only them (the rest is the halving)
    default = state(f"{dtype}.dop_default_T3.")
    assert not torch.allclose(expected["fc1.weight"], default["fc1.weight"], rtol=0, atol=1e-9)
    assert torch.equal(expected["fc1.bias"], default["fc1.bias"])


def test_dop_pieces():
    g = torch.Generator().manual_seed(1)
    merged, tau = 0.01 * torch.randn(8, 6, generator=g, dtype=torch.float64), torch.zeros(8, 6, dtype=torch.float64)
    # the subspace: the leading directions whose cumulative share is below epsilon; none for a zero matrix
    us, vs = dop_subspace(merged, 0.99999)
    assert us.shape == (8, 5) and vs.shape == (6, 5)
    assert dop_subspace(tau, 0.99999)[0].shape == (8, 0)
    # a zero task vector has no subspace and a loss of 0: no NaN, the merge moves towards the other
    out = dop_merge_matrix(merged, tau)
    assert torch.isfinite(out).all() and 0 < (out - merged / 2).abs().max() <= 200 * 1e-4 + 1e-12
    # both zero: zero; no steps: the plain halving
    assert torch.equal(dop_merge_matrix(tau, tau), tau)
    assert torch.equal(dop_merge_matrix(merged, merged.flip(0), steps=0), (merged + merged.flip(0)) / 2)
    # MGDA for two: the min-norm point of the segment, clamped to [0.001, 0.999] at its ends
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert min_norm_weights(a, b) == (0.5, 0.5)
    assert min_norm_weights(a, 2 * a)[0] == 0.999 and min_norm_weights(2 * a, a)[0] == 0.001
    # one model is that model; a tensor named by mean_names is halved like a bias
    taus = [torch.randn(8, 6, generator=g) for _ in range(2)]
    assert torch.equal(dop(iter(taus[:1])), taus[0])
    assert torch.equal(dop(iter(taus), name="pos_embed.weight"), (taus[0] + taus[1]) / 2)


def test_cli_and_run_config(tmp_path):
    base, finetuned = models("f32", 3)
    paths = []
    for i, model in enumerate([base, *finetuned]):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file(model, paths[-1])
    for method, flags, key in (
        ("continual_ties", ["--disjoint", "mean"], "ties_mean_k20_s0.5_T3."),
        ("dop", ["--subspace", "u"], "dop_u_T3."),
    ):
        out = tmp_path / f"{method}.safetensors"
        args = ["merge", "--method", method, *flags, "--base", paths[0], "-o", str(out), "--quiet", *paths[1:]]
        assert main(args) == 0
        assert_matches(load_file(out), state(f"f32.{key}"), "f32")
    config = parse_config(
        {
            "methods": ["seq_ft", "continual_ties", "ind_ft+continual_ties", "dop", "ind_ft+dop"],
            "method_options": {"ind_ft+continual_ties": {"keep": 0.5}, "dop": {"steps": 10}},
            "data": {"source": "digits"},
        }
    )
    assert {"continual_ties", "ind_ft+continual_ties", "dop", "ind_ft+dop"} <= set(config.methods)
