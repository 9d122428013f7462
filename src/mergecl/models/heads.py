"""Classification heads: a learned linear head and a frozen zero-shot head built from class names.

The zero-shot head follows MagMax (docs/methods.md#zero-shot-head): each class embedding is the
L2-normalised mean of the L2-normalised text embeddings of every prompt template filled with the
class name; logits are ``scale * cos(feature, class_embedding)`` with ``scale = 100`` (CLIP's
exp(logit_scale)) and no bias.

The class embeddings are a *persistent buffer*, not a parameter: the optimiser never sees them, they
travel with ``state_dict()`` (so a saved learner reloads with its head), and they are identical in
every fine-tuned checkpoint, so a merge leaves them unchanged (their task vector is zero).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mergecl.errors import MergeclError

ZERO_SHOT_SCALE = 100.0


class LinearHead(nn.Linear):
    """A plain learned linear classifier; its state-dict keys are ``weight`` and ``bias``."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        if in_dim < 1 or num_classes < 1:
            raise MergeclError(f"LinearHead needs in_dim >= 1 and num_classes >= 1, got {in_dim}, {num_classes}")
        super().__init__(in_dim, num_classes)


class ZeroShotHead(nn.Module):
    """Frozen cosine classifier over fixed class embeddings [num_classes, dim]."""

    weight: torch.Tensor

    def __init__(self, class_embeddings: torch.Tensor, scale: float = ZERO_SHOT_SCALE) -> None:
        super().__init__()
        if class_embeddings.dim() != 2 or class_embeddings.shape[0] < 1:
            raise MergeclError(
                f"ZeroShotHead needs class embeddings of shape [num_classes, dim], got {tuple(class_embeddings.shape)}"
            )
        # Normalised here too, so that any embeddings (not only build_zero_shot_weights') give cosines.
        weight = F.normalize(class_embeddings.detach().float(), dim=-1)
        self.register_buffer("weight", weight, persistent=True)
        self.scale = float(scale)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = F.normalize(features, dim=-1)
        return self.scale * features @ self.weight.to(features.dtype).t()

    def extra_repr(self) -> str:
        return f"num_classes={self.weight.shape[0]}, dim={self.weight.shape[1]}, scale={self.scale}"


@torch.no_grad()
def build_zero_shot_weights(
    encode_text: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """Class embeddings [num_classes, dim] from a text encoder, as in MagMax's zero-shot head.

    For each class: encode every template filled with the class name, L2-normalise each embedding,
    average over templates, L2-normalise again. The x100 scale belongs to ``ZeroShotHead``.
    ``encode_text`` maps a list of strings to a float tensor [len(list), dim].
    """
    if not class_names:
        raise MergeclError("zero-shot head: class_names is empty")
    if not templates:
        raise MergeclError("zero-shot head: templates is empty")
    for template in templates:
        if "{}" not in template:
            raise MergeclError(f"zero-shot head: template {template!r} has no '{{}}' for the class name")
    # All prompts in one list (class-major), encoded in chunks, then regrouped per class.
    texts = [template.format(name) for name in class_names for template in templates]
    chunks = [encode_text(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    embeddings = torch.cat([c.detach().float().cpu() for c in chunks])
    embeddings = F.normalize(embeddings, dim=-1).view(len(class_names), len(templates), -1)
    return F.normalize(embeddings.mean(dim=1), dim=-1)


def readable_class_name(name: str) -> str:
    """'aquarium_fish' -> 'aquarium fish': prompts read better without identifier underscores."""
    return " ".join(name.replace("_", " ").split())
