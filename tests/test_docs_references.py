"""The repository documents its methods itself and points only inside itself.

(a) No tracked text file names a path outside the repository (a workspace folder, the methods spec
    that used to live beside it, an absolute path into this checkout's machine).
(b) Every ``docs/methods.md#anchor`` written anywhere in the repository, and every ``(#anchor)`` link
    inside docs/methods.md, is a heading of docs/methods.md (GitHub's anchor rules).
(c) Every built-in merge rule and training method has a section in docs/methods.md, generated from
    the registries, and the summary tables there state the defaults the option schemas have: a new
    rule, method or option without documentation fails here.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS_DOC = ROOT / "docs" / "methods.md"
THIS_FILE = "tests/test_docs_references.py"  # it spells the forbidden strings out, to look for them

# Strings that point outside the repository. Built from pieces where they would otherwise name a
# real path of this machine; the checkout's own absolute path is added at run time.
FORBIDDEN = ("../shared", "/work/shared", "METHODS" + ".md")
FORBIDDEN_PATTERNS = (
    re.compile(r"(?<![\w.~-])/work/"),  # the workspace this repository is developed in
    re.compile(r"(?<![\w.~-])/home/[^/\s]+/"),  # someone's home directory
    re.compile(r"(?<![\w.~-])/Users/[^/\s]+/"),
)

# (file, string) pairs that may stay. tests/conftest.py is the tests' data lookup helper: the full
# real data sets (CLINC150, Banking77, the ResNet weights) are too large to ship, so the helper reads
# $MERGECL_DATA and, when it is unset, the workspace's data folder beside the repository; that is
# test-only (the library itself never looks outside the repository) and its comment names the folder.
ALLOWED = {("tests/conftest.py", "../shared/data")}


def tracked_files() -> list[str]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    return [name for name in listed.decode("utf-8").split("\0") if name]


def read_text(name: str) -> str | None:
    """The file's text, or None for a binary file (or one deleted in the working tree)."""
    try:
        data = (ROOT / name).read_bytes()
    except OSError:
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def tracked_texts() -> dict[str, str]:
    texts = {name: read_text(name) for name in tracked_files()}
    return {name: text for name, text in texts.items() if text is not None}


# --- (a) nothing outside the repository ---------------------------------------------------------


def outside_references(name: str, text: str, checkout: Path = ROOT) -> list[str]:
    """'file:line: what' for every reference to a path outside the repository in ``text``."""
    forbidden = [*FORBIDDEN, f"{checkout}/", f"{checkout.parent / 'shared'}"]
    allowed = [string for file, string in ALLOWED if file == name]
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        hits = [string for string in forbidden if string in line]
        hits += [match.group() for pattern in FORBIDDEN_PATTERNS for match in pattern.finditer(line)]
        for hit in hits:
            if not any(hit in ok and ok in line for ok in allowed):
                found.append(f"{name}:{number}: {hit!r}")
    return found


def test_no_tracked_file_points_outside_the_repository():
    found = []
    for name, text in tracked_texts().items():
        if name != THIS_FILE:
            found += outside_references(name, text)
    assert not found, "paths outside the repository:\n" + "\n".join(found)


def test_the_outside_check_finds_what_it_should():
    # a workspace path, the old spec, an absolute path; the helper's data folder only in conftest.py
    bad = "see ../shared/spec and METHODS" + ".md §2, or /work/main/x, /home/alice/y"
    found = " ".join(outside_references("src/x.py", bad))
    for hit in ("'../shared'", "'METHODS" + ".md'", "'/work/'", "'/home/alice/'"):
        assert hit in found
    assert outside_references("tests/conftest.py", "# else ../shared/data next to the repository") == []
    assert outside_references("src/x.py", "# else ../shared/data next to the repository") != []
    assert outside_references("docs/x.md", "root: /data/mnist, out: /tmp/run, docs/methods.md#magmax") == []


