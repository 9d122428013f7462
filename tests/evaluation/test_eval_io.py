"""Atomic writes: the target is the old file or the new one, and no temporary file survives."""

import os

import pytest

from mergecl import atomic as _io
from mergecl.atomic import atomic_write_bytes, atomic_write_text


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_writes_creates_parents_and_overwrites(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    assert atomic_write_text(target, "first\r\n") == target
    assert target.read_bytes() == b"first\r\n"  # no newline translation
    atomic_write_bytes(target, b"\x00second")
    assert target.read_bytes() == b"\x00second"
    assert _names(target.parent) == ["out.txt"]


def test_new_file_gets_the_mode_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = atomic_write_text(tmp_path / "atomic.txt", "x")
    assert atomic.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_existing_file_keeps_its_mode(tmp_path):
    target = tmp_path / "secret.txt"
    target.write_text("old")
    os.chmod(target, 0o600)
    atomic_write_text(target, "new")
    assert target.stat().st_mode & 0o777 == 0o600
    assert target.read_text() == "new"


def test_failed_rename_leaves_old_content_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "results.csv"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(_io.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["results.csv"]


def test_failed_write_leaves_no_file_at_all(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "x.bin", "not bytes")  # type: ignore[arg-type]
    assert _names(tmp_path) == []
