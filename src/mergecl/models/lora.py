"""LoRA adapters (the peft library) on any encoder, and the dense view of their weight change.

``add_lora(encoder, spec, backbone)`` injects peft LoRA layers into ``encoder`` in place and freezes
every other encoder parameter, so only the adapters train (the head keeps its own setting: a
zero-shot head is a frozen buffer, a linear head trains). The model spec's ``lora`` mapping:

- ``rank`` [32], ``alpha`` [= rank, scaling alpha/rank = 1], ``dropout`` [0.0];
- ``target_modules``: names or a regex of the Linear layers to adapt. Default per backbone:
  ``hf_text`` query/value (BERT-style), ``hf_clip`` q_proj/v_proj; others must name them.

peft starts A random (Kaiming) and B at zero, so theta_0 holds the untrained adapter (B A = 0) and
a task vector covers A and B. A merge rule then combines A's and B's entries separately, which is
not a merge of the products B_t A_t (average(B) average(A) != average(B A)); ``dense_task_vector``
gives the product view, delta W_t = s (B_t A_t - B_0 A_0), for rules that should merge weight changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from mergecl.errors import MergeclError

LORA_DEFAULTS: dict[str, Any] = {"rank": 32, "alpha": None, "dropout": 0.0, "target_modules": None}
DEFAULT_TARGETS = {"hf_text": ["query", "value"], "hf_clip": ["q_proj", "v_proj"]}
ADAPTER = "default"  # peft's adapter name


def lora_options(spec: Any, backbone: str) -> dict[str, Any]:
    """The ``lora`` spec with defaults filled in; a bad key or value names itself."""
    if not isinstance(spec, Mapping):
        raise MergeclError(f"model.lora: expected a mapping of LoRA settings, got {spec!r}")
    for key in spec:
        if key not in LORA_DEFAULTS:
            raise MergeclError(f"model.lora.{key}: unknown option (allowed: {', '.join(LORA_DEFAULTS)})")
    options = {**LORA_DEFAULTS, **spec}
    rank = options["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergeclError(f"model.lora.rank: expected a positive integer, got {rank!r}")
    if options["alpha"] is None:
        options["alpha"] = rank
    for key, low in (("alpha", 0.0), ("dropout", 0.0)):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
            raise MergeclError(f"model.lora.{key}: expected a number >= {low}, got {value!r}")
    if not options["dropout"] < 1:
        raise MergeclError(f"model.lora.dropout: must be below 1, got {options['dropout']}")
    targets = options["target_modules"] if options["target_modules"] is not None else DEFAULT_TARGETS.get(backbone)
    if targets is None:
        raise MergeclError(f"model.lora.target_modules: required for {backbone} (names or a regex of Linear layers)")
    if not (
        isinstance(targets, str) or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))
    ):
        raise MergeclError(f"model.lora.target_modules: expected a regex or a list of names, got {targets!r}")
    options["target_modules"] = targets
    return options


def add_lora(encoder: nn.Module, spec: Any, backbone: str) -> nn.Module:
    """Inject LoRA layers into ``encoder`` (in place) and freeze its other parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    options = lora_options(spec, backbone)
    config = LoraConfig(
        r=options["rank"],
        lora_alpha=options["alpha"],
        lora_dropout=options["dropout"],
        target_modules=options["target_modules"],
        bias="none",
    )
    try:
        inject_adapter_in_model(config, encoder)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        first = str(err).splitlines()[0]
        raise MergeclError(f"model.lora.target_modules: {first}") from None
    for name, param in encoder.named_parameters():
        param.requires_grad_(".lora_" in name)
    return encoder


@dataclass(frozen=True)
class LoraPair:
    """One adapted layer: its frozen base weight and its A and B factors (state-dict keys)."""

    weight: str
    a: str
    b: str
    scaling: float


def lora_pairs(model: nn.Module, prefix: str = "") -> list[LoraPair]:
    """The adapted layers of ``model`` (keys relative to ``model.state_dict()``, with ``prefix``)."""
    pairs = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and ADAPTER in getattr(module, "lora_A", {}):
            scaling = float(module.scaling[ADAPTER])
            at = f"{prefix}{name}."
            pairs.append(
                LoraPair(
                    f"{at}base_layer.weight", f"{at}lora_A.{ADAPTER}.weight", f"{at}lora_B.{ADAPTER}.weight", scaling
                )
            )
    return pairs


def dense_task_vector(
    base: Mapping[str, Tensor], tau: Mapping[str, Tensor], pairs: list[LoraPair]
) -> dict[str, Tensor]:
    """delta W = s (B A - B_0 A_0) per adapted layer, keyed by its base weight, from a factor task vector."""
    out = {}
    for pair in pairs:
        a0, b0 = base[pair.a].float(), base[pair.b].float()
        if pair.a not in tau or pair.b not in tau:
            raise MergeclError(f"task vector: LoRA factors of '{pair.weight}' are missing")
        a, b = a0 + tau[pair.a], b0 + tau[pair.b]
        out[pair.weight] = pair.scaling * (b @ a - b0 @ a0)
    return out


def fold_dense(base: Mapping[str, Tensor], merged: Mapping[str, Tensor], pairs: list[LoraPair]) -> dict[str, Tensor]:
    """A state equal to ``base`` whose base weights are ``merged`` (W_0 + merged delta W) and whose
    adapters are switched off (B = 0), so the model computes exactly the merged dense weights."""
    state = dict(base)
    for pair in pairs:
        state[pair.weight] = merged[pair.weight].to(base[pair.weight].dtype)
        state[pair.b] = base[pair.b].new_zeros(base[pair.b].shape)
    return state