# --- (b) anchors --------------------------------------------------------------------------------


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: link text kept, lower case, every character that is not a
    letter, digit, '_', '-' or space dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def headings(markdown: str) -> list[tuple[int, str, str]]:
    """(level, text, anchor) of every ATX heading outside fenced code blocks; repeated anchors get
    -1, -2, ... as on GitHub."""
    out: list[tuple[int, str, str]] = []
    seen: dict[str, int] = {}
    fence = None
    for line in markdown.splitlines():
        marker = re.match(r"^\s*(```|~~~)", line)
        if marker:
            fence = None if fence == marker.group(1) else (fence or marker.group(1))
            continue
        match = None if fence else re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if match:
            anchor = github_anchor(match.group(2))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            out.append((len(match.group(1)), match.group(2), anchor if count == 0 else f"{anchor}-{count}"))
    return out


def methods_doc() -> str:
    assert METHODS_DOC.is_file(), "docs/methods.md is missing"
    return METHODS_DOC.read_text(encoding="utf-8")


def test_github_anchor_rules():
    assert github_anchor("`magmax`") == "magmax"
    assert github_anchor("`became` (merge rule)") == "became-merge-rule"
    assert github_anchor("`lam: auto`") == "lam-auto"
    assert github_anchor("MagMax paper's claims") == "magmax-papers-claims"
    assert github_anchor("`gpm_one_over_t`") == "gpm_one_over_t"
    assert [h[2] for h in headings("# A\n```\n# not a heading\n```\n## A\n")] == ["a", "a-1"]


def test_every_methods_anchor_exists():
    anchors = {anchor for _, _, anchor in headings(methods_doc())}
    missing = []
    for name, text in tracked_texts().items():
        for number, line in enumerate(text.splitlines(), 1):
            for anchor in re.findall(r"methods\.md#([\w-]+)", line):
                if anchor not in anchors and name != THIS_FILE:
                    missing.append(f"{name}:{number}: methods.md#{anchor}")
    for number, line in enumerate(methods_doc().splitlines(), 1):  # links inside the document
        for anchor in re.findall(r"\]\(#([^)]+)\)", line):
            if anchor not in anchors:
                missing.append(f"docs/methods.md:{number}: #{anchor}")
    assert not missing, "anchors that docs/methods.md does not have:\n" + "\n".join(missing)


# --- (c) every rule and method documented -------------------------------------------------------


def builtin_rules() -> dict:
    from mergecl.merging import all_rules

    # tests register rules of their own (tests/test_plugins.py): only mergecl's are checked here
    return {name: rule for name, rule in all_rules().items() if rule.fn.__module__.startswith("mergecl.")}


def builtin_trainings() -> dict:
    import mergecl.methods  # noqa: F401  (the built-in trainings register on import)
    from mergecl.methods import trainings

    owners = trainings._OWNERS  # the module that registered each training; tests register their own
    return {
        training.method: training
        for name, training in trainings.TRAININGS.items()
        if owners.get(name, "").startswith("mergecl.")
    }


