"""ResNet-20/32/44/56/110 for 32x32 images (He et al. 2016, §4.2), as in akamaster/pytorch_resnet_cifar10.

The module layout reproduces akamaster's exactly, so its released checkpoints (resnet20-12fca82f.th,
resnet56-4bfd9763.th: a torch pickle ``{"state_dict": {"module.<key>": tensor}, "best_prec1": float}``)
load strictly after the ``module.`` prefix is stripped. Shortcuts use "option A": when the shape
changes, subsample by 2 and zero-pad the channels (no parameters). Inputs were normalised with the
ImageNet mean/std in akamaster's training, which ``resnet_cifar_preparer`` repeats.

As an encoder (``num_classes=None``) the network stops at the 64-d global-average-pooled features;
the checkpoint's 10-class ``linear`` layer is dropped on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mergecl.errors import MergeclError
from mergecl.models.images import IMAGENET_MEAN, IMAGENET_STD, ImagePreparer
from mergecl.models.registry import Built, ModelSpec, register_backbone
from mergecl.models.weights import load_weights
from mergecl.options import Options

DEPTHS = (20, 32, 44, 56, 110)


class PadShortcut(nn.Module):
    """Option-A shortcut: x[:, :, ::2, ::2] with planes//4 zero channels on each side."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        changes_shape = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = PadShortcut(planes) if changes_shape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """akamaster's ResNet; ``num_classes=None`` leaves out the classifier (an encoder, out_dim 64)."""

    def __init__(self, depth: int = 20, num_classes: int | None = None) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise MergeclError(f"resnet_cifar depth must be one of {DEPTHS}, got {depth}")
        blocks = (depth - 2) // 6
        self.depth = depth
        self.out_dim = 64
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = _stage(16, 16, blocks, stride=1)
        self.layer2 = _stage(16, 32, blocks, stride=2)
        self.layer3 = _stage(32, 64, blocks, stride=2)
        self.linear = nn.Linear(64, num_classes) if num_classes else None
        for module in self.modules():  # akamaster's _weights_init
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        features = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(features) if self.linear is not None else features


def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_planes, planes, stride)]
    layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def load_resnet_cifar(path: str | Path, depth: int = 20, num_classes: int | None = None) -> ResNetCifar:
    """A ResNet-CIFAR with weights from ``path`` (akamaster .th or safetensors), loaded strictly.

    ``num_classes=None``: the checkpoint's classifier (``linear.*``) is dropped and an encoder returned.
    """
    model = ResNetCifar(depth, num_classes)
    load_weights(model, path, drop_prefixes=("linear.",) if num_classes is None else ())
    return model


def resnet_cifar_preparer(augment: bool = True, size: int = 32) -> ImagePreparer:
    """ImageNet mean/std normalisation (akamaster's); train-time pad-4 crop + flip when ``augment``."""
    return ImagePreparer(size, IMAGENET_MEAN, IMAGENET_STD, augment="pad_crop_flip" if augment else "none")


class ResNetCifarOptions(Options):
    depth: Literal[DEPTHS] = Field(20, description="network depth")  # type: ignore[valid-type]
    augment: bool = Field(True, description="train-time pad-4 crop + flip")


@register_backbone(
    "resnet_cifar",
    summary="akamaster's ResNet-20/32/44/56/110; pretrained: akamaster's .th file (or safetensors), "
    "its 10-class classifier dropped",
    options=ResNetCifarOptions,
    inputs="images [N, 3, 32, 32] in [0, 1]",
    kinds=["tensor", "image_path"],
)
def build_resnet_cifar(spec: ModelSpec, class_names: list[str], device: torch.device) -> Built:
    options = cast(ResNetCifarOptions, spec.options)
    encoder = ResNetCifar(options.depth)
    if spec.pretrained is not None:
        load_weights(encoder, spec.pretrained, drop_prefixes=("linear.",))
    return Built(encoder, resnet_cifar_preparer(augment=options.augment))
