"""TSV-M (``tsv_m``, merging/tsv.py) against the authors' released code.

Reference data: tests/merging/data/tsv_iso_authors.safetensors (shared with test_merging_iso.py),
made once, when this test was written, by running the authors' own merge functions, extracted
unchanged from their repositories, on CPU (torch 2.x):

- TSV-M: github.com/AntoAndGar/task_singular_vectors, commit a6c97188f7aa0bb20753de4f2939be89dd64f1c3,
  src/utils/TSVM_utils.py, ``compute_and_sum_svd_mem_reduction(task_vectors, config)`` (the method
  ``TSVM`` of their main.py; the same function is in the iso-merging release);
- Iso-C / Iso-CTS: github.com/danielm1405/iso-merging, commit d34010af8ba129ef4d17a91ca9943b413fe06f8c,
  src/utils/iso.py, ``iso_c`` and ``iso_cts`` (``config.method.common_space_fraction`` 0.8, and 0.5).

Inputs (stored in the file, key ``CASE/tauT/NAME``): torch.manual_seed(0), then per case a shared
part ``randn`` plus ``0.7 * randn`` per task, float32; the cases:

    a: T=3, blocks.0.attn.weight 16x12, blocks.0.mlp.weight 12x16, blocks.0.bias 12,
       conv.weight 4x3x2x2, text_projection 8x6
    b: T=4, layer.weight 20x10, layer.bias 20      (TSV-M: k=2, 8 of 10 columns filled)
    c: T=3, layer.weight 20x10
    d: T=2, layer.weight 11x7, norm.weight 7

Outputs: ``CASE/METHOD/NAME`` (the authors' float32 run) and ``CASE/METHOD@fp64/NAME`` (the same
inputs in float64), METHOD in tsv_m, iso_c, iso_cts, iso_cts@0.5. mergecl's rules agree with the
float32 outputs to a max difference below 1e-5 of the tensor's largest entry (observed: <= 3.2e-6)
and with the float64 ones to 1e-10; the non-matrix tensors (the authors' mean) agree exactly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergecl.merging import all_rules, merge
from mergecl.merging.tsv import polar, tsv_m

DATA = Path(__file__).parent / "data" / "tsv_iso_authors.safetensors"


def authors_data() -> dict[str, torch.Tensor]:
    return load_file(DATA)


def task_vectors(data: dict[str, torch.Tensor], case: str) -> dict[str, list[torch.Tensor]]:
    """name -> [tau_1..tau_T] of one case."""
    found: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in data.items():
        where, kind, name = key.split("/", 2)
        if where == case and kind.startswith("tau"):
            found.setdefault(name, {})[int(kind[3:])] = value
    return {name: [taus[t] for t in sorted(taus)] for name, taus in found.items()}


def cases(data: dict[str, torch.Tensor]) -> list[str]:
    return sorted({key.split("/")[0] for key in data})


def assert_matches_authors(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = float(expected.abs().max())
    tol = 1e-10 if expected.dtype == torch.float64 else 1e-5
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    torch.testing.assert_close(got, expected, rtol=0, atol=tol * max(scale, 1.0), msg=lambda m: f"{what}: {m}")


def check_rule_against_authors(fn, method: str, **options) -> int:
    """Every tensor of every case, in float32 and float64 (where stored); returns how many."""
    data = authors_data()
    checked = 0
    for case in cases(data):
        for name, taus in task_vectors(data, case).items():
            for suffix, dtype in (("", torch.float32), ("@fp64", torch.float64)):
                key = f"{case}/{method}{suffix}/{name}"
                if key not in data:
                    continue
                got = fn(iter([tau.to(dtype).clone() for tau in taus]), name=name, **options)
                assert_matches_authors(got, data[key], key)
                checked += 1
    return checked


def test_tsv_m_matches_the_authors_release():
    assert check_rule_against_authors(tsv_m, "tsv_m") == 2 * 10


def test_tsv_m_through_the_engine_matches_the_authors_release(tmp_path):
    """The engine hands each tensor's name to the rule (text_projection is averaged) and adds
    lam (default 1.0) times the merged task vector to theta_0."""
    data = authors_data()
    rule = all_rules()["tsv_m"]
    assert rule.lam == 1.0 and rule.granularity == "tensor"
    taus = task_vectors(data, "a")
    base = {name: torch.full_like(values[0], 0.5) for name, values in taus.items()}
    finetuned = [{name: base[name] + values[t] for name, values in taus.items()} for t in range(3)]
    merged = merge(base, finetuned, "tsv_m")
    for name in taus:
        expected = data[f"a/tsv_m/{name}"]
        torch.testing.assert_close(merged[name] - 0.5, expected, rtol=0, atol=2e-5 * float(expected.abs().max()))


def test_tsv_m_options():
    torch.manual_seed(1)
    taus = [torch.randn(9, 6) for _ in range(3)]
    # one task: the whole SVD is kept and the task matrix comes back
    torch.testing.assert_close(tsv_m(iter([taus[0].clone()])), taus[0], rtol=0, atol=1e-5)
    # sv_fraction: k = int(r * fraction) components per task (here 1 of 6): rank <= T
    merged = tsv_m(iter([t.clone() for t in taus]), sv_fraction=1 / 6)
    assert int(torch.linalg.matrix_rank(merged)) == 3
    # more components than the rank holds (3 x 4 > 6): the polar factor has orthonormal rows then
    wide = tsv_m(iter([t.clone() for t in taus]), sv_fraction=4 / 6)
    assert torch.isfinite(wide).all()
    # fewer than one component per task (T > r): nothing is kept
    many = [torch.randn(2, 5) for _ in range(3)]
    assert torch.equal(tsv_m(iter(many)), torch.zeros(2, 5))
    # mean_names: a matching 2-D tensor is averaged; None merges every 2-D tensor by SVD
    mean = torch.stack(taus).mean(0)
    torch.testing.assert_close(tsv_m(iter([t.clone() for t in taus]), name="text_projection"), mean)
    assert not torch.allclose(tsv_m(iter([t.clone() for t in taus]), name="text_projection", mean_names=None), mean)
    # untouched tensors (zero task vectors, e.g. frozen layers) stay zero, without NaN
    assert torch.equal(tsv_m(iter([torch.zeros(4, 3)] * 3)), torch.zeros(4, 3))


def test_polar_factor_is_orthonormal():
    x = torch.randn(10, 4, dtype=torch.float64)
    p = polar(x)
    torch.testing.assert_close(p.T @ p, torch.eye(4, dtype=torch.float64))


def test_cli_merge_tsv_m(tmp_path):
    data = authors_data()
    taus = task_vectors(data, "d")
    base = {name: torch.zeros_like(values[0]) for name, values in taus.items()}
    paths = [tmp_path / "base.safetensors"]
    save_file(base, paths[0])
    for t in range(2):
        paths.append(tmp_path / f"ft{t}.safetensors")
        save_file({name: values[t] for name, values in taus.items()}, paths[-1])
    out = tmp_path / "merged.safetensors"
    args = ["merge", "--method", "tsv_m", "--lam", "0.5", "--base", str(paths[0]), "-o", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "mergecl", *args, "--quiet", *map(str, paths[1:])], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    merged = load_file(out)
    for name in taus:
        expected = 0.5 * data[f"d/tsv_m/{name}"]
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    bad = subprocess.run(
        [sys.executable, "-m", "mergecl", *args, "--force", "--sv-fraction", "2", *map(str, paths[1:])],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "sv_fraction" in bad.stderr


@pytest.mark.parametrize("method", ["tsv_m"])
def test_help_lists_the_rule_and_its_options(method):
    done = subprocess.run([sys.executable, "-m", "mergecl", "merge", "--help"], capture_output=True, text=True)
    assert method in done.stdout and "--sv-fraction" in done.stdout and "--mean-names" in done.stdout
