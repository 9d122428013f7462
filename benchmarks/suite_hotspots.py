"""The three hot spots taken from the clinc150-cil profile (docs/benchmarks.md), old way vs new, on
the same tensors, alternating, best of ``--repeats``; each pair gives identical results (checked).

- the finite check of a model: ``isfinite(x).all()`` per tensor vs ``mergecl.tensors.all_finite``
  (a sum first), on the packaged all-MiniLM-L6-v2's 22.7M parameters;
- pass 2 of TIES's radix select, one task vector chunk of 3.3M entries: a bool mask and a gather vs a
  clamp and one ``bincount`` over every entry (tried, 0.8x: the mask stays);
- a ``lam: auto`` model theta_0 + lam * d over MiniLM's tensors: two fresh tensors per entry vs one.

    python benchmarks/suite_hotspots.py
"""

from __future__ import annotations

import argparse
import time

import torch
from safetensors.torch import load_file

from mergecl.methods.merged import _along
from mergecl.models.text import find_minilm
from mergecl.tensors import all_finite


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def pair(name: str, old, new, repeats: int) -> None:
    a, b = old(), new()
    same = all(torch.equal(a[k], b[k]) for k in a) if isinstance(a, dict) else a == b
    assert same, f"{name}: the two ways differ"
    old_s, new_s = [], []
    for _ in range(repeats):  # alternating
        old_s.append(best(old, 1))
        new_s.append(best(new, 1))
    print(f"| {name} | {min(old_s) * 1e3:.1f} ms | {min(new_s) * 1e3:.1f} ms | {min(old_s) / min(new_s):.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    state = {k: v.float() for k, v in load_file(str(find_minilm() / "model.safetensors")).items()}
    size = sum(v.numel() for v in state.values()) / 1e6
    print(f"torch threads: {torch.get_num_threads()}; MiniLM: {size:.1f}M parameters")
    print("| hot spot | old | new | faster by |")
    print("|:---|---:|---:|---:|")
    pair(
        "finite check of MiniLM",
        lambda: all(bool(torch.isfinite(v).all()) for v in state.values()),
        lambda: all(all_finite(v) for v in state.values()),
        args.repeats,
    )
    g = torch.Generator().manual_seed(0)
    bits = (0.01 * torch.randn(3_276_800, generator=g)).abs_().view(torch.int32)
    b = int(torch.kthvalue(bits >> 16, int(0.8 * bits.numel())).values)

    def masked() -> tuple:
        return tuple(torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=1 << 16).tolist())

    def clamped() -> tuple:
        low = bits.clone().sub_(b << 16).clamp_(-1, 1 << 16).add_(1)
        return tuple(torch.bincount(low, minlength=(1 << 16) + 2)[1:-1].tolist())

    pair("TIES radix pass 2, one 3.3M chunk", masked, clamped, args.repeats)
    direction = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    pair(
        "a lam: auto model of MiniLM",
        lambda: {k: (v.float() + 0.3 * direction[k]).to(v.dtype) for k, v in state.items()},
        lambda: _along(state, direction, 0.3),
        args.repeats,
    )


if __name__ == "__main__":
    main()
