"""Writes knots_reference.safetensors: outputs of the authors' released KnOTS code, read by
tests/merging/test_merging_knots.py.

Usage: python tests/merging/data/make_knots_reference.py <git dir of github.com/gstoica27/KnOTS>

It extracts the release's own files at commit COMMIT (git show) into a temporary folder and RUNS
them: ``SVDMerger.transform`` then ``SVDMerger.merge`` (task_merger.py), with masking_ops.py,
merging_functions.py and ``LoRAHandler`` (ft_handlers.py) as released. Only utils.py (which imports
the data sets and models of the experiments) is stubbed by the two look-ups task_merger.py uses,
``get_mask_fn`` and ``get_merging_fn``, written as utils.py writes them.

Models: LoRA adapters of rank 2 on ``l1.q_proj`` (weight 8x6), ``l2.v_proj`` (5x7) and ``l3.k_proj``
(6x6) as peft names them (``...lora_A.default.weight`` [r, in], ``...lora_B.default.weight``
[out, r]); three tasks, A and B = randn (generator seeded 0, in task order); the base weights = randn
(seeded 1). The release's LoRA task update is B @ A (no alpha / r scaling: its models have
alpha = r), minus the pretrained model's fresh adapter's B_0 @ A_0 = 0 (B_0 = 0, A_0 = 1 here).
Cases (scaling_coeffs = lam; every other key as in configs/vitB_r16_knots_ties.py): ``ties_k20``
(KnOTS-TIES, topK 20, lam 0.6) on l1 only, since topK is over the whole model; ``ties_k20_in``
(the same with concat_across_output False) on l3 only: that path of the release reshapes the
[in, out] merged update to [out, in] before transposing it, right for square weights only (CLIP's
q, k, v, out_proj are square), so it is checked on a square one; ``ties_k100`` (topK 100, lam 0.5),
``tv_sum`` (merge_method tv, merging_type sum, topK 100, lam 0.3) and ``tv_mean`` (tv, mean,
topK 100, lam 1.0) on l1 and l2. Keys: ``A.{t}.{layer}``, ``B.{t}.{layer}``, ``base.{layer}``,
``{case}.{layer}`` (the merged weight).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

COMMIT = "baa35e85768b8841820d35edc3e41b25304248c5"
REAL = ["task_merger.py", "masking_ops.py", "merging_functions.py", "ft_handlers.py"]
OUT = Path(__file__).with_name("knots_reference.safetensors")
SHAPES = {"l1.q_proj": (8, 6), "l2.v_proj": (5, 7), "l3.k_proj": (6, 6)}
BOTH = ["l1.q_proj", "l2.v_proj"]
RANK, TASKS = 2, 3
BASE_CONFIG = {
    "representation": "svd-vector",
    "sign_resolve_mode": "sum_of_values",
    "merge_method": "ties",
    "merging_type": "mean",
    "concat_across_output": True,
    "dare": False,
    "dare_pruning_coeffs": 0.0,
}
CASES = {  # name: (layers, config changes, scaling_coeffs)
    "ties_k20": (["l1.q_proj"], {"topK": 20}, 0.6),
    "ties_k20_in": (["l3.k_proj"], {"topK": 20, "concat_across_output": False}, 0.6),
    "ties_k100": (BOTH, {"topK": 100}, 0.5),
    "tv_sum": (BOTH, {"topK": 100, "merge_method": "tv", "merging_type": "sum"}, 0.3),
    "tv_mean": (BOTH, {"topK": 100, "merge_method": "tv", "merging_type": "mean"}, 1.0),
}


class Holder(nn.Module):
    """A module whose state dict is exactly ``tensors`` (names with dots allowed)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.tensors = tensors

    def state_dict(self, *args, **kwargs):
        return dict(self.tensors)


def utils_stub() -> types.ModuleType:
    from inspect import getmembers, isfunction

    module = types.ModuleType("utils")

    def get_merging_fn(name):
        import merging_functions

        fns = {k.replace("_merging", ""): v for k, v in getmembers(merging_functions, isfunction) if "_merging" in k}
        return fns[name]

    def get_mask_fn(name):
        import masking_ops

        fns = {k.replace("_masking", ""): v for k, v in getmembers(masking_ops, isfunction) if "_masking" in k}
        return fns[name]

    module.get_merging_fn, module.get_mask_fn = get_merging_fn, get_mask_fn
    return module


def main(repo: str) -> None:
    folder = tempfile.mkdtemp()
    for path in REAL:
        text = subprocess.run(["git", "-C", repo, "show", f"{COMMIT}:{path}"], check=True, capture_output=True).stdout
        Path(folder, path).write_bytes(text)
    sys.path.insert(0, folder)
    sys.modules["utils"] = utils_stub()
    from ft_handlers import LoRAHandler
    from task_merger import SVDMerger

    g = torch.Generator().manual_seed(0)
    factors = {}
    for t in range(TASKS):
        for layer, (out_dim, in_dim) in SHAPES.items():
            factors[f"A.{t}.{layer}"] = torch.randn(RANK, in_dim, generator=g)
            factors[f"B.{t}.{layer}"] = torch.randn(out_dim, RANK, generator=g)
    g = torch.Generator().manual_seed(1)
    base = {f"base.{layer}": torch.randn(*shape, generator=g) for layer, shape in SHAPES.items()}
    result = {**factors, **base}
    for case, (layers, changes, lam) in CASES.items():
        pretrained = Holder({f"{layer}.weight": base[f"base.{layer}"].clone() for layer in layers})
        for layer in layers:  # a fresh peft adapter (B = 0): the release's reference parameters
            pretrained.tensors[f"{layer}.lora_A.default.weight"] = torch.ones(RANK, SHAPES[layer][1])
            pretrained.tensors[f"{layer}.lora_B.default.weight"] = torch.zeros(SHAPES[layer][0], RANK)
        tasks = [
            Holder(
                {
                    key: factors[f"{ab}.{t}.{layer}"].clone()
                    for layer in layers
                    for ab, key in (("A", f"{layer}.lora_A.default.weight"), ("B", f"{layer}.lora_B.default.weight"))
                }
            )
            for t in range(TASKS)
        ]
        merger = SVDMerger(tasks, pretrained, LoRAHandler, device="cpu")
        config = {**BASE_CONFIG, **changes, "scaling_coeffs": lam}
        merger.set_scaling_coeffs(lam)
        merger.transform(config)
        merged = merger.merge(config).state_dict()
        for layer in layers:
            result[f"{case}.{layer}"] = merged[f"{layer}.weight"].clone()
    save_file({k: v.contiguous() for k, v in result.items()}, str(OUT))
    print(f"wrote {OUT}: {len(result)} tensors")


if __name__ == "__main__":
    main(sys.argv[1])
