"""LoRA adapters (the peft library) on any encoder, and the dense view of their weight change.

``add_lora(encoder, options)`` injects peft LoRA layers into ``encoder`` in place and freezes every
other encoder parameter, so only the adapters train (the head keeps its own setting: a zero-shot
head is a frozen buffer, a linear head trains). The model spec's ``lora`` mapping is checked against
``LoraOptions`` (rank, alpha, dropout, target_modules); ``target_modules`` defaults to the
backbone's own declaration (``Backbone.lora_targets``, e.g. ``hf_text`` query/value); a backbone
that declares none needs them named.

peft starts A random (Kaiming) and B at zero, so theta_0 holds the untrained adapter (B A = 0) and
a task vector covers A and B. A merge rule then combines A's and B's entries separately, which is
not a merge of the products B_t A_t (average(B) average(A) != average(B A)); ``dense_task_vector``
gives the product view, delta W_t = s (B_t A_t - B_0 A_0), for rules that should merge weight changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, cast

from pydantic import Field
from torch import Tensor, nn

from mergecl.errors import MergeclError
from mergecl.options import Options, read_options

ADAPTER = "default"  # peft's adapter name


class LoraOptions(Options):
    """``model.lora``: train LoRA adapters instead of the encoder's weights."""

    rank: int = Field(32, ge=1, description="the adapters' rank r")
    alpha: float | None = Field(None, ge=0, description="scaling alpha/rank; null = rank (scaling 1)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: str | Annotated[list[str], Field(min_length=1)] | None = Field(
        None, description="names or a regex of the Linear layers to adapt; null = the backbone's default"
    )


def lora_options(given: Any, backbone: str, default_targets: str | Sequence[str] | None = None) -> LoraOptions:
    """The ``lora`` mapping checked against ``LoraOptions``, with alpha and the backbone's default
    target modules filled in; a bad key or value names itself (``model.lora.rank: ...``)."""
    if isinstance(given, LoraOptions):
        options = given
    else:
        if isinstance(given, Mapping):
            for key in given:
                if key not in LoraOptions.model_fields:
                    known = ", ".join(LoraOptions.model_fields)
                    raise MergeclError(f"model.lora.{key}: unknown key (options of lora: {known})")
        options = cast(LoraOptions, read_options(LoraOptions, given, "model.lora"))
    targets = options.target_modules if options.target_modules is not None else default_targets
    if targets is None:
        raise MergeclError(f"model.lora.target_modules: required for {backbone} (names or a regex of Linear layers)")
    alpha = options.alpha if options.alpha is not None else options.rank
    targets = targets if isinstance(targets, str) else list(targets)
    return options.model_copy(update={"alpha": alpha, "target_modules": targets})


def add_lora(encoder: nn.Module, options: LoraOptions) -> nn.Module:
    """Inject LoRA layers into ``encoder`` (in place) and freeze its other parameters. ``options``
    comes from ``lora_options`` (alpha and target modules filled in)."""
    from peft import LoraConfig, inject_adapter_in_model

    if options.alpha is None or options.target_modules is None:
        raise MergeclError("add_lora: options need alpha and target_modules filled in (see lora_options)")
    config = LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
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
