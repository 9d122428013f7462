"""Reading and writing checkpoints tensor by tensor, chunk by chunk.

Readers share one small interface: ``keys()``, ``spec(key) -> (dtype, shape)``,
``read(key, start, stop)`` returning the flat elements [start, stop) of a tensor in its own dtype,
and ``close()`` (a reader is also a context manager: ``with open_checkpoint(path) as reader``).
The safetensors reader parses the header itself and reads byte ranges with plain file reads: no
mmap, so a merge's resident memory is what it holds, not every page of every input it touched.
It is the one way mergecl reads a .safetensors file: ``read_safetensors`` (a whole file, for the
model weights and the run directory's tensors) is built on it.

The writer streams a safetensors file: the header is known in advance from the tensors' dtypes and
shapes, so tensors can be written one chunk at a time in order. Files are written under a temp name
and renamed at the end (mergecl.atomic); a failed merge leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import stat
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from mergecl import __version__
from mergecl.atomic import WriteBehind, atomic_directory, atomic_open, recover, remove_stale_temps
from mergecl.errors import MergeclError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SHARD_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
# What marks an output as mergecl's own (only those may be replaced, and only with force):
MARKER_KEY = "mergecl"  # a .safetensors output: this metadata key, holding the version
MARKER_FILE = ".mergecl-output"  # a directory output: this file, {"mergecl": version, "files": [...]}


class CheckpointReader(Protocol):
    name: str

    def keys(self) -> list[str]: ...

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]: ...

    def read(self, key: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        """Flat elements [start, stop); may fill and return ``out`` (a buffer of that dtype and
        size) or return a read-only view. The caller must not modify the result in place."""
        ...

    def close(self) -> None:
        """Release the files the reader holds (again: nothing); reads after it fail."""
        ...

    def __enter__(self) -> CheckpointReader: ...

    def __exit__(self, *exc_info: object) -> None: ...


def numel(shape: Iterable[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


class _Closing:
    """``close()`` and the context manager of the readers (a reader of memory holds nothing)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class StateDictReader(_Closing):
    """An in-memory state dict; reads are views, no copies."""

    def __init__(self, state: Mapping[str, Tensor], name: str = "<state dict>") -> None:
        self.name = name
        self._state = state
        for key, value in state.items():
            if not isinstance(value, Tensor):
                raise MergeclError(f"{name}: entry {key!r} is a {type(value).__name__}, not a tensor")
            if not isinstance(key, str):
                raise MergeclError(f"{name}: tensor name {key!r} is not a string")
            if value.dtype not in DTYPE_NAMES or value.layout != torch.strided:
                raise MergeclError(f"{name}: tensor {key!r} is a {value.layout} {value.dtype} tensor, not supported")

    def keys(self) -> list[str]:
        return list(self._state)

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        tensor = self._state[key]
        return tensor.dtype, tuple(tensor.shape)

    def read(self, key: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        return self._state[key].detach().reshape(-1)[start:stop]


class SafetensorsReader(_Closing):
    """One .safetensors file, read by byte ranges. The header is checked as strictly as the
    safetensors library checks it (see ``_parse_header``), and duplicate JSON keys are refused.
    The file stays open until ``close()`` (or the end of a ``with`` block)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.name = str(path)
        self._file = _open_regular(self.path)
        try:
            self.metadata, self._entries = _parse_header(self.name, self._file)
        except BaseException:
            self._file.close()
            raise

    def keys(self) -> list[str]:
        return list(self._entries)

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        dtype, shape, _ = self._entries[key]
        return dtype, shape

    def read(self, key: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        dtype, _, offset = self._entries[key]
        if out is None or out.dtype != dtype or out.numel() != stop - start or not (out.is_cpu and out.is_contiguous()):
            out = torch.empty(stop - start, dtype=dtype)
        if out.numel() == 0:
            return out
        view = _byte_view(out)
        try:
            got = os.preadv(self._file.fileno(), [view], offset + start * dtype.itemsize)
        except OSError as err:  # e.g. EIO: say which file
            raise OSError(err.errno, err.strerror, self.name) from err
        if got != len(view):
            raise MergeclError(f"{self.name}: tensor {key!r} is truncated")
        return out

    def read_tensor(self, key: str) -> Tensor:
        """The whole tensor ``key``, in its dtype and shape (a fresh tensor)."""
        dtype, shape, _ = self._entries[key]
        return self.read(key, 0, numel(shape)).reshape(shape)

    def close(self) -> None:
        self._file.close()


def _open_regular(path: Path):
    """``path`` opened for reading; a MergeclError when it is missing or not a regular file (a FIFO
    or a device would block or never end: opened without blocking, checked, then read)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise MergeclError(f"{path}: no such file") from None
    except IsADirectoryError:  # Windows; on POSIX a directory opens and fails the check below
        raise MergeclError(f"{path}: not a regular file") from None
    handle = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        handle.close()
        raise MergeclError(f"{path}: not a regular file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return handle


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of a .safetensors file, in its own dtype and shape, on the CPU: the file is read
    by ``SafetensorsReader`` (as strict, the same one-line errors) and closed."""
    with SafetensorsReader(path) as reader:
        return {key: reader.read_tensor(key) for key in reader.keys()}


# --- strict parsing ------------------------------------------------------------------------------

MAX_HEADER = 100_000_000  # the safetensors library's limit
MAX_DIM = 2**63 - 1  # torch sizes are int64


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: a key given twice is an error (json keeps the last one silently)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(text: str) -> Any:
    """Strict JSON: duplicate keys and NaN/Infinity are errors."""
    return json.loads(text, object_pairs_hook=_unique, parse_constant=_not_json)


def _is_text(value: Any) -> bool:
    """A str the safetensors format can hold: valid Unicode (JSON escapes allow lone surrogates)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _naturals(value: Any, length: int | None = None) -> bool:
    """A list of non-negative integers (not bools, not floats) that torch can hold."""
    return (
        isinstance(value, list)
        and (length is None or len(value) == length)
        and all(type(v) is int and 0 <= v <= MAX_DIM for v in value)
    )


def _parse_header(name: str, handle) -> tuple[dict[str, str], dict[str, tuple[torch.dtype, tuple[int, ...], int]]]:
    """(metadata, {key: (dtype, shape, absolute byte offset)}) of an open .safetensors file.

    Checked: the header length is within the file and at most MAX_HEADER; the header is UTF-8 JSON,
    an object of objects with a known ``dtype``, a ``shape`` of non-negative integers and
    ``data_offsets`` [begin, end]; each byte range holds exactly shape x dtype size bytes; the ranges,
    sorted, start at 0, are contiguous (no overlap, no gap) and end exactly at the end of the file;
    ``__metadata__`` maps strings to strings; no key appears twice. Any failure: one MergeclError.
    """

    def invalid(reason: str) -> MergeclError:
        return MergeclError(f"{name}: not a valid safetensors file ({reason})")

    size = os.fstat(handle.fileno()).st_size
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise invalid(f"{size} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER:
        raise invalid(f"header length {header_len} is over the limit of {MAX_HEADER} bytes")
    if 8 + header_len > size:
        raise invalid(f"header length {header_len} runs past the end of the file ({size} bytes)")
    try:
        header = parse_json(handle.read(header_len).decode("utf-8"))
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise invalid(f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise invalid(f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not (isinstance(metadata, dict) and all(_is_text(k) and _is_text(v) for k, v in metadata.items())):
        raise invalid("__metadata__ is not a mapping of strings to strings")

    data_start, data_len = 8 + header_len, size - 8 - header_len
    ranges, entries = [], {}
    for key, entry in header.items():
        if not _is_text(key):
            raise invalid(f"tensor name {key!r} is not valid Unicode")
        if not isinstance(entry, dict):
            raise invalid(f"tensor {key!r} is a JSON {type(entry).__name__}, not an object")
        dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype_name, str):
            raise invalid(f"tensor {key!r} has no dtype string")
        dtype = DTYPES.get(dtype_name)
        if dtype is None:
            raise MergeclError(f"{name}: tensor {key!r} has unsupported dtype {dtype_name!r}")
        if not _naturals(shape):
            raise invalid(f"tensor {key!r} has shape {shape!r}, not a list of non-negative integers")
        if not _naturals(offsets, 2) or offsets[0] > offsets[1]:
            raise invalid(f"tensor {key!r} has data_offsets {offsets!r}, not [begin, end] with begin <= end")
        nbytes = numel(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise invalid(
                f"tensor {key!r} has {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype_name} ({nbytes} bytes)"
            )
        ranges.append((offsets[0], offsets[1], key))
        entries[key] = (dtype, tuple(shape), data_start + offsets[0])

    end = 0
    for begin, stop, key in sorted(ranges):
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else "leaves a gap after the tensor before it"
            raise invalid(f"tensor {key!r} at bytes [{begin}, {stop}) {what}")
        if stop > data_len:
            raise MergeclError(f"{name}: tensor {key!r} is truncated (bytes [{begin}, {stop}) of {data_len})")
        end = stop
    if end != data_len:
        raise invalid(f"{data_len - end} bytes after the last tensor are not described by the header")
    return metadata, entries


class ShardedReader(_Closing):
    """A Hugging Face style checkpoint directory: an index json mapping tensors to shard files.
    ``close()`` closes every shard's reader."""

    def __init__(self, directory: Path, index_name: str) -> None:
        self.name = str(directory)
        index_path = directory / index_name
        weight_map = _read_index(index_path)
        shards: dict[str, CheckpointReader] = {}
        self._shards = shards.values()
        self._owner: dict[str, CheckpointReader] = {}
        try:
            for key, shard in weight_map.items():
                if shard not in shards:
                    shards[shard] = open_checkpoint(_shard_path(directory, shard, index_path))
                if key not in shards[shard].keys():
                    raise MergeclError(f"{directory / shard}: tensor {key!r} listed in {index_name} is missing")
                self._owner[key] = shards[shard]
        except BaseException:
            self.close()
            raise

    def keys(self) -> list[str]:
        return list(self._owner)

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._owner[key].spec(key)

    def read(self, key: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        return self._owner[key].read(key, start, stop, out)

    def close(self) -> None:
        for shard in self._shards:
            shard.close()


def _read_index(index_path: Path) -> dict[str, str]:
    """The weight_map of a shard index: a JSON object whose "weight_map" maps tensor names to files."""
    try:
        index = parse_json(index_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise MergeclError(f"{index_path}: not a valid shard index ({err})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and all(_is_text(k) and _is_text(v) for k, v in weight_map.items())):
        raise MergeclError(f"{index_path}: not a valid shard index (no 'weight_map' mapping tensor names to files)")
    return weight_map


def _shard_path(directory: Path, shard: str, index_path: Path) -> Path:
    """A shard file named by an index, confined to the index's directory: no absolute path, no '..',
    and no symbolic link leading out, but for the Hugging Face cache's own links from
    ``snapshots/REV/`` to the repository's ``blobs/``."""
    path = directory / shard
    root, real = directory.resolve(), path.resolve()
    inside = real != root and real.is_relative_to(root)
    hub_blob = root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs"
    if Path(shard).is_absolute() or ".." in Path(shard).parts or not (inside or hub_blob):
        raise MergeclError(f"{index_path}: shard file {shard!r} is outside the index's directory")
    if path.is_dir():
        raise MergeclError(f"{index_path}: shard file {shard!r} is a directory")
    return path


def load_torch_state_dict(path: Path) -> dict[str, Tensor]:
    """A .pt/.bin file loaded with weights_only=True: a pickle that would run code is refused.

    A top-level {"state_dict": {...}} (or {"model": {...}}) wrapper is unwrapped.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except FileNotFoundError:
        raise MergeclError(f"{path}: no such file") from None
    except OSError:
        raise  # the system's failure (permissions, I/O), not the file's
    except Exception as err:  # noqa: BLE001 - a malformed file fails torch.load in many ways
        text = str(err).strip()
        first = f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
        raise MergeclError(
            f"{path}: refused to load: not a plain tensor checkpoint loadable with weights_only=True "
            f"({first[:160]}); convert it to safetensors from a trusted environment"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise MergeclError(f"{path}: does not hold a flat dict of tensors")
    return obj


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def open_checkpoint(source: str | os.PathLike | Mapping[str, Tensor], name: str | None = None) -> CheckpointReader:
    """A reader for a state dict, a .safetensors file, a .pt/.bin file or a sharded directory; the
    caller closes it (``reader.close()``, or ``with open_checkpoint(...) as reader``)."""
    if isinstance(source, Mapping):
        return StateDictReader(source, name or "<state dict>")
    path = Path(source)
    if path.is_dir():
        for index, _ in ((SHARD_INDEX, 0), (TORCH_INDEX, 1)):
            if (path / index).exists():
                return ShardedReader(path, index)
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (path / single).exists():
                return open_checkpoint(path / single)
        raise MergeclError(f"{path}: directory holds no {SHARD_INDEX}, model.safetensors or pytorch_model.bin")
    if not path.exists():
        raise MergeclError(f"{path}: no such file")
    if not path.is_file():
        raise MergeclError(f"{path}: not a regular file")  # a FIFO or device would block or never end
    if path.suffix == ".safetensors":
        return SafetensorsReader(path)
    if path.suffix in (".pt", ".pth", ".bin", ".th", ".ckpt"):
        return StateDictReader(load_torch_state_dict(path), str(path))
    raise MergeclError(f"{path}: unknown checkpoint format (expected .safetensors, .pt, .bin or a directory)")


# --- writing -----------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 bytes (decimal units, as Hugging Face's max_shard_size)."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise MergeclError(f"size '{text}' not understood (examples: 500MB, 5GB)")
    number, unit = match.groups()
    return int(float(number) * 1000 ** "_KMGT".index(unit.upper() or "_"))


def _header(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict) -> bytes:
    header: dict = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    offset = 0
    for key, dtype, shape in specs:
        nbytes = numel(shape) * dtype.itemsize
        header[key] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(blob)) + blob


def _byte_view(tensor: Tensor):
    """The memory of a contiguous CPU tensor as a writable buffer of bytes, without a copy, for
    ``preadv`` and ``write``; the caller holds ``tensor`` while the view is used. A ctypes view: a
    numpy one costs 4x the time under the interpreter lock, which the other merge threads wait on
    at every read and write of a chunk."""
    return (ctypes.c_char * (tensor.numel() * tensor.element_size())).from_address(tensor.data_ptr())


def _write_stream(handle, specs, metadata: dict, chunks: Iterator[Tensor]) -> None:
    """Header, then each tensor's bytes pulled chunk by chunk from ``chunks`` (in spec order)."""
    handle.write(_header(specs, metadata))
    behind = WriteBehind(handle)
    try:
        for key, dtype, shape in specs:
            left = numel(shape)
            while left > 0:
                chunk = next(chunks)
                if chunk.dtype != dtype or chunk.numel() > left:
                    raise RuntimeError(f"chunk for '{key}' does not fit its tensor")
                chunk = chunk.contiguous()  # held here while its bytes are written
                behind.wrote(handle.write(_byte_view(chunk)))
                left -= chunk.numel()
    finally:
        behind.wait()  # before the caller's fsync, or its removal of the file


def plan_shards(
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int
) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Greedy split in order; a tensor bigger than the limit gets a shard of its own."""
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = numel(spec[2]) * spec[1].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_checkpoint(
    out: str | os.PathLike,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    chunks: Iterable[Tensor],
    metadata: dict,
    max_shard_size: str | int = "5GB",
    extra_files: Mapping[str, Path | bytes] | None = None,
) -> Path:
    """Stream ``chunks`` (every tensor's flat elements, in the order of ``specs``) to disk, atomically.

    ``out`` ending in .safetensors: one file. Anything else: a directory in the Hugging Face layout,
    ``model.safetensors`` or, above ``max_shard_size``, ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``, and ``extra_files`` (relative name -> a file to copy, or bytes:
    the config, tokenizer and model card that make the directory loadable). If ``chunks`` raises,
    nothing is left at ``out``.
    """
    try:
        return _write_checkpoint(Path(out), specs, iter(chunks), metadata, max_shard_size, extra_files or {})
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror, str(out)) from err  # e.g. ENOSPC: say what was being written


def _write_checkpoint(out: Path, specs, chunks: Iterator[Tensor], metadata: dict, max_shard_size, extra_files) -> Path:
    metadata = {MARKER_KEY: __version__, **metadata}
    remove_stale_temps(out)  # what earlier killed writes of this output left
    if out.suffix == ".safetensors":
        with atomic_open(out) as handle:
            _write_stream(handle, specs, metadata, chunks)
        return out
    shards = plan_shards(specs, parse_size(max_shard_size))
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    with atomic_directory(out) as directory:
        for name, shard in zip(names, shards, strict=True):
            with open(directory / name, "wb") as handle:
                _write_stream(handle, shard, metadata, chunks)
                handle.flush()
                os.fsync(handle.fileno())
        if n > 1:
            total = sum(numel(shape) * dtype.itemsize for _, dtype, shape in specs)
            weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key, _, _ in shard}
            index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
            _write_synced(directory / SHARD_INDEX, json.dumps(index, indent=2))
            names.append(SHARD_INDEX)
        for name, content in extra_files.items():
            target = directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                _write_synced(target, content)
            else:
                shutil.copyfile(content, target)  # a link in the source (an HF cache) is copied as a file
            names.append(name)
        _write_synced(directory / MARKER_FILE, json.dumps({MARKER_KEY: __version__, "files": names}))
    return out


def _write_synced(path: Path, text: str | bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(text.encode("utf-8") if isinstance(text, str) else text)
        handle.flush()
        os.fsync(handle.fileno())


# --- output checks -------------------------------------------------------------------------------


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], force: bool = False) -> None:
    """Refuse an output that would destroy what mergecl did not write.

    ``out`` may not be, lie inside or contain an input or the current directory, nor be a symbolic
    link; an existing non-empty ``out`` is replaced only with ``force`` and only if it is an earlier
    mergecl output (its marker, and in a directory no file the marker does not list). A directory
    output that a kill left under its backup name is put back first (mergecl.atomic.recover).
    """
    out = Path(out)
    if out.is_symlink():
        raise MergeclError(f"{out}: the output is a symbolic link; give the path it points to, or another")
    real = Path(os.path.realpath(out))
    for source in inputs:
        other = Path(os.path.realpath(source))
        if real == other or real.is_relative_to(other) or other.is_relative_to(real) or _same_file(out, source):
            raise MergeclError(f"{out}: the output would be, lie inside or contain the input {source}")
    if Path.cwd().resolve().is_relative_to(real):
        raise MergeclError(f"{out}: the output would be or contain the current directory")
    if out.suffix != ".safetensors":
        recover(out)
    if not os.path.lexists(out):
        return
    if out.suffix == ".safetensors":
        if not out.is_file():
            raise MergeclError(f"{out}: exists and is not a file (a .safetensors output is one file)")
        ours = _is_output_file(out)
    else:
        if not out.is_dir():
            raise MergeclError(f"{out}: exists and is not a directory (an output without .safetensors is one)")
        if not os.listdir(out):
            return  # an empty directory: nothing to lose
        ours = not _foreign_files(out)
    if not ours:
        raise MergeclError(f"{out}: exists and is not an output of mergecl (no marker); refusing to replace it")
    if not force:
        raise MergeclError(f"{out}: exists (an earlier mergecl output); pass --force (force=True) to replace it")


def _same_file(a: Path, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False  # one of them does not exist


def _is_output_file(path: Path) -> bool:
    try:
        with SafetensorsReader(path) as reader:
            return MARKER_KEY in reader.metadata
    except (MergeclError, OSError):
        return False


def _foreign_files(directory: Path) -> list[str]:
    """Paths in ``directory`` that its mergecl marker does not list as regular files (all of them
    when there is no readable marker); a folder counts as ours when everything in it is listed."""
    try:
        marker = parse_json((directory / MARKER_FILE).read_text(encoding="utf-8"))
        listed = set(marker["files"]) if isinstance(marker, dict) and isinstance(marker.get("files"), list) else set()
    except (OSError, ValueError, TypeError):
        return sorted(os.listdir(directory))
    listed.add(MARKER_FILE)
    foreign = []
    for root, folders, files in os.walk(directory):
        for name in sorted(files + [f for f in folders if os.path.islink(os.path.join(root, f))]):
            path = Path(root) / name
            relative = path.relative_to(directory).as_posix()
            if relative not in listed or path.is_symlink() or not path.is_file():
                foreign.append(relative)
    return foreign
