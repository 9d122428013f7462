"""models/: a Learner = encoder + head, and the backbones and heads it is built from.

``build_learner(spec, class_names, device)`` is the entry point. Each backbone declares itself in
its own module with ``register_backbone`` (``mergecl.models.registry``: name, typed options, builder,
text side, LoRA targets); importing this package registers the built-in ones, in the order below.
Importing it needs only torch: transformers, PIL and open_clip are imported inside the functions
that use them.
"""

import importlib

from mergecl.models.base import Learner
from mergecl.models.factory import build_learner
from mergecl.models.heads import LinearHead, ZeroShotHead, build_zero_shot_weights
from mergecl.models.registry import (
    BACKBONES,
    Backbone,
    Built,
    ModelOptions,
    ModelSpec,
    check_model_spec,
    describe_backbones,
    register_backbone,
)

# The modules of the built-in backbones: each registers its backbones when imported, in this order
# (the order in which they are listed).
BUILTIN_BACKBONE_MODULES = ("small", "alexnet", "resnet_cifar", "text", "clip", "open_clip")
for _module in BUILTIN_BACKBONE_MODULES:
    importlib.import_module(f"mergecl.models.{_module}")

__all__ = [
    "BACKBONES",
    "Backbone",
    "Built",
    "Learner",
    "LinearHead",
    "ModelOptions",
    "ModelSpec",
    "ZeroShotHead",
    "build_learner",
    "build_zero_shot_weights",
    "check_model_spec",
    "describe_backbones",
    "register_backbone",
]
