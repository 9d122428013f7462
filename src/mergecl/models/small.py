"""Small backbones trained from scratch: an MLP and a two-block CNN.

Both are encoders: they return a feature vector (``out_dim`` wide) and a ``LinearHead`` sits on top.
They take float tensors as they come from the data layer (no ``prepare`` step is needed).
Both register themselves as backbones (``mlp``, ``cnn``) with the schemas of their options.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, cast

import torch
from pydantic import Field
from torch import nn

from mergecl.errors import MergeclError
from mergecl.models.registry import ModelSpec, register_backbone
from mergecl.models.weights import load_weights
from mergecl.options import Options


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] per hidden size. No hidden sizes: the identity on the
    flattened input (a linear model once the head is on top)."""

    def __init__(self, in_dim: int, hidden: Sequence[int] = (256, 256), dropout: float = 0.0) -> None:
        super().__init__()
        _check_positive("in_dim", [in_dim])
        _check_positive("hidden", list(hidden))
        _check_dropout(dropout)
        layers: list[nn.Module] = []
        width = in_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        self.in_dim = in_dim
        self.out_dim = width
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1).float()
        if x.shape[1] != self.in_dim:
            raise MergeclError(f"MLP expects {self.in_dim} input features, got {x.shape[1]}")
        return self.layers(x)


class SmallCNN(nn.Module):
    """[Conv3x3 -> ReLU -> MaxPool2] per channel count, then Linear -> ReLU (-> Dropout) to
    ``feature_dim``. Built for 1x28x28 (MNIST) and 3x32x32 (CIFAR); any square size >= 2**blocks works.
    Flat inputs [N, C*H*W] are reshaped to [N, C, H, W]."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        channels: Sequence[int] = (32, 64),
        feature_dim: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_positive("in_channels", [in_channels])
        _check_positive("channels", list(channels))
        _check_positive("feature_dim", [feature_dim])
        _check_dropout(dropout)
        if not channels or image_size < 2 ** len(channels):
            raise MergeclError(f"SmallCNN: image_size {image_size} is too small for {len(channels)} pooling blocks")
        blocks: list[nn.Module] = []
        width, side = in_channels, image_size
        for size in channels:
            blocks += [nn.Conv2d(width, size, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            width, side = size, side // 2
        fc: list[nn.Module] = [nn.Linear(width * side * side, feature_dim), nn.ReLU()]
        if dropout > 0:
            fc.append(nn.Dropout(dropout))
        self.in_shape = (in_channels, image_size, image_size)
        self.out_dim = feature_dim
        self.conv = nn.Sequential(*blocks)
        self.fc = nn.Sequential(*fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.dim() in (2, 3) and x[0].numel() == math.prod(self.in_shape):
            x = x.reshape(x.shape[0], *self.in_shape)  # flat vectors or [N, H, W] grey images
        if tuple(x.shape[1:]) != self.in_shape:
            raise MergeclError(f"SmallCNN expects inputs of shape [N, {self.in_shape}], got {tuple(x.shape)}")
        return self.fc(self.conv(x).flatten(1))


def _check_positive(name: str, values: list[int]) -> None:
    if any(int(v) != v or v < 1 for v in values):
        raise MergeclError(f"{name} must be positive integers, got {values}")


def _check_dropout(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise MergeclError(f"dropout must be in [0, 1), got {p}")


class MLPOptions(Options):
    in_dim: int = Field(ge=1, description="the flattened input size")
    hidden: list[Annotated[int, Field(ge=1)]] = Field([256, 256], description="hidden widths ([]: a linear model)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout after each hidden layer")


class CNNOptions(Options):
    in_channels: int = Field(1, ge=1, description="input channels")
    image_size: int = Field(28, ge=2, description="side of the square input images")
    channels: list[Annotated[int, Field(ge=1)]] = Field(
        [32, 64], min_length=1, description="channels of each conv-pool block"
    )
    feature_dim: int = Field(128, ge=1, description="width of the features (the head's input)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the features")


PRETRAINED_FILE = "pretrained: a .safetensors / torch file of encoder weights (or of a whole Learner)"


@register_backbone(
    "mlp",
    summary=f"an MLP trained from scratch; {PRETRAINED_FILE}",
    options=MLPOptions,
    inputs="vectors (flattened)",
    kinds=["tensor"],
)
def build_mlp(spec: ModelSpec, class_names: list[str], device: torch.device) -> nn.Module:
    options = cast(MLPOptions, spec.options)
    encoder = MLP(options.in_dim, options.hidden, options.dropout)
    if spec.pretrained is not None:
        load_weights(encoder, spec.pretrained)
    return encoder


@register_backbone(
    "cnn",
    summary=f"a small CNN trained from scratch; {PRETRAINED_FILE}",
    options=CNNOptions,
    inputs="images [N, C, H, W], [N, H, W] or flat vectors",
    kinds=["tensor"],
)
def build_cnn(spec: ModelSpec, class_names: list[str], device: torch.device) -> nn.Module:
    options = cast(CNNOptions, spec.options)
    encoder = SmallCNN(
        in_channels=options.in_channels,
        image_size=options.image_size,
        channels=options.channels,
        feature_dim=options.feature_dim,
        dropout=options.dropout,
    )
    if spec.pretrained is not None:
        load_weights(encoder, spec.pretrained)
    return encoder
