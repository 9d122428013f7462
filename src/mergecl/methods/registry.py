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
"""

from __future__ import annotations

from dataclasses import dataclass

from mergecl.errors import MergeclError

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
