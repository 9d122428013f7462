"""open_clip is optional: only the error when it is missing is tested here (it cannot import here)."""

import sys

import pytest

from mergecl.errors import MergeclError
from mergecl.models import build_learner
from mergecl.models.open_clip import import_open_clip


def test_open_clip_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if open_clip_torch were not installed
    with pytest.raises(MergeclError, match="open_clip_torch") as info:
        build_learner({"name": "open_clip"}, ["a", "b"])
    assert "\n" not in str(info.value) and "mergecl[openclip]" in str(info.value)


def test_broken_open_clip_import_is_also_a_clear_error(monkeypatch, tmp_path):
    # What happens here with a real install: torchvision has no build for this torch and open_clip's
    # import dies with a RuntimeError. A fake package that fails the same way stands in for it.
    package = tmp_path / "open_clip"
    package.mkdir()
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "open_clip", raising=False)
    with pytest.raises(MergeclError, match="RuntimeError: operator torchvision::nms does not exist"):
        import_open_clip()
