"""Backbones declare themselves: one ``Backbone`` per backbone, read by everything else.

A declaration holds the backbone's name, a one-line summary, the typed schema of its own options
(an ``options.Options`` model: type, default, range, description), its builder, whether it has a
text side (so a ``zero_shot`` head can be built from the class names) with its default prompt
templates, its default LoRA target modules and its default ``pretrained``. Each built-in backbone
registers itself at the bottom of its own module (``small.py``: mlp and cnn; ``alexnet.py``,
``resnet_cifar.py``, ``text.py``, ``clip.py``, ``open_clip.py``); third-party code does the same
from a plugin module (``mergecl/plugins.py``)::

    class TinyOptions(Options):
        width: int = Field(32, ge=1)

    @register_backbone("tiny", summary="...", options=TinyOptions, lora_targets=["fc"])
    def build_tiny(spec: ModelSpec, class_names: list[str], device: torch.device) -> nn.Module:
        return Tiny(spec.options.width)  # an encoder with ``out_dim``; or a ``Built``

The ``model:`` block of a config is a mapping with ``name``, the keys every backbone takes
(``ModelOptions``: head, pretrained, templates, head_scale, lora) and the backbone's own options.
``check_model_spec`` checks it against both schemas when the config is read (a one-line
``MergeclError`` naming the key) and returns the typed ``ModelSpec`` a builder gets.
``describe_backbones()`` lists every backbone with its options, read from the schemas.

A backbone may declare ``export``: its trained encoder as a model that loads without mergecl (a
``Standalone``: the state dict in its own library's key names, the directory whose config and
tokenizer files make it loadable; ``mergecl export``). Without one, an export is the encoder's own
state dict.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import torch
from pydantic import Field, field_validator
from torch import nn

from mergecl.errors import MergeclError
from mergecl.models.heads import ZERO_SHOT_SCALE
from mergecl.models.lora import LoraOptions, lora_options
from mergecl.options import Options, read_options

HEADS = ("linear", "zero_shot")
KINDS = {"tensor": "tensors", "text": "text", "image_path": "image files"}  # data kinds (Split.kind), in words


class ModelOptions(Options):
    """The keys of the ``model:`` block that every backbone takes."""

    name: str = Field(description="the backbone (a registered name)")
    head: Literal["linear", "zero_shot"] | None = Field(
        None,
        description="linear: a learned LinearHead; zero_shot: a frozen ZeroShotHead built from the class names "
        "through the backbone's text side; null = zero_shot for backbones with a text side, else linear",
    )
    pretrained: str | None = Field(
        None, description="weights to start from (meaning per backbone); null = none, or the backbone's default"
    )
    templates: list[str] | None = Field(
        None, min_length=1, description="zero-shot prompt templates, each with one '{}'; null = the backbone's"
    )
    head_scale: float = Field(ZERO_SHOT_SCALE, gt=0, description="zero-shot logit scale (CLIP's exp(logit_scale))")
    lora: LoraOptions | None = Field(
        None, description="train LoRA adapters instead of the encoder (rank, alpha, dropout, target_modules)"
    )

    @field_validator("pretrained", mode="before")
    @classmethod
    def _path_as_text(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("templates")
    @classmethod
    def _one_slot(cls, value: list[str] | None) -> list[str] | None:
        for template in value or ():
            if "{}" not in template:
                raise ValueError(f"template {template!r} has no '{{}}' for the class name")
        return value


class Built(NamedTuple):
    """What a builder returns (a bare encoder means ``Built(encoder)``)."""

    encoder: nn.Module  # returns features ``out_dim`` wide (the linear head's input)
    prepare: Callable[[Any, bool], Any] | None = None  # raw batch, train -> encoder input; None: as it comes
    class_embeddings: torch.Tensor | None = None  # [classes, dim] for a zero_shot head (only when asked for)


@dataclass(frozen=True)
class ModelSpec:
    """A checked ``model:`` block: what a builder gets. Defaults are filled in."""

    backbone: Backbone
    options: Any  # an instance of ``backbone.options`` (the backbone's own options)
    head: str  # 'linear' | 'zero_shot'
    pretrained: str | None
    templates: tuple[str, ...]  # the zero-shot prompt templates
    head_scale: float
    lora: LoraOptions | None  # alpha and target_modules filled in; None: full fine-tuning

    @property
    def name(self) -> str:
        return self.backbone.name


Builder = Callable[[ModelSpec, list[str], torch.device], "Built | nn.Module"]


@dataclass(frozen=True)
class Standalone:
    """A trained encoder as a model of its own library (what ``Backbone.export`` returns)."""

    weights: dict[str, torch.Tensor]  # its state dict, in the library's key names
    files_from: Path | None = None  # a model directory whose other files (config, tokenizer) make it loadable
    files: dict[str, bytes] = field(default_factory=dict)  # more files, by relative name
    loads_with: str = ""  # how to load it, in one line
    features: str = ""  # how the head's input is computed from it, in words


# (spec, the encoder's state dict with LoRA folded in: keys relative to the encoder) -> a Standalone,
# or None when this spec has no standalone form
Exporter = Callable[[ModelSpec, dict[str, torch.Tensor]], "Standalone | None"]


@dataclass(frozen=True)
class Backbone:
    """One backbone's declaration (see the module docstring)."""

    name: str
    summary: str
    build: Builder  # (spec, class_names, device) -> Built or a bare encoder
    options: type[Options] = Options  # the schema of its own keys in ``model:``; default: none
    text_side: bool = False  # can build zero-shot class embeddings (and then defaults to head: zero_shot)
    templates: tuple[str, ...] = ()  # default prompt templates of a zero-shot head
    lora_targets: str | tuple[str, ...] | None = None  # default LoRA target modules; None: must be named
    pretrained: str | None = None  # the default of ``model.pretrained``
    inputs: str = ""  # what it takes, in words (for listings)
    check: Callable[[ModelSpec], None] | None = field(default=None, compare=False)  # config-time checks across keys
    kinds: tuple[str, ...] = ()  # the data kinds it takes (Split.kind: tensor, text, image_path); (): any
    export: Exporter | None = field(default=None, compare=False)  # the trained encoder as a standalone model


