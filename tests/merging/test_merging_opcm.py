"""OPCM (Tang et al. 2025) against the authors' release.

data/opcm_reference.safetensors holds outputs of the authors' code: github.com/tanganke/fusion_bench
at commit 54c9e8c9d9621620c720452cd8533332a32d3689, fusion_bench/method/opcm/opcm.py
(``OPCMForCLIP.run``'s merge loop, ``merge_linear_weights``, ``merge_other_parameters``) and
fusion_bench/method/opcm/utils.py (``svd``, ``get_task_vector_norm``), run on CPU on a
``nn.Sequential(fc=nn.Linear(12, 16))`` (a 16x12 weight and a 16-entry bias), with the CLIP
loading, logging, saving and evaluation left out and the models in task order (no shuffle).
Base: torch.manual_seed(0), the layer's default init; task t (0..3): every parameter plus
0.1 (t + 1) randn. Keys: ``{f32,f64}.base.*``, ``{f32,f64}.task{t}.*`` and
``{f32,f64}.opcm_a{alpha}_T{n}.*``, the authors' merge of tasks 0..n-1 with that alpha.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergecl.cli import main
from mergecl.experiment.config import parse_config
from mergecl.merging import merge
from mergecl.merging.opcm import opcm_fold, opcm_project, opcm_split

REFERENCE = load_file(Path(__file__).parent / "data" / "opcm_reference.safetensors")
TOLERANCE = {"f32": {"rtol": 0, "atol": 1e-5}, "f64": {"rtol": 0, "atol": 1e-12}}


def state(prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in REFERENCE.items() if k.startswith(prefix)}


def models(dtype: str, n: int):
    return state(f"{dtype}.base."), [state(f"{dtype}.task{t}.") for t in range(n)]


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("alpha", [0.5, 0.8])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_opcm_matches_the_authors_release(dtype, alpha, n):
    base, finetuned = models(dtype, n)
    expected = state(f"{dtype}.opcm_a{alpha}_T{n}.")
    options = {} if alpha == 0.5 else {"alpha": alpha}  # 0.5: the release's default
    merged = merge(base, finetuned, "opcm", **options)
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        assert merged[key].dtype == value.dtype
        torch.testing.assert_close(merged[key], value, **TOLERANCE[dtype])


def test_one_model_is_that_model_and_lam_scales_the_merged_task_vector():
    base, finetuned = models("f64", 3)
    assert all(torch.equal(v, finetuned[0][k]) for k, v in merge(base, finetuned[:1], "opcm").items())
    full, half = merge(base, finetuned, "opcm"), merge(base, finetuned, "opcm", lam=0.5)
    for key, value in base.items():
        torch.testing.assert_close(half[key], value + 0.5 * (full[key] - value), rtol=0, atol=1e-12)


def test_projection_removes_the_protected_singular_directions():
    g = torch.Generator().manual_seed(3)
    merged, tau = torch.randn(16, 12, generator=g, dtype=torch.float64), torch.randn(16, 12, generator=g).double()
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    k = opcm_split(s, 0.5)
    assert 0 < k < 12 and float(s[:k].sum() / s.sum()) <= 0.5 < float(s[: k + 1].sum() / s.sum())
    coefficients = u.T @ opcm_project(merged, tau, 0.5) @ vh.T
    assert coefficients.diagonal().abs().max() < 1e-12 and coefficients[:k, :k].abs().max() < 1e-12
    kept = u.T @ tau @ vh.T
    kept.diagonal().zero_()
    kept[:k, :k] = 0
    torch.testing.assert_close(coefficients, kept)  # every other coefficient is untouched
    # not a weight matrix: a plain sum
    biases = [torch.randn(5, generator=g) for _ in range(3)]
    torch.testing.assert_close(opcm_fold(iter(biases)), sum(biases))


def test_cli_and_run_config(tmp_path):
    base, finetuned = models("f32", 3)
    paths = []
    for i, model in enumerate([base, *finetuned]):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file(model, paths[-1])
    out = tmp_path / "opcm.safetensors"
    args = ["merge", "--method", "opcm", "--alpha", "0.8", "--base", paths[0], "-o", str(out), "--quiet", *paths[1:]]
    assert main(args) == 0
    merged = load_file(out)
    for key, value in state("f32.opcm_a0.8_T3.").items():
        torch.testing.assert_close(merged[key], value, **TOLERANCE["f32"])
    config = parse_config(
        {
            "methods": ["seq_ft", "opcm", "ind_ft+opcm"],
            "method_options": {"opcm": {"alpha": 0.8}},
            "data": {"source": "digits"},
        }
    )
    assert "opcm" in config.methods and "ind_ft+opcm" in config.methods


def test_an_embedding_table_is_added_not_projected_as_the_release_treats_nn_embedding():
    """The release projects nn.Linear weights only; an nn.Embedding's table goes through
    ``merge_other_parameters`` (a plain sum), as its biases do. mergecl sees names: ``plain_names``."""
    g = torch.Generator().manual_seed(5)
    base = {
        "embeddings.word_embeddings.weight": torch.randn(20, 6, generator=g),
        "fc.weight": torch.randn(6, 6, generator=g),
    }
    taus = [{k: 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    table = "embeddings.word_embeddings.weight"
    summed = opcm_fold(iter([tau[table] for tau in taus]), name=table)
    torch.testing.assert_close(summed, sum(tau[table] for tau in taus))
    projected = opcm_fold(iter([tau[table] for tau in taus]), plain_names=None, name=table)
    assert not torch.allclose(projected, summed)
    merged = merge(base, taus, "opcm", task_vectors=True)
    as_matrix = merge(base, taus, "opcm", task_vectors=True, plain_names="")  # "": every 2-D tensor projected
    scale = (merged["fc.weight"] - base["fc.weight"]).norm() / (as_matrix["fc.weight"] - base["fc.weight"]).norm()
    assert not torch.allclose(scale, torch.tensor(1.0))  # the model-wide coefficient sees the table's sum
    direction = merged[table] - base[table]
    torch.testing.assert_close(direction / direction.norm(), summed / summed.norm(), rtol=0, atol=1e-6)
