"""Lets the docs tests import their helper module (``from docs_snippets import run_section``): with
``--import-mode=importlib`` pytest puts no test folder on ``sys.path``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
