"""Benchmark suites: packaged configs run by name, with a --quick flavour for smoke tests.

mergecl bench clinc150-cil            # the full suite (3 seeds, <= 30 min on a 2-core CPU)
mergecl bench banking77-cil --quick   # <= 3 min: one seed, tiny data, five methods
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergecl.errors import MergeclError
from mergecl.experiment.config import RunConfig, load_config, parse_config

SUITES = (
    "clinc150-cil",
    "clinc150-cil-random",
    "banking77-cil",
    "clinc150-cil-pam",
    "banking77-cil-pam",
    "banking77-continual",  # the continual-merging protocol (docs/results/continual-merging.md)
    "banking77-continual-svd",  # its SVD rules, fewer streams (their merges cost minutes on a CPU)
    "banking77-continual-dop",  # DOP on one stream (its merge step costs minutes on a CPU)
    "clinc150-continual",
    "clinc150-continual-svd",
)

# The --quick flavour: the same pipeline (pretrained encoder, zero-shot head, every step evaluated,
# merges over Seq-FT and Ind-FT vectors, lam chosen on validation) on a sliver of the data.
QUICK_METHODS = ["zero_shot", "seq_ft", "magmax", "ind_ft+magmax", "magmax@auto"]
QUICK_LORA_METHODS = ["zero_shot", "seq_ft", "ind_ft+average", "pam", "pam@zero"]  # LoRA suites: PAM


def suite_config(
    name: str, quick: bool = False, seeds: list[int] | None = None, orders: int | None = None
) -> RunConfig:
    if name not in SUITES:
        raise MergeclError(f"unknown suite '{name}' (choose from {', '.join(SUITES)})")
    data: dict[str, Any] = load_config(name).model_dump()
    if quick:
        data["name"] = f"{name}-quick"
        data["seeds"] = [0]
        data["data"].update(train_per_class=2, eval_per_class=1)
        data["train"].update(epochs=1)
        if data["model"].get("lora"):
            data["methods"] = QUICK_LORA_METHODS
            data["method_options"] = {"pam@zero": {"reset": "zero", "align_every": 2}}
        else:
            data["methods"] = QUICK_METHODS
            data["method_options"] = {"magmax@auto": {"lam": "auto", "lam_grid": [0.5, 1.0]}}
    if seeds is not None:
        data["seeds"] = seeds
    if orders is not None:  # fewer task orders per seed: order k of seed s is the same stream as in the suite
        data["data"]["orders"] = orders
    return parse_config(data, f"suite {name}")


def bench(
    name: str,
    quick: bool = False,
    seeds: list[int] | None = None,
    out: str | Path | None = None,
    orders: int | None = None,
    **kwargs,
):
    from mergecl.experiment.runner import run

    return run(suite_config(name, quick, seeds, orders), out=out, **kwargs)
