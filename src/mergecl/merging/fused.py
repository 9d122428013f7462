"""Fused fold steps: one pass over a checkpoint's chunk instead of torch's three to six.

A folding rule's step over a task vector, e.g. MagMax's, costs torch a pass per op (widen theta_t,
subtract the base, two abs, a compare, a lerp), each bound by the core's cache bandwidth. fused.c
does the same ops in one loop, in the same order and rounding, so the results are the same bits.
A rule declares which step is its running update (``register_rule(..., fused="magmax")``).

The C file ships with mergecl and is compiled on first use by the system's C compiler (``$CC``,
else ``cc``) into the user's cache (``$XDG_CACHE_HOME/mergecl``, else ``~/.cache/mergecl``), one
library per source, flags, compiler and CPU (it is built for this CPU: a home shared by machines
of other CPUs gets one each). Without a compiler, with a compile that fails, with a cache another
user could write, or with ``MERGECL_FUSED=0``, ``library()`` is None and the engine runs torch's
ops: slower, the same numbers.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("fused.c")
STEPS = ("sum", "magmax")  # the running updates fused.c has (besides "first": state = theta - base)
MAX_PICKED_TASKS = 256  # "pick": task indices as bytes
DTYPES = {torch.bfloat16: "bf16", torch.float32: "f32"}  # checkpoint dtypes it reads (state and base: fp32)
# -ffp-contract=off: no fused multiply-add, so every rounding is torch's; -march=native: this CPU's
# vector units (the library's name carries the CPU)
FLAGS = ("-O3", "-march=native", "-fno-fast-math", "-ffp-contract=off", "-fPIC", "-shared")
COMPILE_TIMEOUT_S = 120


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled steps, compiled now if this CPU's library is not cached yet; None where they
    cannot be had (the engine then uses torch's ops)."""
    if os.environ.get("MERGECL_FUSED", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc")
    if not compiler:
        return None
    try:
        return _load(_built(compiler))
    # RuntimeError: no home folder to cache in; AttributeError: a library without the steps
    except (OSError, subprocess.SubprocessError, RuntimeError, AttributeError):
        return None


def step(name: str, state: Tensor, theta: Tensor, base: Tensor) -> None:
    """``state`` = the rule's step ``name`` ("first": theta - base) over ``theta`` (stored dtype) and
    ``base`` (fp32), in place; all three contiguous, on the CPU, of one length."""
    kernel = getattr(library(), f"{name}_{DTYPES[theta.dtype]}")
    kernel(state.data_ptr(), theta.data_ptr(), base.data_ptr(), state.numel())


def draw_tasks(picks: Tensor, seed: int, num_tasks: int) -> None:
    """``picks`` (uint8) = torch.randint(num_tasks, picks.shape, generator=manual_seed(seed)), the
    same values, drawn by fused.c's MT19937 (torch's CPU generator), 4-10x faster."""
    library().randint_u8(picks.data_ptr(), picks.numel(), seed, num_tasks)


def pick(state: Tensor, theta: Tensor, base: Tensor, picks: Tensor, task: int) -> int:
    """``state`` = theta - base where ``picks`` == ``task``; returns how many entries of ``theta``
    (all of them, picked or not) are not finite."""
    kernel = getattr(library(), f"pick_{DTYPES[theta.dtype]}")
    return kernel(state.data_ptr(), theta.data_ptr(), base.data_ptr(), picks.data_ptr(), state.numel(), task)


def _cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mergecl"


def _cpu() -> str:
    """What the library is built for: the CPU's model and flags (Linux), else the platform's words."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _compiler_identity(compiler: str) -> bytes:
    """The compiler as a file (where it resolves to, its size and time): a new or upgraded compiler
    gets a library of its own, and no process is started to ask its version at every merge."""
    path = Path(shutil.which(compiler) or compiler).resolve()
    info = path.stat()
    return f"{path} {info.st_size} {info.st_mtime_ns}".encode()


def _built(compiler: str) -> Path:
    parts = [SOURCE.read_bytes(), " ".join(FLAGS).encode(), _compiler_identity(compiler), _cpu().encode()]
    key = hashlib.sha256(b"\0".join(parts))
    folder = _cache()
    path = folder / f"fused-{key.hexdigest()[:16]}.so"
    if not path.exists():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:  # compiled aside, then renamed in
            made = Path(scratch) / path.name
            command = [compiler, *FLAGS, str(SOURCE), "-o", str(made), "-lm"]
            subprocess.run(command, check=True, capture_output=True, timeout=COMPILE_TIMEOUT_S)
            os.replace(made, path)
    return path


def _load(path: Path) -> ctypes.CDLL | None:
    for owned in (path.parent, path):  # code loaded into this process: only ours, writable only by us
        info = owned.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            return None
    lib = ctypes.CDLL(str(path))
    for suffix in DTYPES.values():
        for name in ("first", *STEPS):
            kernel = getattr(lib, f"{name}_{suffix}")
            kernel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
            kernel.restype = None
        kernel = getattr(lib, f"pick_{suffix}")
        kernel.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long, ctypes.c_long]
        kernel.restype = ctypes.c_long
    lib.randint_u8.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_uint32, ctypes.c_uint32]
    lib.randint_u8.restype = None
    return lib
