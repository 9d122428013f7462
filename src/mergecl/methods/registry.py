"""Method names -> (training stream, merge rule).

A CL method is how each task is trained (a *stream*) plus, optionally, a merge rule applied after
every step to the stream's task vectors tau_1..tau_t. Methods that differ only in the rule share one
stream, so asking for seq_ft, magmax, average and ties trains once.

Names: ``seq_ft``, ``ind_ft``, ``joint``, ``zero_shot``, ``lwf``, ``ewc``; a merge rule alone
(``magmax``) means that rule over Seq-FT task vectors; ``seq_ft+RULE`` and ``ind_ft+RULE`` say
which task vectors explicitly. Any name may carry a tag, ``magmax@auto``, to run it again with
other method_options (keyed by the full name). A tagged plain method (``pam@zero``) is a stream of
its own, ``pam@zero``, trained with its own options; a tagged merge (``magmax@auto``) reuses its
untagged stream.

Options: ``check_method_options`` checks a config's ``method_options`` against the schema of the
method each key names (``method_schema``), when the config is read: a training method's schema is
its stream's (``Stream.options``); a merge method's is built from the merge engine's own
declarations (``MergeOptions`` and the rule's ``RuleSpec.options``) plus what the runner adds
(``lam: auto``, ``lam_grid``, ``space``).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, create_model, model_validator

from mergecl.errors import MergeclError
from mergecl.merging.engine import RULES, MergeOptions
from mergecl.options import Options, read_options
from mergecl.methods.streams import STREAMS

# method name -> the stream whose own model it evaluates (modules of new methods add theirs)
PLAIN_METHODS = {
    "seq_ft": "seq",
    "ind_ft": "ind",
    "joint": "joint",
    "zero_shot": "zero_shot",
    "lwf": "lwf",
    "ewc": "ewc",
    "gpm": "gpm",
    "became": "became",
    "gpm_one_over_t": "gpm_one_over_t",
    "seq_became": "seq_became",
    "pam": "pam",
}
CL_RULES = ("average", "task_arithmetic", "random_mix", "magmax", "ties", "one_over_t")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    stream: str  # the trained stream's name: a ``STREAMS`` key, with ``@TAG`` for a variant
    rule: str | None = None  # None: evaluate the stream's own model

    @property
    def kind(self) -> str:
        return stream_kind(self.stream)


def stream_kind(stream: str) -> str:
    """``pam@zero`` -> ``pam``: the registered stream a (possibly tagged) stream runs."""
    return stream.partition("@")[0]


def resolve_method(name: str) -> MethodSpec:
    """``NAME@TAG`` is a variant of NAME with its own method_options (e.g. ``magmax@auto``)."""
    base, _, tag = name.partition("@")
    if tag and not tag.replace("_", "").replace(".", "").isalnum():
        raise MergeclError(f"method '{name}': the tag after '@' must be letters, digits, '_' or '.'")
    if base in PLAIN_METHODS:
        return MethodSpec(name, PLAIN_METHODS[base] + (f"@{tag}" if tag else ""))
    prefix, _, rule = base.rpartition("+")
    stream = {"": "seq", "seq_ft": "seq", "ind_ft": "ind"}.get(prefix)
    if stream is None or rule not in CL_RULES:
        valid = [*PLAIN_METHODS, *CL_RULES, *(f"ind_ft+{r}" for r in CL_RULES)]
        raise MergeclError(f"unknown method '{name}' (valid: {', '.join(valid)}; or seq_ft+RULE)")
    return MethodSpec(name, stream, rule)


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

    rule: ClassVar[str]  # set by ``rule_schema``

    lam: Positive | Literal["auto"] | None = None  # None: the rule's default; auto: best of lam_grid
    lam_grid: Annotated[list[Positive], Field(min_length=1)] | None = None  # None: 0.1, 0.2, ..., 1.0
    space: Literal["factors", "dense"] = "factors"  # LoRA: merge the factors, or the changes B A

    @model_validator(mode="after")
    def _engine_accepts(self):
        if self.lam_grid is not None and self.lam != "auto":
            raise ValueError("lam_grid is only used with lam: auto")
        engine = self.model_dump(exclude={"lam", "lam_grid", "space"}, exclude_unset=True)
        lam = None if self.lam == "auto" else self.lam
        try:  # the engine's own range checks (keep in (0, 1], a valid regex, ...)
            MergeOptions(method=self.rule, lam=lam, **engine)
        except MergeclError as err:
            raise ValueError(str(err)) from None
        return self


@functools.cache
def rule_schema(rule: str) -> type[Options]:
    """A merge method's options: the engine's ``MergeOptions`` fields (types and defaults), minus
    those another rule declares as its own (``keep`` is TIES's); ``seed`` stays: DARE draws too."""
    hints = typing.get_type_hints(MergeOptions)
    others = {option for spec in RULES.values() for option in spec.options} - set(RULES[rule].options) - {"seed"}
    fields: dict[str, Any] = {
        f.name: (hints[f.name], f.default)
        for f in dataclasses.fields(MergeOptions)
        if f.name not in ("method", "lam", *others)
    }
    schema = create_model(f"{rule}_options", __base__=MergeMethodOptions, **fields)
    schema.rule = rule  # read by the engine check above
    return schema


def method_schema(spec: MethodSpec) -> type[Options]:
    return rule_schema(spec.rule) if spec.rule else STREAMS[spec.kind].options


def check_method_options(methods: list[str], method_options: Mapping[str, Any], lora: bool = False) -> None:
    """Every key of ``method_options`` against the run's methods: a method (or a stream, ``seq``)
    of the run, and options its schema accepts. ``lora``: the model has LoRA adapters."""
    specs = {spec.name: spec for spec in resolve_methods(methods)}
    streams = {spec.stream for spec in specs.values()}
    trained: dict[str, str] = {}  # stream -> the key that sets its training's options
    for key, given in method_options.items():
        where = f"method_options.{key}"
        if key in specs:
            schema = method_schema(specs[key])
        elif key in streams:
            schema = STREAMS[stream_kind(key)].options
        else:
            raise MergeclError(f"{where}: '{key}' is not a method of this run (methods: {', '.join(specs)})")
        options = read_options(schema, given, where)
        if getattr(options, "space", None) == "dense" and not lora:
            raise MergeclError(f"{where}.space: dense needs a LoRA model (model.lora)")
        if key in specs and specs[key].rule:
            continue  # a merge's own options
        stream = specs[key].stream if key in specs else key
        if trained.setdefault(stream, key) != key:  # the runner would read only one of them
            raise MergeclError(f"method_options: {trained[stream]} and {key} both set the options of one training")
