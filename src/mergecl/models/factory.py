"""``build_learner(spec, class_names, device)``: a model spec (a plain dict, e.g. from YAML) -> Learner.

The spec is the ``model:`` block of a run config: ``name`` (a registered backbone), the keys every
backbone takes (``registry.ModelOptions``: head, pretrained, templates, head_scale, lora) and the
backbone's own options, declared with the backbone in its module (``registry.Backbone.options``).
``print(mergecl.models.registry.describe_backbones())`` lists every backbone and option with its
type, default and meaning, read from those schemas. This module holds no backbone names: it checks
the spec (``registry.check_model_spec``), calls the backbone's builder, puts the head on top (a
``ZeroShotHead`` from the class embeddings the builder made, or a ``LinearHead`` over
``encoder.out_dim``) and injects LoRA adapters when asked. A bad spec raises a one-line MergeclError
naming the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mergecl.errors import MergeclError
from mergecl.models.base import Learner
from mergecl.models.heads import LinearHead, ZeroShotHead
from mergecl.models.lora import add_lora
from mergecl.models.registry import Built, ModelSpec, check_model_spec


def build_learner(
    spec: dict[str, Any] | ModelSpec, class_names: Sequence[str], device: str | torch.device = "cpu"
) -> Learner:
    """A Learner on ``device`` whose head covers all ``class_names`` (see the module docstring)."""
    model = check_model_spec(spec)
    if not class_names or not all(isinstance(c, str) for c in class_names):
        raise MergeclError("build_learner: class_names must be a non-empty list of strings")
    device = torch.device(device)
    built = model.backbone.build(model, list(class_names), device)
    if isinstance(built, nn.Module):
        built = Built(built)
    elif isinstance(built, tuple) and not isinstance(built, Built) and 1 <= len(built) <= 3:
        built = Built(*built)
    if not isinstance(built, Built) or not isinstance(built.encoder, nn.Module):
        raise MergeclError(f"backbone {model.name}: its builder must return an nn.Module or a Built")
    if model.head == "zero_shot":
        if built.class_embeddings is None:
            raise MergeclError(f"backbone {model.name}: its builder gave no class embeddings for the zero_shot head")
        head: nn.Module = ZeroShotHead(built.class_embeddings, scale=model.head_scale)
    else:
        out_dim = getattr(built.encoder, "out_dim", None)
        if out_dim is None:
            raise MergeclError(f"backbone {model.name}: its encoder needs an out_dim (the feature width)")
        head = LinearHead(int(out_dim), len(class_names))
    if model.lora is not None:  # after the zero-shot head: it is built from the plain encoder
        add_lora(built.encoder, model.lora)
    return Learner(built.encoder, head, built.prepare).to(device)
