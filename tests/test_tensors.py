"""The sum-first finite check: a finite sum proves finite entries; an overflowing sum is checked exactly."""

import pytest
import torch

from mergecl.tensors import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_all_finite_finds_every_non_finite_entry_and_passes_large_finite_values(dtype):
    big = torch.finfo(dtype).max
    assert all_finite(torch.zeros(0, dtype=dtype))
    assert all_finite(torch.randn(1000).to(dtype))
    assert all_finite(torch.full((10,), big, dtype=dtype))  # the sum overflows; the entries are finite
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(1000).to(dtype)
        x[537] = bad
        assert not all_finite(x)
    both = torch.tensor([float("inf"), float("-inf")], dtype=dtype)  # a NaN sum
    assert not all_finite(both)
