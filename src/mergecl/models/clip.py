"""Hugging Face CLIP as in MagMax (docs/methods.md#magmax): train the image tower, freeze a zero-shot head.

The encoder is CLIP's ``vision_model`` + ``visual_projection``; its features are L2-normalised. The
text tower is used once, to embed the prompt templates of every class into a ``ZeroShotHead``
(frozen buffer, logits = 100 * cosine), and is then dropped: it is neither trained nor merged, and
it does not occupy memory during training. ``openai/clip-vit-base-patch16`` on the hub holds the same
OpenAI ViT-B/16 weights that MagMax loads through open_clip.

Images go through ``ImagePreparer`` (torch/PIL only): train RandomResizedCrop(image_size, scale
(0.9, 1.0)) bicubic without flip; eval resize + centre crop; CLIP mean/std.
transformers is imported lazily.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Annotated, Any, cast

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field
from torch import nn

from mergecl.errors import MergeclError
from mergecl.models._util import one_line
from mergecl.models.heads import build_zero_shot_weights, readable_class_name
from mergecl.models.images import CLIP_MEAN, CLIP_STD, ImagePreparer
from mergecl.models.registry import Built, ModelSpec, Standalone, register_backbone
from mergecl.models.text import check_local_or_hub, import_transformers, load_tokenizer, model_directory, saved_files
from mergecl.options import Options

# A short subset of the standard CLIP ImageNet prompt family ("a photo of a {}." ...).
CLIP_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a cropped photo of a {}.",
    "a bright photo of a {}.",
    "a close-up photo of a {}.",
    "a rendering of a {}.",
)


class CLIPImageEncoder(nn.Module):
    """pixel_values [N, 3, S, S] -> L2-normalised image embeddings [N, projection_dim]."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module, normalize: bool = True) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.normalize = normalize
        self.out_dim = int(visual_projection.out_features)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        features = self.visual_projection(pooled)
        return F.normalize(features, dim=-1) if self.normalize else features


