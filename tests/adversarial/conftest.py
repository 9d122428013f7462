"""The adversarial suite (issue 12): every test here is marked ``adversarial`` (``pytest -m adversarial``)."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "/adversarial/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.adversarial)
