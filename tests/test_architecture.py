"""The import layers of docs/architecture.md, enforced.

The layer table is read from the doc itself (so the two cannot drift): each row names a layer, the
folders (``merging/``) and top-level files (``errors.py``) it holds, and the layers it may import
(``0``, ``0, 2, 3``, ``0-4``, ``all``; a parenthesis is a comment). Every module of src/mergecl
must belong to exactly one row, and every ``import`` / ``from ... import`` in it (module level or
inside a function, relative or absolute) that names a mergecl module must name one of a layer the
row allows. A module may always import within its own layer.

The one exception, stated under the doc's table: the package's own ``__init__.py`` is layer 0,
but its ``__getattr__`` lazily imports the public entry points ``mergecl.merge`` and ``mergecl.run`` (functions)
(on first use only, so ``import mergecl`` loads nothing above layer 0).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
PACKAGE = ROOT / "src" / "mergecl"
FACADE = (Path("__init__.py"), "__getattr__")  # the doc's stated exception (see the module docstring)


def read_layer_table(text: str) -> tuple[dict[str, int], dict[int, set[int]]]:
    """({"merging/": 1, "errors.py": 0, ...}, {layer: the layers it may import}) from the doc's table."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^\|\s*layer\s*\|\s*folder\s*\|", line))
    header = [cell.strip() for cell in lines[start].strip().strip("|").split("|")]
    places, allowed = {}, {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        row = dict(zip(header, (cell.strip() for cell in line.strip().strip("|").split("|")), strict=True))
        layer = int(row["layer"])
        for name in re.findall(r"`([^`]+)`", row["folder"]):
            assert name not in places, f"{DOC.name}: {name} is in two rows of the layer table"
            places[name] = layer
        allowed[layer] = row["imports"]
    everything = set(allowed)
    return places, {layer: _layers(spec, everything) for layer, spec in allowed.items()}


def _layers(spec: str, everything: set[int]) -> set[int]:
    spec = re.sub(r"\([^)]*\)", "", spec).strip()  # "0, 1 (the safe torch loader)" -> "0, 1"
    if spec == "all":
        return set(everything)
    layers: set[int] = set()
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", part)
        assert match, f"{DOC.name}: layer table imports {spec!r} not understood (give 0, 1-4 or all)"
        low, high = int(match[1]), int(match[2] or match[1])
        layers.update(range(low, high + 1))
    return layers


def module_name(path: Path) -> str:
    """src/mergecl/merging/engine.py -> mergecl.merging.engine; a package's __init__ -> the package."""
    parts = ("mergecl", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_file(name: str) -> Path | None:
    """The file of mergecl module ``name`` (a package: its __init__.py), None when there is none."""
    base = PACKAGE.joinpath(*name.split(".")[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def layer_of(path: Path, places: dict[str, int]) -> int | None:
    relative = path.relative_to(PACKAGE)
    if len(relative.parts) > 1:
        return places.get(relative.parts[0] + "/")
    return places.get(relative.name)


def imported_modules(path: Path, text: str | None = None) -> list[tuple[int, str, bool]]:
    """(line, mergecl module, inside the facade's __getattr__) for every import of a mergecl module
    in ``path`` (its ``text`` if given)."""
    text = path.read_text(encoding="utf-8") if text is None else text
    tree = ast.parse(text, filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    facade_lines: set[int] = set()
    if path.relative_to(PACKAGE) == FACADE[0]:
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == FACADE[1]:
                facade_lines.update(range(node.lineno, node.end_lineno + 1))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y, from .. import z
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            # `from P import x` imports the submodule P.x when there is one, else P itself
            names = [
                f"{source}.{alias.name}" if module_file(f"{source}.{alias.name}") else source for alias in node.names
            ]
        else:
            continue
        for name in names:
            if name == "mergecl" or name.startswith("mergecl."):
                found.append((node.lineno, name, node.lineno in facade_lines))
    return found


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_doc_table_is_read():
    places, allowed = read_layer_table(DOC.read_text(encoding="utf-8"))
    assert places["merging/"] == 1 and places["errors.py"] == 0 and places["cli.py"] == 7
    assert allowed[0] == {0} and allowed[4] == {0, 2, 3} and allowed[7] == set(range(8))
    for name in ("options.py", "atomic.py", "distributed.py", "progress.py", "plugins.py", "__init__.py"):
        assert places.get(name) == 0, f"{name} belongs to layer 0 in {DOC.name}"


def test_every_module_has_a_layer():
    places, _ = read_layer_table(DOC.read_text(encoding="utf-8"))
    missing = [str(p.relative_to(PACKAGE)) for p in sources() if layer_of(p, places) is None]
    assert not missing, f"modules in no row of the layer table of {DOC.name}: {', '.join(missing)}"


def problems_of(path: Path, places: dict[str, int], allowed: dict[int, set[int]], text: str | None = None) -> list[str]:
    """'FILE:LINE: layer A imports MODULE (layer B); ...' for each import of ``path`` its row does not allow."""
    layer = layer_of(path, places)
    if layer is None:
        return []  # test_every_module_has_a_layer names it
    where = f"src/mergecl/{path.relative_to(PACKAGE)}"
    problems = []
    for line, name, facade in imported_modules(path, text):
        target = module_file(name)
        if target is None:
            problems.append(f"{where}:{line}: imports {name}, which does not exist")
            continue
        other = layer_of(target, places)
        if facade or other is None or other == layer or other in allowed[layer]:
            continue
        problems.append(
            f"{where}:{line}: layer {layer} imports {name} (layer {other}); "
            f"{DOC.name} allows layers {sorted(allowed[layer])}"
        )
    return problems


def test_no_module_imports_a_layer_its_row_does_not_allow():
    places, allowed = read_layer_table(DOC.read_text(encoding="utf-8"))
    problems = [problem for path in sources() for problem in problems_of(path, places, allowed)]
    assert not problems, f"imports against the layers of {DOC.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from mergecl.experiment.runner import run\n", ["mergecl.experiment.runner"]),
        ("def f():\n    import mergecl.training.loop as loop\n", ["mergecl.training.loop"]),
        ("from mergecl import distributed, __version__\n", ["mergecl.distributed", "mergecl"]),
        ("from ..experiment import config\n", ["mergecl.experiment.config"]),
        ("from . import rules\n", ["mergecl.merging.rules"]),
        ("import torch\nfrom collections import abc\n", []),
    ],
)
def test_imports_are_found(source, expected):
    """The parser sees absolute, relative, aliased and function-level imports (of a file placed as if
    it were src/mergecl/merging/x.py)."""
    assert [name for _, name, _ in imported_modules(PACKAGE / "merging" / "x.py", source)] == expected


def test_an_upward_import_is_named_with_file_and_line():
    places, allowed = read_layer_table(DOC.read_text(encoding="utf-8"))
    text = "import os\n\n\ndef late():\n    from mergecl.experiment import runner\n"
    assert problems_of(PACKAGE / "merging" / "x.py", places, allowed, text) == [
        "src/mergecl/merging/x.py:5: layer 1 imports mergecl.experiment.runner (layer 7); "
        "architecture.md allows layers [0]"
    ]
    # layer 0 may import layer 0 only: the progress bars may not reach for the training loop
    text = "from mergecl.training.loop import quiet\n"
    assert problems_of(PACKAGE / "progress.py", places, allowed, text) == [
        "src/mergecl/progress.py:1: layer 0 imports mergecl.training.loop (layer 4); architecture.md allows layers [0]"
    ]
