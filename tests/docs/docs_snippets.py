"""Run the Python blocks of a docs page section in a fresh interpreter, as a user would paste them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"


def section_blocks(page: str, title: str) -> list[str]:
    """The ```python blocks under ``## title`` of docs/``page``, in order."""
    text = (DOCS / page).read_text(encoding="utf-8")
    parts = re.split(r"^## ", text, flags=re.M)
    matches = [p for p in parts[1:] if p.splitlines()[0].strip() == title]
    assert len(matches) == 1, f"docs/{page}: no single section '## {title}'"
    blocks = re.findall(r"^```python\n(.*?)^```", matches[0], flags=re.S | re.M)
    assert blocks, f"docs/{page} '## {title}': no python block"
    return blocks


def section_code(page: str, title: str) -> str:
    """The ```python blocks under ``## title`` of docs/``page``, joined in order."""
    return "\n".join(section_blocks(page, title))


def run_section(page: str, title: str, check: str, cwd: Path, timeout: float = 300) -> str:
    """Run the section's code, then ``check`` (more Python, in the same namespace), in a fresh
    interpreter in ``cwd``; return its stdout. A failure shows the code's stderr."""
    script = cwd / "snippet.py"
    script.write_text(section_code(page, title) + "\n\n# --- the test's checks ---\n" + check, encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", MERGECL_QUIET="1")
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"docs/{page} '## {title}' failed:\n{proc.stderr[-4000:]}"
    return proc.stdout
