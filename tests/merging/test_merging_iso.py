"""Iso-C and Iso-CTS (``iso_c``, ``iso_cts``, merging/iso.py) against the authors' released code.

The reference data and how it was made (github.com/danielm1405/iso-merging, commit
d34010af8ba129ef4d17a91ca9943b413fe06f8c, src/utils/iso.py, ``iso_c`` and ``iso_cts``, run unchanged
on CPU in float32 and float64 with ``common_space_fraction`` 0.8 and, for Iso-CTS, 0.5 too) are
described in test_merging_tsv.py, which shares tests/merging/data/tsv_iso_authors.safetensors.
Tolerances: max difference below 1e-5 of the tensor's largest entry in float32 (observed: <= 3.2e-6),
1e-10 in float64; the non-matrix tensors (the authors' mean) agree exactly.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from mergecl.merging import all_rules, merge
from mergecl.merging.iso import iso_c, iso_cts, iso_cts_split


def _tsv_test():
    """The shared helpers of test_merging_tsv.py (tests are imported by path, not as a package)."""
    path = Path(__file__).parent / "test_merging_tsv.py"
    spec = importlib.util.spec_from_file_location("_tsv_iso_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


REFERENCE = _tsv_test()


def test_iso_c_matches_the_authors_release():
    assert REFERENCE.check_rule_against_authors(iso_c, "iso_c") == 2 * 10


def test_iso_cts_matches_the_authors_release():
    assert REFERENCE.check_rule_against_authors(iso_cts, "iso_cts") == 2 * 10
    assert REFERENCE.check_rule_against_authors(iso_cts, "iso_cts@0.5", common_space_fraction=0.5) == 10


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_through_the_engine_matches_the_authors_release(method):
    data = REFERENCE.authors_data()
    rule = all_rules()[method]
    assert rule.lam == 1.0 and rule.granularity == "tensor"
    taus = REFERENCE.task_vectors(data, "a")
    base = {name: torch.full_like(values[0], -0.25) for name, values in taus.items()}
    finetuned = [{name: base[name] + values[t] for name, values in taus.items()} for t in range(3)]
    merged = merge(base, finetuned, method, lam=0.5)
    for name in taus:
        expected = 0.5 * data[f"a/{method}/{name}"]
        got = merged[name] + 0.25
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * float(expected.abs().max()), msg=name)


def test_iso_cts_split_follows_the_release():
    # int(r * fraction), then the task-specific part rounded (halves to even) to a multiple of T
    assert iso_cts_split(12, 3, 0.8) == (9, 1)
    assert iso_cts_split(10, 3, 0.8) == (7, 1)
    assert iso_cts_split(10, 4, 0.8) == (10, 0)  # round(0.5) == 0: no task-specific directions
    assert iso_cts_split(10, 4, 0.5) == (6, 1)  # round(1.25) == 1
    assert iso_cts_split(768, 8, 0.8) == (616, 19)  # a ViT-B attention matrix, 8 tasks
    # where the release's rounding would give a negative common part (it fails there): r // T each
    assert iso_cts_split(2, 3, 0.0) == (2, 0)
    assert iso_cts_split(5, 2, 0.0) == (1, 2)
    for rank in range(1, 40):
        for count in range(1, 10):
            for fraction in (0.0, 0.1, 0.5, 0.8, 1.0):
                common, per_task = iso_cts_split(rank, count, fraction)
                assert common >= 0 and per_task >= 0 and common + count * per_task == rank


def test_flat_spectrum_and_degenerate_inputs():
    torch.manual_seed(3)
    taus = [torch.randn(9, 7, dtype=torch.float64) for _ in range(3)]
    for fn in (iso_c, iso_cts):
        merged = fn(iter([t.clone() for t in taus]))
        s = torch.linalg.svdvals(merged)
        torch.testing.assert_close(s, torch.full_like(s, float(s.mean())))  # isotropic: one singular value
        # zero task vectors (untouched tensors) stay zero, without NaN
        assert torch.equal(fn(iter([torch.zeros(5, 4)] * 3)), torch.zeros(5, 4))
        # mean_names: a matching 2-D tensor is averaged
        mean = torch.stack(taus).mean(0)
        torch.testing.assert_close(fn(iter([t.clone() for t in taus]), name="a.text_projection"), mean)
    # Iso-C's singular value is the mean of the task-arithmetic sum's
    total_s = torch.linalg.svdvals(torch.stack(taus).sum(0))
    torch.testing.assert_close(torch.linalg.svdvals(iso_c(iter([t.clone() for t in taus])))[0], total_s.mean())
    # Iso-CTS with the whole rank common (fraction 1) is Iso-C
    torch.testing.assert_close(
        iso_cts(iter([t.clone() for t in taus]), common_space_fraction=1.0), iso_c(iter([t.clone() for t in taus]))
    )
