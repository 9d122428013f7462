"""Atomic writes: a reader sees the old file or the new one, never a half-written one.

Bytes go to a temp file in the target's own directory (so the final ``os.replace`` is a rename within
one file system, atomic on POSIX and Windows), are flushed and fsynced, and only then replace the
target; the directory is fsynced so the rename survives a crash. On any error (KeyboardInterrupt
too) the temp file is removed and the target is left untouched. Used by every layer that writes.

Temp files are named ``.NAME.<8 random characters>.tmp`` beside ``NAME`` and locked (flock) by the
process writing them, so ``remove_stale_temps`` can tell a killed writer's leftovers from a live one's.

A directory is replaced by swapping it with its complete replacement in one atomic exchange (Linux
``renameat2(RENAME_EXCHANGE)``, macOS ``renamex_np(RENAME_SWAP)``): at every instant the path holds
the old directory or the new one, in full. Where the file system cannot swap, two renames go through
a backup name, ``.NAME.mergecl-old``: a kill between them leaves the old directory there, and the next
``atomic_directory`` on the same path puts it back first (``recover``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows: no flock, and then no stale-temp clean-up
    fcntl = None

TEMP_SUFFIX = ".tmp"
BACKUP_SUFFIX = ".mergecl-old"
STALE_AFTER_S = 10.0  # an unlocked temp younger than this may be one whose writer has yet to lock it


def _umask() -> int:
    umask = os.umask(0o022)  # os.umask has no getter: set and restore
    os.umask(umask)
    return umask


def _new_file_mode() -> int:
    # mkstemp creates 0600 files; give what a plain open() would
    return 0o666 & ~_umask()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not possible on every platform: best effort
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` without waiting; False if another process holds it."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # EWOULDBLOCK, or a file system without locks
        return False
    return True


def _temp_pattern(name: str) -> re.Pattern:
    # exactly mkstemp's names for this target: '.NAME.' + 8 characters + '.tmp'
    return re.compile(rf"\.{re.escape(name)}\.[A-Za-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}")


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files (or directories) that killed writes of ``path`` left beside it.

    Only names of this writer's pattern for this very target are considered, and of those only the
    unlocked ones (a live writer holds its lock; the kernel drops it when the writer dies) that are
    older than ``STALE_AFTER_S``. Symbolic links are never followed or removed. Returns what went.
    """
    target = Path(path)
    pattern = _temp_pattern(target.name)
    try:
        names = [n for n in os.listdir(target.parent) if pattern.fullmatch(n)]
    except OSError:
        return []
    return [target.parent / n for n in names if remove_if_abandoned(target.parent / n)]


def remove_if_abandoned(path: Path, min_age_s: float = STALE_AFTER_S) -> bool:
    """Delete one temp (file or directory) unless its writer is alive (it holds the temp's flock)
    or it is younger than ``min_age_s``; never through a symbolic link. True if it went."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False  # gone already, a symbolic link, or not ours to read
    try:
        info = os.fstat(fd)
        if time.time() - info.st_mtime < min_age_s or not _try_lock(fd):
            return False
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
            return False  # the name was reused since we opened it
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class WriteBehind:
    """Start putting a file's written bytes on disk while more are being written, so that the fsync
    that makes it durable finds little left to wait for (a 0.4 GB checkpoint's fsync took ~0.8 s
    at the end of a merge; done behind, it overlaps the computing). ``wrote(n)`` after each write;
    every ``every`` bytes the file is flushed and ``fdatasync`` runs in a background thread (one at
    a time); ``wait()`` before the final fsync. A failed background sync is left to that fsync."""

    def __init__(self, handle: BinaryIO, every: int = 64 << 20) -> None:
        self.handle = handle
        self.every = every
        self.pending = 0
        self.thread: threading.Thread | None = None

    def wrote(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending < self.every or (self.thread is not None and self.thread.is_alive()):
            return
        self.handle.flush()
        self.pending = 0
        self.thread = threading.Thread(target=self._sync, args=(self.handle.fileno(),), daemon=True)
        self.thread.start()

    @staticmethod
    def _sync(fd: int) -> None:
        with contextlib.suppress(OSError):
            getattr(os, "fdatasync", os.fsync)(fd)

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temp file for binary writing; it replaces ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = target.stat().st_mode & 0o777 if target.exists() else _new_file_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        _try_lock(fd)  # held until the file is closed: remove_stale_temps leaves it alone
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; create the parent folder if needed. Returns the path."""
    with atomic_open(path) as handle:
        handle.write(data)
    return Path(path)


def atomic_link(source: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Make ``path`` a hard link to the file ``source`` (one copy on disk), atomically: linked at a
    temp name, then moved into place. False, with nothing changed, where the file system cannot
    (another device, no hard links): the caller copies instead. Only for files written whole and
    replaced, never edited in place (mergecl's own), since both names share the bytes."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    try:
        os.link(source, tmp)
    except OSError:
        return False
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)
    return True


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` atomically (no newline translation: what you pass is what lands)."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temp name; it takes ``path``'s place only if the block succeeds.

    An existing directory at ``path`` is replaced: swapped with the new one in one atomic step where
    the file system can, else moved to the backup name first (see the module docstring), and
    removed after the swap.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    if _backup(target).is_dir() and not _backup(target).is_symlink():
        shutil.rmtree(_backup(target))  # killed after its swap: the new directory is in place
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent))
    lock = os.open(tmp, os.O_RDONLY)
    try:
        _try_lock(lock)  # held until the swap: remove_stale_temps leaves it alone
        yield tmp
        os.chmod(tmp, _new_file_mode() | 0o111 & ~_umask())  # mkdtemp makes 0700
        if not os.path.lexists(target):
            os.replace(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # the old directory, now under the temp name
        else:
            backup = _backup(target)
            os.replace(target, backup)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    _fsync_dir(target.parent)


def _backup(target: Path) -> Path:
    return target.with_name(f".{target.name}{BACKUP_SUFFIX}")


def recover(path: str | os.PathLike) -> None:
    """Undo what a kill between the two renames of a replacement left: ``path`` missing and the old
    directory under the backup name. It goes back (a rename: nothing is deleted)."""
    target = Path(path)
    backup = _backup(target)
    if not os.path.lexists(target) and backup.is_dir() and not backup.is_symlink():
        os.replace(backup, target)


_RENAME_EXCHANGE = 2  # Linux renameat2 flag; macOS's RENAME_SWAP has the same value
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        done = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        done = libc.renamex_np(os.fsencode(a), os.fsencode(b), _RENAME_EXCHANGE)
    else:
        return False
    if done == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # e.g. a file system without exchange: the caller renames in two steps
    raise OSError(code, os.strerror(code), str(a), None, str(b))
