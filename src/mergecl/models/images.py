"""Image preparation with torch and PIL only (torchvision is not importable on every machine).

``ImagePreparer`` turns a batch of raw images (a float tensor [N, C, H, W] in [0, 1], a uint8 tensor,
or a list of image file paths) into a normalised float tensor [N, channels, size, size].

- eval: resize the shorter side to ``size`` (bicubic, antialiased) then centre-crop ``size`` x ``size``
  (torchvision's Resize + CenterCrop, CLIP's eval transform).
- train, ``augment="resized_crop"``: torchvision's RandomResizedCrop(size, scale, ratio=(3/4, 4/3)),
  bicubic, no flip (MagMax's CLIP train transform, scale (0.9, 1.0)).
- train, ``augment="pad_crop_flip"``: eval resize, then 4-pixel zero padding, a random ``size`` crop and
  a random horizontal flip (the usual CIFAR augmentation, as in akamaster's ResNet training).

Randomness comes from torch's global generator, so a seeded run augments identically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mergecl.errors import MergeclError
from mergecl.models._util import one_line

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTS = ("none", "resized_crop", "pad_crop_flip")


class ImagePreparer:
    """Callable ``(inputs, train) -> tensor [N, channels, size, size]`` for ``Learner.prepare``."""

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: str = "none",
        crop_scale: tuple[float, float] = (0.9, 1.0),
        channels: int = 3,
    ) -> None:
        if augment not in AUGMENTS:
            raise MergeclError(f"unknown image augment {augment!r} (choose from {', '.join(AUGMENTS)})")
        if len(mean) != channels or len(std) != channels:
            raise MergeclError(f"image mean/std need {channels} values, got {len(mean)} and {len(std)}")
        self.size = int(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment = augment
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.channels = channels

    def __call__(self, inputs: torch.Tensor | Sequence[str], train: bool = False) -> torch.Tensor:
        if isinstance(inputs, torch.Tensor):
            batch = match_channels(as_float_images(inputs), self.channels)
            images = list(batch) if train and self.augment != "none" else None
            if images is None:  # eval on a tensor batch: one batched resize
                return self._normalize(resize_center_crop(batch, self.size))
        else:
            images = [load_image(p, self.channels) for p in inputs]
        out = [self._one(img.unsqueeze(0), train) for img in images]
        return self._normalize(torch.cat(out))

    def __deepcopy__(self, memo: dict) -> ImagePreparer:
        return self  # immutable settings: copies of a learner can share it

    def _one(self, image: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.augment == "resized_crop":
            return random_resized_crop(image, self.size, self.crop_scale)
        image = resize_center_crop(image, self.size)
        if train and self.augment == "pad_crop_flip":
            image = pad_crop_flip(image)
        return image

    def _normalize(self, batch: torch.Tensor) -> torch.Tensor:
        return (batch - self.mean) / self.std


def load_image(path: str | Path, channels: int = 3) -> torch.Tensor:
    """An image file as a float tensor [channels, H, W] in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise MergeclError(f"cannot read image {path}: {one_line(exc)}") from None
    tensor = torch.from_numpy(array.copy()).float().div_(255.0)
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)


def as_float_images(batch: torch.Tensor) -> torch.Tensor:
    """[N, H, W] or [N, C, H, W], uint8 or float -> float [N, C, H, W] (uint8 scaled to [0, 1])."""
    if batch.dim() == 3:
        batch = batch.unsqueeze(1)
    if batch.dim() != 4:
        raise MergeclError(f"image batch must be [N, C, H, W], got shape {tuple(batch.shape)}")
    return batch.float().div(255.0) if batch.dtype == torch.uint8 else batch.float()


def match_channels(batch: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey -> RGB by repetition, RGB -> grey by ITU-R 601 luma; otherwise unchanged."""
    have = batch.shape[1]
    if have == channels:
        return batch
    if have == 1 and channels == 3:
        return batch.expand(-1, 3, -1, -1)
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=batch.dtype).view(1, 3, 1, 1)
        return (batch * weights).sum(dim=1, keepdim=True)
    raise MergeclError(f"images have {have} channels, the model takes {channels}")


def resize(batch: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if batch.shape[-2:] == (height, width):
        return batch
    out = F.interpolate(batch, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)  # bicubic overshoots; keep pixel range


def resize_center_crop(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side -> size (aspect kept), then the central size x size crop."""
    h, w = batch.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        batch = resize(batch, max(size, int(h * scale)), max(size, int(w * scale)))
    h, w = batch.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return batch[..., top : top + size, left : left + size]


def random_resized_crop(
    batch: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    top, left, h, w = _resized_crop_box(*batch.shape[-2:], scale, ratio)
    return resize(batch[..., top : top + h, left : left + w], size, size)


def pad_crop_flip(batch: torch.Tensor, pad: int = 4) -> torch.Tensor:
    h, w = batch.shape[-2:]
    padded = F.pad(batch, (pad, pad, pad, pad))
    top = int(torch.randint(0, 2 * pad + 1, (1,)))
    left = int(torch.randint(0, 2 * pad + 1, (1,)))
    out = padded[..., top : top + h, left : left + w]
    return out.flip(-1) if torch.rand(1).item() < 0.5 else out


def _resized_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: 10 tries, then a centre crop at the clamped ratio."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,)))
            left = int(torch.randint(0, width - w + 1, (1,)))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
