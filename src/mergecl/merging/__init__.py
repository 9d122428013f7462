"""Layer 1: pure tensor code. Merge rules and their declarations, checkpoint readers and writer, and
the streaming merge engine. ``register_rule`` adds a rule from any module (docs/extending.md)."""

from mergecl.merging import rules, ties
from mergecl.merging.checkpoints import open_checkpoint, write_checkpoint
from mergecl.merging.continual import continual_merges, merge_continual
from mergecl.merging.engine import MergeResult, merge, merge_checkpoints
from mergecl.merging.registry import Draw, Input, Prepared, Rule, all_rules, get_rule, register_rule

__all__ = [
    "Draw",
    "Input",
    "MergeResult",
    "Prepared",
    "Rule",
    "all_rules",
    "continual_merges",
    "get_rule",
    "merge",
    "merge_checkpoints",
    "merge_continual",
    "open_checkpoint",
    "register_rule",
    "rules",
    "ties",
    "write_checkpoint",
]