BACKBONES: dict[str, Backbone] = {}


def register_backbone(
    backbone: Backbone | str,
    *,
    summary: str = "",
    options: type[Options] = Options,
    text_side: bool = False,
    templates: Sequence[str] = (),
    lora_targets: str | Sequence[str] | None = None,
    pretrained: str | None = None,
    inputs: str = "",
    check: Callable[[ModelSpec], None] | None = None,
    kinds: Sequence[str] = (),
    export: Exporter | None = None,
) -> Any:
    """Register a backbone: ``register_backbone(Backbone(...))`` returns it; ``@register_backbone(name,
    summary=..., options=...)`` over a builder registers ``Backbone(name, ..., build=builder)`` and returns
    the builder unchanged. A name can be registered again only by the same module (a re-run)."""
    if isinstance(backbone, Backbone):
        return _add(backbone)
    name = backbone

    def decorate(build: Builder) -> Builder:
        targets = lora_targets if lora_targets is None or isinstance(lora_targets, str) else tuple(lora_targets)
        _add(
            Backbone(
                name, summary, build, options, text_side, tuple(templates), targets, pretrained, inputs, check,
                tuple(kinds), export,
            )
        )  # fmt: skip
        return build

    return decorate


def _add(backbone: Backbone) -> Backbone:
    name = backbone.name
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise MergeclError(f"register_backbone: name {name!r} must be letters, digits, '_' or '-'")
    if not (isinstance(backbone.options, type) and issubclass(backbone.options, Options)):
        raise MergeclError(f"register_backbone {name}: options must be a subclass of mergecl.options.Options")
    clash = set(backbone.options.model_fields) & set(ModelOptions.model_fields)
    if clash:
        raise MergeclError(f"register_backbone {name}: options {sorted(clash)} are keys every backbone takes")
    if backbone.text_side and not backbone.templates:
        raise MergeclError(f"register_backbone {name}: a text side needs default prompt templates")
    if not set(backbone.kinds) <= set(KINDS):
        raise MergeclError(f"register_backbone {name}: kinds are some of {', '.join(KINDS)}, got {backbone.kinds}")
    old = BACKBONES.get(name)
    if old is not None and _origin(old) != _origin(backbone):
        raise MergeclError(f"register_backbone: '{name}' is already registered by {_origin(old)}")
    BACKBONES[name] = backbone
    return backbone


def _origin(backbone: Backbone) -> str:
    return f"{getattr(backbone.build, '__module__', '?')}.{getattr(backbone.build, '__qualname__', '?')}"


def get_backbone(name: Any) -> Backbone:
    if name is None:
        raise MergeclError(f"model.name: missing (choose from {', '.join(BACKBONES)})")
    if not isinstance(name, str) or name not in BACKBONES:
        raise MergeclError(f"model.name: unknown backbone {name!r} (choose from {', '.join(BACKBONES)})")
    return BACKBONES[name]


