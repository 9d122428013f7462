"""Small helpers shared by the model modules."""

from __future__ import annotations


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line, for MergeclError messages (library errors can span pages)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