def load_hf_clip(pretrained: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """(CLIPModel, tokenizer) from a local directory or hub id; the tokenizer defaults to the same."""
    transformers = import_transformers()
    check_local_or_hub(str(pretrained))
    try:
        model = transformers.CLIPModel.from_pretrained(str(pretrained))
    except (OSError, ValueError) as exc:
        raise MergeclError(f"cannot load CLIP model {str(pretrained)!r}: {one_line(exc)}") from None
    return model.float(), load_tokenizer(tokenizer or pretrained)


def random_hf_clip(config: dict[str, Any]) -> Any:
    """An untrained CLIPModel from CLIPConfig keyword arguments (tests, architecture experiments)."""
    transformers = import_transformers()
    try:
        return transformers.CLIPModel(transformers.CLIPConfig(**config))
    except (TypeError, ValueError) as exc:
        raise MergeclError(f"model.config: invalid CLIPConfig arguments: {one_line(exc)}") from None


@torch.no_grad()
def clip_class_embeddings(
    model: Any,
    tokenizer: Any,
    class_names: Sequence[str],
    templates: Sequence[str] = CLIP_TEMPLATES,
) -> torch.Tensor:
    """Zero-shot class embeddings (docs/methods.md#zero-shot-head) from CLIP's text tower
    (text_model + text_projection)."""
    was_training = model.training
    model.eval()
    device = model.text_projection.weight.device
    max_length = int(model.config.text_config.max_position_embeddings)

    def encode(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        pooled = model.text_model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).pooler_output
        return model.text_projection(pooled)

    weights = build_zero_shot_weights(encode, [readable_class_name(n) for n in class_names], templates)
    model.train(was_training)
    return weights


def clip_image_parts(
    model: Any, crop_scale: tuple[float, float] = (0.9, 1.0)
) -> tuple[CLIPImageEncoder, ImagePreparer]:
    """CLIPModel -> (trainable image encoder, its image preparer at the model's image size)."""
    encoder = CLIPImageEncoder(model.vision_model, model.visual_projection)
    size = int(model.config.vision_config.image_size)
    preparer = ImagePreparer(size, CLIP_MEAN, CLIP_STD, augment="resized_crop", crop_scale=crop_scale)
    return encoder, preparer


def _crop_range(value: list[float]) -> list[float]:
    if not 0 < value[0] <= value[1] <= 1:
        raise ValueError("expected [low, high] with 0 < low <= high <= 1")
    return value


# RandomResizedCrop's scale range at train time (hf_clip and open_clip)
CropScale = Annotated[list[float], Field(min_length=2, max_length=2), AfterValidator(_crop_range)]


class HFClipOptions(Options):
    crop_scale: CropScale = Field([0.9, 1.0], description="train-time RandomResizedCrop scale [low, high]")
    tokenizer: str | None = Field(None, description="tokenizer directory or hub id; null = pretrained's")
    config: dict[str, Any] | None = Field(
        None, description="CLIPConfig keyword arguments for an untrained model (only when pretrained is null)"
    )


def _check_hf_clip(spec: ModelSpec) -> None:
    options = cast(HFClipOptions, spec.options)
    if spec.pretrained is None and options.config is None:
        raise MergeclError("model.pretrained: hf_clip needs a pretrained model (or a config to build one)")
    if spec.pretrained is None and spec.head == "zero_shot" and options.tokenizer is None:
        raise MergeclError("model.tokenizer: a zero_shot head needs a tokenizer for the CLIP text tower")


def export_hf_clip(spec: ModelSpec, state: dict[str, torch.Tensor]) -> Standalone | None:
    """The trained image tower inside the pretrained CLIPModel it came from (its text tower and
    logit scale unchanged), with the base's config, tokenizer and image processor files. A CLIP
    built from a bare config (no pretrained) has no text tower to ship: None."""
    if spec.pretrained is None:
        return None
    transformers = import_transformers()
    weights = transformers.CLIPModel.from_pretrained(str(spec.pretrained)).state_dict()
    for key, value in state.items():
        if key not in weights:
            raise MergeclError(f"hf_clip export: '{key}' of the trained encoder is not a tensor of {spec.pretrained}")
        weights[key] = value
    source = model_directory(spec.pretrained)
    files: dict[str, bytes] = {}
    if source is None:
        files = saved_files(transformers.CLIPConfig.from_pretrained(str(spec.pretrained)))
    tokenizer = cast(HFClipOptions, spec.options).tokenizer
    if tokenizer is not None:
        files.update(saved_files(load_tokenizer(tokenizer)))
    loads = "transformers.CLIPModel.from_pretrained(DIR) (and CLIPProcessor when the base had a preprocessor)"
    features = "normalize(model.get_image_features(pixel_values)) (visual_projection of the pooled vision output)"
    return Standalone(weights, source, files, loads, features)


@register_backbone(
    "hf_clip",
    summary="Hugging Face CLIP: the image tower trains, the text tower only builds the zero-shot head; "
    "pretrained: a local directory or hub id (e.g. openai/clip-vit-base-patch16)",
    options=HFClipOptions,
    text_side=True,
    templates=CLIP_TEMPLATES,
    lora_targets=["q_proj", "v_proj"],
    inputs="images (tensors or PIL)",
    kinds=["tensor", "image_path"],
    check=_check_hf_clip,
    export=export_hf_clip,
)
def build_hf_clip(spec: ModelSpec, class_names: list[str], device: torch.device) -> Built:
    options = cast(HFClipOptions, spec.options)
    if spec.pretrained is not None:
        model, tokenizer = load_hf_clip(spec.pretrained, options.tokenizer)
    else:
        model = random_hf_clip(options.config or {})
        tokenizer = load_tokenizer(options.tokenizer) if options.tokenizer is not None else None
    model.to(device)
    embeddings = None
    if spec.head == "zero_shot":
        embeddings = clip_class_embeddings(model, tokenizer, class_names, list(spec.templates))
    encoder, preparer = clip_image_parts(model, (options.crop_scale[0], options.crop_scale[1]))
    return Built(encoder, preparer, embeddings)  # the text tower goes out of scope here
