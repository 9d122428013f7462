"""mergecl.atomic, the atomic writes every layer uses: the target holds the old content or the new,
never a mix, and no temp file survives a failed write (kills mid-write: tests/adversarial)."""

import os

import pytest

from mergecl import atomic
from mergecl.atomic import TEMP_SUFFIX, atomic_directory, atomic_open, atomic_write_bytes, atomic_write_text


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_write_creates_the_parents_and_replaces_the_old_file(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    assert atomic_write_text(target, "first\r\n") == target
    assert target.read_bytes() == b"first\r\n"  # no newline translation
    atomic_write_bytes(target, b"\x00second")
    assert target.read_bytes() == b"\x00second"
    assert names(target.parent) == ["out.txt"]


def test_the_bytes_go_to_a_temp_beside_the_target_until_the_block_ends(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_open(target) as handle:
        handle.write(b"new")
        (temp,) = [n for n in names(tmp_path) if n != "out.bin"]
        assert temp.startswith(".out.bin.") and temp.endswith(TEMP_SUFFIX)  # the pattern clean-up knows
        assert target.read_bytes() == b"old"
        assert atomic.remove_stale_temps(target) == []  # a live writer's temp is left alone
    assert target.read_bytes() == b"new" and names(tmp_path) == ["out.bin"]


def test_a_new_file_gets_the_mode_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = atomic_write_text(tmp_path / "atomic.txt", "x")
    assert written.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_a_replaced_file_keeps_its_mode(tmp_path):
    target = tmp_path / "secret.txt"
    target.write_text("old")
    os.chmod(target, 0o600)
    atomic_write_text(target, "new")
    assert target.stat().st_mode & 0o777 == 0o600
    assert target.read_text() == "new"


def test_a_failed_rename_leaves_the_old_content_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "results.csv"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert names(tmp_path) == ["results.csv"]


def test_a_failed_write_leaves_no_file_at_all(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "x.bin", "not bytes")  # type: ignore[arg-type]
    assert names(tmp_path) == []


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as building:
        (building / "a.txt").write_text("one")
    assert names(target) == ["a.txt"]
    with pytest.raises(RuntimeError), atomic_directory(target) as building:
        (building / "b.txt").write_text("two")
        raise RuntimeError("failed half way")
    assert names(target) == ["a.txt"] and names(tmp_path) == ["model"]
    with atomic_directory(target) as building:
        (building / "b.txt").write_text("two")
    assert names(target) == ["b.txt"] and names(tmp_path) == ["model"]


def test_atomic_link_shares_the_bytes_or_says_it_cannot(tmp_path, monkeypatch):
    from mergecl.atomic import atomic_link

    source = tmp_path / "a.safetensors"
    source.write_bytes(b"tensors")
    target = tmp_path / "order1" / "task0.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"an older file of ours")
    assert atomic_link(source, target)
    assert target.read_bytes() == b"tensors" and os.stat(target).st_ino == os.stat(source).st_ino
    assert sorted(p.name for p in target.parent.iterdir()) == ["task0.safetensors"]  # no temp left

    def cannot(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cannot)
    other = tmp_path / "order2" / "task0.safetensors"
    assert not atomic_link(source, other) and not other.exists()


def test_write_behind_flushes_and_syncs_in_the_background_and_waits(tmp_path):
    path = tmp_path / "big.bin"
    with open(path, "wb") as handle:
        behind = atomic.WriteBehind(handle, every=1000)
        behind.wrote(handle.write(b"x" * 999))
        assert behind.thread is None and path.stat().st_size == 0  # still in the writer's buffer
        behind.wrote(handle.write(b"y" * 10))
        assert behind.thread is not None and path.stat().st_size == 1009  # flushed, syncing behind
        behind.wait()
        assert not behind.thread.is_alive()
    assert path.read_bytes() == b"x" * 999 + b"y" * 10
