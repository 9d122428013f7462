"""Option schemas (layer 0): every merge rule, training method, backbone and data source declares its
options once, as a small typed pydantic model (type, default, range); the config check, the CLI and
the code that uses the options all read that model.

A schema is strict: no unknown key, no string where a number is expected ('1e3' stays text in
YAML 1.1), no bool for a number, no NaN or infinity. ``read_options`` turns the first problem into
one line naming the key: ``method_options.ewc: unknown option 'lamda' (options: decay, ...)``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from mergecl.errors import MergeclError

# a field's constraints as a reader writes them (pydantic's metadata attribute -> symbol), for listings
RANGE_WORDS = (
    ("ge", ">="),
    ("gt", ">"),
    ("le", "<="),
    ("lt", "<"),
    ("min_length", "length >="),
    ("max_length", "length <="),
)


class Options(BaseModel):
    """A method's options (none: a method without options). Subclasses declare fields."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


def read_options(schema: type[Options], given: Any, where: str) -> Options:
    """``given`` (a mapping from the config) checked against ``schema``; a MergeclError names the key."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise MergeclError(f"{where}: expected a mapping of options, got {given!r}")
    try:
        return schema.model_validate(given)
    except ValidationError as err:
        raise MergeclError(error_line(err, schema, where)) from None


def error_line(err: ValidationError, schema: type[Options], where: str) -> str:
    """The first wrong key of ``err`` as one line (a union's alternatives joined by 'or')."""
    errors = err.errors()
    first = errors[0]
    key = str(first["loc"][0]) if first["loc"] else ""
    if first["type"] == "extra_forbidden":
        known = f"options: {', '.join(schema.model_fields)}" if schema.model_fields else "it takes no options"
        return f"{where}: unknown option '{key}' ({known})"
    if not key:  # a check over several options (a model validator)
        return f"{where}: {first['msg'].removeprefix('Value error, ')}"
    # a union (e.g. a number or 'auto') reports one error per alternative: say them all at once
    wanted = list(dict.fromkeys(e["msg"] for e in errors if e["loc"] and str(e["loc"][0]) == key))
    message = wanted[0].removeprefix("Value error, ")
    if len(wanted) > 1:
        message = "Input should be " + " or ".join(m.removeprefix("Input should be ") for m in wanted)
    where = f"{where}.{key}" + "".join(f"[{p}]" for p in first["loc"][1:] if isinstance(p, int))
    return f"{where}: {message}, got {first['input']!r}"
