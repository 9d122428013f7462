"""Method names -> (training, merge rule).

A CL method is how each task is trained (a *training*, ``trainings.py``) plus, optionally, a merge
rule applied after every step to the training's task vectors tau_1..tau_t. Methods that differ only
in the rule share one training, so asking for seq_ft, magmax, average and ties trains once.

Names: each registered training's plain method (``seq_ft``, ``ind_ft``, ``joint``, ``zero_shot``,
``lwf``, ``ewc``, ``gpm``, ``became``, ``pam``, ... and a plugin's); a merge rule alone (``magmax``)
means that rule over Seq-FT task vectors; ``seq_ft+RULE`` and ``ind_ft+RULE`` say which task vectors
explicitly, and so does any independent training's method (``finetuned+RULE``: given checkpoints).
Any name may carry a tag, ``magmax@auto``, to run it again with other method_options (keyed by the
full name). A tagged plain method (``pam@zero``) is a training of its own,
``pam@zero``, trained with its own options; a tagged merge (``magmax@auto``) reuses its untagged
training.

Options: ``check_method_options`` checks a config's ``method_options`` against the schema of the
method each key names (``method_schema``), when the config is read: a training method's schema is
its training's (``Training.options``); a merge method's is built from the merge engine's own
declarations (``merging.engine.merge_schema``: the engine's options and the rule's) plus what a CL merge adds
(``lam: auto``, ``lam_grid``, ``space``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, create_model, model_validator

from mergecl.errors import MergeclError
from mergecl.merging.engine import merge_schema
from mergecl.merging.registry import all_rules
from mergecl.methods.trainings import TRAININGS, plain_methods, registered_training
from mergecl.options import Options, read_options


def cl_rules() -> list[str]:
    """The merge rules that are CL methods: those that need no checkpoint besides the task vectors."""
    return [name for name, rule in all_rules().items() if rule.continual]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    # the training whose task vectors it evaluates: a registered training's name, with ``@TAG`` for a
    # variant (``pam@zero``); ``registered_training`` gives the registered one
    training: str
    rule: str | None = None  # None: evaluate the training's own model


def task_vector_methods() -> dict[str, str]:
    """Plain method -> training, for the independent trainings (each task from theta_0: ``ind_ft``,
    ``finetuned``), whose task vectors ``METHOD+RULE`` merges; Seq-FT's are ``seq_ft+RULE``."""
    return {t.method: t.name for t in TRAININGS.values() if t.independent}


def resolve_method(name: str) -> MethodSpec:
    """``NAME@TAG`` is a variant of NAME with its own method_options (e.g. ``magmax@auto``)."""
    base, _, tag = name.partition("@")
    if tag and not tag.replace("_", "").replace(".", "").isalnum():
        raise MergeclError(f"method '{name}': the tag after '@' must be letters, digits, '_' or '.'")
    plain = plain_methods()
    if base in plain:
        return MethodSpec(name, plain[base] + (f"@{tag}" if tag else ""))
    prefix, _, rule = base.rpartition("+")
    training = {"": "seq", "seq_ft": "seq", **task_vector_methods()}.get(prefix)
    rules = cl_rules()
    if training is None or rule not in rules:
        valid = [*plain, *rules, *(f"ind_ft+{r}" for r in rules)]
        others = ", ".join(f"{m}+RULE" for m in ["seq_ft", *task_vector_methods()] if m != "ind_ft")
        raise MergeclError(f"unknown method '{name}' (valid: {', '.join(valid)}; or {others})")
    return MethodSpec(name, training, rule)


def resolve_methods(names: list[str]) -> list[MethodSpec]:
    if not names:
        raise MergeclError("config: methods: give at least one method")
    specs = [resolve_method(n) for n in names]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise MergeclError(f"config: methods: '{spec.name}' is listed twice")
        seen.add(spec.name)
    return specs


# --- options ------------------------------------------------------------------------------------

Positive = Annotated[float, Field(gt=0)]


class MergeMethodOptions(Options):
    """What a CL merge adds to the engine's options: lam chosen on validation, the LoRA space."""

    lam: Positive | Literal["auto"] | None = None  # None: the rule's default; auto: best of lam_grid
    lam_grid: Annotated[list[Positive], Field(min_length=1)] | None = None  # None: 0.1, 0.2, ..., 1.0
    space: Literal["factors", "dense"] = "factors"  # LoRA: merge the factors, or the changes B A

    @model_validator(mode="after")
    def _grid_needs_auto(self):
        if self.lam_grid is not None and self.lam != "auto":
            raise ValueError("lam_grid is only used with lam: auto")
        return self


@functools.cache
def rule_schema(rule: str) -> type[Options]:
    """A merge method's options: the merge's own schema (the engine's options and the rule's, from
    its declaration) with what a CL merge adds in front (``lam: auto``, ``lam_grid``, ``space``)."""
    return create_model(f"{rule}_options", __base__=(MergeMethodOptions, merge_schema(rule)))


def method_schema(spec: MethodSpec) -> type[Options]:
    return rule_schema(spec.rule) if spec.rule else registered_training(spec.training).options


def check_method_options(methods: list[str], method_options: Mapping[str, Any], lora: bool = False) -> None:
    """Every key of ``method_options`` against the run's methods: a method (or a training, ``seq``)
    of the run, and options its schema accepts. ``lora``: the model has LoRA adapters."""
    specs = {spec.name: spec for spec in resolve_methods(methods)}
    trainings = {spec.training for spec in specs.values()}
    trained: dict[str, str] = {}  # training -> the key that sets its options
    for key, given in method_options.items():
        where = f"method_options.{key}"
        if key in specs:
            schema = method_schema(specs[key])
        elif key in trainings:
            schema = registered_training(key).options
        else:
            raise MergeclError(f"{where}: '{key}' is not a method of this run (methods: {', '.join(specs)})")
        options = read_options(schema, given, where)
        if getattr(options, "space", None) == "dense" and not lora:
            raise MergeclError(f"{where}.space: dense needs a LoRA model (model.lora)")
        if key in specs and specs[key].rule:
            continue  # a merge's own options
        training = specs[key].training if key in specs else key
        if trained.setdefault(training, key) != key:  # the runner would read only one of them
            raise MergeclError(f"method_options: {trained[training]} and {key} both set the options of one training")