def part(markdown: str, title: str) -> str:
    """The text of the level-2 section ``title`` (up to the next level-2 heading)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, re.S | re.M)
    assert match, f"docs/methods.md has no '## {title}' section"
    return match.group(1)


def documented_names(section: str) -> set[str]:
    """The first code span of every level-3 heading of a section: '### `magmax`' -> magmax."""
    names = set()
    for level, text, _ in headings(section):
        match = re.match(r"`([^`]+)`", text)
        if level == 3 and match:
            names.add(match.group(1))
    return names


def table_rows(section: str) -> dict[str, list[str]]:
    """Table rows of a section by the first code span of their first cell: name -> the cells."""
    rows = {}
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            match = re.search(r"`([^`]+)`", cells[0])
            if match:
                rows[match.group(1)] = cells
    return rows


def same_default(text: str, default) -> bool:
    """Whether a table's default (``1e6``, ``262,144``, ```global```, ``true``) is the schema's."""
    if default is None:
        return True  # said in words ("the rule's", "the train section's")
    text = text.strip().strip("`").replace(",", "")
    if isinstance(default, bool):
        return text.lower() == str(default).lower()
    if isinstance(default, int | float):
        try:
            return float(text) == float(default)
        except ValueError:
            return False
    return text == str(default)


def option_defaults(cell: str) -> dict[str, str]:
    """'`keep` (0.2), `scope` (`global`)' -> {'keep': '0.2', 'scope': '`global`'}."""
    return dict(re.findall(r"`(\w+)` \(([^)]*)\)", cell))


def check_options(where: str, schema, cell: str, section: str) -> list[str]:
    problems = []
    stated = option_defaults(cell)
    for option, field in schema.model_fields.items():
        if f"`{option}`" not in section:
            problems.append(f"{where}: option `{option}` is not documented")
        elif option in stated and not same_default(stated[option], field.default):
            problems.append(f"{where}: option `{option}` says {stated[option]}, the schema {field.default!r}")
    return problems


def test_every_merge_rule_is_documented_with_its_defaults():
    from mergecl.merging.engine import EngineOptions

    section = part(methods_doc(), "Merge rules")
    documented = documented_names(section)
    rows = table_rows(section)
    problems = []
    for name, rule in builtin_rules().items():
        if name not in documented:
            problems.append(f"merge rule '{name}': no '### `{name}`' section under '## Merge rules'")
        if name not in rows:
            problems.append(f"merge rule '{name}': no row in the rules table")
            continue
        cells = rows[name]
        lam = "computed" if rule.lam is None else rule.lam
        if not (cells[1] == lam if rule.lam is None else same_default(cells[1], lam)):
            problems.append(f"merge rule '{name}': the table says lam {cells[1]}, the rule {lam}")
        problems += check_options(f"merge rule '{name}'", rule.options, cells[2], section)
        if cells[4] != ("yes" if rule.continual else "no"):
            problems.append(f"merge rule '{name}': the table's CL method column says {cells[4]}")
    if "dare" not in documented:
        problems.append("DARE (the engine's `dare` option) has no '### `dare`' section")
    for option, field in EngineOptions.model_fields.items():
        cells = next((cells for key, cells in rows.items() if key == option or f"`{option}`" in cells[0]), None)
        if cells is None:
            problems.append(f"merge option `{option}`: no row in 'Options of every merge'")
        elif not same_default(cells[1], field.default):
            problems.append(f"merge option `{option}`: the table says {cells[1]}, the schema {field.default!r}")
    assert not problems, "\n".join(problems)


def test_every_training_method_is_documented_with_its_defaults():
    section = part(methods_doc(), "Training methods")
    documented = documented_names(section)
    rows = table_rows(section)
    problems = []
    trainings = builtin_trainings()
    assert {"seq_ft", "ind_ft", "became", "pam"} <= set(trainings)
    for method, training in trainings.items():
        if method not in documented:
            problems.append(f"training method '{method}': no '### `{method}`' section under '## Training methods'")
        if method not in rows:
            problems.append(f"training method '{method}': no row in the training methods table")
            continue
        cells = rows[method]
        if cells[1].strip("`") != training.name:
            problems.append(f"training method '{method}': the table names training {cells[1]}, not {training.name}")
        start = "previous model" if training.continues else ("no training" if training.step is None else "theta_0")
        if start not in cells[2].replace("$\\theta_0$", "theta_0"):
            problems.append(f"training method '{method}': the table says it starts from {cells[2]}, not {start}")
        problems += check_options(f"training method '{method}'", training.options, cells[3], section)
    assert not problems, "\n".join(problems)


def test_cl_method_names_are_documented():
    from mergecl.methods.registry import MergeMethodOptions

    section = part(methods_doc(), "CL method names")
    for option in MergeMethodOptions.model_fields:
        assert f"`{option}" in section, f"the CL merge option `{option}` is not documented"
    for name in ("`RULE`", "`ind_ft+RULE`", "`seq_ft+RULE`", "`NAME@TAG`", "`lam: auto`", "`space: dense`"):
        assert name in section, f"{name} is not documented under '## CL method names'"
