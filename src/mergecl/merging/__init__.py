"""Layer 1: pure tensor code. Task vectors, merge rules, and the streaming merge engine."""

from mergecl.merging import rules
from mergecl.merging.checkpoints import open_checkpoint, write_checkpoint
from mergecl.merging.engine import RULES, MergeResult, merge, merge_checkpoints

__all__ = [
    "RULES",
    "MergeResult",
    "merge",
    "merge_checkpoints",
    "open_checkpoint",
    "rules",
    "write_checkpoint",
]
