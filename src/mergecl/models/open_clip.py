"""open_clip CLIP models (MagMax's own loader), same contract as ``mergecl.models.clip``.

Optional: needs ``pip install 'mergecl[openclip]'`` (open_clip_torch and a torchvision that matches
the installed torch). It is imported only inside ``load_open_clip``; when it is missing or fails to
import (torchvision without a build for this torch), a one-line MergeclError says what to install.

The encoder is ``model.visual`` with L2-normalised outputs; the text tower embeds the prompt
templates of every class once (docs/methods.md#zero-shot-head) into a frozen ``ZeroShotHead`` and is then dropped.
Images are prepared by mergecl's own ``ImagePreparer`` (the same transforms as the HF CLIP path),
at the model's image size and normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mergecl.errors import MergeclError
from mergecl.models._util import one_line
from mergecl.models.clip import CLIP_TEMPLATES, CropScale
from mergecl.models.heads import build_zero_shot_weights, readable_class_name
from mergecl.models.images import CLIP_MEAN, CLIP_STD, ImagePreparer
from mergecl.models.registry import Built, ModelSpec, register_backbone
from mergecl.options import Options

INSTALL_HINT = "pip install 'mergecl[openclip]' (open_clip_torch plus a torchvision matching your torch)"


class OpenClipImageEncoder(nn.Module):
    """images [N, 3, S, S] -> L2-normalised embeddings from open_clip's ``model.visual``."""

    def __init__(self, visual: nn.Module, out_dim: int, normalize: bool = True) -> None:
        super().__init__()
        self.visual = visual
        self.normalize = normalize
        self.out_dim = out_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.visual(images)
        return F.normalize(features, dim=-1) if self.normalize else features


def import_open_clip() -> Any:
    try:
        import open_clip
    except Exception as exc:  # ImportError, or torchvision failing at import (RuntimeError, OSError)
        raise MergeclError(
            f"open_clip is not usable ({type(exc).__name__}: {one_line(exc, 120)}): {INSTALL_HINT}"
        ) from None
    return open_clip


def load_open_clip(arch: str = "ViT-B-16", pretrained: str | None = "openai") -> tuple[Any, Any]:
    """(open_clip model, tokenizer); ``pretrained`` is an open_clip tag ('openai') or a local file."""
    open_clip = import_open_clip()
    try:
        model = open_clip.create_model(arch, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(arch)
    except (RuntimeError, OSError, ValueError) as exc:
        raise MergeclError(f"cannot load open_clip {arch!r} / {pretrained!r}: {one_line(exc)}") from None
    return model.float(), tokenizer


@torch.no_grad()
def open_clip_class_embeddings(
    model: Any, tokenizer: Any, class_names: Sequence[str], templates: Sequence[str] = CLIP_TEMPLATES
) -> torch.Tensor:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device

    def encode(texts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(texts).to(device))

    weights = build_zero_shot_weights(encode, [readable_class_name(n) for n in class_names], templates)
    model.train(was_training)
    return weights


def open_clip_image_parts(
    model: Any, crop_scale: tuple[float, float] = (0.9, 1.0)
) -> tuple[OpenClipImageEncoder, ImagePreparer]:
    """open_clip model -> (trainable image encoder, its image preparer)."""
    size, mean, std = _preprocess_settings(model)
    out_dim = getattr(model.visual, "output_dim", None) or _probe_dim(model, size)
    encoder = OpenClipImageEncoder(model.visual, int(out_dim))
    preparer = ImagePreparer(size, mean, std, augment="resized_crop", crop_scale=crop_scale)
    return encoder, preparer


def _preprocess_settings(model: Any) -> tuple[int, Sequence[float], Sequence[float]]:
    visual = model.visual
    size = getattr(visual, "image_size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = getattr(visual, "image_mean", None) or CLIP_MEAN
    std = getattr(visual, "image_std", None) or CLIP_STD
    return size, tuple(mean), tuple(std)


@torch.no_grad()
def _probe_dim(model: Any, size: int) -> int:
    device = next(model.visual.parameters()).device
    return int(model.visual(torch.zeros(1, 3, size, size, device=device)).shape[-1])


class OpenClipOptions(Options):
    arch: str = Field("ViT-B-16", description="open_clip architecture name")
    crop_scale: CropScale = Field([0.9, 1.0], description="train-time RandomResizedCrop scale [low, high]")


# Declared here without importing open_clip: only the builder (through load_open_clip) imports it.
@register_backbone(
    "open_clip",
    summary=f"open_clip CLIP (MagMax's loader; optional: {INSTALL_HINT}); pretrained: an open_clip tag "
    "or a local checkpoint file, null = untrained",
    options=OpenClipOptions,
    text_side=True,
    templates=CLIP_TEMPLATES,
    pretrained="openai",
    inputs="images (tensors or PIL)",
    kinds=["tensor", "image_path"],
)
def build_open_clip(spec: ModelSpec, class_names: list[str], device: torch.device) -> Built:
    options = cast(OpenClipOptions, spec.options)
    model, tokenizer = load_open_clip(options.arch, spec.pretrained)
    model.to(device)
    embeddings = None
    if spec.head == "zero_shot":
        embeddings = open_clip_class_embeddings(model, tokenizer, class_names, list(spec.templates))
    encoder, preparer = open_clip_image_parts(model, (options.crop_scale[0], options.crop_scale[1]))
    return Built(encoder, preparer, embeddings)
