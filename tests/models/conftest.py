"""Shared set-up for tests/models: never reach a model hub, find the shared real data."""

import os
from pathlib import Path

import pytest

# Set before transformers / huggingface_hub are imported (they read these once).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

_DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data next to the project (or $MERGECL_SHARED_DATA); skip when it is not there."""
    root = Path(os.environ.get("MERGECL_SHARED_DATA", _DEFAULT_DATA))
    if not root.is_dir():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"shared data not found at {root}")
    return root
