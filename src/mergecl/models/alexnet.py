"""The AlexNet-5 of GPM (Saha et al. 2021), used by BECAME's CIFAR-100 benchmarks (docs/methods.md#became).

conv 64 k4 -> BN -> ReLU -> dropout 0.2 -> maxpool 2; conv 128 k3 (same, dropout 0.2); conv 256 k2
(dropout 0.5); fc 2048 -> BN -> ReLU -> dropout 0.5; fc 2048 (same). Convolutions and linear
layers have no bias (the release's ``bias=False``); every BatchNorm has ``track_running_stats=False``,
so it normalises with the statistics of the current batch in eval mode too. An encoder: it returns
the 2048-d features and a ``LinearHead`` sits on top (the release has one bias-free head per task;
here one head over all classes, each task using its own columns).

Inputs are 3x32x32 images in [0, 1] (flat vectors are reshaped); with ``normalize`` they are
standardised with the release's mean/std (x/255 of 125.3, 123.0, 113.9 and 63.0, 62.1, 66.7).
"""

from __future__ import annotations

import math
from typing import cast

import torch
from pydantic import Field
from torch import nn

from mergecl.errors import MergeclError
from mergecl.models.registry import ModelSpec, register_backbone
from mergecl.models.weights import load_weights
from mergecl.options import Options

GPM_MEAN = tuple(x / 255 for x in (125.3, 123.0, 113.9))
GPM_STD = tuple(x / 255 for x in (63.0, 62.1, 66.7))


def conv_output_size(size: int, kernel: int) -> int:
    return size - kernel + 1  # stride 1, no padding


class AlexNet5(nn.Module):
    def __init__(self, in_channels: int = 3, image_size: int = 32, normalize: bool = True) -> None:
        super().__init__()
        if normalize and in_channels != 3:
            raise MergeclError(f"AlexNet5: normalize uses RGB statistics; in_channels is {in_channels}")
        side = image_size
        for kernel in (4, 3, 2):
            side = conv_output_size(side, kernel) // 2
        if side < 1:
            raise MergeclError(f"AlexNet5: image_size {image_size} is too small (needs >= 18)")
        self.in_shape = (in_channels, image_size, image_size)
        self.out_dim = 2048
        self.conv1 = nn.Conv2d(in_channels, 64, 4, bias=False)
        self.bn1 = nn.BatchNorm2d(64, track_running_stats=False)
        self.conv2 = nn.Conv2d(64, 128, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(128, track_running_stats=False)
        self.conv3 = nn.Conv2d(128, 256, 2, bias=False)
        self.bn3 = nn.BatchNorm2d(256, track_running_stats=False)
        self.fc1 = nn.Linear(256 * side * side, 2048, bias=False)
        self.bn4 = nn.BatchNorm1d(2048, track_running_stats=False)
        self.fc2 = nn.Linear(2048, 2048, bias=False)
        self.bn5 = nn.BatchNorm1d(2048, track_running_stats=False)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.drop1 = nn.Dropout(0.2)
        self.drop2 = nn.Dropout(0.5)
        self.normalize = normalize
        # not persistent: constants, not weights (no entry in the state dict, nothing to merge)
        self.register_buffer("mean", torch.tensor(GPM_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(GPM_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.dim() in (2, 3) and x[0].numel() == math.prod(self.in_shape):
            x = x.reshape(x.shape[0], *self.in_shape)
        if tuple(x.shape[1:]) != self.in_shape:
            raise MergeclError(f"AlexNet5 expects inputs of shape [N, {self.in_shape}], got {tuple(x.shape)}")
        if self.normalize:
            x = (x - self.mean) / self.std
        x = self.pool(self.drop1(self.relu(self.bn1(self.conv1(x)))))
        x = self.pool(self.drop1(self.relu(self.bn2(self.conv2(x)))))
        x = self.pool(self.drop2(self.relu(self.bn3(self.conv3(x)))))
        x = self.drop2(self.relu(self.bn4(self.fc1(x.flatten(1)))))
        return self.drop2(self.relu(self.bn5(self.fc2(x))))


class AlexNet5Options(Options):
    in_channels: int = Field(3, ge=1, description="input channels")
    image_size: int = Field(32, ge=1, description="side of the square input images")
    normalize: bool = Field(True, description="standardise with the release's CIFAR mean/std (RGB only)")


@register_backbone(
    "alexnet5",
    summary="the AlexNet-5 of GPM/BECAME; pretrained: a .safetensors / torch file of encoder weights",
    options=AlexNet5Options,
    inputs="images [N, 3, 32, 32] in [0, 1] or flat vectors",
    kinds=["tensor"],
)
def build_alexnet5(spec: ModelSpec, class_names: list[str], device: torch.device) -> nn.Module:
    options = cast(AlexNet5Options, spec.options)
    encoder = AlexNet5(options.in_channels, options.image_size, options.normalize)
    if spec.pretrained is not None:
        load_weights(encoder, spec.pretrained)
    return encoder
