"""models/: a Learner = encoder + head, and the backbones and heads it is built from.

``build_learner(spec, class_names, device)`` is the entry point (spec keys: see
``mergecl.models.factory``). Importing this package needs only torch: transformers, PIL and
open_clip are imported inside the functions that use them.
"""

from mergecl.models.base import Learner
from mergecl.models.factory import build_learner
from mergecl.models.heads import LinearHead, ZeroShotHead, build_zero_shot_weights

__all__ = ["Learner", "LinearHead", "ZeroShotHead", "build_learner", "build_zero_shot_weights"]