def check_model_spec(spec: Any) -> ModelSpec:
    """The ``model:`` block checked against the common schema and its backbone's: the typed spec,
    defaults filled in. The first problem is a one-line MergeclError naming the key. Builds nothing."""
    if isinstance(spec, ModelSpec):
        return spec
    if not isinstance(spec, Mapping):
        raise MergeclError(f"model: expected a mapping with a name and its options, got {spec!r}")
    backbone = get_backbone(spec.get("name"))
    own_keys = backbone.options.model_fields
    for key in spec:
        if key not in ModelOptions.model_fields and key not in own_keys:
            known = ", ".join(own_keys) or "none"
            common = ", ".join(k for k in ModelOptions.model_fields if k != "name")
            raise MergeclError(
                f"model: unknown key {key!r} (options of {backbone.name}: {known}; of every backbone: {common})"
            )
    for key, info in own_keys.items():
        if info.is_required() and key not in spec:
            about = f" ({info.description})" if info.description else ""
            raise MergeclError(f"model.{key}: required for {backbone.name}{about}")
    given = {k: v for k, v in spec.items() if k in ModelOptions.model_fields}
    if given.get("lora") is not None:  # its own check first: its errors name model.lora.KEY
        given["lora"] = lora_options(given["lora"], backbone.name, backbone.lora_targets)
    common = cast(ModelOptions, read_options(ModelOptions, given, "model"))
    options = read_options(backbone.options, {k: v for k, v in spec.items() if k in own_keys}, "model")
    head = common.head or ("zero_shot" if backbone.text_side else "linear")
    if head == "zero_shot" and not backbone.text_side:
        raise MergeclError(f"model.head: {backbone.name} has no text side for a zero_shot head; use head: linear")
    checked = ModelSpec(
        backbone=backbone,
        options=options,
        head=head,
        pretrained=common.pretrained if "pretrained" in spec else backbone.pretrained,
        templates=tuple(common.templates) if common.templates is not None else backbone.templates,
        head_scale=common.head_scale,
        lora=common.lora,
    )
    if backbone.check is not None:
        backbone.check(checked)
    return checked


def check_inputs(spec: Any, kind: str, source: str) -> None:
    """The data kind ``kind`` (``Split.kind``) of data source ``source`` against the kinds the
    backbone declares: a one-line MergeclError before any model is built when it cannot take them."""
    backbone = check_model_spec(spec).backbone
    if not backbone.kinds or kind in backbone.kinds:
        return
    takes = " or ".join(KINDS[k] for k in backbone.kinds)
    fits = [b.name for b in BACKBONES.values() if kind in b.kinds]
    hint = f"; backbones for {KINDS.get(kind, kind)}: {', '.join(fits)}" if fits else ""
    raise MergeclError(
        f"model.name: {backbone.name} takes {takes}, but data source {source!r} gives {KINDS.get(kind, kind)}{hint}"
    )


def describe_backbones() -> str:
    """Every registered backbone with its options (type, default, description), from the schemas."""
    lines = ["Keys every backbone takes:"]
    lines += _describe_fields(ModelOptions, skip=("name",))
    lines.append("model.lora:")
    lines += _describe_fields(LoraOptions)
    for backbone in BACKBONES.values():
        extras = []
        if backbone.text_side:
            extras.append("text side: head zero_shot by default")
        if backbone.pretrained is not None:
            extras.append(f"pretrained default {backbone.pretrained!r}")
        if backbone.lora_targets is not None:
            extras.append(f"LoRA targets {_show(backbone.lora_targets)}")
        if backbone.inputs:
            extras.append(f"inputs: {backbone.inputs}")
        tail = f" ({'; '.join(extras)})" if extras else ""
        lines.append(f"{backbone.name}: {backbone.summary}{tail}")
        lines += _describe_fields(backbone.options) or ["  (no options of its own)"]
    return "\n".join(lines)


def _describe_fields(schema: type[Options], skip: Sequence[str] = ()) -> list[str]:
    out = []
    for key, info in schema.model_fields.items():
        if key in skip:
            continue
        default = "required" if info.is_required() else f"default {_show(info.get_default(call_default_factory=True))}"
        about = f": {info.description}" if info.description else ""
        out.append(f"  {key} ({_type_name(info.annotation)}, {default}){about}")
    return out


def _type_name(annotation: Any) -> str:
    """``list[Annotated[int, ...]] | None`` -> ``list[int] | null``: a type as a config reader sees it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(_show(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, Options):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if isinstance(value, (list, dict)) else repr(value)
